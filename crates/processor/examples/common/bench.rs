//! What the benchmark examples share: a throwaway server, and writers that keep putting while
//! a measured operation runs (to show how long that operation makes a writer wait).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgstate_testcluster::{Cluster, ClusterOptions};
use processor::state::{EnhancedPostgresBackend, StateBackend};
use tokio::task::JoinHandle;

/// A throwaway PostgreSQL without replicas or TLS, and its primary's URL.
pub fn throwaway() -> anyhow::Result<(Cluster, String)> {
    eprintln!("starting a throwaway PostgreSQL ...");
    let cluster = Cluster::start(ClusterOptions {
        replicas: 0,
        tls: false,
        ..ClusterOptions::default()
    })?;
    let url = format!("{}?sslmode=disable", cluster.primary_url());
    Ok((cluster, url))
}

/// Loads `rows` live entries into `table` with psql (keys `prefix` followed by 1 to `rows`,
/// 100-byte values), then `VACUUM ANALYZE`. (`maintenance_bench` loads its own mix.)
#[allow(dead_code)]
pub fn fill(cluster: &Cluster, table: &str, rows: u32, prefix: &str) -> anyhow::Result<()> {
    cluster.psql(
        0,
        &format!(
            "INSERT INTO {table} (key, value) SELECT convert_to('{prefix}' || i, 'UTF8'), \
             convert_to(repeat('v', 100), 'UTF8') FROM generate_series(1, {rows}) i"
        ),
    )?;
    cluster.psql(0, &format!("VACUUM ANALYZE {table}"))?;
    Ok(())
}

/// Tasks putting one entry after another until stopped.
pub struct Writers {
    stop: Arc<AtomicBool>,
    longest_us: Arc<AtomicU64>,
    puts: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Writers {
    /// Starts `n` tasks on `backend`; task `t`'s `i`-th put writes `entry(t, i)` (key, value).
    pub fn start(
        backend: &EnhancedPostgresBackend,
        n: u64,
        entry: fn(u64, u64) -> (String, Vec<u8>),
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let longest_us = Arc::new(AtomicU64::new(0));
        let puts = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|t| {
                let (b, stop, longest, puts) = (
                    backend.clone_handle(),
                    stop.clone(),
                    longest_us.clone(),
                    puts.clone(),
                );
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let (key, value) = entry(t, i);
                        let start = Instant::now();
                        b.put(key.as_bytes(), &value).await?;
                        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                        longest.fetch_max(us, Ordering::Relaxed);
                        puts.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        Writers {
            stop,
            longest_us,
            puts,
            tasks,
        }
    }

    /// Stops the tasks; the puts they completed and the longest single put.
    pub async fn stop(self) -> anyhow::Result<(u64, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok((
            self.puts.load(Ordering::Relaxed),
            Duration::from_micros(self.longest_us.load(Ordering::Relaxed)),
        ))
    }
}

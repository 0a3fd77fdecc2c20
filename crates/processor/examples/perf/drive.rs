//! Runs one workload from N tasks for a fixed time and measures throughput, latency
//! percentiles and the client's resident memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One operation of a workload: given the task's number and a random number, do one call.
pub type Op = Arc<
    dyn Fn(usize, u64) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send + Sync,
>;

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Calls completed per second in the measured window.
    pub calls_per_s: f64,
    /// Median call latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile call latency, microseconds.
    pub p99_us: f64,
    /// Highest resident set size of this process seen during the run, MiB.
    pub rss_mib: f64,
}

/// Warm-up before the measured window starts.
const WARMUP: Duration = Duration::from_millis(500);

/// Runs `op` from `tasks` tasks: `WARMUP`, then `seconds` measured.
pub async fn drive(tasks: usize, seconds: f64, op: Op) -> anyhow::Result<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let (op, stop, measuring) = (op.clone(), stop.clone(), measuring.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(t as u64 + 1) | 1;
            let mut lat: Vec<u32> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let start = Instant::now();
                op(t, rng).await?;
                if measuring.load(Ordering::Relaxed) {
                    lat.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(WARMUP).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let mut rss = rss_mib();
    let window = Duration::from_secs_f64(seconds);
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(100).min(window)).await;
        rss = rss.max(rss_mib());
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    all.sort_unstable();
    Ok(Sample {
        calls_per_s: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        rss_mib: rss,
    })
}

/// The `q` quantile of sorted latencies (0 when there are none).
pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i])
}

/// This process's resident set size, MiB (0 where `/proc` is missing).
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:") / 1024.0
}

fn proc_status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// A random index below `n`.
pub fn pick(rng: u64, n: u32) -> u32 {
    ((rng >> 11) % u64::from(n)) as u32
}

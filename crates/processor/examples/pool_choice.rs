//! The pool's foundation, measured: bb8 as it is, bb8 behind a first-come-first-served turn
//! (what `pool/conn_pool.rs` does), and deadpool, each over a fake manager (a connection is a
//! number, made at once), so that only the pools' own work is timed.
//!
//! `TASKS` tasks loop for `SECONDS` each: check a connection out, hold it (a few scheduler
//! yields: a statement's await points, without its network time; or `HOLD_MS` of sleep), give
//! it back. Printed per pool: checkouts per second, the spread of checkouts between tasks (a
//! starved task has few) and the waits for a connection (median, 99th percentile, longest).
//!
//! ```text
//! cargo run --release -p processor --example pool_choice
//! TASKS=64 CONNECTIONS=8 SECONDS=5 HOLD_MS=1 cargo run --release -p processor --example pool_choice
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// A connection that is a number: made at once, always valid.
struct Fake(AtomicU64);

impl bb8::ManageConnection for Fake {
    type Connection = u64;
    type Error = Infallible;

    async fn connect(&self) -> Result<u64, Infallible> {
        Ok(self.0.fetch_add(1, Relaxed))
    }

    async fn is_valid(&self, _: &mut u64) -> Result<(), Infallible> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u64) -> bool {
        false
    }
}

impl deadpool::managed::Manager for Fake {
    type Type = u64;
    type Error = Infallible;

    async fn create(&self) -> Result<u64, Infallible> {
        Ok(self.0.fetch_add(1, Relaxed))
    }

    async fn recycle(
        &self,
        _: &mut u64,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Infallible> {
        Ok(())
    }
}

/// The pools compared.
#[derive(Clone)]
enum Pool {
    Bb8(bb8::Pool<Fake>),
    Bb8Turn(bb8::Pool<Fake>, Arc<Semaphore>),
    Deadpool(deadpool::managed::Pool<Fake>),
}

impl Pool {
    fn name(&self) -> &'static str {
        match self {
            Pool::Bb8(_) => "bb8",
            Pool::Bb8Turn(..) => "bb8 + FCFS turn (ours)",
            Pool::Deadpool(_) => "deadpool",
        }
    }

    /// One checkout, held for `hold`; returns how long the connection took to come.
    async fn once(&self, hold: &Hold) -> Duration {
        let start = Instant::now();
        match self {
            Pool::Bb8(pool) => {
                let conn = pool.get().await.expect("no timeout is set");
                let waited = start.elapsed();
                hold.run().await;
                drop(conn);
                waited
            }
            Pool::Bb8Turn(pool, turns) => {
                let turn = turns.acquire().await.expect("never closed");
                let conn = pool.get().await.expect("no timeout is set");
                let waited = start.elapsed();
                hold.run().await;
                drop(conn);
                drop(turn);
                waited
            }
            Pool::Deadpool(pool) => {
                let conn = pool.get().await.expect("no timeout is set");
                let waited = start.elapsed();
                hold.run().await;
                drop(conn);
                waited
            }
        }
    }
}

/// How a task holds its connection.
enum Hold {
    Yields(u32),
    Sleep(Duration),
}

impl Hold {
    async fn run(&self) {
        match self {
            Hold::Yields(n) => {
                for _ in 0..*n {
                    tokio::task::yield_now().await;
                }
            }
            Hold::Sleep(d) => tokio::time::sleep(*d).await,
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `tasks` tasks on `pool` for `seconds`; prints one line.
async fn measure(pool: Pool, tasks: u64, seconds: u64, hold: Arc<Hold>) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (pool, hold) = (pool.clone(), hold.clone());
        handles.push(tokio::spawn(async move {
            let mut waits = Vec::new();
            while Instant::now() < deadline {
                waits.push(pool.once(&hold).await);
            }
            waits
        }));
    }
    let mut counts = Vec::new();
    let mut waits = Vec::new();
    for h in handles {
        let w = h.await.expect("task");
        counts.push(w.len());
        waits.extend(w);
    }
    waits.sort();
    counts.sort();
    let pick = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize];
    println!(
        "| {} | {:.0} | {} / {} | {:.0?} | {:.1?} | {:.1?} |",
        pool.name(),
        waits.len() as f64 / seconds as f64,
        counts[0],
        counts[counts.len() - 1],
        pick(0.5),
        pick(0.99),
        waits[waits.len() - 1],
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tasks = env("TASKS", 64);
    let connections = env("CONNECTIONS", 8) as u32;
    let seconds = env("SECONDS", 3);
    let hold = Arc::new(match env("HOLD_MS", 0) {
        0 => Hold::Yields(env("HOLD_YIELDS", 4) as u32),
        ms => Hold::Sleep(Duration::from_millis(ms)),
    });
    println!("{tasks} tasks, {connections} connections, {seconds} s each");
    println!(
        "| pool | checkouts/s | fewest / most per task | median wait | p99 wait | longest wait |"
    );
    println!("|---|---|---|---|---|---|");
    for round in 0..3 {
        let bb8 = || async {
            bb8::Pool::builder()
                .max_size(connections)
                .min_idle(Some(connections))
                .build(Fake(AtomicU64::new(0)))
                .await
                .expect("fake connections never fail")
        };
        let pools = [
            Pool::Bb8(bb8().await),
            Pool::Bb8Turn(bb8().await, Arc::new(Semaphore::new(connections as usize))),
            Pool::Deadpool(
                deadpool::managed::Pool::builder(Fake(AtomicU64::new(0)))
                    .max_size(connections as usize)
                    .build()
                    .expect("no runtime needed without timeouts"),
            ),
        ];
        // Alternate the order between rounds, so no pool always runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1, 2]
        } else {
            vec![2, 1, 0]
        };
        for i in order {
            measure(pools[i].clone(), tasks, seconds, hold.clone()).await;
        }
    }
}

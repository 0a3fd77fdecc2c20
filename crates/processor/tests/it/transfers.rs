//! Transfers between accounts under concurrent writers: the total of the balances is the
//! same at every instant, which is what checkpoint and restore tests check a state against.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use processor::state::{EnhancedPostgresBackend, IsolationLevel};
use tokio::task::JoinHandle;

/// Writers moving one unit at a time between accounts `acct:first` .. `acct:first+count-1`,
/// each move one SERIALIZABLE transaction (retried by the backend).
pub struct Transfers {
    stop: Arc<AtomicBool>,
    moves: Arc<AtomicU64>,
    writers: Vec<JoinHandle<()>>,
}

fn balance(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

impl Transfers {
    /// Starts `writers` tasks on `b`.
    pub fn start(b: &EnhancedPostgresBackend, first: u64, count: u64, writers: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let moves = Arc::new(AtomicU64::new(0));
        let writers = (0..writers)
            .map(|w| {
                let (b, stop, moves) = (b.clone_handle(), stop.clone(), moves.clone());
                tokio::spawn(async move {
                    let mut x = 0x9E37_79B9u64.wrapping_mul(w + 1);
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let from = format!("acct:{}", first + x % count).into_bytes();
                        let to = format!("acct:{}", first + (x >> 20) % count).into_bytes();
                        if from == to {
                            continue;
                        }
                        b.transaction(IsolationLevel::Serializable, |tx| {
                            let (from, to) = (from.clone(), to.clone());
                            Box::pin(async move {
                                let a = balance(tx.get(&from).await?);
                                let c = balance(tx.get(&to).await?);
                                tx.put(&from, (a - 1).to_string().as_bytes()).await?;
                                tx.put(&to, (c + 1).to_string().as_bytes()).await
                            })
                        })
                        .await
                        .unwrap();
                        moves.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Transfers {
            stop,
            moves,
            writers,
        }
    }

    /// The moves committed so far.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// Stops the writers (a failed one fails the test); the moves committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.writers {
            w.await.unwrap();
        }
        self.moves.load(Ordering::Relaxed)
    }
}

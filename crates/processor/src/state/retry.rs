//! Jittered exponential backoff and the small random source behind it, shared by the retry
//! loop of transactions, leader campaigns and listener reconnects; and the retry of a step
//! whose bounded lock wait ran out (maintenance DDL and batches).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state::error::{sqlstate, StateError, StateResult};

/// Whether `e` is a lock wait that ran out (`lock_timeout`, SQLSTATE `55P03`).
pub(crate) fn lock_busy(e: &StateError) -> bool {
    e.sqlstate() == Some(sqlstate::LOCK_NOT_AVAILABLE)
}

/// Runs `step` until it succeeds, fails otherwise than on a lock wait running out, or has run
/// `attempts` times (its last error is returned); waits 10 ms times the attempt's number
/// between runs. (A plain closure returning a future, not an async closure: the future of
/// the caller stays `Send`.)
pub(crate) async fn while_lock_busy<T, F, Fut>(attempts: u32, mut step: F) -> StateResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StateResult<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match step().await {
            Err(e) if lock_busy(&e) && attempt < attempts => {
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// Exponential backoff with jitter: uniform in [d/2, d] for d = base * 2^attempt, at most 5 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    const CAP: Duration = Duration::from_secs(5);
    let d = base.saturating_mul(1u32 << attempt.min(16)).min(CAP);
    let half = d / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(if nanos == 0 { 0 } else { random() % nanos })
}

/// A small xorshift generator; jitter needs spread, not cryptographic quality.
pub(crate) fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(10);
        for attempt in 0..30 {
            let d = backoff(base, attempt);
            let full = base
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(5));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}

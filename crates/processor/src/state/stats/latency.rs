//! Lock-free latency histograms: percentiles per operation kind, cheap enough to record on
//! every operation (one relaxed atomic add).
//!
//! Buckets are logarithmic with four per power of two: durations up to 3 µs are exact, every
//! other bucket spans at most a quarter of its lower bound, so a percentile read from a bucket's
//! upper end is at most 25% above the true value (and never below it).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Buckets per power of two.
const SUB: u64 = 4;
/// Enough buckets for any `u64` of microseconds.
const BUCKETS: usize = 64 * SUB as usize;

/// Counts of durations (in microseconds) by bucket.
pub(crate) struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
    }
}

/// The bucket of `us`.
fn bucket(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let exp = u64::from(63 - us.leading_zeros()); // floor(log2(us)), at least 2
    let fraction = (us >> (exp - 2)) & (SUB - 1);
    ((exp - 1) * SUB + fraction) as usize
}

/// The largest duration bucket `b` holds.
fn upper(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let exp = b / SUB + 1;
    let fraction = b % SUB;
    // In u128: the last bucket's end is 2^64 - 1.
    let end = (u128::from(SUB + fraction + 1) << (exp - 2)) - 1;
    u64::try_from(end).unwrap_or(u64::MAX)
}

impl Histogram {
    pub fn record(&self, us: u64) {
        self.counts[bucket(us)].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The durations at quantiles `qs` (each in 0..=1), in microseconds: for each, the upper
    /// end of the bucket where the running count reaches that share. Zeros when empty.
    pub fn quantiles(&self, qs: &[f64]) -> Vec<u64> {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        qs.iter()
            .map(|q| {
                if total == 0 {
                    return 0;
                }
                let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
                let mut seen = 0;
                for (b, n) in counts.iter().enumerate() {
                    seen += n;
                    if seen >= target {
                        return upper(b);
                    }
                }
                upper(BUCKETS - 1)
            })
            .collect()
    }
}

/// Latency percentiles of one kind of operation, from
/// [`BackendStats::latencies`](crate::state::BackendStats::latencies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpLatency {
    /// The operation kind (`get`, `put`, `delete`, `scan`, `count`, `clear`, `batch_put`,
    /// `batch_copy`, `query`).
    pub operation: String,
    /// Operations timed.
    pub count: u64,
    /// Median duration, in microseconds (at most 25% above the true value).
    pub p50_us: u64,
    /// 95th percentile, in microseconds.
    pub p95_us: u64,
    /// 99th percentile, in microseconds.
    pub p99_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_lands_in_a_bucket_whose_upper_end_bounds_it_within_a_quarter() {
        let mut samples: Vec<u64> = (0..5_000).collect();
        samples.extend((0..64).map(|s| 1u64 << s));
        samples.extend((1..64).map(|s| (1u64 << s) - 1));
        samples.extend([u64::MAX, u64::MAX - 1, 1_000_000, 123_456_789]);
        for us in samples {
            let b = bucket(us);
            assert!(b < BUCKETS, "{us}");
            let hi = upper(b);
            assert!(hi >= us, "{us} in bucket {b} up to {hi}");
            assert!(b == 0 || upper(b - 1) < us, "{us}: bucket {b} too high");
            assert!(hi - us <= us / 4 + 1, "{us} in bucket up to {hi}");
        }
    }

    #[test]
    fn quantiles_of_a_known_spread() {
        let h = Histogram::default();
        assert_eq!(h.quantiles(&[0.5]), vec![0]);
        for us in 1..=1000 {
            h.record(us);
        }
        assert_eq!(h.count(), 1000);
        let q = h.quantiles(&[0.5, 0.95, 0.99, 1.0]);
        for (got, want) in q.iter().zip([500u64, 950, 990, 1000]) {
            assert!(*got >= want && *got <= want + want / 4, "{got} for {want}");
        }
        assert!(q.windows(2).all(|w| w[0] <= w[1]));
    }
}

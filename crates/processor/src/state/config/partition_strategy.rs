//! [`PartitionStrategy`]: how the state table is partitioned (a setting; the catalog work is in
//! `partitions`).

use std::fmt;
use std::time::Duration;

use crate::state::error::{StateError, StateResult};
use crate::state::limits::MAX_KEY_LEN;

/// Most hash partitions accepted (PostgreSQL plans and locks every partition a statement
/// cannot prune, so thousands of them make scans and counts slow).
pub const MAX_HASH_PARTITIONS: u32 = 1024;

/// How the state table is partitioned, set with
/// [`EnhancedPostgresConfig::with_partitioning`](crate::state::EnhancedPostgresConfig::with_partitioning).
///
/// The state table stays one table to every operation: the same statements, the same primary
/// key on `key`, the same results. Partitions are ordinary tables named `<table>_p<i>` in the
/// same schema, each vacuumed and analyzed on its own.
///
/// Hash and list partition by `key` itself, so `key` stays the primary key. Time-range
/// partitions by the window of time in which an entry was last written; see
/// [`TimeRange`](Self::TimeRange) for how `key` stays unique there.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartitionStrategy {
    /// `PARTITION BY HASH (key)` into `partitions` partitions (2 to
    /// [`MAX_HASH_PARTITIONS`]): spreads rows, their indexes and their vacuum work evenly.
    /// A single-key operation touches one partition; scans and counts read all of them.
    Hash {
        /// How many partitions.
        partitions: u32,
    },
    /// One partition per listed key prefix (for example `b"orders:"`, `b"sessions:"`) and a
    /// default partition `<table>_pdefault` for every other key: each namespace of keys gets
    /// its own table, indexes, vacuum and statistics. A single-key operation touches one
    /// partition; a [`list_keys`](crate::state::StateBackend::list_keys) of a listed prefix
    /// reads only its partition.
    ///
    /// The partitions are key ranges (`PARTITION BY RANGE (key)`, from the prefix to the
    /// first key after all keys that start with it), which is what lets `key` stay the primary
    /// key. Prefixes are 1 to [`MAX_KEY_LEN`] bytes, at
    /// most [`MAX_LIST_PREFIXES`] of them, and none may start another (their ranges would
    /// overlap); the order of the list does not matter.
    List {
        /// The key prefixes, one partition each.
        prefixes: Vec<Vec<u8>>,
    },
    /// One partition per *write window*: consecutive spans of `interval` (aligned to the Unix
    /// epoch), each holding the entries last written while it was the current window.
    /// Every write, deletes and `clear()` included, puts its entry in the current window's
    /// partition (moving it there from an older one; `clear()` so moves every live entry), so a partition whose window ended more than the retention policy's
    /// `max_age` ago holds only entries not written since: retention drops it whole instead
    /// of deleting its rows, and so does expired-entry cleanup once none of its entries is
    /// live. Partitions are named `<table>_w<YYYYMMDDHH24MISS>` (the window's start, UTC).
    ///
    /// The table gets a column `write_window` (the window's start) and the primary key
    /// `(key, write_window)`. `key` stays unique because a write first moves the key's
    /// entry out of any older window, and the current window changes only under a lock every
    /// write takes shared: a statement whose snapshot predates a change of window fails with a
    /// serialization failure (`40001`), which single operations and
    /// [`transaction`](crate::state::EnhancedPostgresBackend::transaction) retry. Reads of a
    /// key look in every partition (one index probe each). The background cleanup task
    /// starts new windows and creates `premake` partitions ahead of the current one. An
    /// existing table cannot be converted to it online.
    TimeRange {
        /// Length of each window: whole seconds, from 1 second to 366 days.
        interval: Duration,
        /// Windows whose partitions are created ahead of the current one (1 to 100).
        premake: u32,
    },
}

/// Most key prefixes accepted by [`PartitionStrategy::List`].
pub const MAX_LIST_PREFIXES: usize = 1024;

/// Longest window of [`PartitionStrategy::TimeRange`].
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

impl PartitionStrategy {
    /// Checks the strategy's numbers.
    pub(crate) fn validate(&self) -> StateResult<()> {
        match self {
            PartitionStrategy::Hash { partitions } => {
                if !(2..=MAX_HASH_PARTITIONS).contains(partitions) {
                    return Err(StateError::config(format!(
                        "hash partitioning needs 2 to {MAX_HASH_PARTITIONS} partitions, not {partitions}"
                    )));
                }
            }
            PartitionStrategy::List { prefixes } => {
                if prefixes.is_empty() || prefixes.len() > MAX_LIST_PREFIXES {
                    return Err(StateError::config(format!(
                        "list partitioning needs 1 to {MAX_LIST_PREFIXES} key prefixes, not {}",
                        prefixes.len()
                    )));
                }
                let mut sorted: Vec<&Vec<u8>> = prefixes.iter().collect();
                sorted.sort();
                for p in &sorted {
                    if p.is_empty() || p.len() > MAX_KEY_LEN {
                        return Err(StateError::config(format!(
                            "a list partition's key prefix must be 1 to {MAX_KEY_LEN} bytes, not {}",
                            p.len()
                        )));
                    }
                }
                // Sorted, a prefix that starts another comes right before one it starts.
                for pair in sorted.windows(2) {
                    if pair[1].starts_with(pair[0]) {
                        return Err(StateError::config(format!(
                            "list partition prefixes overlap: {} starts {}",
                            shown(pair[0]),
                            shown(pair[1])
                        )));
                    }
                }
            }
            PartitionStrategy::TimeRange { interval, premake } => {
                if interval.subsec_nanos() != 0
                    || *interval < Duration::from_secs(1)
                    || *interval > MAX_WINDOW
                {
                    return Err(StateError::config(format!(
                        "a time-range window must be whole seconds from 1 s to 366 days, not {interval:?}"
                    )));
                }
                if !(1..=100).contains(premake) {
                    return Err(StateError::config(format!(
                        "time-range premake must be 1 to 100 windows, not {premake}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The `PARTITION BY` clause, as `pg_get_partkeydef` prints it.
    pub(crate) fn partition_by(&self) -> &'static str {
        match self {
            PartitionStrategy::Hash { .. } => "HASH (key)",
            PartitionStrategy::List { .. } => "RANGE (key)",
            PartitionStrategy::TimeRange { .. } => "RANGE (write_window)",
        }
    }

    /// Whether rows carry a write window (time-range partitioning).
    pub(crate) fn windowed(&self) -> bool {
        matches!(self, PartitionStrategy::TimeRange { .. })
    }

    /// Each partition: its name suffix and its bound clause (numbers only). None for
    /// time-range partitioning, whose partitions come and go with the windows.
    pub(crate) fn partitions(&self) -> Vec<(String, String)> {
        match self {
            PartitionStrategy::TimeRange { .. } => Vec::new(),
            PartitionStrategy::Hash { partitions } => (0..*partitions)
                .map(|i| {
                    (
                        format!("_p{i}"),
                        format!("FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i})"),
                    )
                })
                .collect(),
            PartitionStrategy::List { prefixes } => {
                let hex = |b: &[u8]| format!("decode('{}', 'hex')", to_hex(b));
                let mut parts: Vec<(String, String)> = prefixes
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let upper = after_prefix(p).map_or("MAXVALUE".to_string(), |u| hex(&u));
                        (
                            format!("_p{i}"),
                            format!("FOR VALUES FROM ({}) TO ({upper})", hex(p)),
                        )
                    })
                    .collect();
                parts.push(("_pdefault".to_string(), "DEFAULT".to_string()));
                parts
            }
        }
    }

    /// The bounds of [`partitions`](Self::partitions) as `pg_get_expr` prints them, sorted.
    fn printed_bounds(&self) -> Vec<String> {
        let mut bounds: Vec<String> = match self {
            PartitionStrategy::TimeRange { .. } => Vec::new(),
            PartitionStrategy::Hash { partitions } => (0..*partitions)
                .map(|i| format!("FOR VALUES WITH (modulus {partitions}, remainder {i})"))
                .collect(),
            PartitionStrategy::List { prefixes } => prefixes
                .iter()
                .map(|p| {
                    let upper = after_prefix(p)
                        .map_or("MAXVALUE".to_string(), |u| format!("'\\x{}'", to_hex(&u)));
                    format!("FOR VALUES FROM ('\\x{}') TO ({upper})", to_hex(p))
                })
                .chain(["DEFAULT".to_string()])
                .collect(),
        };
        bounds.sort();
        bounds
    }

    /// Whether a partitioned table whose key is `partkeydef` (as `pg_get_partkeydef` prints
    /// it) with partitions bounded by `bounds` (as `pg_get_expr` prints them), spanning
    /// `spans` seconds each when they are time ranges, has this strategy.
    pub(crate) fn matches(&self, partkeydef: &str, bounds: &[String], spans: &[f64]) -> bool {
        if let PartitionStrategy::TimeRange { interval, .. } = self {
            return partkeydef == self.partition_by()
                && spans.len() == bounds.len()
                && spans.iter().all(|s| *s == interval.as_secs_f64());
        }
        let mut bounds = bounds.to_vec();
        bounds.sort();
        partkeydef == self.partition_by() && bounds == self.printed_bounds()
    }
}

impl fmt::Display for PartitionStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionStrategy::Hash { partitions } => {
                write!(f, "hash partitioning by key into {partitions} partitions")
            }
            PartitionStrategy::List { prefixes } => write!(
                f,
                "list partitioning by key prefix into {} partitions",
                prefixes.len() + 1
            ),
            PartitionStrategy::TimeRange { interval, .. } => write!(
                f,
                "time-range partitioning by write window of {} s",
                interval.as_secs()
            ),
        }
    }
}

/// The least byte string greater than every string that starts with `prefix`: the prefix
/// with its trailing `0xFF` bytes dropped and its last byte incremented; `None` when it is all
/// `0xFF` (nothing is greater but the end of the range).
fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&b| b != 0xFF)?;
    let mut upper = prefix[..=keep].to_vec();
    upper[keep] += 1;
    Some(upper)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A prefix for an error message: text when it is printable ASCII, else hex.
fn shown(prefix: &[u8]) -> String {
    match std::str::from_utf8(prefix) {
        Ok(s) if s.chars().all(|c| c.is_ascii_graphic() || c == ' ') => format!("{s:?}"),
        _ => format!("0x{}", to_hex(prefix)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_partitions_are_validated_and_named() {
        for bad in [0, 1, MAX_HASH_PARTITIONS + 1] {
            let err = PartitionStrategy::Hash { partitions: bad }.validate();
            assert!(err.is_err(), "{bad}");
        }
        let s = PartitionStrategy::Hash { partitions: 3 };
        s.validate().unwrap();
        let parts = s.partitions();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[2].0, "_p2");
        assert_eq!(parts[2].1, "FOR VALUES WITH (MODULUS 3, REMAINDER 2)");
    }

    #[test]
    fn recognises_its_catalog_form() {
        let s = PartitionStrategy::Hash { partitions: 2 };
        let bounds = |m: u32| -> Vec<String> {
            (0..2)
                .map(|r| format!("FOR VALUES WITH (modulus {m}, remainder {r})"))
                .collect()
        };
        assert!(s.matches("HASH (key)", &bounds(2), &[]));
        assert!(!s.matches("HASH (key)", &bounds(4), &[]));
        assert!(!s.matches("LIST (key)", &bounds(2), &[]));
        assert!(!s.matches("HASH (key)", &bounds(2)[..1], &[]));
        let l = PartitionStrategy::List {
            prefixes: vec![b"or".to_vec(), vec![0xFF, 0xFF]],
        };
        let printed = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(l.matches(
            "RANGE (key)",
            &printed(&[
                "DEFAULT",
                "FOR VALUES FROM ('\\xffff') TO (MAXVALUE)",
                "FOR VALUES FROM ('\\x6f72') TO ('\\x6f73')",
            ]),
            &[]
        ));
        assert!(!l.matches("RANGE (key)", &printed(&["DEFAULT"]), &[]));
        let t = PartitionStrategy::TimeRange {
            interval: Duration::from_secs(3600),
            premake: 2,
        };
        t.validate().unwrap();
        let two = printed(&["a", "b"]);
        assert!(t.matches("RANGE (write_window)", &two, &[3600.0, 3600.0]));
        assert!(!t.matches("RANGE (write_window)", &two, &[3600.0, 60.0]));
        assert!(!t.matches("RANGE (key)", &two, &[3600.0, 3600.0]));
        for (interval, premake) in [(0.5, 2), (0.0, 2), (3600.0, 0), (3600.0, 101), (1e9, 2)] {
            let bad = PartitionStrategy::TimeRange {
                interval: Duration::from_secs_f64(interval),
                premake,
            };
            assert!(bad.validate().is_err(), "{interval} {premake}");
        }
    }

    #[test]
    fn list_prefixes_are_validated_and_bounded() {
        let list = |p: &[&[u8]]| PartitionStrategy::List {
            prefixes: p.iter().map(|p| p.to_vec()).collect(),
        };
        assert!(list(&[]).validate().is_err());
        assert!(list(&[b""]).validate().is_err());
        assert!(list(&[b"a", b"ab"]).validate().is_err(), "overlap");
        assert!(
            list(&[b"ab", b"a"]).validate().is_err(),
            "overlap in any order"
        );
        assert!(list(&[b"x", b"x"]).validate().is_err(), "duplicate");
        assert!(list(&[&[7u8; MAX_KEY_LEN + 1]]).validate().is_err());
        list(&[b"a", b"b", b"ba"]).validate().unwrap_err();
        list(&[b"orders:", b"sessions:"]).validate().unwrap();
        assert_eq!(after_prefix(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(after_prefix(&[1, 0xFF, 0xFF]), Some(vec![2]));
        assert_eq!(after_prefix(&[0xFF]), None);
        let parts = list(&[b"ab", &[0xFF]]).partitions();
        assert_eq!(
            parts,
            vec![
                (
                    "_p0".to_string(),
                    "FOR VALUES FROM (decode('6162', 'hex')) TO (decode('6163', 'hex'))"
                        .to_string()
                ),
                (
                    "_p1".to_string(),
                    "FOR VALUES FROM (decode('ff', 'hex')) TO (MAXVALUE)".to_string()
                ),
                ("_pdefault".to_string(), "DEFAULT".to_string()),
            ]
        );
    }
}

//! The backend's workloads: one call of each public operation the harness measures.

use std::sync::Arc;

use processor::state::{EnhancedPostgresBackend, StateBackend};

use crate::drive::{pick, Op};
use crate::{key, META_KEYS, VALUE_LEN};

/// A workload: its name, the rows one call touches, and whether pgbench runs the same SQL.
pub struct Workload {
    pub name: &'static str,
    pub rows_per_call: u32,
}

/// Every workload, in the order they run (deletes after the reads they would empty).
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "get",
        rows_per_call: 1,
    },
    Workload {
        name: "put",
        rows_per_call: 1,
    },
    Workload {
        name: "put_with_metadata",
        rows_per_call: 1,
    },
    Workload {
        name: "get_many",
        rows_per_call: 100,
    },
    Workload {
        name: "scan",
        rows_per_call: 1000,
    },
    Workload {
        name: "query_by_metadata",
        rows_per_call: 10,
    },
    Workload {
        name: "transaction",
        rows_per_call: 1,
    },
    Workload {
        name: "batch_put",
        rows_per_call: 100,
    },
    Workload {
        name: "batch_copy",
        rows_per_call: 1000,
    },
    Workload {
        name: "delete",
        rows_per_call: 1,
    },
];

/// One call of workload `name` on `backend`, over `keys` preloaded keys. Each workload's
/// call is its own future (one future for all would be as large as the largest, and the
/// harness would copy that much per call: callgrind counts it).
pub fn op(backend: &EnhancedPostgresBackend, name: &'static str, keys: u32) -> Op {
    let b = Arc::new(backend.clone_handle());
    // `call!(|b, k, value, rng| body)`: an `Op` whose call runs `body` with the backend,
    // the picked key, a value and the random number.
    macro_rules! call {
        (|$b:ident, $k:ident, $value:ident, $rng:ident| $body:expr) => {{
            let b = b.clone();
            let op: Op = Arc::new(move |_, $rng| {
                let $b = b.clone();
                Box::pin(async move {
                    let $k = key(pick($rng, keys));
                    let $value = [0xCD_u8; VALUE_LEN];
                    let _ = (&$k, &$value, $rng);
                    $body;
                    Ok(())
                })
            });
            op
        }};
    }
    match name {
        "get" => call!(|b, k, value, rng| b.get(&k).await?),
        "put" => call!(|b, k, value, rng| b.put(&k, &value).await?),
        "put_with_metadata" => call!(|b, k, value, rng| {
            let metadata = serde_json::json!({ "source": "bench", "n": pick(rng, keys) });
            b.put_with_metadata(&k, &value, metadata).await?
        }),
        "delete" => call!(|b, k, value, rng| b.delete(&k).await?),
        "get_many" => call!(|b, k, value, rng| {
            let many: Vec<Vec<u8>> = (0..100u64)
                .map(|i| key(pick(rng.rotate_left(i as u32), keys)))
                .collect();
            let refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
            b.get_many(&refs).await?
        }),
        "scan" => call!(|b, k, value, rng| b.list_keys_page(b"key:", Some(&k), 1000).await?),
        "query_by_metadata" => call!(|b, k, value, rng| {
            let group = pick(rng, META_KEYS / 10);
            b.query_by_metadata("group", &serde_json::json!(group))
                .await?
        }),
        "transaction" => call!(|b, k, value, rng| {
            let mut tx = b.begin().await?;
            tx.get(&k).await?;
            tx.put(&k, &value).await?;
            tx.commit().await?
        }),
        "batch_put" | "batch_copy" => call!(|b, k, value, rng| {
            let n = if name == "batch_put" { 100 } else { 1000 };
            let many: Vec<Vec<u8>> = (0..n)
                .map(|i| key(pick(rng.rotate_left(i % 64) ^ u64::from(i), keys)))
                .collect();
            let entries: Vec<(&[u8], &[u8])> =
                many.iter().map(|k| (k.as_slice(), &value[..])).collect();
            if name == "batch_put" {
                b.batch_put(&entries).await?;
            } else {
                b.batch_copy(&entries).await?;
            }
        }),
        other => {
            Arc::new(move |_, _| Box::pin(async move { anyhow::bail!("unknown workload {other}") }))
        }
    }
}

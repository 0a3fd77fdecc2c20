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

/// One call of workload `name` on `backend`, over `keys` preloaded keys.
pub fn op(backend: &EnhancedPostgresBackend, name: &'static str, keys: u32) -> Op {
    let b = Arc::new(backend.clone_handle());
    Arc::new(move |_, rng| {
        let b = b.clone();
        Box::pin(async move {
            let k = key(pick(rng, keys));
            let value = [0xCD_u8; VALUE_LEN];
            match name {
                "get" => {
                    b.get(&k).await?;
                }
                "put" => b.put(&k, &value).await?,
                "put_with_metadata" => {
                    let metadata = serde_json::json!({ "source": "bench", "n": pick(rng, keys) });
                    b.put_with_metadata(&k, &value, metadata).await?
                }
                "delete" => b.delete(&k).await?,
                "get_many" => {
                    let many: Vec<Vec<u8>> = (0..100u64)
                        .map(|i| key(pick(rng.rotate_left(i as u32), keys)))
                        .collect();
                    let refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
                    b.get_many(&refs).await?;
                }
                "scan" => {
                    b.list_keys_page(b"key:", Some(&k), 1000).await?;
                }
                "query_by_metadata" => {
                    let group = pick(rng, META_KEYS / 10);
                    b.query_by_metadata("group", &serde_json::json!(group))
                        .await?;
                }
                "transaction" => {
                    let mut tx = b.begin().await?;
                    tx.get(&k).await?;
                    tx.put(&k, &value).await?;
                    tx.commit().await?;
                }
                "batch_put" | "batch_copy" => {
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
                }
                other => anyhow::bail!("unknown workload {other}"),
            }
            Ok(())
        })
    })
}

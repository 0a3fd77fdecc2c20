//! A transfer between two accounts in a SERIALIZABLE transaction, run again on a
//! serialization failure or deadlock by `transaction(level, f)`; eight tasks transfer at once
//! and the total never changes. `cargo run --example transaction_retry`.

#[path = "common/mod.rs"]
mod common;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel, StateBackend,
};

fn amount(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = common::server()?;
    let config = EnhancedPostgresConfig::new(url)
        .with_schema("example_transactions")
        .with_max_retries(20);
    let backend = EnhancedPostgresBackend::new(config).await?;
    backend.put(b"acct:a", b"1000").await?;
    backend.put(b"acct:b", b"1000").await?;

    let mut tasks = Vec::new();
    for i in 0..8i64 {
        let backend = backend.clone_handle();
        tasks.push(tokio::spawn(async move {
            let (from, to) = if i % 2 == 0 {
                (b"acct:a".to_vec(), b"acct:b".to_vec())
            } else {
                (b"acct:b".to_vec(), b"acct:a".to_vec())
            };
            backend
                .transaction(IsolationLevel::Serializable, |tx| {
                    let (from, to) = (from.clone(), to.clone());
                    Box::pin(async move {
                        let a = amount(tx.get(&from).await?);
                        let b = amount(tx.get(&to).await?);
                        tx.put(&from, (a - 10).to_string().as_bytes()).await?;
                        tx.put(&to, (b + 10).to_string().as_bytes()).await
                    })
                })
                .await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let a = amount(backend.get(b"acct:a").await?);
    let b = amount(backend.get(b"acct:b").await?);
    println!(
        "a = {a}, b = {b}, total = {} ({} transactions retried)",
        a + b,
        backend.get_stats().transaction_retries
    );
    assert_eq!(a + b, 2000);
    backend.clear().await?;
    Ok(())
}

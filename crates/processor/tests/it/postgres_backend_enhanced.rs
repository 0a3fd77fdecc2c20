//! The enhanced backend's own tests, by the name the seed's Testing section runs them with:
//! `cargo test --package processor postgres_backend_enhanced` (against the cluster the tests
//! start themselves).

use std::sync::Arc;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresConfig, PostgresStateBackend,
    StateBackend,
};

use crate::{conformance, support};

#[tokio::test]
async fn the_enhanced_backend_meets_the_state_backend_contract() {
    let b = Arc::new(support::backend("pbe_conf").await);
    conformance::run(b.clone(), b.as_ref()).await;
    conformance::run_enhanced(&b).await;
}

/// Table statistics carry the total size (table, TOAST and indexes); operation statistics
/// count the bytes written and read.
#[tokio::test]
async fn table_and_operation_statistics() {
    let b = support::backend("pbe_stats").await;
    for i in 0..10u8 {
        b.put(&[b'k', i], &[i; 100]).await.unwrap();
    }
    assert_eq!(b.get(&[b'k', 3]).await.unwrap(), Some(vec![3; 100]));
    let table = b.get_table_statistics().await.unwrap();
    assert!(table.total_rows >= 10);
    assert!(table.table_size > 0);
    assert_eq!(table.total_size, table.table_size + table.indexes_size);
    let stats = b.get_stats();
    assert_eq!(stats.bytes_written, 10 * (2 + 100));
    assert_eq!(stats.bytes_read, 100);
}

/// The seed's "Migration from Basic Backend": the enhanced backend takes over the basic
/// backend's table and data as they are.
#[tokio::test]
async fn the_basic_backends_table_carries_over() {
    let schema = support::unique("pbe_migrate");
    let basic = PostgresStateBackend::new(
        PostgresConfig::new(support::url()).with_schema_name(schema.clone()),
    )
    .await
    .unwrap();
    basic.put(b"window:123", b"aggregated").await.unwrap();
    basic.close().await;
    let enhanced = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(support::url()).with_schema(schema),
    )
    .await
    .unwrap();
    assert_eq!(
        enhanced.get(b"window:123").await.unwrap(),
        Some(b"aggregated".to_vec())
    );
}

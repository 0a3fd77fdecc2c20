//! One conformance suite, run against every `StateBackend`.

use std::sync::Arc;
use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, MemoryStateBackend, PostgresConfig, PostgresStateBackend,
    StateBackend, StateError, StateResult,
};

use crate::support;

/// Writes an entry with a TTL behind the backend under test (the basic backend has no TTL
/// writes of its own, but its reads must still honour TTLs written by others).
#[async_trait::async_trait]
pub trait TtlWriter: Send + Sync {
    async fn put_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()>;
}

#[async_trait::async_trait]
impl TtlWriter for MemoryStateBackend {
    async fn put_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        self.put_with_ttl(key, value, ttl).await
    }
}

#[async_trait::async_trait]
impl TtlWriter for EnhancedPostgresBackend {
    async fn put_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        self.put_with_ttl(key, value, ttl).await
    }
}

fn tricky_keys() -> Vec<Vec<u8>> {
    vec![
        vec![0x00],
        vec![0x00, 0x01],
        vec![0x00, 0xFF],
        b"%".to_vec(),
        b"%a".to_vec(),
        b"_".to_vec(),
        b"_x".to_vec(),
        b"a".to_vec(),
        b"a%b".to_vec(),
        b"a_b".to_vec(),
        b"ab".to_vec(),
        b"a\\b".to_vec(),
        b"a\\".to_vec(),
        vec![b'a', 0xFF],
        vec![b'a', 0xFF, 0x00],
        vec![b'b'],
        vec![0x7F],
        vec![0x80],
        vec![0xFF],
        vec![0xFF, 0x00],
        vec![0xFF, 0xFF],
        vec![0xFF, 0xFF, 0xFF],
    ]
}

/// The contract every backend must meet. `b` starts empty.
pub async fn run(b: Arc<dyn StateBackend>, ttl: &dyn TtlWriter) {
    // Empty.
    assert_eq!(b.count().await.unwrap(), 0);
    assert_eq!(b.get(b"missing").await.unwrap(), None);
    assert!(!b.contains(b"missing").await.unwrap());
    assert!(b.list_keys(b"").await.unwrap().is_empty());

    // Round trips, overwrite, binary and empty values.
    b.put(b"k1", b"v1").await.unwrap();
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"v1".to_vec()));
    b.put(b"k1", b"v2").await.unwrap();
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"v2".to_vec()));
    b.put(b"empty", b"").await.unwrap();
    assert_eq!(b.get(b"empty").await.unwrap(), Some(Vec::new()));
    let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    b.put(b"big", &binary).await.unwrap();
    assert_eq!(b.get(b"big").await.unwrap(), Some(binary));
    assert!(b.contains(b"k1").await.unwrap());
    assert_eq!(b.count().await.unwrap(), 3);

    // Delete is idempotent.
    b.delete(b"k1").await.unwrap();
    b.delete(b"k1").await.unwrap();
    b.delete(b"never-existed").await.unwrap();
    assert_eq!(b.get(b"k1").await.unwrap(), None);
    assert!(!b.contains(b"k1").await.unwrap());
    b.clear().await.unwrap();
    assert_eq!(b.count().await.unwrap(), 0);

    // Byte-prefix scans with NUL, 0xFF and LIKE metacharacters.
    let keys = tricky_keys();
    for k in &keys {
        b.put(k, k).await.unwrap();
    }
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        b.list_keys(b"").await.unwrap(),
        sorted,
        "all keys in byte order"
    );
    let prefixes: Vec<Vec<u8>> = vec![
        vec![0x00],
        b"%".to_vec(),
        b"_".to_vec(),
        b"a".to_vec(),
        b"a%".to_vec(),
        b"a_".to_vec(),
        b"a\\".to_vec(),
        vec![b'a', 0xFF],
        vec![0xFF],
        vec![0xFF, 0xFF],
        vec![0xFF, 0xFF, 0xFF, 0xFF],
        b"zzz".to_vec(),
    ];
    for p in &prefixes {
        let expected: Vec<Vec<u8>> = sorted
            .iter()
            .filter(|k| k.starts_with(p))
            .cloned()
            .collect();
        assert_eq!(b.list_keys(p).await.unwrap(), expected, "prefix {p:?}");
    }
    assert_eq!(b.count().await.unwrap(), keys.len());
    b.clear().await.unwrap();

    // TTL: an expired entry is invisible to every read, before any cleanup.
    ttl.put_ttl(b"ttl:short", b"x", Duration::from_millis(300))
        .await
        .unwrap();
    ttl.put_ttl(b"ttl:long", b"y", Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(b.get(b"ttl:short").await.unwrap(), Some(b"x".to_vec()));
    assert_eq!(b.count().await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(b.get(b"ttl:short").await.unwrap(), None);
    assert!(!b.contains(b"ttl:short").await.unwrap());
    assert_eq!(b.count().await.unwrap(), 1);
    assert_eq!(
        b.list_keys(b"ttl:").await.unwrap(),
        vec![b"ttl:long".to_vec()]
    );
    assert_eq!(b.get(b"ttl:long").await.unwrap(), Some(b"y".to_vec()));
    // Writing over an expired entry makes it live again; a plain put clears the TTL.
    b.put(b"ttl:short", b"again").await.unwrap();
    assert_eq!(b.get(b"ttl:short").await.unwrap(), Some(b"again".to_vec()));
    b.clear().await.unwrap();

    // Bad keys are refused, nothing written.
    for bad in [
        Vec::new(),
        vec![b'k'; processor::state::limits::MAX_KEY_LEN + 1],
    ] {
        assert!(matches!(
            b.put(&bad, b"v").await,
            Err(StateError::InvalidInput(_))
        ));
        assert!(matches!(
            b.get(&bad).await,
            Err(StateError::InvalidInput(_))
        ));
    }
    let max_key = vec![b'k'; processor::state::limits::MAX_KEY_LEN];
    b.put(&max_key, b"v").await.unwrap();
    assert_eq!(b.get(&max_key).await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.count().await.unwrap(), 1);
    b.clear().await.unwrap();
}

#[tokio::test]
async fn memory_backend_conforms() {
    let b = Arc::new(MemoryStateBackend::new());
    run(b.clone(), b.as_ref()).await;
}

#[tokio::test]
async fn enhanced_backend_conforms() {
    let b = Arc::new(support::backend("conf_enh").await);
    run(b.clone(), b.as_ref()).await;
}

#[tokio::test]
async fn basic_backend_conforms() {
    let schema = support::unique("conf_basic");
    let mut cfg = PostgresConfig::new(support::url());
    cfg.schema = schema.clone();
    cfg.max_connections = 4;
    let basic = Arc::new(PostgresStateBackend::new(cfg).await.unwrap());
    // TTL entries are written by an enhanced backend on the same table.
    let writer = EnhancedPostgresBackend::new(
        processor::state::EnhancedPostgresConfig::new(support::url())
            .with_schema(schema)
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap();
    run(basic, &writer).await;
}

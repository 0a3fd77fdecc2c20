//! One conformance suite, run against every `StateBackend`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use processor::state::{
    EnhancedPostgresBackend, IsolationLevel, MemoryStateBackend, PostgresConfig,
    PostgresStateBackend, StateBackend, StateError, StateResult,
};

use crate::support;

/// Writes an entry with a TTL through the backend under test.
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
impl TtlWriter for PostgresStateBackend {
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
    for bad in [Vec::new(), vec![b'k'; processor::state::MAX_KEY_LEN + 1]] {
        assert!(matches!(
            b.put(&bad, b"v").await,
            Err(StateError::InvalidInput(_))
        ));
        assert!(matches!(
            b.get(&bad).await,
            Err(StateError::InvalidInput(_))
        ));
    }
    let max_key = vec![b'k'; processor::state::MAX_KEY_LEN];
    b.put(&max_key, b"v").await.unwrap();
    assert_eq!(b.get(&max_key).await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.count().await.unwrap(), 1);
    b.clear().await.unwrap();
}

#[tokio::test]
async fn memory_backend_conforms() {
    let b = Arc::new(MemoryStateBackend::new(None));
    run(b.clone(), b.as_ref()).await;
}

// The enhanced backend runs the suite in `postgres_backend_enhanced`, the name the seed's
// Testing section selects its tests by.

/// The enhanced backend's operations beyond the trait, on `b` (empty): transactions from 16
/// tasks at once, versions across delete and re-create, savepoints, transaction-scoped locks,
/// notifications in a transaction, UNNEST batches and COPY.
pub async fn run_enhanced(b: &EnhancedPostgresBackend) {
    b.put(b"counter", b"0").await.unwrap();
    let tasks = (0..16).map(|t| {
        let b = b.clone_handle();
        tokio::spawn(async move {
            for i in 0..20 {
                b.transaction(IsolationLevel::Serializable, |tx| {
                    Box::pin(async move {
                        let n: i64 = tx
                            .get(b"counter")
                            .await?
                            .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                            .unwrap_or(0);
                        tx.put(b"counter", (n + 1).to_string().as_bytes()).await
                    })
                })
                .await
                .unwrap();
                let k = format!("t{t}:{i}");
                let v = b.put_with_version(k.as_bytes(), b"a", None).await.unwrap();
                assert_eq!(
                    b.put_with_version(k.as_bytes(), b"b", Some(v))
                        .await
                        .unwrap(),
                    v + 1
                );
                assert!(b
                    .put_with_version(k.as_bytes(), b"c", Some(v))
                    .await
                    .is_err());
                b.delete(k.as_bytes()).await.unwrap();
                assert_eq!(
                    b.put_with_version(k.as_bytes(), b"d", None).await.unwrap(),
                    v + 3
                );
            }
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    assert_eq!(b.get(b"counter").await.unwrap(), Some(b"320".to_vec()));

    // Savepoints, transaction-scoped locks and notifications inside a transaction.
    let mut tx = b.begin().await.unwrap();
    tx.put(b"sp", b"kept").await.unwrap();
    tx.savepoint("s1").await.unwrap();
    tx.put(b"sp", b"undone").await.unwrap();
    tx.rollback_to_savepoint("s1").await.unwrap();
    tx.advisory_xact_lock(42, processor::state::LockMode::Exclusive)
        .await
        .unwrap();
    tx.notify("pgb_channel", "hello").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(b.get(b"sp").await.unwrap(), Some(b"kept".to_vec()));

    // Batches: several UNNEST chunks in one transaction, and COPY twice (behind transaction
    // pooling its staging table lives for one transaction, so the second finds none left over).
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..12_000u32)
        .map(|i| (format!("batch:{i}").into_bytes(), i.to_be_bytes().to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = rows.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    b.batch_put(&refs).await.unwrap();
    // (A new key starts at 1, or above the version floor once entries were removed: after
    // `clear()`, which the suites run between them.)
    let first = b.get_entry(b"batch:7").await.unwrap().unwrap().version;
    for _ in 0..2 {
        assert_eq!(b.batch_copy(&refs[..3000]).await.unwrap(), 3000);
    }
    assert_eq!(b.list_keys(b"batch:").await.unwrap().len(), 12_000);
    assert_eq!(
        b.get_entry(b"batch:7").await.unwrap().unwrap().version,
        first + 2,
        "each write bumps the version by one"
    );
    // (Boxed: the suite's future is large for a test thread's stack.)
    Box::pin(whole_entries(b, &refs)).await;

    // Pages of a prefix scan: together exactly the scan, in order; an open-ended prefix; a
    // cursor before the prefix starts at its first key; bad limits refused.
    let all = b.list_keys(b"batch:").await.unwrap();
    let mut paged: Vec<Vec<u8>> = Vec::new();
    let mut cursor: Option<Vec<u8>> = Some(b"a".to_vec());
    loop {
        let page = b
            .list_keys_page(b"batch:", cursor.as_deref(), 5000)
            .await
            .unwrap();
        let done = page.len() < 5000;
        cursor = page.last().cloned();
        paged.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(paged, all);
    b.put(&[0xFF], b"x").await.unwrap();
    b.put(&[0xFF, 0xFF, 1], b"x").await.unwrap();
    assert_eq!(
        b.list_keys_page(&[0xFF], None, 1).await.unwrap(),
        vec![vec![0xFF]]
    );
    assert_eq!(
        b.list_keys_page(&[0xFF], Some(&[0xFF]), 10).await.unwrap(),
        vec![vec![0xFF, 0xFF, 1]]
    );
    for limit in [0, processor::state::MAX_PAGE + 1] {
        let e = b.list_keys_page(b"", None, limit).await.unwrap_err();
        assert_eq!(e.kind(), processor::state::ErrorKind::InvalidInput, "{e}");
    }

    // Many keys in one read: order kept, duplicates answered twice, absent, deleted and
    // expired keys `None`; bad input refused.
    b.put(b"gm:deleted", b"x").await.unwrap();
    b.delete(b"gm:deleted").await.unwrap();
    b.put_with_ttl(b"gm:expired", b"x", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let keys: Vec<&[u8]> = vec![
        b"batch:2",
        b"gm:absent",
        b"gm:deleted",
        b"batch:11999",
        b"gm:expired",
        b"batch:2",
    ];
    assert_eq!(
        b.get_many(&keys).await.unwrap(),
        vec![
            Some(2u32.to_be_bytes().to_vec()),
            None,
            None,
            Some(11_999u32.to_be_bytes().to_vec()),
            None,
            Some(2u32.to_be_bytes().to_vec()),
        ]
    );
    assert!(b.get_many(&[]).await.unwrap().is_empty());
    let many: Vec<&[u8]> = refs.iter().map(|(k, _)| *k).take(10_000).collect();
    let values = b.get_many(&many).await.unwrap();
    assert!(values.iter().all(Option::is_some) && values.len() == 10_000);
    let too_many: Vec<&[u8]> = vec![b"k"; processor::state::MAX_GET_MANY + 1];
    for bad in [too_many, vec![&b""[..]]] {
        let e = b.get_many(&bad).await.unwrap_err();
        assert_eq!(e.kind(), processor::state::ErrorKind::InvalidInput, "{e}");
    }
}

#[tokio::test]
async fn basic_backend_conforms() {
    let cfg = PostgresConfig::new(support::url())
        .with_schema_name(support::unique("conf_basic"))
        .with_pool_size(1, 4);
    let basic = Arc::new(PostgresStateBackend::new(cfg).await.unwrap());
    run(basic.clone(), basic.as_ref()).await;
}

/// Whole entries by COPY, twice: metadata and TTLs kept, the last of a key wins.
async fn whole_entries(b: &EnhancedPostgresBackend, refs: &[(&[u8], &[u8])]) {
    let meta = serde_json::json!({"src": "copy"});
    let whole: Vec<processor::state::BatchEntry> = refs[..100]
        .iter()
        .map(|(k, v)| processor::state::BatchEntry {
            key: k,
            value: v,
            metadata: Some(&meta),
            ttl: Some(Duration::from_secs(3600)),
        })
        .chain([processor::state::BatchEntry {
            key: b"batch:0",
            value: b"last",
            metadata: None,
            ttl: None,
        }])
        .collect();
    for _ in 0..2 {
        assert_eq!(b.batch_copy_entries(&whole).await.unwrap(), 100);
    }
    let first = b.get_entry(b"batch:0").await.unwrap().unwrap();
    assert_eq!(
        (first.value.as_slice(), first.expires_at),
        (&b"last"[..], None)
    );
    let other = b.get_entry(b"batch:1").await.unwrap().unwrap();
    assert_eq!(other.metadata, meta);
    assert!(other.expires_at.is_some());
}

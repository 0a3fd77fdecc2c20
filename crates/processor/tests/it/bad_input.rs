//! Every kind of bad input is a clear `InvalidInput` (or `Configuration`) error and writes
//! nothing.

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, StateBackend, StateError,
};
use processor::state::{MAX_KEY_LEN, MAX_TTL, MAX_VALUE_LEN};
use serde_json::json;

use crate::support;

fn invalid<T: std::fmt::Debug>(r: Result<T, StateError>, needle: &str) {
    match r {
        Err(StateError::InvalidInput(msg)) => {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidInput containing {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_keys_values_metadata_and_ttls_write_nothing() {
    let b = support::backend("bad").await;
    let long_key = vec![b'k'; MAX_KEY_LEN + 1];
    // Allocated lazily by the OS: only its length is ever read.
    let huge_value = vec![0u8; MAX_VALUE_LEN + 1];

    invalid(b.put(b"", b"v").await, "key is empty");
    invalid(b.put(&long_key, b"v").await, "at most 2048");
    invalid(b.put(b"k", &huge_value).await, "value is");
    invalid(
        b.put_with_metadata(b"", b"v", json!({})).await,
        "key is empty",
    );
    invalid(
        b.put_with_metadata(b"k", b"v", json!([1, 2])).await,
        "JSON object",
    );
    invalid(
        b.put_with_metadata(b"k", b"v", json!("text")).await,
        "JSON object",
    );
    invalid(
        b.put_with_metadata(b"k", b"v", json!(null)).await,
        "JSON object",
    );
    invalid(
        b.put_with_metadata(b"k", b"v", json!({"a": "nul\u{0}"}))
            .await,
        "NUL",
    );
    invalid(
        b.put_with_ttl(b"k", b"v", Duration::ZERO).await,
        "TTL must be positive",
    );
    invalid(
        b.put_with_ttl(b"k", b"v", MAX_TTL + Duration::from_secs(1))
            .await,
        "exceeds",
    );
    invalid(b.put_with_ttl(b"k", b"v", Duration::MAX).await, "exceeds");
    invalid(
        b.put_with_ttl(b"", b"v", Duration::from_secs(1)).await,
        "key is empty",
    );
    invalid(b.put_with_version(b"", b"v", None).await, "key is empty");
    invalid(
        b.put_with_version(&long_key, b"v", Some(1)).await,
        "at most 2048",
    );
    invalid(b.put_entry(b"k", b"v", json!(1), None).await, "JSON object");
    invalid(b.get(b"").await, "key is empty");
    invalid(b.contains(&long_key).await, "at most 2048");
    invalid(b.delete(b"").await, "key is empty");
    invalid(b.query_by_metadata("", &json!(1)).await, "path");
    invalid(b.query_by_metadata("a..b", &json!(1)).await, "path");

    // One bad entry spoils the whole batch; the good ones are not written either.
    let bad_batch: Vec<(&[u8], &[u8])> = vec![(b"good1", b"v"), (b"", b"v"), (b"good2", b"v")];
    invalid(b.batch_put(&bad_batch).await, "batch entry 1");
    invalid(b.batch_copy(&bad_batch).await, "batch entry 1");
    let long_batch: Vec<(&[u8], &[u8])> = vec![(b"good1", b"v"), (&long_key, b"v")];
    invalid(b.batch_put(&long_batch).await, "batch entry 1");
    let huge_batch: Vec<(&[u8], &[u8])> = vec![(b"good1", b"v"), (b"big", &huge_value)];
    invalid(b.batch_copy(&huge_batch).await, "batch entry 1");

    assert_eq!(b.count().await.unwrap(), 0, "nothing was written");
    assert!(b.list_keys(b"").await.unwrap().is_empty());
    assert_eq!(
        b.get_stats().put_count,
        0,
        "refused before reaching the server"
    );
}

#[tokio::test]
async fn hostile_identifiers_are_refused_and_the_table_is_intact() {
    let b = support::backend("ident").await;
    b.put(b"survivor", b"1").await.unwrap();
    let hostile = [
        "state_entries; DROP TABLE state_entries; --",
        "x\"; DROP SCHEMA public CASCADE; --",
        "a b",
        "",
        "1starts_with_digit",
        "ünïcode",
        "nul\0byte",
    ];
    for name in hostile {
        let cfg = EnhancedPostgresConfig::new(support::url()).with_table_name(name);
        let err = EnhancedPostgresBackend::new(cfg).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}: {err}");
        let cfg = EnhancedPostgresConfig::new(support::url()).with_schema(name);
        let err = EnhancedPostgresBackend::new(cfg).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}: {err}");
    }
    let long = "t".repeat(41);
    let err = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(support::url()).with_table_name(long),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("at most 40"), "{err}");
    assert_eq!(b.get(b"survivor").await.unwrap(), Some(b"1".to_vec()));
}

#[tokio::test]
async fn malformed_configuration_is_a_clear_error() {
    let secret = "hunter2-planted";
    for (url, needle) in [
        (
            format!("postgresql://u:{secret}@127.0.0.1:1/db?sslmode=bogus"),
            "unknown sslmode",
        ),
        (
            format!("postgresql://u:{secret}@127.0.0.1:notaport/db"),
            "malformed",
        ),
        ("not a url at all".to_string(), "malformed"),
        (String::new(), "empty"),
    ] {
        let err = EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(url.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration, "{url}: {err}");
        assert!(err.to_string().contains(needle), "{url}: {err}");
        assert!(!err.to_string().contains(secret), "password leaked: {err}");
        assert!(
            !format!("{err:?}").contains(secret),
            "password leaked: {err:?}"
        );
    }
}

#[tokio::test]
async fn dead_server_is_a_bounded_connection_error() {
    let port = pgstate_testcluster::free_port().unwrap();
    let url = format!("postgresql://u:hunter2-planted@127.0.0.1:{port}/db?sslmode=disable");
    let start = std::time::Instant::now();
    let err = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url).with_connect_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30), "bounded wait");
}

#[test]
fn debug_output_never_shows_a_password() {
    let secret = "hunter2-planted";
    let url = format!("postgresql://u:{secret}@127.0.0.1/db");
    let basic = processor::state::PostgresConfig::new(url.clone());
    assert!(!format!("{basic:?}").contains(secret));
    let kw = EnhancedPostgresConfig::new(format!("host=h user=u password={secret}"));
    assert!(!format!("{kw:?}").contains(secret));
    assert!(!EnhancedPostgresConfig::new(url)
        .redacted_url()
        .contains(secret));
}

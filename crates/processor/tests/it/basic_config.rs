//! `PostgresConfig` as the seed project's users call it: its builders, and what each does on
//! a real server (names used, sslmode enforced, timeouts that fire, statement logging).

use std::time::Duration;

use processor::state::{ErrorKind, PostgresConfig, PostgresStateBackend, StateBackend, StateError};

use crate::capture::Capture;
use crate::support;

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A configuration on a schema of its own, its sessions named `app`.
pub fn setup(tag: &str) -> (PostgresConfig, String, String) {
    let (schema, app) = (support::unique(tag), support::unique("app"));
    let url = with_param(&support::url(), &format!("application_name={app}"));
    let config = PostgresConfig::new(url)
        .with_schema_name(schema.clone())
        .with_pool_size(1, 4);
    (config, schema, app)
}

#[tokio::test]
async fn the_table_and_schema_names_are_the_ones_used() {
    let (config, schema, _) = setup("basic_names");
    let b = PostgresStateBackend::new(config.with_table_name("orders_state"))
        .await
        .unwrap();
    b.put(b"order:1", b"paid").await.unwrap();
    let db = support::raw(&support::url()).await;
    let sql = format!("SELECT value FROM \"{schema}\".orders_state WHERE key = 'order:1'");
    let value: Vec<u8> = db.query_one(&sql, &[]).await.unwrap().get(0);
    assert_eq!(value, b"paid");
}

#[tokio::test]
async fn the_ssl_mode_is_enforced() {
    for (mode, tls) in [("require", true), ("disable", false)] {
        let (config, _, app) = setup("basic_ssl");
        let b = PostgresStateBackend::new(config.with_ssl_mode(mode))
            .await
            .unwrap();
        assert!(b.health_check().await.unwrap());
        let sessions = support::sessions(&app).await;
        assert!(!sessions.is_empty());
        assert!(
            sessions.iter().all(|(_, on)| *on == tls),
            "{mode}: {sessions:?}"
        );
    }
    // verify-full needs the server's CA, which the URL does not name: refused, not weakened.
    let (config1, _, _) = setup("basic_ssl");
    let e = PostgresStateBackend::new(config1.with_ssl_mode("verify-full"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StateError::Configuration(m) if m.contains("root certificate")),
        "{e}"
    );
    // An unknown mode is refused before anything connects.
    let (config2, _, app) = setup("basic_ssl");
    let e = PostgresStateBackend::new(config2.with_ssl_mode("sometimes"))
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::Configuration(_)), "{e}");
    assert!(support::sessions(&app).await.is_empty());
}

/// `with_timeout` bounds connecting: a server that accepts the connection and never answers
/// fails `new()` with a timeout.
#[tokio::test]
async fn the_connect_timeout_fires() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let config = PostgresConfig::new(format!("postgresql://postgres@127.0.0.1:{port}/postgres"))
        .with_ssl_mode("disable")
        .with_timeout(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(60), PostgresStateBackend::new(config))
        .await
        .expect("new() returns")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    eprintln!("refused after {:?}", started.elapsed());
    drop(silent);
}

/// `with_timeout` bounds each operation: a put waiting for a row another transaction holds
/// fails once the timeout passes (it was sent, so its outcome is unknown until it settles).
#[tokio::test]
async fn the_query_timeout_fires() {
    let (config, schema, _) = setup("basic_timeout");
    let b = PostgresStateBackend::new(config.with_timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    b.put(b"held", b"v1").await.unwrap();
    let mut db = support::raw(&support::url()).await;
    let tx = db.transaction().await.unwrap();
    let sql = format!("SELECT 1 FROM \"{schema}\".state_entries WHERE key = 'held' FOR UPDATE");
    tx.execute(&sql, &[]).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), b.put(b"held", b"v2"))
        .await
        .expect("put returns")
        .unwrap_err();
    // Sent, so not retried: an unknown outcome is never run again.
    assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
    assert_eq!(b.stats().await.retry_count, 0);
    tx.rollback().await.unwrap();
    // Reads and other keys were never blocked.
    assert_eq!(b.get(b"other").await.unwrap(), None);
}

/// `with_statement_logging(true)` logs each operation at `info` by its statement's name,
/// never its key or value; off, nothing is logged.
#[tokio::test]
async fn statement_logging_logs_every_operation_and_no_value() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let statements = |c: &Capture| -> Vec<String> {
        c.events()
            .iter()
            .filter(|e| e.field("message") == Some("statement"))
            .filter_map(|e| e.field("statement").map(str::to_string))
            .collect()
    };
    let (config, _, _) = setup("basic_log");
    let quiet = PostgresStateBackend::new(config).await.unwrap();
    quiet.put(b"log-key-7a", b"log-value-7a").await.unwrap();
    assert!(statements(&capture).is_empty());
    let (config, _, _) = setup("basic_log");
    let b = PostgresStateBackend::new(config.with_statement_logging(true))
        .await
        .unwrap();
    b.put(b"log-key-7a", b"log-value-7a").await.unwrap();
    assert!(b.get(b"log-key-7a").await.unwrap().is_some());
    b.delete(b"log-key-7a").await.unwrap();
    let logged = statements(&capture);
    assert!(logged.len() >= 3, "{logged:?}");
    capture.assert_never_shows(&["log-key-7a", "log-value-7a"]);
}

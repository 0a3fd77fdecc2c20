//! TLS basics on the shared cluster (whose servers have TLS on): `prefer` (the default)
//! encrypts, `disable` does not, verification against the generated CA succeeds. The full
//! sslmode matrix is the security issue's.

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresSslConfig, StateBackend,
};

use crate::support;

async fn check_mode(url: String, ssl: Option<PostgresSslConfig>, expect_tls: bool) {
    let app = support::unique("tls");
    let mut cfg = EnhancedPostgresConfig::new(url)
        .with_schema(support::unique("tls"))
        .with_application_name(app.clone())
        .with_pool_config(support::small_pool());
    if let Some(ssl) = ssl {
        cfg = cfg.with_ssl_config(ssl);
    }
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    b.put(b"k", b"v").await.unwrap();
    let seen: Vec<bool> = support::sessions(&app).await.iter().map(|s| s.1).collect();
    assert!(!seen.is_empty(), "no connection found");
    assert!(
        seen.iter().all(|s| *s == expect_tls),
        "expected ssl={expect_tls}, saw {seen:?}"
    );
}

#[tokio::test]
async fn prefer_encrypts_and_disable_does_not() {
    let Some(cluster) = pgstate_testcluster::shared().cluster() else {
        support::skip(
            "tls::prefer_encrypts_and_disable_does_not",
            "the suite points at an external server",
        );
        return;
    };
    let url = cluster.primary_url();
    check_mode(url.clone(), None, true).await;
    check_mode(format!("{url}?sslmode=prefer"), None, true).await;
    check_mode(format!("{url}?sslmode=disable"), None, false).await;
    check_mode(format!("{url}?sslmode=require"), None, true).await;
    let certs = cluster.certs().expect("TLS cluster");
    let full = PostgresSslConfig {
        mode: "verify-full".into(),
        root_cert_path: Some(certs.ca_cert.clone()),
        client_cert_path: None,
        client_key_path: None,
    };
    check_mode(url, Some(full), true).await;
}

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
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn prefer_encrypts_and_disable_does_not() {
    let cluster = support::local_cluster();
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

/// A copy of `key` in a fresh folder, with `mode`.
fn key_copy(key: &std::path::Path, mode: u32) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(support::unique("keys"));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("client.key");
    std::fs::copy(key, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, copy)
}

/// The URL of the shared primary as the certificate user, with `params`.
fn cert_url(cluster: &pgstate_testcluster::Cluster, params: &str) -> String {
    format!(
        "postgresql://{}@localhost:{}/postgres?{params}",
        pgstate_testcluster::CERT_USER,
        cluster.nodes()[0].port
    )
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn client_keys_readable_by_others_or_encrypted_are_refused_clearly() {
    let cluster = support::local_cluster();
    let certs = cluster.certs().expect("TLS cluster");
    let attempt = |key: &std::path::Path, extra: &str| {
        let url = cert_url(
            cluster,
            &format!(
                "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}{extra}",
                certs.ca_cert.display(),
                certs.client_cert.display(),
                key.display()
            ),
        );
        EnhancedPostgresBackend::new(
            EnhancedPostgresConfig::new(url)
                .with_schema(support::unique("keys"))
                .with_pool_config(support::small_pool()),
        )
    };
    let (dir, open_key) = key_copy(&certs.client_key, 0o644);
    let err = attempt(&open_key, "").await.unwrap_err();
    assert_eq!(err.kind(), processor::state::ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("0644"), "{err}");
    // The same key with 0600 is accepted.
    let (dir2, private) = key_copy(&certs.client_key, 0o600);
    let b = attempt(&private, "").await.unwrap();
    assert!(b.health_check().await.unwrap());

    // An encrypted key: a clear error, and the password shows nowhere.
    let encrypted = dir.join("encrypted.key");
    support::run(
        std::process::Command::new("openssl")
            .args(["pkey", "-aes256", "-passout", "pass:hunter2-secret", "-in"])
            .arg(&certs.client_key)
            .arg("-out")
            .arg(&encrypted),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&encrypted, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let err = attempt(&encrypted, "&sslpassword=hunter2-secret")
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert_eq!(err.kind(), processor::state::ErrorKind::Tls, "{err}");
    assert!(text.contains("is encrypted"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dir2);
}

/// `sslrootcert=system` uses the operating system's store: the test CA is not in it, so the
/// server's certificate is refused; weaker modes with it are refused as libpq does.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn sslrootcert_system_verifies_against_the_operating_systems_store() {
    let cluster = support::local_cluster();
    let url = format!(
        "postgresql://postgres:{}@localhost:{}/postgres",
        pgstate_testcluster::PASSWORD,
        cluster.nodes()[0].port
    );
    let err = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(format!("{url}?sslrootcert=system"))
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), processor::state::ErrorKind::Tls, "{err}");
    let err = EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(format!(
        "{url}?sslrootcert=system&sslmode=require"
    )))
    .await
    .unwrap_err();
    assert_eq!(err.kind(), processor::state::ErrorKind::Configuration);
    assert!(err.to_string().contains("verify-full"), "{err}");

    // With the test CA as the system store ($SSL_CERT_FILE) and as ~/.postgresql/root.crt,
    // and the client certificate as ~/.postgresql/postgresql.crt: run in a process of its own,
    // since both come from the environment.
    let certs = cluster.certs().expect("TLS cluster");
    let home = std::env::temp_dir().join(support::unique("home"));
    let pg = home.join(".postgresql");
    std::fs::create_dir_all(&pg).unwrap();
    std::fs::copy(&certs.ca_cert, pg.join("root.crt")).unwrap();
    std::fs::copy(&certs.client_cert, pg.join("postgresql.crt")).unwrap();
    let (keydir, key) = key_copy(&certs.client_key, 0o600);
    std::fs::rename(&key, pg.join("postgresql.key")).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "tls::tls_from_the_environment",
            "--nocapture",
        ])
        .env("SSL_CERT_FILE", &certs.ca_cert)
        .env("HOME", &home)
        .env("PGSTATE_TLS_CHILD_URL", &url)
        .env(
            "PGSTATE_TLS_CHILD_CERT_URL",
            cert_url(cluster, "sslmode=verify-full"),
        )
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("1 passed"), "{log}");
    let _ = std::fs::remove_dir_all(home);
    let _ = std::fs::remove_dir_all(keydir);
}

/// Run by `sslrootcert_system_verifies_against_the_operating_systems_store` in a process of
/// its own, with `$SSL_CERT_FILE` and `$HOME` set for it.
#[tokio::test]
#[ignore = "run by tls::sslrootcert_system_verifies_against_the_operating_systems_store"]
async fn tls_from_the_environment() {
    let url = std::env::var("PGSTATE_TLS_CHILD_URL").expect("started by its parent test");
    let cert_url = std::env::var("PGSTATE_TLS_CHILD_CERT_URL").expect("started by its parent");
    // The operating system's store (here $SSL_CERT_FILE) trusts the server.
    let system = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(format!("{url}?sslrootcert=system"))
            .with_schema(support::unique("system"))
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap();
    assert!(system.health_check().await.unwrap());
    // ~/.postgresql/root.crt makes verify-full work without sslrootcert, and
    // ~/.postgresql/postgresql.crt and .key log the certificate user in.
    let home = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(cert_url)
            .with_schema(support::unique("home"))
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap();
    assert!(home.health_check().await.unwrap());
}

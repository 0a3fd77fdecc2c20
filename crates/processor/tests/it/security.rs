//! TLS with libpq's semantics, checked against `psql` (libpq) as the oracle; client
//! certificates; secrets never shown.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use pgstate_testcluster::{Cluster, CERT_USER, PASSWORD};
use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, PostgresPoolConfig,
    PostgresSslConfig, StateBackend,
};

use crate::support;

const MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// What a client saw: `None` = could not connect, `Some(encrypted)` otherwise.
type Outcome = Option<bool>;

fn psql_outcome(bindir: &Path, host: &str, port: u16, mode: &str, root: &Path) -> Outcome {
    let conninfo = format!(
        "host={host} port={port} user=postgres password={PASSWORD} dbname=postgres \
         sslmode={mode} sslrootcert={} connect_timeout=5",
        root.display()
    );
    let out = Command::new(bindir.join("psql"))
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-c"])
        .arg("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)")
        .env_remove("PGSSLMODE")
        .env("PGSSLCERT", "/nonexistent/pgstate.crt")
        .env("PGSSLKEY", "/nonexistent/pgstate.key")
        .output()
        .expect("run psql");
    if !out.status.success() {
        return None;
    }
    match String::from_utf8_lossy(&out.stdout).trim() {
        "t" => Some(true),
        "f" => Some(false),
        other => panic!("unexpected psql output {other:?}"),
    }
}

async fn our_outcome(admin_url: &str, host: &str, port: u16, mode: &str, root: &Path) -> Outcome {
    let app = support::unique("tlsm");
    let url = format!(
        "postgresql://postgres:{PASSWORD}@{host}:{port}/postgres?sslmode={mode}&sslrootcert={}",
        root.display()
    );
    let cfg = EnhancedPostgresConfig::new(url)
        .with_schema(support::unique("tlsm"))
        .with_application_name(app.clone())
        .with_connect_timeout(std::time::Duration::from_secs(5))
        .with_pool_config(PostgresPoolConfig {
            min_connections: 1,
            max_connections: 1,
            ..support::small_pool()
        });
    let b = match EnhancedPostgresBackend::new(cfg).await {
        Ok(b) => b,
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::Tls | ErrorKind::Connection | ErrorKind::Configuration
                ),
                "{mode} {host}: unexpected error kind: {e}"
            );
            assert!(!e.to_string().contains(PASSWORD), "password in error: {e}");
            return None;
        }
    };
    b.put(b"k", b"v").await.unwrap();
    let admin = support::raw(admin_url).await;
    let rows = admin
        .query(
            "SELECT coalesce(s.ssl, false) FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    let seen: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| *s == seen[0]),
        "{seen:?}"
    );
    Some(seen[0])
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn every_sslmode_matches_psql_on_every_kind_of_server() {
    let tls = support::local_cluster();
    let plain = support::own_cluster(0).await;
    let certs = tls.certs().expect("certificates");
    let tls_port = tls.nodes()[0].port;
    let cases: Vec<(&str, &str, u16, &Path, String)> = vec![
        (
            "certificate valid for the host",
            "localhost",
            tls_port,
            certs.ca_cert.as_path(),
            tls.primary_url(),
        ),
        (
            "certificate for another name",
            "127.0.0.2",
            tls_port,
            certs.ca_cert.as_path(),
            tls.primary_url(),
        ),
        (
            "untrusted CA",
            "localhost",
            tls_port,
            certs.other_ca_cert.as_path(),
            tls.primary_url(),
        ),
        (
            "server without TLS",
            "127.0.0.1",
            plain.nodes()[0].port,
            certs.ca_cert.as_path(),
            plain.primary_url(),
        ),
    ];
    let mut table = String::new();
    let mut mismatches = Vec::new();
    for (what, host, port, root, admin) in &cases {
        for mode in MODES {
            let oracle = psql_outcome(tls.bindir(), host, *port, mode, root);
            let ours = our_outcome(admin, host, *port, mode, root).await;
            table.push_str(&format!(
                "{what:32} {mode:12} psql {oracle:?} ours {ours:?}\n"
            ));
            if oracle != ours {
                mismatches.push(format!(
                    "{what} / {mode}: psql {oracle:?}, pgstate {ours:?}"
                ));
            }
        }
    }
    eprintln!("{table}");
    assert!(
        mismatches.is_empty(),
        "differences from libpq:\n{}",
        mismatches.join("\n")
    );
    // The matrix is not trivially uniform: it has encrypted, plaintext and refused outcomes.
    assert!(
        table.contains("Some(true)") && table.contains("Some(false)") && table.contains("None")
    );
}

fn cert_backend(cluster: &Cluster, cert: &Path, key: &Path) -> EnhancedPostgresConfig {
    let certs = cluster.certs().expect("certificates");
    EnhancedPostgresConfig::new(format!(
        "postgresql://{CERT_USER}@localhost:{}/postgres",
        cluster.nodes()[0].port
    ))
    .with_schema(support::unique("certauth"))
    .with_ssl_config(PostgresSslConfig {
        mode: "verify-full".into(),
        root_cert_path: Some(certs.ca_cert.clone()),
        client_cert_path: Some(cert.to_path_buf()),
        client_key_path: Some(key.to_path_buf()),
    })
    .with_pool_config(support::small_pool())
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn client_certificate_authentication() {
    let cluster = support::local_cluster();
    let certs = cluster.certs().expect("certificates");

    // The right certificate logs in (no password anywhere), as a role that is not superuser
    // and owns only its schema: the conformance suite passes there.
    let b =
        EnhancedPostgresBackend::new(cert_backend(cluster, &certs.client_cert, &certs.client_key))
            .await
            .expect("certificate login");
    let b = Arc::new(b);
    crate::conformance::run(b.clone(), b.as_ref()).await;
    let err = b.checkpoint().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permission, "{err}");

    // A certificate from a CA the server does not trust is refused.
    let err = EnhancedPostgresBackend::new(cert_backend(
        cluster,
        &certs.untrusted_client_cert,
        &certs.untrusted_client_key,
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Tls | ErrorKind::Connection),
        "{err}"
    );

    // A certificate and key that do not belong together are refused before connecting.
    let err = EnhancedPostgresBackend::new(cert_backend(
        cluster,
        &certs.client_cert,
        &certs.untrusted_client_key,
    ))
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");

    // Missing files are named.
    let missing = Path::new("/nonexistent/client.crt");
    let err = EnhancedPostgresBackend::new(cert_backend(cluster, missing, &certs.client_key))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("/nonexistent/client.crt"), "{err}");
    // Key material never appears in errors.
    let key_text = std::fs::read_to_string(&certs.client_key).unwrap();
    let body = key_text.lines().nth(1).unwrap_or("");
    assert!(!body.is_empty() && !err.to_string().contains(body));
}

fn openssl(args: &[&str]) {
    support::run(Command::new("openssl").args(args));
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn client_keys_in_sec1_and_rsa_pkcs1_formats_authenticate() {
    let cluster = support::local_cluster();
    let certs = cluster.certs().expect("certificates");
    let dir = cluster.dir().join(support::unique("keys"));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).to_string_lossy().to_string();
    let certs_dir = certs.ca_cert.parent().unwrap();
    let ca_key = certs_dir.join("ca.key").to_string_lossy().to_string();
    let ca_crt = certs.ca_cert.to_string_lossy().to_string();
    let ext = certs_dir.join("client.ext").to_string_lossy().to_string();

    // The same EC key, as SEC1 ("BEGIN EC PRIVATE KEY").
    openssl(&[
        "ec",
        "-in",
        &certs.client_key.to_string_lossy(),
        "-out",
        &p("sec1.key"),
    ]);
    assert!(std::fs::read_to_string(p("sec1.key"))
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    // A new RSA key as PKCS#1 ("BEGIN RSA PRIVATE KEY"), certified by the cluster's CA.
    openssl(&["genrsa", "-traditional", "-out", &p("rsa.key"), "2048"]);
    assert!(std::fs::read_to_string(p("rsa.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let subj = format!("/CN={CERT_USER}");
    openssl(&[
        "req",
        "-new",
        "-key",
        &p("rsa.key"),
        "-subj",
        &subj,
        "-out",
        &p("rsa.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("rsa.csr"),
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        &p("rsa.crt"),
        "-extfile",
        &ext,
    ]);

    for (cert, key) in [
        (certs.client_cert.clone(), dir.join("sec1.key")),
        (dir.join("rsa.crt"), dir.join("rsa.key")),
    ] {
        let b = EnhancedPostgresBackend::new(cert_backend(cluster, &cert, &key))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        b.put(b"k", b"v").await.unwrap();
        assert_eq!(b.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    }
}

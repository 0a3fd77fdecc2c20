//! libpq's environment, as psql honours it: variables, a password file and a service file,
//! with what the connection string says winning.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use pgstate_testcluster::{Cluster, CERT_USER, PASSWORD};

use crate::{bare, expect, scratch, unique};

fn cluster() -> &'static Cluster {
    pgstate_testcluster::shared()
        .cluster()
        .expect("the local test cluster")
}

fn port() -> String {
    let url = cluster().primary_url();
    let after = url.rsplit_once(':').unwrap().1;
    after.split('/').next().unwrap().to_string()
}

/// `pgstate` with no URL and the libpq variables of the test cluster's primary, except those
/// named in `without`, on a schema of its own.
fn with_env(schema: &str, without: &[&str]) -> Command {
    let mut cmd = bare();
    let port = port();
    for (k, v) in [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGUSER", "postgres"),
        ("PGPASSWORD", PASSWORD),
        ("PGDATABASE", "postgres"),
    ] {
        if !without.contains(&k) {
            cmd.env(k, v);
        }
    }
    cmd.env("HOME", scratch("home")).args(["--schema", schema]);
    cmd
}

fn file(dir: &std::path::Path, name: &str, text: &str, mode: u32) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn host_port_user_password_and_database_come_from_the_environment() {
    let s = unique("env");
    expect(with_env(&s, &[]).args(["put", "k", "v"]), 0);
    assert_eq!(expect(with_env(&s, &[]).args(["get", "k"]), 0), "v\n");
    // Without PGPASSWORD the server refuses the login (scram): exit 3.
    expect(with_env(&s, &["PGPASSWORD"]).args(["get", "k"]), 3);
    // A wrong PGDATABASE: exit 3 (the database does not exist).
    expect(
        with_env(&s, &[])
            .env("PGDATABASE", "nope")
            .args(["get", "k"]),
        3,
    );
    // What the URL says wins over the environment.
    let url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/postgres",
        port()
    );
    expect(
        with_env(&s, &[])
            .env("PGPORT", "1")
            .args(["--url", &url, "get", "k"]),
        0,
    );
}

#[test]
fn a_password_file_fills_a_missing_password_unless_others_can_read_it() {
    let s = unique("pgpass");
    let dir = scratch("pgpass");
    let line = format!("127.0.0.1:{}:postgres:postgres:{PASSWORD}\n", port());
    let private = file(&dir, "private", &line, 0o600);
    let open = file(&dir, "open", &line, 0o644);
    expect(
        with_env(&s, &["PGPASSWORD"])
            .env("PGPASSFILE", &private)
            .args(["put", "k", "v"]),
        0,
    );
    expect(
        with_env(&s, &["PGPASSWORD"])
            .env("PGPASSFILE", &open)
            .args(["get", "k"]),
        3,
    );
    // ~/.pgpass, found through HOME.
    let home = scratch("pgpass_home");
    file(&home, ".pgpass", &line, 0o600);
    expect(
        with_env(&s, &["PGPASSWORD"])
            .env("HOME", &home)
            .args(["get", "k"]),
        0,
    );
}

#[test]
fn a_service_file_names_the_server() {
    let s = unique("service");
    let dir = scratch("service");
    let text = format!(
        "[state]\nhost=127.0.0.1\nport={}\nuser=postgres\npassword={PASSWORD}\ndbname=postgres\n",
        port()
    );
    let services = file(&dir, "services.conf", &text, 0o600);
    let mut by_env = bare();
    by_env
        .env("PGSERVICE", "state")
        .env("PGSERVICEFILE", &services)
        .args(["--schema", &s, "put", "k", "v"]);
    expect(&mut by_env, 0);
    // service= in the connection string, from ~/.pg_service.conf.
    let home = scratch("service_home");
    file(&home, ".pg_service.conf", &text, 0o600);
    let mut by_url = bare();
    by_url
        .env("HOME", &home)
        .args(["--url", "service=state", "--schema", &s, "get", "k"]);
    assert_eq!(expect(&mut by_url, 0), "v\n");
    // A setting of the service file pgstate does not apply is an error, never dropped.
    let strict = file(
        &dir,
        "strict.conf",
        &format!("{text}channel_binding=require\n"),
        0o600,
    );
    let mut refused = bare();
    refused
        .env("PGSERVICE", "state")
        .env("PGSERVICEFILE", &strict)
        .args(["--schema", &s, "get", "k"]);
    let out = crate::run(&mut refused);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("channel_binding"),
        "{out:?}"
    );
    // A service found nowhere is an error naming it.
    let mut missing = bare();
    missing
        .env("HOME", &home)
        .args(["--url", "service=nosuch", "--schema", &s, "get", "k"]);
    expect(&mut missing, 3);
}

#[test]
fn the_application_name_comes_from_pgappname() {
    let s = unique("appname");
    let app = unique("app");
    expect(with_env(&s, &[]).args(["put", "k", "v"]), 0);
    let mut listen = with_env(&s, &[])
        .env("PGAPPNAME", &app)
        .args(["listen", "appname_chan", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let n = cluster()
            .psql(
                0,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"),
            )
            .unwrap();
        n.trim() != "0"
    });
    expect(with_env(&s, &[]).args(["notify", "appname_chan", "hi"]), 0);
    let done = listen.wait().unwrap();
    assert!(seen, "no session named {app}");
    assert!(done.success());
}

#[test]
fn pgconnect_timeout_bounds_connecting() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let started = Instant::now();
    expect(
        with_env(&unique("timeout"), &[])
            .env("PGPORT", &port)
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "2")
            .args(["get", "k"]),
        3,
    );
    // The command's own connect timeout is 10 s: 2 s must have cut it (generous margin).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[test]
fn tls_settings_come_from_the_environment_and_a_wrong_ca_is_refused() {
    let certs = cluster().certs().expect("a TLS test cluster");
    let s = unique("tls");
    let verify = |ca: &std::path::Path| {
        let mut cmd = with_env(&s, &[]);
        cmd.env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", ca)
            .args(["put", "k", "v"]);
        cmd
    };
    expect(&mut verify(&certs.ca_cert), 0);
    expect(&mut verify(&certs.other_ca_cert), 3);
    // sslmode=disable against a server that requires TLS for the certificate role: refused;
    // the client certificate and key from PGSSLCERT / PGSSLKEY log that role in.
    let cert_login = |mode: &str| {
        let mut cmd = with_env(&unique("certrole"), &["PGPASSWORD"]);
        cmd.env("PGUSER", CERT_USER)
            .env("PGSSLMODE", mode)
            .env("PGSSLROOTCERT", &certs.ca_cert)
            .env("PGSSLCERT", &certs.client_cert)
            .env("PGSSLKEY", &certs.client_key)
            .args(["put", "k", "v"]);
        cmd
    };
    expect(&mut cert_login("verify-full"), 0);
    expect(&mut cert_login("disable"), 3);
}

//! Build script, for the tests only (nothing in the library depends on it): sets two cfgs so
//! that a test that cannot run in this setup is reported by the harness as ignored, not as
//! passed:
//!
//! - `pgstate_citus` when the `citus` extension is installed for the PostgreSQL server
//!   binaries the tests use (the lookup of `pgstate_testcluster::citus_installed`); with
//!   `PGSTATE_REQUIRE_CITUS=1` a missing extension fails the build instead;
//! - `pgstate_external_server` when `PGSTATE_TEST_DATABASE_URL` is set: the tests run
//!   against that server, and those that need the local cluster (its replicas,
//!   certificates, PgBouncer) are ignored.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory of the server binaries: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else the first `PATH` entry holding them.
fn server_bindir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| has_server(d))
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pgstate_citus)");
    println!("cargo::rustc-check-cfg=cfg(pgstate_external_server)");
    println!("cargo::rerun-if-env-changed=PGSTATE_TEST_DATABASE_URL");
    if std::env::var("PGSTATE_TEST_DATABASE_URL").is_ok_and(|u| !u.trim().is_empty()) {
        println!("cargo::rustc-cfg=pgstate_external_server");
    }
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PGSTATE_REQUIRE_CITUS");
    let lib = server_bindir().and_then(|bin| bin.parent().map(|root| root.join("lib")));
    if let Some(lib) = lib.as_ref().filter(|l| l.is_dir()) {
        // Installing the extension changes the directory.
        println!("cargo::rerun-if-changed={}", lib.display());
    }
    let installed = lib.is_some_and(|l| l.join("citus.so").is_file());
    if installed {
        println!("cargo::rustc-cfg=pgstate_citus");
    } else if std::env::var("PGSTATE_REQUIRE_CITUS").as_deref() == Ok("1") {
        panic!("PGSTATE_REQUIRE_CITUS=1, but the citus extension is not installed");
    }
}

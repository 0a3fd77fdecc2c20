//! What the usage examples share: a server to run against.

use pgstate_testcluster::{Cluster, ClusterOptions};

/// `$DATABASE_URL`, or a throwaway local PostgreSQL started from the installed server
/// binaries (kept alive by the returned cluster, removed when it is dropped).
pub fn server() -> anyhow::Result<(String, Option<Cluster>)> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok((url, None));
    }
    eprintln!("DATABASE_URL is not set: starting a throwaway PostgreSQL ...");
    let cluster = Cluster::start(ClusterOptions {
        replicas: 0,
        tls: false,
        ..ClusterOptions::default()
    })?;
    Ok((
        format!("{}?sslmode=disable", cluster.primary_url()),
        Some(cluster),
    ))
}

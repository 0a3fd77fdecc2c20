//! `pgstate dev up | down | status`: a local primary, two streaming replicas and TLS, started
//! from the installed server binaries by the machinery the tests use, and kept running until
//! `dev down`.
//!
//! The cluster is private: a random superuser password, no `trust` (also not on the Unix
//! socket), its directory readable by its owner only. Its state lives in the dev directory
//! (`--dev-dir`, `$PGSTATE_DEV_DIR`, else per user: `$XDG_RUNTIME_DIR/pgstate-dev` or
//! `pgstate-dev-<uid>` in the temporary directory), which must belong to the user and is kept
//! at mode 0700: `cluster.json` (the cluster's directory and URLs) and `env` (`DATABASE_URL`
//! and `PGSTATE_REPLICA_URLS` for a shell), both 0600, since the URLs hold the password. Other
//! commands use that cluster when neither `--url` nor `$DATABASE_URL` is given. Printed URLs
//! never show the password.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use clap::Subcommand;
use pgstate_testcluster::{Cluster, ClusterOptions};
use processor::state::redact;

use crate::devstate::DevState;
use crate::exit::{CliError, NOT_FOUND, UNREACHABLE};
use crate::target::Target;

/// What `pgstate dev` does.
#[derive(Subcommand, Debug)]
pub enum DevAction {
    /// Start the cluster (or say where the running one is) and print its URLs.
    Up,
    /// Stop the cluster and remove its files.
    Down,
    /// Say whether the cluster runs, with its URLs (exit code 1 when there is none, 3 when a
    /// server does not answer).
    Status,
}

/// Whether the server of `url` accepts TCP connections on 127.0.0.1.
fn answers(url: &str) -> bool {
    let port = url
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse::<u16>().ok());
    port.is_some_and(|port| {
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )
        .is_ok()
    })
}

/// Starts a private cluster (random password, no `trust`): a primary, `replicas` streaming
/// replicas and TLS.
pub fn start_cluster(replicas: usize) -> Result<Cluster, CliError> {
    Ok(Cluster::start(ClusterOptions {
        replicas,
        tls: true,
        private: true,
        ..ClusterOptions::default()
    })?)
}

/// The URL of `cluster`'s node `i` over TLS, checking the server's certificate and name.
pub fn tls_url(cluster: &Cluster, i: usize) -> String {
    match cluster.certs() {
        Some(certs) => format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            cluster.url(i),
            certs.ca_cert.display()
        ),
        None => cluster.url(i),
    }
}

/// Runs `pgstate dev ACTION`.
pub async fn run(action: DevAction, target: &Target) -> Result<(), CliError> {
    let dev_dir = target.dev_dir().to_path_buf();
    match action {
        DevAction::Up => {
            if let Some(state) = DevState::load(&dev_dir)? {
                if answers(&state.primary) {
                    println!("the dev cluster is already running");
                    state.print(&dev_dir);
                    return Ok(());
                }
                // Left over from a machine restart: its servers are gone.
                let _ = pgstate_testcluster::stop_kept(&state.dir);
            }
            eprintln!("starting a primary, two streaming replicas and TLS ...");
            let cluster = tokio::task::spawn_blocking(|| start_cluster(2))
                .await
                .map_err(|e| CliError::failed(format!("starting the cluster: {e}")))??;
            let state = DevState {
                primary: tls_url(&cluster, 0),
                replicas: (1..cluster.nodes().len())
                    .map(|i| tls_url(&cluster, i))
                    .collect(),
                dir: cluster.dir().to_path_buf(),
            };
            // Kept only once its state is saved: else dropping it stops it.
            state.save(&dev_dir)?;
            cluster.keep();
            println!("the dev cluster is running (stop it with `pgstate dev down`)");
            state.print(&dev_dir);
            Ok(())
        }
        DevAction::Down => {
            let Some(state) = DevState::load(&dev_dir)? else {
                println!("no dev cluster is running");
                return Ok(());
            };
            let dir = state.dir.clone();
            // Its files may be gone already (a temporary directory emptied at boot).
            if dir.exists() {
                tokio::task::spawn_blocking(move || pgstate_testcluster::stop_kept(&dir))
                    .await
                    .map_err(|e| CliError::failed(format!("stopping the cluster: {e}")))??;
            }
            DevState::forget(&dev_dir)?;
            println!("the dev cluster is stopped and its files removed");
            Ok(())
        }
        DevAction::Status => {
            let Some(state) = DevState::load(&dev_dir)? else {
                println!("no dev cluster is running");
                return Err(CliError::new(NOT_FOUND, ""));
            };
            let mut down = 0;
            for (name, url) in std::iter::once(("primary", &state.primary))
                .chain(state.replicas.iter().map(|r| ("replica", r)))
            {
                let up = answers(url);
                down += usize::from(!up);
                println!(
                    "{name:8} {} {}",
                    if up { "up  " } else { "DOWN" },
                    redact(url)
                );
            }
            if down > 0 {
                return Err(CliError::new(
                    UNREACHABLE,
                    format!("{down} server(s) of the dev cluster do not answer"),
                ));
            }
            Ok(())
        }
    }
}

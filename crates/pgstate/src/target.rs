//! Which server a command talks to: `--url`, else `$DATABASE_URL`, else libpq's environment
//! (`PGHOST` or `PGSERVICE`; its other variables, service files and password file fill what
//! any URL leaves unset), else the cluster that `pgstate dev up` keeps running; and the
//! backend a command opens there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresPoolConfig, PostgresReplicaConfig,
};

use crate::devstate::{default_dev_dir, DevState};
use crate::exit::{CliError, UNREACHABLE};
use crate::Cli;

/// The server and table the command line names.
pub struct Target {
    url: Option<String>,
    replicas: Vec<String>,
    read_replicas: bool,
    /// The state table's schema.
    pub schema: String,
    /// The state table.
    pub table: String,
    dev_dir: PathBuf,
}

impl Target {
    /// The target of `cli`.
    pub fn new(cli: &Cli) -> Self {
        Target {
            url: cli.url.clone().filter(|u| !u.trim().is_empty()),
            replicas: cli.replicas.clone(),
            read_replicas: cli.read_replicas,
            schema: cli.schema.clone(),
            table: cli.table.clone(),
            dev_dir: cli.dev_dir.clone().unwrap_or_else(default_dev_dir),
        }
    }

    /// Where `pgstate dev` keeps its cluster's state.
    pub fn dev_dir(&self) -> &Path {
        &self.dev_dir
    }

    /// The URL given on the command line or in `$DATABASE_URL`, if any.
    pub fn given_url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// The primary's URL and the replicas' URLs to use.
    pub fn resolve(&self) -> Result<(String, Vec<String>), CliError> {
        if let Some(url) = &self.url {
            return Ok((url.clone(), self.replicas.clone()));
        }
        // libpq's environment names a server: an empty URL, filled from it as psql would.
        if ["PGHOST", "PGSERVICE"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|h| !h.is_empty()))
        {
            return Ok(("postgresql://".to_string(), self.replicas.clone()));
        }
        match DevState::load(&self.dev_dir)? {
            Some(dev) => {
                let replicas = if self.replicas.is_empty() {
                    dev.replicas
                } else {
                    self.replicas.clone()
                };
                Ok((dev.primary, replicas))
            }
            None => Err(CliError::new(
                UNREACHABLE,
                "no server: give --url, set DATABASE_URL (or PGHOST, or PGSERVICE), or start a local cluster with `pgstate dev up`",
            )),
        }
    }

    /// The configuration of a backend on `url` with `replicas`, for this command line's table.
    pub fn config(&self, url: &str, replicas: &[String]) -> EnhancedPostgresConfig {
        let mut config = EnhancedPostgresConfig::new(url)
            .with_schema(self.schema.clone())
            .with_table_name(self.table.clone())
            .with_application_name("pgstate-cli")
            // A command runs and ends: cleanup is `retention apply`'s work, not a side effect.
            .with_expired_cleanup(false)
            .with_connect_timeout(Duration::from_secs(10))
            .with_pool_config(PostgresPoolConfig {
                min_connections: 1,
                max_connections: 8,
                acquire_timeout: Duration::from_secs(30),
                ..PostgresPoolConfig::default()
            });
        if !replicas.is_empty() {
            config = config.with_replicas(PostgresReplicaConfig {
                replica_urls: replicas.to_vec(),
                enable_read_splitting: true,
                max_replication_lag_ms: 5_000,
                health_check_interval: Duration::from_secs(1),
                enable_auto_failover: true,
            });
        }
        config
    }

    /// A backend on the resolved server (this creates or upgrades the schema). Its reads go
    /// to the primary unless `--read-replicas` was given: each command is a session of its
    /// own, so a read from a replica might not see what the previous command wrote.
    pub async fn backend(&self) -> Result<EnhancedPostgresBackend, CliError> {
        let (url, replicas) = self.resolve()?;
        self.open(self.config(&url, &replicas)).await
    }

    /// A backend on the resolved server's existing table, for a command that only reads: it
    /// creates and upgrades nothing, and a table that does not exist (or lacks migrations) is
    /// "not found" (exit 1), naming `pgstate migrate`.
    pub async fn existing(&self) -> Result<EnhancedPostgresBackend, CliError> {
        let (url, replicas) = self.resolve()?;
        self.open(self.config(&url, &replicas).with_schema_changes(false))
            .await
    }

    /// A backend with `config` (a command's variant of [`config`](Self::config)), reading as
    /// [`backend`](Self::backend) does.
    pub async fn open(
        &self,
        config: EnhancedPostgresConfig,
    ) -> Result<EnhancedPostgresBackend, CliError> {
        let backend = EnhancedPostgresBackend::new(config).await?;
        Ok(if self.read_replicas {
            backend
        } else {
            backend.reading_from_primary()
        })
    }
}

//! Layer `assembly`: a backend's parts, built from a configuration in order: validation, the
//! migrated table, the primary's pool, the replicas and their monitor, the coordinator, the
//! store, and the current write window; then its background tasks (`background`: cleanup
//! passes and write windows; `published`: the node figures for the `metrics` facade). The
//! facades (`enhanced`, `basic`, the lease lock) hold the [`Core`] it builds; it holds no
//! behaviour of its own beyond starting and stopping those tasks.
//!
//! May use every layer below the facades.

mod background;
pub(crate) mod published;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::config::TargetSessionAttrs;

use crate::state::config::connspec::ConnectionSpec;
use crate::state::config::enhanced::{EnhancedPostgresConfig, PostgresPoolConfig, ValidatedConfig};
use crate::state::coordination::Coordinator;
use crate::state::error::StateResult;
use crate::state::maintenance;
use crate::state::ops::store::Store;
use crate::state::pool::conn_pool::ConnPool;
use crate::state::pool::context::Context;
use crate::state::routing::router::{spawn_monitor, Replica, Router};
use crate::state::schema::migrations::{migrate, status, verify, MigrationStatus};
use crate::state::schema::names::TableNames;
use crate::state::stats::counters::{BackendStats, Stats};
use crate::state::wire::connection::Connector;

pub(crate) use background::plan;

/// One backend's parts, shared by all its handles; the background tasks stop when it drops.
pub(crate) struct Core {
    /// Every key/value operation over the pools.
    pub store: Store,
    /// Advisory locks, leader election, LISTEN/NOTIFY.
    pub coordinator: Arc<Coordinator>,
    /// The configuration it was built from.
    pub config: EnhancedPostgresConfig,
    /// The replica monitor's task, when one runs.
    monitor: Option<JoinHandle<()>>,
    /// The background cleanup task, when one runs.
    cleanup: OnceLock<JoinHandle<()>>,
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(m) = &self.monitor {
            m.abort();
        }
        if let Some(c) = self.cleanup.get() {
            c.abort();
        }
    }
}

impl Core {
    /// The operation counters and timings, with every node's connection and read figures
    /// read once (so the read counts add up to `reads_by_node`).
    pub fn stats(&self) -> BackendStats {
        let s = &self.store;
        let mut stats = s.ctx.stats.snapshot();
        let nodes = published::nodes(s);
        let reads = |primary: bool| -> u64 {
            nodes
                .iter()
                .filter(|n| n.primary == primary)
                .map(|n| n.reads)
                .sum()
        };
        stats.primary_reads = reads(true);
        stats.replica_reads = reads(false);
        (
            stats.connections_created,
            stats.connections_closed,
            stats.connections_broken,
            stats.reads_by_node,
        ) = published::connections_and_reads(&nodes);
        stats.read_failovers = s.router.failovers();
        stats.puts_queued = u64::try_from(s.coalescer.waiting()).unwrap_or(u64::MAX);
        stats.gets_queued = u64::try_from(s.lookups.waiting()).unwrap_or(u64::MAX);
        stats
    }
}

/// Validates `config`, connects, applies the embedded migrations (under an advisory lock, so
/// concurrent starts are safe), opens the pools, starts the replica monitor when there is
/// anything to watch and the current write window of a time-partitioned table, then the
/// background tasks.
pub(crate) async fn assemble(config: EnhancedPostgresConfig) -> StateResult<Arc<Core>> {
    let (store, coordinator, monitor, windows) = parts(&config).await?;
    tracing::info!(url = %config.redacted_url(), table = %store.ctx.names.qualified, replicas = store.router.replicas.len(), "state backend ready");
    let label = store.ctx.names.label.clone();
    let core = Arc::new(Core {
        store,
        coordinator,
        config,
        monitor,
        cleanup: OnceLock::new(),
    });
    published::spawn_publisher(Arc::downgrade(&core), label);
    if let Some(task) = background::spawn_cleanup(&core, windows) {
        let _ = core.cleanup.set(task);
    }
    Ok(core)
}

/// What [`parts`] builds: the store, the coordinator, the monitor's task, and the write
/// windows' length and premake count of a table partitioned by write window.
type Parts = (
    Store,
    Arc<Coordinator>,
    Option<JoinHandle<()>>,
    Option<(Duration, u32)>,
);

/// The parts, in order (see [`assemble`]).
async fn parts(config: &EnhancedPostgresConfig) -> StateResult<Parts> {
    let valid = config.validate()?;
    let (connector, names) = migrated(config, &valid).await?;
    let lock_connector = session_connector(config, &valid, &connector)?;
    let op_timeout = config.operation_timeout;
    let primary = ConnPool::new(connector, names.clone(), &config.pool, false, op_timeout).await?;
    let settings = config.replicas.clone().unwrap_or_default();
    let interval = settings.health_check_interval;
    let router = Arc::new(Router::new(
        replicas(config, &valid, &names).await?,
        settings,
        config.read_your_writes,
    ));
    // Also without replicas, a multi-host URL gets the monitor, which notes failovers.
    let monitor = if router.replicas.is_empty() && valid.primary.pg.get_hosts().len() < 2 {
        None
    } else {
        // One round now, so healthy replicas serve reads from the start.
        router.check(&primary).await;
        Some(spawn_monitor(
            Arc::downgrade(&router),
            Arc::downgrade(&primary),
            interval,
        ))
    };
    let ctx = Arc::new(Context {
        stats: Arc::new(
            Stats::new(config.slow_query_threshold, &names.label)
                .logging_statements(config.log_statements),
        ),
        primary,
        names,
        limit: op_timeout,
    });
    let coordinator = Arc::new(Coordinator::new(lock_connector.as_ref(), ctx.clone()));
    let store = Store {
        ctx,
        router,
        coalescer: Arc::default(),
        lookups: Arc::default(),
    };
    // A backend that may not change the schema starts no write window and creates no
    // partition, now or in the background: instances that may do it.
    let windows = if config.schema_changes {
        maintenance::window_settings(&store, config).await?
    } else {
        None
    };
    if let Some((window, premake)) = windows {
        // Best effort: a table busy or a role without rights to create partitions must not
        // stop the backend; writes go on into the current window meanwhile, and the
        // background task tries again.
        if let Err(e) = maintenance::roll_windows(&store, window, premake).await {
            tracing::warn!(table = %store.ctx.names.qualified, error = %e, "starting the write window of now failed");
        }
    }
    Ok((store, coordinator, monitor, windows))
}

/// Where the state table of `config` stands with the embedded migrations, read on a
/// connection of its own; nothing is created.
pub(crate) async fn migration_status(
    config: &EnhancedPostgresConfig,
) -> StateResult<MigrationStatus> {
    let valid = config.validate()?;
    let names = TableNames::new(valid.schema.clone(), valid.table.clone());
    let client = connector(config, &valid.primary)?.connect().await?;
    status(&client, &names).await
}

/// A connector to `spec` with the configuration's timeouts and application name.
fn connector(config: &EnhancedPostgresConfig, spec: &ConnectionSpec) -> StateResult<Connector> {
    Connector::new(
        spec,
        config.connect_timeout,
        config.statement_timeout,
        &config.application_name,
    )
}

/// The primary's connector and the state table's names, once the migrations are applied
/// (the names then know the table's layout).
async fn migrated(
    config: &EnhancedPostgresConfig,
    valid: &ValidatedConfig,
) -> StateResult<(Connector, TableNames)> {
    let mut names = TableNames::new(valid.schema.clone(), valid.table.clone());
    let mut connector = connector(config, &valid.primary)?;
    connector.require_writable();
    let client = connector.connect().await?;
    let migrated = if config.schema_changes {
        migrate(
            client,
            &names,
            config.partitioning.as_ref(),
            config.citus.as_ref(),
        )
        .await?
    } else {
        verify(&client, &names).await?
    };
    names.windowed = migrated.layout.windowed();
    names.distributed = migrated.distributed;
    Ok((connector, names))
}

/// Where session features (session advisory locks, guards, leader election, LISTEN) connect:
/// the session URL when there is one, else the primary's, unless that goes through
/// PgBouncer's transaction pooling (then none).
fn session_connector(
    config: &EnhancedPostgresConfig,
    valid: &ValidatedConfig,
    primary: &Connector,
) -> StateResult<Option<Connector>> {
    Ok(match &valid.session {
        Some(spec) => {
            let mut c = connector(config, spec)?;
            c.require_writable();
            Some(c)
        }
        None if primary.transaction_pooling => None,
        None => Some(primary.clone()),
    })
}

/// A pool for each replica URL.
async fn replicas(
    config: &EnhancedPostgresConfig,
    valid: &ValidatedConfig,
    names: &TableNames,
) -> StateResult<Vec<Replica>> {
    // A replica that cannot answer within this is taken out of rotation for the read that
    // waited (which then runs elsewhere) until its next good check.
    let replica_pool = PostgresPoolConfig {
        acquire_timeout: config.pool.acquire_timeout.min(Duration::from_secs(2)),
        ..config.pool.clone()
    };
    let mut replicas = Vec::new();
    for spec in &valid.replicas {
        let connector = connector(config, spec)?;
        let name = connector
            .target
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        let single_server = spec.pg.get_hosts().len() == 1;
        let follows_standby =
            !single_server && spec.pg.get_target_session_attrs() == TargetSessionAttrs::ReadOnly;
        if !single_server && !follows_standby {
            tracing::warn!(replica = %name, "a multi-host replica URL without target_session_attrs=read-only reaches whichever host answers first, which may be the primary");
        }
        let pool = ConnPool::new(
            connector,
            names.clone(),
            &replica_pool,
            true,
            config.operation_timeout,
        )
        .await?;
        replicas.push(Replica::new(pool, name, single_server, follows_standby));
    }
    Ok(replicas)
}

//! One connection: connecting with the configured `sslmode` (including libpq's `allow` and
//! `prefer` fallbacks), session settings, the health probe and broken-connection detection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Error, NoTls, Notification, Row, Socket};

use crate::state::config::connspec::{ConnectionSpec, SslMode};
use crate::state::error::{classify, StateError, StateResult};
use crate::state::schema::names::TableNames;
use crate::state::wire::statements::{Param, StatementCache, Statements};
use crate::state::wire::tls::TlsSetup;

/// Opens connections to one server.
#[derive(Clone)]
pub(crate) struct Connector {
    pg: tokio_postgres::Config,
    tls: TlsSetup,
    timeout: Duration,
    statement_timeout: Option<Duration>,
    /// Shown in errors instead of the URL, which may hold a password.
    pub(crate) target: String,
    /// Behind PgBouncer's transaction pooling: statements are sent unnamed, and nothing is
    /// set on the session.
    pub(crate) transaction_pooling: bool,
}

impl Connector {
    pub fn new(
        spec: &ConnectionSpec,
        connect_timeout: Duration,
        statement_timeout: Option<Duration>,
        application_name: &str,
    ) -> StateResult<Self> {
        let tls = TlsSetup::new(&spec.ssl)?;
        let mut pg = spec.pg.clone();
        // A connect_timeout of the connection string (or PGCONNECT_TIMEOUT) wins, as in libpq.
        let connect_timeout = pg.get_connect_timeout().copied().unwrap_or(connect_timeout);
        pg.connect_timeout(connect_timeout);
        // TCP keepalives probe after 5 s of silence every 2 s, and unacknowledged data gives up
        // after 11 s: a dead peer or network ends a connection (pooled or dedicated) within
        // about 11 s instead of the kernel's default of many minutes. A frozen server that
        // still acknowledges is caught by the operation timeout instead.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(5));
        pg.keepalives_interval(Duration::from_secs(2));
        pg.keepalives_retries(3);
        pg.tcp_user_timeout(Duration::from_secs(11));
        if pg.get_application_name().is_none() {
            pg.application_name(application_name);
        }
        let target = describe(&pg);
        Ok(Connector {
            pg,
            tls,
            timeout: connect_timeout,
            statement_timeout,
            target,
            transaction_pooling: spec.pgbouncer,
        })
    }

    /// A connector for a long-lived dedicated session (a held advisory lock, a leader lease, a
    /// LISTEN): the same TCP keepalives as pooled connections (a dead peer ends the session,
    /// and fires its lost signal, within about 11 s); no statement timeout, since a lock wait
    /// is bounded by its own `lock_timeout`.
    pub fn dedicated(&self) -> Self {
        let mut c = self.clone();
        c.statement_timeout = None;
        c
    }

    /// Connects a dedicated session (see [`dedicated`](Self::dedicated)) and makes the server
    /// side match: its own keepalives (so a vanished client's locks are freed within about
    /// 11 s, not hours), no statement, lock or idle timeouts inherited from the role or
    /// database (which would end a held lock or a long wait behind our back), and a check for
    /// a closed client connection while a lock wait runs. Settings the server does not know
    /// (older versions) are skipped.
    pub async fn connect_dedicated(&self) -> StateResult<Connected> {
        let session = self.connect_session().await?;
        const SETTINGS: &[(&str, &str)] = &[
            ("statement_timeout", "0"),
            ("lock_timeout", "0"),
            ("idle_in_transaction_session_timeout", "0"),
            ("idle_session_timeout", "0"),
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "11000"),
            ("client_connection_check_interval", "1000"),
        ];
        let all: String = SETTINGS
            .iter()
            .map(|(k, v)| format!("SET {k} = {v};"))
            .collect();
        if session.client.batch_execute(&all).await.is_err() {
            for (k, v) in SETTINGS {
                if let Err(e) = session
                    .client
                    .batch_execute(&format!("SET {k} = {v}"))
                    .await
                {
                    if session.client.is_closed() {
                        return Err(self.err(&e));
                    }
                    tracing::debug!(setting = k, error = %e, "dedicated session setting skipped");
                }
            }
        }
        Ok(session)
    }

    /// Sends a cancel request for the statement running on the session `token` belongs to
    /// (over TLS when that session used TLS). Best effort: failures are logged.
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) {
        let result = match &self.tls.connector {
            Some(tls) => token.cancel_query(tls.clone()).await,
            None => token.cancel_query(NoTls).await,
        };
        if let Err(e) = result {
            tracing::debug!(target = %self.target, error = %e, "cancel request failed");
        }
    }

    /// Connect only to a server that accepts writes (libpq's `target_session_attrs=read-write`):
    /// with several hosts in the URL, the one that is the primary now.
    pub fn require_writable(&mut self) {
        self.pg
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }

    /// Connects, honouring `sslmode`, bounded by the connect timeout as a whole (TCP, TLS and
    /// authentication).
    pub async fn connect(&self) -> StateResult<Client> {
        Ok(self.connect_session().await?.client)
    }

    /// Like [`connect`](Self::connect), keeping what the connection's I/O task reports: when
    /// the connection ends, and the notifications it receives.
    pub async fn connect_session(&self) -> StateResult<Connected> {
        let attempt = self.connect_with_fallbacks();
        let session = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(StateError::Timeout(format!(
                    "connecting to {} took longer than {:?}",
                    self.target, self.timeout
                )))
            }
        };
        if let (Some(t), false) = (self.statement_timeout, self.transaction_pooling) {
            // A number we format ourselves; nothing from the caller reaches the SQL text.
            let sql = format!("SET statement_timeout = {}", t.as_millis().max(1));
            session
                .client
                .batch_execute(&sql)
                .await
                .map_err(|e| self.err(&e))?;
        }
        Ok(session)
    }

    async fn connect_with_fallbacks(&self) -> StateResult<Connected> {
        match (self.tls.mode, &self.tls.connector) {
            (SslMode::Disable, _) | (_, None) => self.plain().await,
            (SslMode::Allow, Some(tls)) => match self.plain().await {
                Ok(c) => Ok(c),
                // libpq: if the plaintext attempt fails, try again with TLS.
                Err(first) => self
                    .with_tls(tls.clone(), PgSslMode::Require)
                    .await
                    .inspect_err(|_| {
                        tracing::debug!(error = %first, "plaintext attempt failed (sslmode=allow)");
                    }),
            },
            (SslMode::Prefer, Some(tls)) => {
                match self.with_tls(tls.clone(), PgSslMode::Prefer).await {
                    // libpq: if the TLS attempt fails for any reason (handshake, verification,
                    // or the server rejecting the TLS session), try again without TLS.
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS attempt failed (sslmode=prefer); trying plaintext");
                        self.plain().await
                    }
                    ok => ok,
                }
            }
            (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(tls)) => {
                self.with_tls(tls.clone(), PgSslMode::Require).await
            }
        }
    }

    async fn plain(&self) -> StateResult<Connected> {
        let mut pg = self.pg.clone();
        pg.ssl_mode(PgSslMode::Disable);
        self.finish(pg, NoTls).await
    }

    async fn with_tls<T>(&self, tls: T, mode: PgSslMode) -> StateResult<Connected>
    where
        T: MakeTlsConnect<Socket> + Send,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let mut pg = self.pg.clone();
        pg.ssl_mode(mode);
        self.finish(pg, tls).await
    }

    async fn finish<T>(&self, pg: tokio_postgres::Config, tls: T) -> StateResult<Connected>
    where
        T: MakeTlsConnect<Socket> + Send,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let (client, mut connection) = pg.connect(tls).await.map_err(|e| self.err(&e))?;
        let target = self.target.clone();
        let (closed_tx, closed) = watch::channel(false);
        let (notify_tx, notifications) = mpsc::channel::<Notification>(NOTIFICATION_BUFFER);
        let overflowed = Arc::new(AtomicBool::new(false));
        let overflow = overflowed.clone();
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        // Never wait here: this task also reads the replies to the listener's
                        // own queries, so waiting for the listener could deadlock. A full
                        // buffer drops the notification and says so.
                        if let Err(mpsc::error::TrySendError::Full(_)) = notify_tx.try_send(n) {
                            overflow.store(true, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        tracing::debug!(target = %target, notice = %n.message(), "server notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(target = %target, error = %e, "connection closed");
                        break;
                    }
                    None => break,
                }
            }
            let _ = closed_tx.send(true);
        });
        Ok(Connected {
            client,
            closed,
            notifications,
            overflowed,
        })
    }

    /// Classifies a driver error and names the server (never the URL) in connection errors.
    pub fn err(&self, e: &tokio_postgres::Error) -> StateError {
        match classify(e) {
            StateError::Connection { message, sqlstate } => StateError::Connection {
                message: format!("{}: {message}", self.target),
                sqlstate,
            },
            StateError::Tls(message) => StateError::Tls(format!("{}: {message}", self.target)),
            other => other,
        }
    }
}

/// Notifications a connection buffers for its reader; more are dropped (and flagged).
pub(crate) const NOTIFICATION_BUFFER: usize = 8192;

/// A connection together with what its I/O task reports.
pub(crate) struct Connected {
    pub client: Client,
    /// Becomes `true` (or its sender is dropped) when the connection has ended.
    pub closed: watch::Receiver<bool>,
    /// Notifications received on this connection (after a LISTEN).
    pub notifications: mpsc::Receiver<Notification>,
    /// Set when a notification was dropped because `notifications` was full.
    pub overflowed: Arc<AtomicBool>,
}

/// Resolves once the connection behind `closed` has ended.
pub(crate) async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    // An error means the I/O task is gone, which also means the connection is.
    let _ = closed.wait_for(|c| *c).await;
}

/// `host:port[,host:port] db=... user=...`, without any secret.
fn describe(pg: &tokio_postgres::Config) -> String {
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!(
        "{} (database {}, user {})",
        hosts.join(","),
        pg.get_dbname().unwrap_or("<default>"),
        pg.get_user().unwrap_or("<none>")
    )
}

/// A pooled connection: the client, its prepared statements, and what it has set up. Whether
/// it may be reused is the business of its checkout (see the `pool` module).
///
/// The larger parts are boxed: a connection is moved with every checkout and held in every
/// transaction's future, and each move copies it.
pub(crate) struct PgConn {
    pub client: Client,
    pub stmts: Box<Statements>,
    /// Whether this session's COPY staging table exists.
    pub copy_stage_ready: AtomicBool,
    /// Ad-hoc statements prepared on first use.
    pub cache: StatementCache,
    /// Opens connections to the same server: for cancel requests and for looking up this
    /// connection's server process (see the `settle` module).
    pub origin: Box<Connector>,
    /// Cancels the statement running on this connection.
    pub cancel: tokio_postgres::CancelToken,
    /// The server process: its id and start time in microseconds since the epoch (none
    /// behind PgBouncer's transaction pooling, where it changes per transaction).
    pub backend: Option<(i32, i64)>,
}

impl PgConn {
    /// Connects and prepares the fixed statements for `names`.
    ///
    /// The session plans them generically once (`plan_cache_mode = force_generic_plan`): on a
    /// partitioned table PostgreSQL would otherwise plan every execution again, because a
    /// generic plan that prunes partitions only when it runs looks as dear as reading all of
    /// them (measured: point reads on 16 hash partitions at 0.54x a plain table's rate, 0.92x
    /// with generic plans; BENCHMARKS.md). Behind PgBouncer's transaction pooling statements
    /// are unnamed and planned with their values each time anyway. Maintenance batches, whose
    /// `LIMIT` a generic plan would guess, set `plan_cache_mode = auto` for their transaction.
    pub async fn open(connector: &Connector, names: &TableNames) -> StateResult<Self> {
        let client = connector.connect().await?;
        let mut backend = None;
        if !connector.transaction_pooling {
            // Citus makes its own choice (custom plans, so each statement reaches its shard;
            // a generic plan of a multi-shard query cannot be distributed).
            let plans = if names.distributed {
                ""
            } else {
                "SET plan_cache_mode = force_generic_plan; "
            };
            // The server process, identified for settling (see the `settle` module).
            let sql = format!(
                "{plans}SELECT pg_backend_pid()::text, \
                 ((extract(epoch FROM backend_start) * 1000000)::int8)::text \
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            );
            for msg in client.simple_query(&sql).await? {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
                    let pid = row.get(0).and_then(|v| v.parse().ok());
                    let started = row.get(1).and_then(|v| v.parse().ok());
                    backend = pid.zip(started);
                }
            }
        }
        let stmts = Statements::prepare(&client, names, connector.transaction_pooling).await?;
        Ok(PgConn {
            cancel: client.cancel_token(),
            client,
            stmts: Box::new(stmts),
            copy_stage_ready: AtomicBool::new(false),
            cache: StatementCache::default(),
            origin: Box::new(connector.clone()),
            backend,
        })
    }

    /// One cheap round trip (an empty query).
    pub async fn probe(&self) -> StateResult<()> {
        self.client.simple_query("").await?;
        Ok(())
    }
}

/// The parameters without their types, for a prepared statement.
fn values<'a>(params: &[(Param<'a>, Type)]) -> (Vec<Param<'a>>, Vec<Type>) {
    params.iter().map(|(p, t)| (*p, t.clone())).unzip()
}

impl PgConn {
    /// Like `Client::query_typed`, prepared once on this connection (see [`StatementCache`]).
    pub async fn query_cached(
        &self,
        sql: &str,
        params: &[(Param<'_>, Type)],
    ) -> Result<Vec<Row>, Error> {
        let (vals, types) = values(params);
        match self
            .cache
            .get(&self.client, self.stmts.unnamed(), sql, &types)
            .await?
        {
            Some(stmt) => self.client.query(&stmt, &vals).await,
            None => self.client.query_typed(sql, params).await,
        }
    }

    /// Like `Client::query_typed_opt`, prepared once on this connection.
    pub async fn query_opt_cached(
        &self,
        sql: &str,
        params: &[(Param<'_>, Type)],
    ) -> Result<Option<Row>, Error> {
        let (vals, types) = values(params);
        match self
            .cache
            .get(&self.client, self.stmts.unnamed(), sql, &types)
            .await?
        {
            Some(stmt) => self.client.query_opt(&stmt, &vals).await,
            None => self.client.query_typed_opt(sql, params).await,
        }
    }

    /// Like `Client::query_typed_one`, prepared once on this connection.
    pub async fn query_one_cached(
        &self,
        sql: &str,
        params: &[(Param<'_>, Type)],
    ) -> Result<Row, Error> {
        let (vals, types) = values(params);
        match self
            .cache
            .get(&self.client, self.stmts.unnamed(), sql, &types)
            .await?
        {
            Some(stmt) => self.client.query_one(&stmt, &vals).await,
            None => self.client.query_typed_one(sql, params).await,
        }
    }

    /// Like `Client::execute_typed`, prepared once on this connection.
    pub async fn execute_cached(
        &self,
        sql: &str,
        params: &[(Param<'_>, Type)],
    ) -> Result<u64, Error> {
        let (vals, types) = values(params);
        match self
            .cache
            .get(&self.client, self.stmts.unnamed(), sql, &types)
            .await?
        {
            Some(stmt) => self.client.execute(&stmt, &vals).await,
            None => self.client.execute_typed(sql, params).await,
        }
    }
}

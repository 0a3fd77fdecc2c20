//! LISTEN/NOTIFY: [`PostgresListener`] on a dedicated connection that reconnects, plain or
//! durable.
//!
//! **Plain** notifications are PostgreSQL's: delivered to sessions listening at commit time, lost
//! for a listener whose connection is down. After a reconnect the listener reports that
//! notifications may have been missed.
//!
//! **Durable** events ([`EnhancedPostgresBackend::notify_durable`](crate::state::EnhancedPostgresBackend::notify_durable))
//! are rows in `state_events` with a gapless sequence number per channel, inserted in the same
//! transaction as the `NOTIFY` that wakes listeners. Producers on one channel are ordered by the
//! channel's row lock, so sequence numbers become visible in order. A durable listener reads the
//! rows after the last sequence number it delivered, so after a reconnect it catches up with
//! nothing lost or duplicated, in order per channel. Old events are removed with
//! [`prune_events`](crate::state::EnhancedPostgresBackend::prune_events); a listener that falls
//! behind pruning reports the missing range.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::state::config::connspec::ConnectionSpec;
use crate::state::coordination::CoordinationHandle;
use crate::state::error::{StateError, StateResult};
use crate::state::ident::{check_channel, quote_channel};
use crate::state::limits::MAX_METADATA_LEN;
use crate::state::retry::backoff;
use crate::state::wire::connection::{Connected, Connector, NOTIFICATION_BUFFER};

/// PostgreSQL's limit on a notification payload: it must be shorter than 8000 bytes.
pub const MAX_NOTIFY_PAYLOAD: usize = 7999;

/// Checks a plain notification's payload (no NUL, under 8000 bytes).
pub(crate) fn check_payload(payload: &str) -> StateResult<()> {
    if payload.len() > MAX_NOTIFY_PAYLOAD {
        return Err(StateError::invalid(format!(
            "notification payload is {} bytes; PostgreSQL allows at most {MAX_NOTIFY_PAYLOAD} \
             (use notify_durable for larger payloads)",
            payload.len()
        )));
    }
    check_text(payload)
}

/// Checks a durable event's payload (no NUL, at most 32 MiB).
pub(crate) fn check_durable_payload(payload: &str) -> StateResult<()> {
    if payload.len() > MAX_METADATA_LEN {
        return Err(StateError::invalid(format!(
            "event payload is {} bytes; at most {MAX_METADATA_LEN} allowed",
            payload.len()
        )));
    }
    check_text(payload)
}

fn check_text(payload: &str) -> StateResult<()> {
    if payload.contains('\0') {
        return Err(StateError::invalid("payload contains a NUL byte"));
    }
    Ok(())
}

/// `pg_notify` for a plain notification: channel and payload as parameters.
pub(crate) const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";

/// One statement that appends a durable event to `channel` ($1) with `payload` ($2), taking the
/// channel's next sequence number, and wakes listeners with that number as the payload. The
/// channel row stays locked until commit, so events of one channel commit in sequence order.
pub(crate) fn durable_notify_sql(names: &crate::state::schema::names::TableNames) -> String {
    format!(
        "WITH c AS (
             INSERT INTO {channels} AS c (channel, last_seq) VALUES ($1, 1)
             ON CONFLICT (channel) DO UPDATE SET last_seq = c.last_seq + 1
             RETURNING last_seq
         ), e AS (
             INSERT INTO {events} (channel, seq, payload) SELECT $1, last_seq, $2 FROM c
             RETURNING seq
         )
         SELECT seq, pg_notify($1, seq::text)::text FROM e",
        channels = names.event_channels,
        events = names.events
    )
}

/// One notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The channel it was sent on.
    pub channel: String,
    /// The payload.
    pub payload: String,
    /// Durable mode: the event's sequence number on its channel (1, 2, 3, ...).
    pub seq: Option<i64>,
}

/// Durable mode: where each channel's delivery stands.
struct Durable {
    /// Reads a channel's events after a sequence number, in order.
    fetch_sql: String,
    /// Reads a channel's last sequence number.
    end_sql: String,
    /// The last sequence number delivered, per channel.
    positions: HashMap<String, i64>,
    /// Channels that may have undelivered events.
    stale: HashSet<String>,
    /// Fetched, not yet delivered.
    buffer: VecDeque<Notification>,
    /// `fetch_sql` prepared on the current session (prepared again after a reconnect).
    fetch: Option<tokio_postgres::Statement>,
}

/// Rows fetched per catch-up query, at most.
const FETCH: i64 = 500;
/// Payload bytes fetched per catch-up query: rows stop at the first that would start past
/// it (so one query holds at most this much plus one payload).
const FETCH_BYTES: i64 = 8 * 1024 * 1024;

/// Receives notifications on a dedicated connection.
///
/// Up to 8192 notifications wait in memory for `recv`; a listener that falls further behind
/// loses the excess and is told so ([`StateError::NotificationsMissed`] in plain mode; a
/// durable listener simply re-reads the table).
///
/// The connection uses the TLS settings of the URL or backend it was made from. When it drops,
/// [`recv`](Self::recv) reconnects with exponential backoff (100 ms doubling to 5 s, for as long
/// as it takes), listens again on every channel, and then:
/// - plain mode: returns [`StateError::NotificationsMissed`] once (notifications sent while the
///   connection was down are lost), then carries on;
/// - durable mode: delivers the events committed meanwhile, in order, each exactly once.
///
/// Dropping the listener closes its connection.
pub struct PostgresListener {
    connector: Connector,
    channels: Vec<String>,
    session: Option<Connected>,
    durable: Option<Durable>,
    missed: Option<String>,
    reconnects: u64,
    /// The server process id of the current connection.
    pid: Option<i32>,
}

/// The server process id of a session.
async fn session_pid(session: &Connected) -> StateResult<i32> {
    Ok(session
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .try_get(0)?)
}

impl PostgresListener {
    /// Connects to `url` (any URL or keyword string the backend accepts, including `sslmode`,
    /// `sslrootcert`, `sslcert` and `sslkey`, with libpq's environment filling what it leaves
    /// unset, as for the backend) and listens on `channel`.
    pub async fn new(url: &str, channel: &str) -> StateResult<Self> {
        let spec = ConnectionSpec::parse_in_env(url)?;
        if spec.pgbouncer {
            return Err(StateError::config(
                "LISTEN needs a session that lasts: give the listener a direct URL (or one through \
                 PgBouncer's session pooling), not one with pgbouncer=true",
            ));
        }
        let connector =
            Connector::new(&spec, Duration::from_secs(10), None, "pgstate-listener")?.dedicated();
        Self::start(connector, &[channel], None).await
    }

    /// Listens on `channels` through the backend's primary, with its TLS settings.
    pub async fn from_backend(
        backend: impl Into<CoordinationHandle>,
        channels: &[&str],
    ) -> StateResult<Self> {
        let connector = backend.into().0.connector()?.clone();
        Self::start(connector, channels, None).await
    }

    /// A durable listener on `channels`: delivers the events that
    /// [`notify_durable`](crate::state::EnhancedPostgresBackend::notify_durable) commits from now on.
    pub async fn durable(
        backend: impl Into<CoordinationHandle>,
        channels: &[&str],
    ) -> StateResult<Self> {
        Self::durable_from(
            backend,
            &channels.iter().map(|c| (*c, None)).collect::<Vec<_>>(),
        )
        .await
    }

    /// A durable listener resuming after the given sequence number per channel (as saved from
    /// [`position`](Self::position)); `None` starts at the channel's current end.
    pub async fn durable_from(
        backend: impl Into<CoordinationHandle>,
        channels: &[(&str, Option<i64>)],
    ) -> StateResult<Self> {
        let coordinator = backend.into().0;
        let names = &coordinator.ctx.names;
        let durable = Durable {
            // The running total of payload bytes is computed on the (at most FETCH) rows the
            // inner query reads in order; the outer one keeps those that start within
            // FETCH_BYTES (always the first). Rows left out are never read out of storage.
            fetch_sql: format!(
                "SELECT seq, payload FROM (SELECT seq, payload, \
                 sum(octet_length(payload)) OVER (ORDER BY seq) - octet_length(payload) AS before \
                 FROM {} WHERE channel = $1 AND seq > $2 ORDER BY seq LIMIT {FETCH}) page \
                 WHERE before < {FETCH_BYTES} ORDER BY seq",
                names.events
            ),
            end_sql: format!(
                "SELECT last_seq FROM {} WHERE channel = $1",
                names.event_channels
            ),
            positions: HashMap::new(),
            stale: HashSet::new(),
            buffer: VecDeque::new(),
            fetch: None,
        };
        let connector = coordinator.connector()?.clone();
        let names: Vec<&str> = channels.iter().map(|(c, _)| *c).collect();
        let mut listener = Self::start(connector, &names, Some(durable)).await?;
        for (channel, from) in channels {
            listener.start_position(channel, *from).await?;
        }
        Ok(listener)
    }

    async fn start(
        connector: Connector,
        channels: &[&str],
        durable: Option<Durable>,
    ) -> StateResult<Self> {
        if channels.is_empty() {
            return Err(StateError::invalid("a listener needs at least one channel"));
        }
        for c in channels {
            check_channel(c)?;
        }
        let mut listener = PostgresListener {
            connector,
            channels: Vec::new(),
            session: None,
            durable,
            missed: None,
            reconnects: 0,
            pid: None,
        };
        let session = listener.connector.connect_dedicated().await?;
        listener.pid = Some(session_pid(&session).await?);
        listener.session = Some(session);
        for c in channels {
            listener.listen(c).await?;
        }
        Ok(listener)
    }

    /// Sets where a durable channel starts: after `from`, or at its current end.
    async fn start_position(&mut self, channel: &str, from: Option<i64>) -> StateResult<()> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        let position = match from {
            Some(p) => p.max(0),
            None => {
                let client = &self.connected()?.client;
                client
                    .query_opt(d.end_sql.as_str(), &[&channel])
                    .await?
                    .map(|r| r.try_get::<_, i64>(0))
                    .transpose()?
                    .unwrap_or(0)
            }
        };
        if let Some(d) = &mut self.durable {
            d.positions.insert(channel.to_string(), position);
            d.stale.insert(channel.to_string());
        }
        Ok(())
    }

    fn connected(&self) -> StateResult<&Connected> {
        self.session.as_ref().ok_or_else(|| StateError::Connection {
            message: format!("listener connection to {} is down", self.connector.target),
            sqlstate: None,
        })
    }

    /// Listens on one more channel (any string of 1 to 63 bytes without NUL; it is quoted, so
    /// it is taken exactly as written). In durable mode, delivery starts at its current end.
    ///
    /// A durable listener needs its connection for this (to find where the channel ends);
    /// while it is down the call fails and changes nothing.
    pub async fn listen(&mut self, channel: &str) -> StateResult<()> {
        let sql = format!("LISTEN {}", quote_channel(channel)?);
        if self.channels.iter().any(|c| c == channel) {
            return Ok(());
        }
        match &self.session {
            Some(s) => s.client.batch_execute(&sql).await?,
            // Plain mode: the reconnect listens on every channel.
            None if self.durable.is_none() => {}
            None => {
                self.connected()?;
            }
        }
        // Listening before reading the channel's end, so nothing committed in between is lost.
        if self
            .durable
            .as_ref()
            .is_some_and(|d| !d.positions.contains_key(channel))
        {
            self.start_position(channel, None).await?;
        }
        self.channels.push(channel.to_string());
        Ok(())
    }

    /// Stops listening on `channel`.
    pub async fn unlisten(&mut self, channel: &str) -> StateResult<()> {
        let sql = format!("UNLISTEN {}", quote_channel(channel)?);
        if let Some(s) = &self.session {
            s.client.batch_execute(&sql).await?;
        }
        self.channels.retain(|c| c != channel);
        if let Some(d) = &mut self.durable {
            d.positions.remove(channel);
            d.stale.remove(channel);
            d.buffer.retain(|n| n.channel != channel);
        }
        Ok(())
    }

    /// The channels listened on.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// Durable mode: the last sequence number delivered on `channel` (save it to resume with
    /// [`durable_from`](Self::durable_from)).
    pub fn position(&self, channel: &str) -> Option<i64> {
        self.durable.as_ref()?.positions.get(channel).copied()
    }

    /// The server process id of the listener's current connection (`None` while it is down),
    /// as shown in `pg_stat_activity`.
    pub fn backend_pid(&self) -> Option<i32> {
        self.session.as_ref().and(self.pid)
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The next notification's payload. See [`recv_notification`](Self::recv_notification).
    pub async fn recv(&mut self) -> StateResult<String> {
        Ok(self.recv_notification().await?.payload)
    }

    /// The next notification. Waits as long as it takes, reconnecting when the connection
    /// drops. Returns [`StateError::NotificationsMissed`] once after a reconnect in plain
    /// mode (and in durable mode when events were pruned before delivery); the listener stays
    /// usable. Cancel-safe: a durable event counts as delivered only when returned.
    ///
    /// Long on purpose: one loop over what may be pending, in priority order (a gap to
    /// report, buffered durable events, a reconnect, an overflow, durable channels to fetch,
    /// the next notification), each step short; they read best side by side.
    pub async fn recv_notification(&mut self) -> StateResult<Notification> {
        loop {
            if let Some(why) = self.missed.take() {
                return Err(StateError::NotificationsMissed(why));
            }
            if let Some(d) = &mut self.durable {
                if let Some(n) = d.buffer.pop_front() {
                    if let Some(seq) = n.seq {
                        d.positions.insert(n.channel.clone(), seq);
                    }
                    return Ok(n);
                }
            }
            if self.session.is_none() {
                self.reconnect().await;
                continue;
            }
            if self
                .session
                .as_ref()
                .is_some_and(|s| s.overflowed.swap(false, Ordering::Relaxed))
            {
                match &mut self.durable {
                    // The events are in the table: read them all again from the positions.
                    Some(d) => d.stale.extend(self.channels.iter().cloned()),
                    None => {
                        self.missed = Some(format!(
                            "the listener fell more than {NOTIFICATION_BUFFER} notifications \
                             behind; some were dropped (those already buffered still follow)"
                        ));
                        continue;
                    }
                }
            }
            if let Some(channel) = self
                .durable
                .as_ref()
                .and_then(|d| d.stale.iter().next().cloned())
            {
                if let Err(e) = self.fetch(&channel).await {
                    // A terminated session answers the pending fetch with its FATAL error
                    // (57P01) before the driver marks the connection closed: both mean the
                    // session is gone, and the listener reconnects.
                    let lost = e.kind() == crate::state::error::ErrorKind::Connection
                        || self.session.as_ref().is_some_and(|s| s.client.is_closed());
                    if lost {
                        self.session = None;
                        continue;
                    }
                    return Err(e);
                }
                continue;
            }
            let Some(session) = self.session.as_mut() else {
                continue;
            };
            match session.notifications.recv().await {
                Some(n) => {
                    let channel = n.channel().to_string();
                    if !self.channels.contains(&channel) {
                        continue;
                    }
                    match &mut self.durable {
                        None => {
                            return Ok(Notification {
                                channel,
                                payload: n.payload().to_string(),
                                seq: None,
                            })
                        }
                        Some(d) => {
                            // The payload is the new event's sequence number: fetch only if it
                            // is past what was delivered.
                            let seq = n.payload().parse::<i64>().unwrap_or(i64::MAX);
                            if seq > d.positions.get(&channel).copied().unwrap_or(0) {
                                d.stale.insert(channel);
                            }
                        }
                    }
                }
                // The connection's I/O task ended: everything it received was delivered above.
                None => {
                    tracing::warn!(target = %self.connector.target, "listener connection lost");
                    self.session = None;
                }
            }
        }
    }

    /// Reconnects (with backoff, until it succeeds) and listens on every channel again.
    async fn reconnect(&mut self) {
        let mut attempt = 0u32;
        loop {
            if attempt > 0 {
                tokio::time::sleep(backoff(Duration::from_millis(100), attempt - 1)).await;
            }
            attempt += 1;
            match self.try_reconnect().await {
                Ok((session, pid)) => {
                    self.session = Some(session);
                    // Statements prepared on the old session are gone with it.
                    if let Some(d) = &mut self.durable {
                        d.fetch = None;
                    }
                    self.pid = Some(pid);
                    self.reconnects += 1;
                    match &mut self.durable {
                        Some(d) => d.stale.extend(self.channels.iter().cloned()),
                        None => {
                            self.missed = Some(format!(
                                "the listener's connection to {} dropped and was re-established \
                                 (reconnect #{}); notifications sent meanwhile were not received",
                                self.connector.target, self.reconnects
                            ))
                        }
                    }
                    tracing::info!(target = %self.connector.target, attempts = attempt, "listener reconnected");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "listener reconnect failed");
                }
            }
        }
    }

    async fn try_reconnect(&self) -> StateResult<(Connected, i32)> {
        let session = self.connector.connect_dedicated().await?;
        let mut sql = String::new();
        for c in &self.channels {
            sql.push_str(&format!("LISTEN {};", quote_channel(c)?));
        }
        session.client.batch_execute(&sql).await?;
        let pid = session_pid(&session).await?;
        Ok((session, pid))
    }

    /// Durable mode: reads undelivered events of `channel` into the buffer.
    async fn fetch(&mut self, channel: &str) -> StateResult<()> {
        let (Some(d), Some(s)) = (&mut self.durable, &self.session) else {
            return Ok(());
        };
        let after = d.positions.get(channel).copied().unwrap_or(0);
        let fetch = match &d.fetch {
            Some(stmt) => stmt.clone(),
            None => {
                let stmt = s.client.prepare(&d.fetch_sql).await?;
                d.fetch = Some(stmt.clone());
                stmt
            }
        };
        let rows = s.client.query(&fetch, &[&channel, &after]).await?;
        // Caught up only if neither bound cut the page short: fewer rows than FETCH, and
        // fewer bytes than FETCH_BYTES (a row left out would have started past them).
        let bytes: usize = rows
            .iter()
            .map(|r| r.try_get::<_, &str>(1).map_or(0, str::len))
            .sum();
        if (rows.len() as i64) < FETCH && (bytes as i64) < FETCH_BYTES {
            d.stale.remove(channel);
        }
        let mut expected = after + 1;
        for row in rows {
            let seq: i64 = row.try_get(0)?;
            if seq != expected && self.missed.is_none() {
                // Pruned before delivery. Report once; delivery goes on after the gap.
                self.missed = Some(format!(
                    "events {expected}..={} on channel {channel:?} were pruned before delivery",
                    seq - 1
                ));
            }
            expected = seq + 1;
            d.buffer.push_back(Notification {
                channel: channel.to_string(),
                payload: row.try_get(1)?,
                seq: Some(seq),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for PostgresListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresListener")
            .field("target", &self.connector.target)
            .field("channels", &self.channels)
            .field("durable", &self.durable.is_some())
            .field("connected", &self.session.is_some())
            .field("reconnects", &self.reconnects)
            .finish()
    }
}

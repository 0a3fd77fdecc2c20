//! `StateError`: every failure the state backends report, with the SQLSTATE where the server
//! gave one and a small [`ErrorKind`] that applications branch on.

use std::fmt;

/// Result type used across `processor::state`.
pub type StateResult<T> = Result<T, StateError>;

/// Everything that can go wrong in a state backend.
///
/// Messages never contain passwords or key material. Match on [`StateError::kind`] for broad
/// handling, on the variants for specific cases, and use [`StateError::sqlstate`] for the raw
/// PostgreSQL error code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The backend was used before it was initialised (or after it was closed).
    #[error("state backend not initialized: {0}")]
    NotInitialized(String),
    /// The key does not exist (or has expired).
    #[error("key not found: {}", DisplayKey(.key))]
    KeyNotFound {
        /// The key that was looked up.
        key: Vec<u8>,
    },
    /// A value could not be encoded.
    #[error("serialization failed: {0}")]
    SerializationFailed(String),
    /// A stored value could not be decoded.
    #[error("deserialization failed: {0}")]
    DeserializationFailed(String),
    /// The database reported an error that fits no more specific variant.
    #[error("storage error: {message}{}", SqlStateSuffix(.sqlstate))]
    StorageError {
        /// What went wrong.
        message: String,
        /// The SQLSTATE code, when the server sent one.
        sqlstate: Option<String>,
    },
    /// A checkpoint could not be written.
    #[error("checkpoint failed: {0}")]
    CheckpointFailed(String),
    /// A checkpoint could not be restored.
    #[error("restore failed: {0}")]
    RestoreFailed(String),
    /// The entry existed but its TTL has passed.
    #[error("state expired: {}", DisplayKey(.key))]
    StateExpired {
        /// The key whose entry expired.
        key: Vec<u8>,
    },
    /// A transaction failed (serialization failure, deadlock, aborted transaction...).
    #[error("transaction failed: {message}{}", SqlStateSuffix(.sqlstate))]
    TransactionFailed {
        /// What went wrong.
        message: String,
        /// The SQLSTATE code, when the server sent one (`40001`, `40P01`, ...).
        sqlstate: Option<String>,
    },
    /// An optimistic-locking check failed: the entry changed (or exists, or is missing) since the
    /// caller read it. Re-read and retry.
    #[error("concurrent modification of key {}", DisplayKey(.key))]
    ConcurrentModification {
        /// The key whose version did not match.
        key: Vec<u8>,
    },
    /// The backend is full (a configured limit was reached).
    #[error("state backend full: {0}")]
    BackendFull(String),
    /// The caller passed input the backend refuses (empty or oversized key, bad metadata, bad TTL,
    /// bad identifier...). Nothing was written.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The configuration is invalid (malformed URL, unknown sslmode, bad pool sizes...).
    #[error("invalid configuration: {0}")]
    Configuration(String),
    /// An operation did not finish in time (pool acquire timeout, statement timeout, connect
    /// timeout, the operation timeout before its statement was sent). Nothing was written: a
    /// write that may have reached the server is [`StateError::OutcomeUnknown`] instead.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A write was sent to the server but its caller learned no outcome (it outlasted the
    /// operation timeout, or its connection failed while it ran): it may or may not have been
    /// applied. Either way it is settled (applied, or never to be) before anything the same
    /// session does next is sent, so it never lands after the session's next acknowledged
    /// write. Not retried automatically, and [`is_retryable`](StateError::is_retryable) is
    /// false: read the state before doing the work again (a put of the same value may simply
    /// be repeated).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The connection to the server failed or was lost.
    #[error("connection error: {message}{}", SqlStateSuffix(.sqlstate))]
    Connection {
        /// What went wrong.
        message: String,
        /// The SQLSTATE code, when the server sent one (`57P01`, `08006`, ...).
        sqlstate: Option<String>,
    },
    /// TLS could not be set up (bad certificate file, failed verification, server refuses TLS...).
    #[error("TLS error: {0}")]
    Tls(String),
    /// COMMIT was sent but the connection failed before the server answered: the transaction
    /// may or may not have committed. Never retried automatically; check the state before
    /// doing the work again.
    #[error("commit outcome unknown: {0}")]
    CommitOutcomeUnknown(String),
    /// The database role lacks a privilege the operation needs.
    #[error("permission denied: {message}{}", SqlStateSuffix(.sqlstate))]
    PermissionDenied {
        /// What went wrong.
        message: String,
        /// The SQLSTATE code (`42501` for insufficient privilege).
        sqlstate: Option<String>,
    },
    /// A release named a lock this backend handle does not hold (never acquired, or already
    /// released). Nothing was released.
    #[error("lock not held: {lock}")]
    LockNotHeld {
        /// The lock (its name, or its key).
        lock: String,
    },
    /// The lock was held, but its dedicated connection ended (terminated, network failure,
    /// server restart), so the server released it (at once for a closed connection; within
    /// about 11 s of the client vanishing, by TCP keepalive): others may have taken it since.
    #[error("lock lost: {lock} (its connection ended)")]
    LockLost {
        /// The lock (its name, or its key).
        lock: String,
    },
    /// A fenced write was refused: the lock's fencing token moved on (someone acquired the lock
    /// after this holder), or this holder no longer holds the lock. Roll back; the work must
    /// not be applied.
    #[error("fenced off: lock {lock} token {token} is stale (current token {current}, still held: {held})")]
    Fenced {
        /// The lock's name.
        lock: String,
        /// The token the writer presented.
        token: i64,
        /// The token of the latest acquisition.
        current: i64,
        /// Whether the writer's session still holds the lock.
        held: bool,
    },
    /// An epoch commit (or a read under its claim) was refused: a later claim of the
    /// operator's key groups took over, so this claim's epoch is no longer current. Nothing
    /// of the refused commit was applied; the instance holding this claim must stop (claim
    /// again to continue from the last committed state).
    #[error("epoch fenced: operator {operator:?} epoch {epoch} was claimed again by a later epoch; nothing of this commit was applied")]
    EpochFenced {
        /// The operator.
        operator: String,
        /// The refused claim's epoch.
        epoch: i64,
    },
    /// A listener's connection dropped and was re-established: notifications sent while it was
    /// down are lost (plain mode), or events were pruned before a durable listener read them.
    /// The listener remains usable; call `recv` again.
    #[error("notifications may have been missed: {0}")]
    NotificationsMissed(String),
}

/// The broad class of a [`StateError`], for applications that branch on what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input from the caller; fix the call.
    InvalidInput,
    /// Bad configuration; fix the configuration.
    Configuration,
    /// The key is missing or expired.
    NotFound,
    /// An optimistic-locking conflict; re-read and retry.
    Conflict,
    /// A transaction was aborted by the server (serialization failure, deadlock); retry it.
    Transaction,
    /// A pool, connect or statement timeout: nothing was written.
    Timeout,
    /// A write may or may not have been applied ([`StateError::OutcomeUnknown`],
    /// [`StateError::CommitOutcomeUnknown`]); it is settled before the session's next write is sent.
    OutcomeUnknown,
    /// The connection failed or was lost.
    Connection,
    /// TLS setup or verification failed.
    Tls,
    /// The role lacks a privilege.
    Permission,
    /// Encoding or decoding a value failed.
    Serialization,
    /// A lock or leadership is not held (released, lost or fenced off), or a listener missed
    /// notifications.
    Coordination,
    /// Any other database or backend error.
    Storage,
}

impl ErrorKind {
    /// The kind's name in `snake_case` (as in metric labels and the CLI's JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Configuration => "configuration",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Transaction => "transaction",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::Connection => "connection",
            ErrorKind::Tls => "tls",
            ErrorKind::Permission => "permission",
            ErrorKind::Serialization => "serialization",
            ErrorKind::Coordination => "coordination",
            ErrorKind::Storage => "storage",
        }
    }
}

impl StateError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::InvalidInput(_) => ErrorKind::InvalidInput,
            StateError::Configuration(_) => ErrorKind::Configuration,
            StateError::KeyNotFound { .. } | StateError::StateExpired { .. } => ErrorKind::NotFound,
            StateError::ConcurrentModification { .. } => ErrorKind::Conflict,
            StateError::TransactionFailed { .. } => ErrorKind::Transaction,
            StateError::CommitOutcomeUnknown(_) | StateError::OutcomeUnknown(_) => {
                ErrorKind::OutcomeUnknown
            }
            StateError::Timeout(_) => ErrorKind::Timeout,
            StateError::Connection { .. } => ErrorKind::Connection,
            StateError::Tls(_) => ErrorKind::Tls,
            StateError::PermissionDenied { .. } => ErrorKind::Permission,
            StateError::SerializationFailed(_) | StateError::DeserializationFailed(_) => {
                ErrorKind::Serialization
            }
            StateError::LockNotHeld { .. }
            | StateError::LockLost { .. }
            | StateError::Fenced { .. }
            | StateError::EpochFenced { .. }
            | StateError::NotificationsMissed(_) => ErrorKind::Coordination,
            StateError::NotInitialized(_)
            | StateError::StorageError { .. }
            | StateError::CheckpointFailed(_)
            | StateError::RestoreFailed(_)
            | StateError::BackendFull(_) => ErrorKind::Storage,
        }
    }

    /// Whether the server refused the statement, so nothing of it was written: an error with
    /// a SQLSTATE that is not a connection's (a FATAL error such as 57P01 or PgBouncer's
    /// 08P01 may follow a commit). The caller checks the connection is still open too.
    pub(crate) fn is_refusal(&self) -> bool {
        self.sqlstate().is_some() && self.kind() != ErrorKind::Connection
    }

    /// The operation timeout (`limit`) ran out: the one message for it.
    pub(crate) fn op_timeout(limit: std::time::Duration) -> StateError {
        StateError::Timeout(format!(
            "the operation did not complete within the operation timeout ({limit:?})"
        ))
    }

    /// This error, for a write (`what`: "put", "delete", ...) whose statement was never sent:
    /// a timeout says that nothing was written; any other error is returned as it is.
    pub(crate) fn not_sent(self, what: &str) -> StateError {
        match self {
            StateError::Timeout(m) => {
                StateError::Timeout(format!("{m}; the {what} was not sent: nothing was written"))
            }
            other => other,
        }
    }

    /// The same error again, for each of several callers that share one outcome (a group of
    /// coalesced puts): the same variant and text where they can be copied, else a storage
    /// error with this error's text and SQLSTATE.
    pub(crate) fn shared(&self) -> StateError {
        match self {
            StateError::Timeout(m) => StateError::Timeout(m.clone()),
            StateError::Connection { message, sqlstate } => StateError::Connection {
                message: message.clone(),
                sqlstate: sqlstate.clone(),
            },
            StateError::TransactionFailed { message, sqlstate } => StateError::TransactionFailed {
                message: message.clone(),
                sqlstate: sqlstate.clone(),
            },
            StateError::PermissionDenied { message, sqlstate } => StateError::PermissionDenied {
                message: message.clone(),
                sqlstate: sqlstate.clone(),
            },
            StateError::Tls(m) => StateError::Tls(m.clone()),
            StateError::CommitOutcomeUnknown(m) => StateError::CommitOutcomeUnknown(m.clone()),
            StateError::OutcomeUnknown(m) => StateError::OutcomeUnknown(m.clone()),
            StateError::EpochFenced { operator, epoch } => StateError::EpochFenced {
                operator: operator.clone(),
                epoch: *epoch,
            },
            other => StateError::StorageError {
                message: other.to_string(),
                sqlstate: other.sqlstate().map(str::to_string),
            },
        }
    }

    /// The five-character SQLSTATE the server reported, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StateError::StorageError { sqlstate, .. }
            | StateError::TransactionFailed { sqlstate, .. }
            | StateError::Connection { sqlstate, .. }
            | StateError::PermissionDenied { sqlstate, .. } => sqlstate.as_deref(),
            _ => None,
        }
    }

    /// Whether running the same operation again may succeed: timeouts, lost connections,
    /// serialization failures, deadlocks, optimistic-locking conflicts (after a re-read) and
    /// server-side resource exhaustion. Input, configuration, TLS and permission errors are not,
    /// and neither is an unknown outcome ([`StateError::OutcomeUnknown`],
    /// [`StateError::CommitOutcomeUnknown`]).
    pub fn is_retryable(&self) -> bool {
        match self.kind() {
            ErrorKind::Timeout | ErrorKind::Connection | ErrorKind::Conflict => true,
            // Only serialization failures and deadlocks; not 40002 (integrity violation at
            // commit) or 40003 (statement completion unknown), where a retry may apply the
            // work twice or fail the same way.
            ErrorKind::Transaction => matches!(
                self.sqlstate(),
                Some(sqlstate::SERIALIZATION_FAILURE | sqlstate::DEADLOCK_DETECTED)
            ),
            ErrorKind::Storage => self.sqlstate().is_some_and(sqlstate::is_transient),
            _ => false,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        StateError::InvalidInput(msg.into())
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        StateError::Configuration(msg.into())
    }
}

/// SQLSTATE codes the backend classifies errors by (see PostgreSQL's Appendix A).
pub mod sqlstate {
    /// `40001`: could not serialize access.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// `40P01`: deadlock detected.
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// `3D000`: the database does not exist.
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// `42501`: insufficient privilege.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// `57P01`: the server is shutting down (or the backend was terminated).
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `57014`: query canceled (statement timeout or cancel request).
    pub const QUERY_CANCELED: &str = "57014";
    /// `53300`: too many connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `23505`: unique violation.
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// `54000`: program limit exceeded (for example an index row too large).
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    /// `55P03`: lock not available (a lock wait reached `lock_timeout`).
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";

    /// Whether the code names a condition that can clear up by itself.
    pub fn is_transient(code: &str) -> bool {
        code.starts_with("08") // connection exception
            || code.starts_with("53") // insufficient resources
            || code.starts_with("57P") // operator intervention: shutdown, crash, cannot connect now
            || code == SERIALIZATION_FAILURE
            || code == DEADLOCK_DETECTED
    }
}

impl From<tokio_postgres::Error> for StateError {
    fn from(err: tokio_postgres::Error) -> Self {
        classify(&err)
    }
}

/// Maps a driver error onto the variant a caller can act on.
pub(crate) fn classify(err: &tokio_postgres::Error) -> StateError {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code().to_string();
        let mut message = db.message().to_string();
        if let Some(detail) = db.detail() {
            message.push_str(" (");
            message.push_str(detail);
            message.push(')');
        }
        let sqlstate = Some(code.clone());
        return match code.as_str() {
            c if c.starts_with("40") => StateError::TransactionFailed { message, sqlstate },
            // Insufficient privilege, and a login refused (class 28: wrong password, no
            // pg_hba entry): the role cannot use the server.
            c if c == sqlstate::INSUFFICIENT_PRIVILEGE || c.starts_with("28") => {
                StateError::PermissionDenied { message, sqlstate }
            }
            // The database named in the connection string does not exist: a setting to fix,
            // not a failure to retry.
            sqlstate::INVALID_CATALOG_NAME => {
                StateError::Configuration(format!("{message} (SQLSTATE {code})"))
            }
            sqlstate::QUERY_CANCELED => StateError::Timeout(message),
            c if c.starts_with("08")
                || c.starts_with("57P")
                || c == sqlstate::TOO_MANY_CONNECTIONS =>
            {
                StateError::Connection { message, sqlstate }
            }
            _ => StateError::StorageError { message, sqlstate },
        };
    }
    if err.is_closed() {
        return StateError::Connection {
            message: "connection closed".to_string(),
            sqlstate: None,
        };
    }
    // Client-side errors (I/O, protocol, TLS, encoding). Their Display carries no secrets:
    // tokio-postgres never prints the configuration.
    let text = err.to_string();
    let source = std::error::Error::source(err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let message = if source.is_empty() || text.contains(&source) {
        text
    } else {
        format!("{text}: {source}")
    };
    let lower = message.to_ascii_lowercase();
    if lower.contains("tls") || lower.contains("ssl") || lower.contains("certificate") {
        StateError::Tls(message)
    } else if lower.contains("timeout") || lower.contains("timed out") {
        StateError::Timeout(message)
    } else if lower.contains("error serializing")
        || lower.contains("error deserializing")
        // The driver refusing a call before sending it (a bug, not a lost connection).
        || lower.contains("parameters but got")
        || lower.contains("invalid column")
        || lower.contains("unexpected number of rows")
    {
        StateError::StorageError {
            message,
            sqlstate: None,
        }
    } else {
        StateError::Connection {
            message,
            sqlstate: None,
        }
    }
}

struct SqlStateSuffix<'a>(&'a Option<String>);

impl fmt::Display for SqlStateSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => write!(f, " (SQLSTATE {code})"),
            None => Ok(()),
        }
    }
}

/// Shows a key as text when it is printable ASCII, otherwise as hex; long keys are shortened.
pub(crate) struct DisplayKey<'a>(pub &'a [u8]);

impl fmt::Display for DisplayKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        let shown = &self.0[..self.0.len().min(SHOWN)];
        if shown.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            write!(f, "{:?}", String::from_utf8_lossy(shown))?;
        } else {
            f.write_str("0x")?;
            for b in shown {
                write!(f, "{b:02x}")?;
            }
        }
        if self.0.len() > SHOWN {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classes() {
        assert!(StateError::Timeout("x".into()).is_retryable());
        assert!(StateError::ConcurrentModification { key: b"k".to_vec() }.is_retryable());
        assert!(!StateError::InvalidInput("x".into()).is_retryable());
        let busy = StateError::StorageError {
            message: "m".into(),
            sqlstate: Some("53200".into()),
        };
        assert!(busy.is_retryable());
        let unique = StateError::StorageError {
            message: "m".into(),
            sqlstate: Some("23505".into()),
        };
        assert!(!unique.is_retryable());
        assert_eq!(unique.sqlstate(), Some("23505"));
    }

    #[test]
    fn unknown_commit_outcome_is_not_retryable() {
        let e = StateError::CommitOutcomeUnknown("x".into());
        assert_eq!(e.kind(), ErrorKind::OutcomeUnknown);
        assert!(!e.is_retryable());
    }

    #[test]
    fn keys_display_safely() {
        let e = StateError::ConcurrentModification { key: vec![0, 255] };
        assert_eq!(e.to_string(), "concurrent modification of key 0x00ff");
        let e = StateError::KeyNotFound {
            key: b"user:1".to_vec(),
        };
        assert_eq!(e.to_string(), "key not found: \"user:1\"");
        let long = StateError::KeyNotFound {
            key: vec![b'a'; 100],
        };
        assert!(long.to_string().ends_with("... (100 bytes)"));
    }
}

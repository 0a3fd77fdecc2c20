//! Exit codes and the error every command returns (listed in `pgstate --help`).

use processor::state::{ErrorKind, StateError};

/// Not found: `get` of an absent key, an unknown checkpoint.
pub const NOT_FOUND: u8 = 1;
/// Bad usage or invalid input; nothing was written.
pub const USAGE: u8 = 2;
/// The server cannot be reached or used (connection, TLS, configuration, permission, timeout).
pub const UNREACHABLE: u8 = 3;
/// Any other failure.
pub const FAILED: u8 = 4;

/// A command's failure: the exit code and the message for stderr (empty: print nothing).
#[derive(Debug)]
pub struct CliError {
    /// The process's exit code.
    pub code: u8,
    /// What went wrong, for stderr.
    pub message: String,
}

impl CliError {
    /// A failure with `code` and `message`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }

    /// Bad usage or input.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }

    /// Any other failure.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FAILED, message)
    }

    /// Not found, with nothing printed.
    pub fn silent_not_found() -> Self {
        Self::new(NOT_FOUND, "")
    }
}

impl From<StateError> for CliError {
    fn from(e: StateError) -> Self {
        let code = match e.kind() {
            ErrorKind::InvalidInput => USAGE,
            ErrorKind::NotFound => NOT_FOUND,
            // A table a reading command found missing (or not migrated).
            _ if matches!(e, StateError::NotInitialized(_)) => NOT_FOUND,
            ErrorKind::Configuration
            | ErrorKind::Connection
            | ErrorKind::Tls
            | ErrorKind::Permission
            | ErrorKind::Timeout => UNREACHABLE,
            _ => FAILED,
        };
        // StateError's messages never hold a password.
        CliError::new(code, e.to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader (`head`, `grep -q`) has what it wanted.
            return CliError::new(0, "");
        }
        CliError::failed(e.to_string())
    }
}

impl From<pgstate_testcluster::Error> for CliError {
    fn from(e: pgstate_testcluster::Error) -> Self {
        CliError::new(UNREACHABLE, format!("local cluster: {e}"))
    }
}

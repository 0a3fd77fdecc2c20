//! SQL identifiers: validated once, always emitted quoted.
//!
//! Names that end up in SQL text (schema, table, archive table, savepoint, channel) go through
//! [`Ident`]; values never do, they travel as bind parameters.

use std::fmt;

use crate::state::error::{StateError, StateResult};

/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
pub const MAX_IDENT_LEN: usize = 63;

/// Longest accepted state table name: leaves room for the suffixes of derived names
/// (`_archive`, `_metadata_gin_idx`, ...) within [`MAX_IDENT_LEN`].
pub const MAX_TABLE_NAME_LEN: usize = 40;

/// A validated identifier: ASCII letters, digits and `_`, not starting with a digit, at most
/// 63 bytes. Rendered with double quotes, so it is never folded or read as a keyword.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ident(String);

impl Ident {
    /// Validates `name`; `what` names the setting in the error message.
    pub fn new(what: &str, name: &str) -> StateResult<Self> {
        Self::with_limit(what, name, MAX_IDENT_LEN)
    }

    /// Validates a state table name (shorter limit, see [`MAX_TABLE_NAME_LEN`]).
    pub fn new_table(name: &str) -> StateResult<Self> {
        Self::with_limit("table name", name, MAX_TABLE_NAME_LEN)
    }

    fn with_limit(what: &str, name: &str, max: usize) -> StateResult<Self> {
        let shown: String = name.chars().take(40).collect();
        if name.is_empty() {
            return Err(StateError::invalid(format!("{what} is empty")));
        }
        if name.len() > max {
            return Err(StateError::invalid(format!(
                "{what} {shown:?}... is {} bytes; at most {max} allowed",
                name.len()
            )));
        }
        let mut bytes = name.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StateError::invalid(format!(
                "{what} {shown:?} is not a plain identifier: use ASCII letters, digits and '_', not starting with a digit"
            )));
        }
        Ok(Ident(name.to_string()))
    }

    /// The bare name, as stored in the catalogs.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A derived identifier (`<self><suffix>`); the caller guarantees the suffix is plain.
    pub(crate) fn suffixed(&self, suffix: &str) -> Ident {
        Ident(format!("{}{}", self.0, suffix))
    }
}

/// Validates a LISTEN/NOTIFY channel name: any string of 1 to 63 bytes without NUL (longer
/// names would be truncated by `LISTEN` but refused by `pg_notify`, so they are refused here).
pub(crate) fn check_channel(channel: &str) -> StateResult<()> {
    let shown: String = channel.chars().take(40).collect();
    if channel.is_empty() {
        return Err(StateError::invalid("channel name is empty"));
    }
    if channel.len() > MAX_IDENT_LEN {
        return Err(StateError::invalid(format!(
            "channel name {shown:?}... is {} bytes; at most {MAX_IDENT_LEN} allowed",
            channel.len()
        )));
    }
    if channel.contains('\0') {
        return Err(StateError::invalid(format!(
            "channel name {shown:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// A channel name as a double-quoted identifier for `LISTEN`/`UNLISTEN`, with `"` doubled, so
/// that any valid name (see [`check_channel`]) is read as exactly itself.
pub(crate) fn quote_channel(channel: &str) -> StateResult<String> {
    check_channel(channel)?;
    Ok(format!("\"{}\"", channel.replace('"', "\"\"")))
}

impl fmt::Display for Ident {
    /// Writes the identifier double-quoted. Validation already excluded `"`, so no escaping is due.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_quotes_them() {
        let id = Ident::new("schema", "Tenant_42").unwrap();
        assert_eq!(id.to_string(), "\"Tenant_42\"");
        assert!(Ident::new("schema", "_x").is_ok());
        assert!(Ident::new("schema", &"a".repeat(63)).is_ok());
    }

    #[test]
    fn refuses_hostile_names() {
        for bad in [
            "",
            "1abc",
            "a b",
            "a;b",
            "a\"b",
            "a'b",
            "x; DROP TABLE state_entries; --",
            "é",
            "a\0b",
            &"a".repeat(64),
        ] {
            let err = Ident::new("schema", bad).unwrap_err();
            assert!(matches!(err, StateError::InvalidInput(_)), "{bad:?}: {err}");
        }
        assert!(Ident::new_table(&"t".repeat(41)).is_err());
    }

    #[test]
    fn channels_are_quoted_verbatim() {
        assert_eq!(quote_channel("Jobs").unwrap(), "\"Jobs\"");
        assert_eq!(
            quote_channel("x\"; DROP TABLE t; --").unwrap(),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert!(quote_channel(&"c".repeat(63)).is_ok());
        for bad in ["", "a\0b", &"c".repeat(64)] {
            assert!(matches!(
                quote_channel(bad),
                Err(StateError::InvalidInput(_))
            ));
        }
    }
}

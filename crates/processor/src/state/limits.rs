//! Input limits shared by every backend, checked before anything is sent to a server.

use std::time::Duration;

use crate::state::error::{StateError, StateResult};

/// Longest accepted key, in bytes. Keys are the primary key of a btree index, whose entries must
/// fit a third of an 8 KiB page; 2 KiB leaves room for the tuple header.
pub const MAX_KEY_LEN: usize = 2048;

/// Longest accepted value, in bytes: 960 MiB. PostgreSQL caps one field, and one protocol
/// message, at about 1 GiB; the margin leaves room for the key, the metadata
/// ([`MAX_METADATA_LEN`]) and the message framing in the same statement.
pub const MAX_VALUE_LEN: usize = (1 << 30) - (64 << 20);

/// Longest accepted TTL: 100 years.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Longest accepted metadata document, in bytes of JSON text.
pub const MAX_METADATA_LEN: usize = 32 * 1024 * 1024;

/// Most keys one [`get_many`](crate::state::EnhancedPostgresBackend::get_many) takes (their
/// values come back in one response).
pub const MAX_GET_MANY: usize = 10_000;

/// Most keys one page of
/// [`list_keys_page`](crate::state::EnhancedPostgresBackend::list_keys_page) holds.
pub const MAX_PAGE: usize = 100_000;

/// Checks a key: non-empty and at most [`MAX_KEY_LEN`] bytes.
pub fn check_key(key: &[u8]) -> StateResult<()> {
    if key.is_empty() {
        return Err(StateError::invalid("key is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StateError::invalid(format!(
            "key is {} bytes; at most {MAX_KEY_LEN} allowed",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a value: at most [`MAX_VALUE_LEN`] bytes.
pub fn check_value(value: &[u8]) -> StateResult<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(StateError::invalid(format!(
            "value is {} bytes; at most {MAX_VALUE_LEN} allowed",
            value.len()
        )));
    }
    Ok(())
}

/// Checks a key/value pair.
pub fn check_entry(key: &[u8], value: &[u8]) -> StateResult<()> {
    check_key(key)?;
    check_value(value)
}

/// Checks a TTL and returns it in whole microseconds (rounded up, so a tiny TTL is not zero).
pub fn check_ttl(ttl: Duration) -> StateResult<i64> {
    if ttl.is_zero() {
        return Err(StateError::invalid("TTL must be positive"));
    }
    if ttl > MAX_TTL {
        return Err(StateError::invalid(format!(
            "TTL of {}s exceeds the maximum of {}s (100 years)",
            ttl.as_secs(),
            MAX_TTL.as_secs()
        )));
    }
    let micros = ttl.as_micros() + u128::from(ttl.subsec_nanos() % 1000 != 0);
    // Bounded by MAX_TTL, so this fits comfortably.
    Ok(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// Checks metadata: a JSON object, with no NUL characters (which `jsonb` cannot store), and of
/// bounded size.
pub fn check_metadata(metadata: &serde_json::Value) -> StateResult<()> {
    if !metadata.is_object() {
        return Err(StateError::invalid(format!(
            "metadata must be a JSON object, got {}",
            json_type(metadata)
        )));
    }
    let text = serde_json::to_string(metadata)
        .map_err(|e| StateError::SerializationFailed(e.to_string()))?;
    if text.len() > MAX_METADATA_LEN {
        return Err(StateError::invalid(format!(
            "metadata is {} bytes of JSON; at most {MAX_METADATA_LEN} allowed",
            text.len()
        )));
    }
    if contains_nul(metadata) {
        return Err(StateError::invalid(
            "metadata contains a NUL character, which PostgreSQL's jsonb cannot store",
        ));
    }
    Ok(())
}

/// Whether any string or object key in `v` holds a NUL character.
fn contains_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
        }
        _ => false,
    }
}

/// The JSON type name of a value, for error messages.
pub(crate) fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` when
/// there is none (empty prefix, or all bytes 0xFF): the exclusive upper bound of a prefix scan.
pub fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xFF {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// The longest name stored as `text` (a lock, leader, operator, source, topic or reader
/// name), in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Checks a name stored as `text`: not empty, at most [`MAX_NAME_LEN`] bytes, no NUL byte;
/// `what` names it in the error.
pub(crate) fn check_name(what: &str, name: &str) -> StateResult<()> {
    if name.is_empty() {
        return Err(StateError::invalid(format!("{what} is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StateError::invalid(format!(
            "{what} is {} bytes; at most {MAX_NAME_LEN} allowed",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(StateError::invalid(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

/// Checks a page request: `limit` 1 to [`MAX_PAGE`], a prefix no longer than a key, a valid
/// `start_after`. Returns the statement's (prefix, after, limit).
pub(crate) fn check_page<'a>(
    prefix: &'a [u8],
    start_after: Option<&'a [u8]>,
    limit: usize,
) -> StateResult<(&'a [u8], &'a [u8], i64)> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(StateError::invalid(format!(
            "a page holds 1 to {MAX_PAGE} keys, not {limit}"
        )));
    }
    if prefix.len() > MAX_KEY_LEN {
        return Err(StateError::invalid(format!(
            "prefix is {} bytes; at most {MAX_KEY_LEN} allowed",
            prefix.len()
        )));
    }
    if let Some(after) = start_after {
        check_key(after)?;
    }
    // Every key is longer than the empty string: no lower bound beyond the prefix.
    Ok((prefix, start_after.unwrap_or_default(), limit as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_bounds() {
        assert_eq!(prefix_upper_bound(b""), None);
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(&[0x61, 0xFF]), Some(vec![0x62]));
        assert_eq!(prefix_upper_bound(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_upper_bound(&[0x00]), Some(vec![0x01]));
    }

    #[test]
    fn ttl_rounding_and_bounds() {
        assert_eq!(check_ttl(Duration::from_nanos(1)).unwrap(), 1);
        assert_eq!(check_ttl(Duration::from_secs(2)).unwrap(), 2_000_000);
        assert!(check_ttl(Duration::ZERO).is_err());
        assert!(check_ttl(MAX_TTL + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn metadata_rules() {
        assert!(check_metadata(&serde_json::json!({"a": 1})).is_ok());
        assert!(check_metadata(&serde_json::json!([1])).is_err());
        assert!(check_metadata(&serde_json::json!("x")).is_err());
        assert!(check_metadata(&serde_json::json!({"a": "x\u{0}y"})).is_err());
        assert!(check_metadata(&serde_json::json!({"k\u{0}": 1})).is_err());
        // A literal backslash-u-0000 is six ordinary characters.
        assert!(check_metadata(&serde_json::json!({"a": "\\u0000"})).is_ok());
    }
}

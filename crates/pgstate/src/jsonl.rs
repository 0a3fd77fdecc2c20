//! The JSON lines format of `export` and `import`: one object per entry,
//! `{"key": "...", "value": "...", "metadata": {...}, "ttl_ms": N}`. Keys and values that are
//! not UTF-8 are written in hex as `key_hex` and `value_hex`; `metadata` is left out when it
//! is empty, `ttl_ms` (the time left to live when exported) when the entry does not expire.

use std::time::{Duration, SystemTime};

use processor::state::StateEntry;
use serde_json::{Map, Value};

/// One entry as a line holds it.
#[derive(Debug, PartialEq)]
pub struct Line {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub metadata: Value,
    pub ttl: Option<Duration>,
}

impl Line {
    /// The entry to write: its key, value, metadata and TTL.
    pub fn entry(&self) -> processor::state::BatchEntry<'_> {
        processor::state::BatchEntry {
            key: &self.key,
            value: &self.value,
            metadata: Some(&self.metadata),
            ttl: self.ttl,
        }
    }
}

fn put_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(name.to_string(), Value::String(text.to_string())),
        Err(_) => object.insert(format!("{name}_hex"), Value::String(hex(bytes))),
    };
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `entry` as one line (without the newline); its TTL is measured from `now`.
pub fn encode(entry: &StateEntry, now: SystemTime) -> String {
    let mut object = Map::new();
    put_bytes(&mut object, "key", &entry.key);
    put_bytes(&mut object, "value", &entry.value);
    if entry.metadata.as_object().is_some_and(|m| !m.is_empty()) {
        object.insert("metadata".into(), entry.metadata.clone());
    }
    if let Some(at) = entry.expires_at {
        // At least 1 ms: the entry was live when read.
        let left = at
            .duration_since(now)
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        object.insert("ttl_ms".into(), Value::from(left.as_millis() as u64));
    }
    Value::Object(object).to_string()
}

fn bytes(object: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    if let Some(v) = object.get(name) {
        return v
            .as_str()
            .map(|s| s.as_bytes().to_vec())
            .ok_or_else(|| format!("\"{name}\" is not a string"));
    }
    let hexed = format!("{name}_hex");
    match object.get(&hexed) {
        Some(v) => v
            .as_str()
            .and_then(unhex)
            .ok_or_else(|| format!("\"{hexed}\" is not hex")),
        None => Err(format!("no \"{name}\" (or \"{hexed}\")")),
    }
}

/// The fields a line may have.
const FIELDS: [&str; 6] = ["key", "key_hex", "value", "value_hex", "metadata", "ttl_ms"];

/// The entry on `line`, or what is wrong with it (also a field it does not know: a typo such
/// as `ttl` or `meta` must not import an entry without what it meant to say).
pub fn decode(line: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let unknown: Vec<String> = object
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .map(|k| format!("{k:?}"))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "unknown field {} (a line has {})",
            unknown.join(", "),
            FIELDS.join(", ")
        ));
    }
    for name in ["key", "value"] {
        if object.contains_key(name) && object.contains_key(&format!("{name}_hex")) {
            return Err(format!("both \"{name}\" and \"{name}_hex\""));
        }
    }
    let metadata = match object.get("metadata") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(m @ Value::Object(_)) => m.clone(),
        Some(_) => return Err("\"metadata\" is not an object".into()),
    };
    let ttl = match object.get("ttl_ms") {
        None | Some(Value::Null) => None,
        Some(v) => Some(Duration::from_millis(
            v.as_u64()
                .filter(|ms| *ms > 0)
                .ok_or("\"ttl_ms\" is not a positive integer")?,
        )),
    };
    Ok(Line {
        key: bytes(object, "key")?,
        value: bytes(object, "value")?,
        metadata,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_round_trip_also_in_hex() {
        let now = SystemTime::now();
        let entry = StateEntry {
            key: vec![0xff, 0x00, b'k'],
            value: b"v\"al\nue".to_vec(),
            metadata: serde_json::json!({"a": [1, 2]}),
            version: 3,
            created_at: now,
            updated_at: now,
            expires_at: Some(now + Duration::from_secs(5)),
        };
        let line = encode(&entry, now);
        assert!(line.contains("\"key_hex\":\"ff006b\""), "{line}");
        assert!(!line.contains('\n'));
        let back = decode(&line).unwrap();
        assert_eq!(back.key, entry.key);
        assert_eq!(back.value, entry.value);
        assert_eq!(back.metadata, entry.metadata);
        assert_eq!(back.ttl, Some(Duration::from_secs(5)));
        let plain = decode(r#"{"key":"k","value":"v"}"#).unwrap();
        assert_eq!((plain.metadata, plain.ttl), (serde_json::json!({}), None));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for (line, says) in [
            ("nope", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"value":"v"}"#, "no \"key\""),
            (r#"{"key":"k","value_hex":"zz"}"#, "not hex"),
            (r#"{"key":"k","value":"v","metadata":3}"#, "not an object"),
            (r#"{"key":"k","value":"v","ttl_ms":-1}"#, "ttl_ms"),
            (
                r#"{"key":"k","value":"v","ttl":60}"#,
                "unknown field \"ttl\"",
            ),
            (
                r#"{"key":"k","value":"v","meta":{"x":1}}"#,
                "unknown field \"meta\"",
            ),
            (
                r#"{"key":"k","key_hex":"6b","value":"v"}"#,
                "both \"key\" and \"key_hex\"",
            ),
        ] {
            let e = decode(line).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        }
    }
}

//! Connection-string syntax: URLs (`postgresql://...?k=v`) and libpq keyword strings
//! (`host=... user=...`), splitting off the keys handled here rather than by the driver, and
//! redacting passwords for display.

use crate::state::error::{StateError, StateResult};

/// The connection-string keys handled here rather than by the driver.
pub(crate) const OUR_KEYS: [&str; 7] = [
    "service",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "pgbouncer",
];

pub(crate) fn is_url(s: &str) -> bool {
    s.starts_with("postgresql://") || s.starts_with("postgres://")
}

/// Splits `sslmode`, `sslrootcert`, `sslcert`, `sslkey` off a URL's query string.
pub(crate) fn split_url_params(url: &str) -> StateResult<(String, Vec<(String, String)>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut ssl = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if OUR_KEYS.contains(&k) {
            ssl.push((k.to_string(), percent_decode(v)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ssl))
}

pub(crate) fn percent_decode(s: &str) -> StateResult<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    StateError::config("malformed percent-encoding in connection URL")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| StateError::config("connection URL parameter is not valid UTF-8"))
}

/// Splits the TLS keywords off a libpq keyword string (`host=... sslmode=...`).
pub(crate) fn split_keyword_params(s: &str) -> StateResult<(String, Vec<(String, String)>)> {
    let mut kept = Vec::new();
    let mut ssl = Vec::new();
    for (k, v) in parse_keywords(s)? {
        if OUR_KEYS.contains(&k.as_str()) {
            ssl.push((k, v));
        } else {
            let escaped = v.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{k}='{escaped}'"));
        }
    }
    Ok((kept.join(" "), ssl))
}

pub(crate) fn parse_keywords(s: &str) -> StateResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The word itself is not shown: it may be part of a password.
            return Err(StateError::config(
                "malformed connection string: a word without '=' (quote values that contain spaces)",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(StateError::config(
                                "malformed connection string: unterminated quoted value",
                            ))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(StateError::config(
                            "malformed connection string: unterminated quoted value",
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Replaces every password in a connection string with `***`: the user-info password of a
/// URL (found as the driver finds it: everything before the first `@`), and the value of any
/// parameter or keyword whose name contains `password` (`password`, `sslpassword`, also
/// percent-encoded or in capitals). A keyword string that cannot be parsed is not shown at all.
pub fn redact(url: &str) -> String {
    let trimmed = url.trim();
    if looks_like_url(trimmed) {
        let scheme_end = trimmed.find("://").map_or(0, |i| i + 3);
        let (head, tail) = trimmed.split_at(scheme_end);
        // The user information is taken to end at the last `@`: a password with an unencoded
        // `@`, `/`, `?` or `#` (the driver splits at the first `@`, taking the rest for a host
        // name) is hidden whole. Hiding a little too much of an odd URL is the safe side.
        let tail = match tail.rfind('@') {
            Some(at) => {
                let (userinfo, rest) = tail.split_at(at);
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***{rest}"),
                    None => tail.to_string(),
                }
            }
            None => tail.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let parts: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                        _ => pair.to_string(),
                    })
                    .collect();
                format!("{path}?{}", parts.join("&"))
            }
            None => tail,
        };
        format!("{head}{tail}")
    } else {
        match parse_keywords(trimmed) {
            Ok(pairs) => pairs
                .into_iter()
                .map(|(k, v)| {
                    if is_secret_key(&k) {
                        format!("{k}=***")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => "<unparseable connection string>".to_string(),
        }
    }
}

pub(crate) fn looks_like_url(s: &str) -> bool {
    let lower = s.get(..13).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("postgresql://") || lower.starts_with("postgres://")
}

pub(crate) fn is_secret_key(key: &str) -> bool {
    let decoded = percent_decode(key).unwrap_or_else(|_| key.to_string());
    decoded.to_ascii_lowercase().contains("password")
}

/// The driver's parse error, without any text taken from the input (an unknown "option" may
/// be a fragment of a password): only known keyword names are kept.
pub(crate) fn sanitize_driver_error(message: &str) -> String {
    const KNOWN: &[&str] = &[
        "user",
        "password",
        "dbname",
        "options",
        "application_name",
        "sslmode",
        "host",
        "hostaddr",
        "port",
        "connect_timeout",
        "tcp_user_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_retries",
        "target_session_attrs",
        "channel_binding",
        "load_balance_hosts",
        "sslnegotiation",
        "replication",
    ];
    let mut out = String::new();
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut quoted = true;
    for part in parts {
        if quoted {
            if KNOWN.contains(&part) {
                out.push('`');
                out.push_str(part);
                out.push('`');
            } else {
                out.push_str("(a parameter)");
            }
        } else {
            out.push_str(part);
        }
        quoted = !quoted;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://user:s3cr%40t@host:5432/db?sslmode=require"),
            "postgresql://user:***@host:5432/db?sslmode=require"
        );
        assert_eq!(redact("postgres://user@host/db"), "postgres://user@host/db");
        assert_eq!(
            redact("postgres://u@h/db?password=hunter2&x=1"),
            "postgres://u@h/db?password=***&x=1"
        );
        assert_eq!(
            redact("host=h user=u password='a b c' dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
    }
}

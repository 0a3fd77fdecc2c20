//! One connection's settings: parsing connection strings (URLs and libpq keyword strings),
//! the keys we handle ourselves (TLS, `pgbouncer`), and password redaction.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::state::config::connstr::{
    is_url, looks_like_url, redact, sanitize_driver_error, split_keyword_params, split_url_params,
    truncate,
};
use crate::state::config::libpq_env::LibpqEnv;
use crate::state::error::{StateError, StateResult};

/// libpq `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Plaintext first; TLS if the server refuses the plaintext connection.
    Allow,
    /// TLS first, without verification (the chain is verified when a root certificate is
    /// given); plaintext if TLS is unavailable or fails.
    Prefer,
    /// TLS without verification (the chain is verified when a root certificate is given).
    Require,
    /// TLS; the server certificate must chain to the root certificate. The host name is not checked.
    VerifyCa,
    /// TLS; chain and host name are verified.
    VerifyFull,
}

impl SslMode {
    /// libpq's name of the mode (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = StateError;

    fn from_str(s: &str) -> StateResult<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(StateError::config(format!(
                    "unknown sslmode {:?}: expected disable, allow, prefer, require, verify-ca or verify-full",
                    truncate(other, 32)
                )))
            }
        })
    }
}

/// TLS settings resolved for one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SslSettings {
    pub mode: SslMode,
    /// Whether `mode` was given (else it is the default, `prefer`).
    pub mode_given: bool,
    /// A file, or [`SYSTEM_ROOTS`]: the operating system's trust store.
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Whether an `sslpassword` was given (only for a clearer error about encrypted keys).
    pub key_password: bool,
}

impl Default for SslSettings {
    /// Nothing named: `prefer`, no files.
    fn default() -> Self {
        SslSettings {
            mode: SslMode::Prefer,
            mode_given: false,
            root_cert: None,
            client_cert: None,
            client_key: None,
            key_password: false,
        }
    }
}

/// libpq's `sslrootcert=system`: trust the operating system's certificate store.
pub(crate) const SYSTEM_ROOTS: &str = "system";

impl SslSettings {
    /// Whether the root certificates are the operating system's.
    pub fn system_roots(&self) -> bool {
        self.root_cert.as_deref() == Some(std::path::Path::new(SYSTEM_ROOTS))
    }

    /// libpq's defaults and rules, after the URL and any explicit settings: files in
    /// `<home>/.postgresql` (`root.crt`, `postgresql.crt`, `postgresql.key`) when none are
    /// named; `sslrootcert=system` means `verify-full` and refuses weaker modes; a client
    /// certificate needs its key; verify modes need roots.
    pub fn resolve(&mut self, home: Option<&std::path::Path>) -> StateResult<()> {
        if self.mode != SslMode::Disable {
            if let Some(dir) = home.map(|h| h.join(".postgresql")) {
                let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
                if self.root_cert.is_none() {
                    self.root_cert = existing("root.crt");
                }
                if self.client_cert.is_none() {
                    self.client_cert = existing("postgresql.crt");
                }
                if self.client_key.is_none() && self.client_cert.is_some() {
                    self.client_key = existing("postgresql.key");
                }
            }
        }
        if self.system_roots() {
            if !self.mode_given {
                self.mode = SslMode::VerifyFull;
            } else if self.mode != SslMode::VerifyFull {
                return Err(StateError::config(format!(
                    "sslmode {} may not be used with sslrootcert=system: use verify-full (the \
                     operating system's trust store is for checking a server's name too)",
                    self.mode
                )));
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(StateError::config(
                "a client certificate needs its key and a key needs its certificate (sslcert and \
                 sslkey, or ~/.postgresql/postgresql.crt and postgresql.key)",
            ));
        }
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none()
        {
            return Err(StateError::config(format!(
                "sslmode {} needs a root certificate (sslrootcert / root_cert_path, \
                 sslrootcert=system for the operating system's store, or ~/.postgresql/root.crt)",
                self.mode
            )));
        }
        Ok(())
    }
}

/// One server's parsed connection string: the driver config plus our TLS settings, which the
/// driver does not understand (it knows only disable/prefer/require).
#[derive(Clone)]
pub(crate) struct ConnectionSpec {
    pub pg: tokio_postgres::Config,
    pub ssl: SslSettings,
    /// `pgbouncer=true`: the URL goes through PgBouncer's transaction pooling, where no
    /// session state (prepared statements, session settings, session locks, LISTEN) lasts
    /// beyond a transaction.
    pub pgbouncer: bool,
}

impl ConnectionSpec {
    /// Parses `url` as it is, without libpq's environment.
    #[cfg(test)]
    pub fn parse(url: &str) -> StateResult<Self> {
        Self::parse_with(url, &LibpqEnv::default(), |_| Ok(()))
    }

    /// Parses `url`, filling what it leaves unset from this process's libpq environment.
    pub fn parse_in_env(url: &str) -> StateResult<Self> {
        Self::parse_with(url, &LibpqEnv::current(), |_| Ok(()))
    }

    /// Parses `url`, filling what it leaves unset from `env` (see the `libpq_env` module);
    /// `adjust` may change the TLS settings (an explicit TLS configuration) before they are
    /// checked.
    pub fn parse_with(
        url: &str,
        env: &LibpqEnv,
        adjust: impl FnOnce(&mut SslSettings) -> StateResult<()>,
    ) -> StateResult<Self> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(StateError::config("connection URL is empty"));
        }
        // The driver only knows lower-case schemes.
        let lowered;
        let trimmed = if looks_like_url(trimmed) && !is_url(trimmed) {
            let end = trimmed.find("://").map_or(0, |i| i + 3);
            lowered = format!("{}{}", trimmed[..end].to_ascii_lowercase(), &trimmed[end..]);
            lowered.as_str()
        } else {
            trimmed
        };
        refuse_other_scheme(trimmed)?;
        let (rest, params) = if is_url(trimmed) {
            split_url_params(trimmed)?
        } else {
            split_keyword_params(trimmed)?
        };
        let mut pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            StateError::config(format!(
                "malformed connection URL {}: {}",
                redact(trimmed),
                sanitize_driver_error(&e.to_string())
            ))
        })?;
        let mut ssl = SslSettings::default();
        let mut pgbouncer = false;
        let mut service = None;
        for (k, v) in params {
            match k.as_str() {
                "service" => service = Some(v),
                "pgbouncer" => {
                    pgbouncer = match v.to_ascii_lowercase().as_str() {
                        "true" | "1" | "yes" | "on" => true,
                        "false" | "0" | "no" | "off" => false,
                        _ => {
                            return Err(StateError::config(format!(
                                "pgbouncer must be true or false, not {:?}",
                                truncate(&v, 20)
                            )))
                        }
                    }
                }
                "sslmode" => {
                    ssl.mode = v.parse()?;
                    ssl.mode_given = true;
                }
                "sslpassword" => ssl.key_password = true,
                "sslrootcert" => ssl.root_cert = Some(PathBuf::from(v)),
                "sslcert" => ssl.client_cert = Some(PathBuf::from(v)),
                "sslkey" => ssl.client_key = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        for (k, v) in env.settings(service.as_deref())? {
            fill(&mut pg, &mut ssl, &k, &v)?;
        }
        check_target(&pg, trimmed)?;
        env.apply_passfile(&mut pg);
        adjust(&mut ssl)?;
        let home = std::env::var_os("HOME").map(PathBuf::from);
        ssl.resolve(home.as_deref())?;
        Ok(ConnectionSpec { pg, ssl, pgbouncer })
    }
}

/// Refuses a URL with a scheme other than `postgresql://` or `postgres://` (`http://...`),
/// not shown (it may hold a password); a keyword string may hold "://" in a value.
fn refuse_other_scheme(trimmed: &str) -> StateResult<()> {
    let other_scheme = trimmed.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    });
    if !is_url(trimmed) && other_scheme {
        return Err(StateError::config(
            "the connection URL's scheme must be postgresql:// or postgres:// (or give a \
             libpq keyword string such as \"host=... user=...\")",
        ));
    }
    Ok(())
}

/// Applies libpq setting `key` = `value` (from a service file or the environment) to a
/// connection whose string did not give it (`pg`, `ssl`).
fn fill(
    pg: &mut tokio_postgres::Config,
    ssl: &mut SslSettings,
    key: &str,
    value: &str,
) -> StateResult<()> {
    let bad = || StateError::config(format!("{key} from the libpq environment is not valid"));
    match key {
        "host" if pg.get_hosts().is_empty() => {
            for h in value.split(',').filter(|h| !h.is_empty()) {
                pg.host(h);
            }
        }
        "port" if pg.get_ports().is_empty() => {
            for p in value.split(',') {
                pg.port(p.trim().parse().map_err(|_| bad())?);
            }
        }
        "user" if pg.get_user().is_none() => {
            pg.user(value);
        }
        "password" if pg.get_password().is_none() => {
            pg.password(value);
        }
        "dbname" if pg.get_dbname().is_none() => {
            pg.dbname(value);
        }
        "application_name" if pg.get_application_name().is_none() => {
            pg.application_name(value);
        }
        "connect_timeout" if pg.get_connect_timeout().is_none() => {
            let secs: u64 = value.trim().parse().map_err(|_| bad())?;
            if secs > 0 {
                pg.connect_timeout(Duration::from_secs(secs.max(2)));
            }
        }
        "sslmode" if !ssl.mode_given => {
            ssl.mode = value.to_ascii_lowercase().parse()?;
            ssl.mode_given = true;
        }
        "sslrootcert" if ssl.root_cert.is_none() => ssl.root_cert = Some(PathBuf::from(value)),
        "sslcert" if ssl.client_cert.is_none() => ssl.client_cert = Some(PathBuf::from(value)),
        "sslkey" if ssl.client_key.is_none() => ssl.client_key = Some(PathBuf::from(value)),
        // Set by the connection string already: it wins.
        known if LibpqEnv::applies(known) => {}
        // Never dropped in silence (a `channel_binding=require` lost would weaken security).
        other => {
            return Err(StateError::config(format!(
                "the service file's setting {other:?} is not supported here: put it in the \
                 connection string"
            )))
        }
    }
    Ok(())
}

/// Refuses a parsed connection string (`url`, shown redacted) that names no host, a host with
/// `@` (the tail of a password with an unencoded `@`: never connected to, never shown) or no
/// user.
fn check_target(pg: &tokio_postgres::Config, url: &str) -> StateResult<()> {
    if pg.get_hosts().is_empty() {
        return Err(StateError::config(format!(
            "connection URL {} names no host",
            redact(url)
        )));
    }
    // A host name with `@` is the tail of a password with an unencoded `@`: refuse it
    // (never connect to it, never show it).
    if pg
        .get_hosts()
        .iter()
        .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(name) if name.contains('@')))
    {
        return Err(StateError::config(format!(
            "connection URL {} has '@' in its host name: percent-encode '@' in a user name \
             or password as %40",
            redact(url)
        )));
    }
    if pg.get_user().is_none() {
        return Err(StateError::config(format!(
            "connection URL {} names no user",
            redact(url)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redaction hides every part of a password, whatever characters it has, for every URL
    /// form; parsing such a URL fails or succeeds without the password in its error text.
    #[test]
    fn passwords_with_any_characters_never_show() {
        const CHARS: &[u8] = b"abcXYZ019@:/?#&=%!$'*+,;[] ";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..10_000 {
            let len = 6 + (next() % 20) as usize;
            // Marker letters on both ends, so any leaked fragment of 4 bytes is found.
            let middle: String = (0..len)
                .map(|_| CHARS[(next() % CHARS.len() as u64) as usize] as char)
                .collect();
            let password = format!("Q{middle}Q");
            let url = match case % 3 {
                0 => format!("postgresql://user:{password}@db.example:5432/state"),
                1 => format!("postgres://user:{password}@db.example/state?sslmode=require"),
                _ => format!("postgresql://user:{password}@h1:5432,h2:5433/state"),
            };
            let shown = redact(&url);
            let error = ConnectionSpec::parse(&url)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let bytes = password.as_bytes();
            for w in bytes.windows(4) {
                let frag = String::from_utf8_lossy(w);
                // Fragments that are also ordinary URL text say nothing about the password.
                if "postgresql://user:***@db.example:5432/state?sslmode=require,h1h2:5433"
                    .contains(frag.as_ref())
                {
                    continue;
                }
                assert!(
                    !shown.contains(frag.as_ref()),
                    "{url:?} redacted as {shown:?}"
                );
                assert!(
                    !error.contains(frag.as_ref()),
                    "{url:?} gave {error:?} ({frag:?})"
                );
            }
        }
    }

    #[test]
    fn redacts_passwords_the_way_the_driver_reads_them() {
        for (url, secret) in [
            ("postgresql://u:pa/ss@db/app", "pa/ss"),
            ("postgresql://u:pa?ss@db/app", "pa?ss"),
            ("postgresql://u:pa#ss@db/app", "pa#ss"),
            (
                "POSTGRES://u:UPPERsecret@h/db?sslmode=require",
                "UPPERsecret",
            ),
            ("postgresql://u@h/db?sslpassword=keypass1", "keypass1"),
            ("postgresql://u@h/db?pass%77ord=encoded1", "encoded1"),
            ("host=h user=u sslpassword=keypass2", "keypass2"),
            ("host=h user=u PASSWORD=caps3", "caps3"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            if let Err(e) = ConnectionSpec::parse(url) {
                assert!(!e.to_string().contains(secret), "{url}: {e}");
            }
        }
        // A password split into "options" by a stray space never reaches an error message.
        let err = ConnectionSpec::parse("host=h user=u password=my secretword")
            .err()
            .unwrap();
        assert!(!err.to_string().contains("secretword"), "{err}");
        let err = ConnectionSpec::parse("http://u:webpw@h/db").err().unwrap();
        assert!(err.to_string().contains("postgresql://") && !err.to_string().contains("webpw"));
        // A keyword string may hold "://" in a value.
        assert!(ConnectionSpec::parse("host=h user=u application_name='see http://x'").is_ok());
        let err = ConnectionSpec::parse("jdbc:postgresql://u:jdbcpw@h/db")
            .err()
            .unwrap();
        assert!(!err.to_string().contains("jdbcpw"), "{err}");
        assert!(ConnectionSpec::parse("host=h user=u password='abc\\").is_err());
        // Upper-case schemes work like lower-case ones.
        let spec = ConnectionSpec::parse("POSTGRESQL://u:pw@h:5433/db").unwrap();
        assert_eq!(spec.pg.get_ports(), &[5433]);
    }

    #[test]
    fn parses_ssl_params_from_urls_and_keywords() {
        let spec = ConnectionSpec::parse(
            "postgresql://u:p@localhost:5433/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(spec.ssl.mode, SslMode::VerifyFull);
        assert_eq!(spec.ssl.root_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(spec.pg.get_application_name(), Some("x"));
        assert_eq!(spec.pg.get_ports(), &[5433]);

        let spec = ConnectionSpec::parse(
            "host=localhost user=u password='it''s' sslmode=disable dbname='my db'",
        );
        // A doubled quote is not an escape in libpq keyword strings: this is malformed.
        assert!(spec.is_err());
        let spec = ConnectionSpec::parse(
            r"host=localhost user=u password='it\'s' sslmode=disable dbname='my db'",
        )
        .unwrap();
        assert_eq!(spec.ssl.mode, SslMode::Disable);
        assert_eq!(spec.pg.get_dbname(), Some("my db"));
        assert_eq!(spec.pg.get_password(), Some(&b"it's"[..]));
    }

    #[test]
    fn rejects_bad_urls_with_clear_errors() {
        for (url, needle) in [
            ("", "empty"),
            (
                "postgresql://u:pw@h/db?sslmode=sometimes",
                "unknown sslmode",
            ),
            (
                "postgresql://u:pw@h/db?sslmode=verify-full",
                "root certificate",
            ),
            ("postgresql://h/db", "no user"),
            ("postgresql://u:pw@h:notaport/db", "malformed"),
            ("host=h user", "malformed"),
        ] {
            let err = ConnectionSpec::parse(url).err().unwrap();
            let text = err.to_string();
            assert!(text.contains(needle), "{url}: {text}");
            assert!(!text.contains("pw@"), "{text}");
            assert_eq!(err.kind(), crate::state::ErrorKind::Configuration);
        }
    }

    #[test]
    fn sslrootcert_system_means_verify_full_and_refuses_weaker_modes() {
        let spec = ConnectionSpec::parse("postgresql://u@h/db?sslrootcert=system").unwrap();
        assert_eq!(spec.ssl.mode, SslMode::VerifyFull);
        assert!(spec.ssl.system_roots());
        assert!(ConnectionSpec::parse(
            "postgresql://u@h/db?sslrootcert=system&sslmode=verify-full"
        )
        .is_ok());
        for weak in ["disable", "allow", "prefer", "require", "verify-ca"] {
            let url = format!("postgresql://u@h/db?sslrootcert=system&sslmode={weak}");
            let e = ConnectionSpec::parse(&url).err().unwrap();
            assert!(e.to_string().contains("verify-full"), "{weak}: {e}");
        }
        // A file named "system" is still reachable as ./system.
        let spec = ConnectionSpec::parse("postgresql://u@h/db?sslrootcert=./system").unwrap();
        assert!(!spec.ssl.system_roots());
    }

    #[test]
    fn default_files_in_the_home_folder_are_used_when_none_are_named() {
        let home = std::env::temp_dir().join(format!("pgstate-home-{}", std::process::id()));
        let dir = home.join(".postgresql");
        std::fs::create_dir_all(&dir).unwrap();
        let blank = SslSettings::default;
        // No files: nothing changes.
        let mut s = blank();
        s.resolve(Some(&home)).unwrap();
        assert_eq!(s, blank());
        for f in ["root.crt", "postgresql.crt", "postgresql.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let mut s = blank();
        s.resolve(Some(&home)).unwrap();
        assert_eq!(s.root_cert, Some(dir.join("root.crt")));
        assert_eq!(s.client_cert, Some(dir.join("postgresql.crt")));
        assert_eq!(s.client_key, Some(dir.join("postgresql.key")));
        // Named files win; sslmode=disable uses none.
        let mut s = SslSettings {
            root_cert: Some(PathBuf::from("/named/ca.pem")),
            ..blank()
        };
        s.resolve(Some(&home)).unwrap();
        assert_eq!(s.root_cert, Some(PathBuf::from("/named/ca.pem")));
        let mut s = SslSettings {
            mode: SslMode::Disable,
            ..blank()
        };
        s.resolve(Some(&home)).unwrap();
        assert_eq!(s.root_cert, None);
        // A default certificate without its key is an error, as in libpq.
        std::fs::remove_file(dir.join("postgresql.key")).unwrap();
        let e = blank().resolve(Some(&home)).err().unwrap();
        assert!(e.to_string().contains("postgresql.key"), "{e}");
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn ssl_passwords_are_redacted_and_not_passed_to_the_driver() {
        let url = "postgresql://u@h/db?sslkey=%2Fk&sslcert=%2Fc&sslpassword=hunter2";
        assert!(!redact(url).contains("hunter2"));
        let spec = ConnectionSpec::parse(url).unwrap();
        assert!(spec.ssl.key_password);
    }
}

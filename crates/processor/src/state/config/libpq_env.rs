//! libpq's environment, applied as libpq applies it: what the connection string says wins;
//! then a service file's section (`service=NAME` or `PGSERVICE`, in `PGSERVICEFILE` or
//! `~/.pg_service.conf`, then `PGSYSCONFDIR/pg_service.conf`); then the environment
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGAPPNAME`,
//! `PGCONNECT_TIMEOUT`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`); then a
//! password file (`PGPASSFILE` or `~/.pgpass`) for a password still missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::state::error::{StateError, StateResult};

/// The environment variables libpq reads, and the settings each fills.
const VARIABLES: [(&str, &str); 11] = [
    ("PGHOST", "host"),
    ("PGPORT", "port"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGDATABASE", "dbname"),
    ("PGAPPNAME", "application_name"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
];

/// A snapshot of the environment libpq reads (empty: none of it applies). `Debug` shows the
/// variables' names, never their values (`PGPASSWORD`).
#[derive(Clone, Default)]
pub(crate) struct LibpqEnv {
    vars: HashMap<String, String>,
    home: Option<PathBuf>,
}

impl std::fmt::Debug for LibpqEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.vars.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("LibpqEnv")
            .field("set", &names)
            .finish_non_exhaustive()
    }
}

impl LibpqEnv {
    /// This process's environment.
    pub fn current() -> Self {
        let names = VARIABLES.iter().map(|(v, _)| *v).chain([
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGSYSCONFDIR",
            "PGPASSFILE",
        ]);
        LibpqEnv {
            vars: names
                .filter_map(|n| std::env::var(n).ok().map(|v| (n.to_string(), v)))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
            home: std::env::var_os("HOME").map(PathBuf::from),
        }
    }

    /// Whether setting `key` is one that libpq's environment may fill (the keys of
    /// [`VARIABLES`]).
    pub fn applies(key: &str) -> bool {
        VARIABLES.iter().any(|(_, k)| *k == key)
    }

    /// An environment of `vars` and home directory `home` (for tests).
    #[cfg(test)]
    pub fn of(vars: &[(&str, &str)], home: Option<&Path>) -> Self {
        LibpqEnv {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: home.map(Path::to_path_buf),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// The settings of service `name` (named in the connection string, else `PGSERVICE`);
    /// none without a service. A service named and found in no file is an error, as in libpq.
    fn service(&self, named: Option<&str>) -> StateResult<Vec<(String, String)>> {
        let Some(name) = named.or_else(|| self.var("PGSERVICE")) else {
            return Ok(Vec::new());
        };
        let user_file = self
            .var("PGSERVICEFILE")
            .map(PathBuf::from)
            .or_else(|| self.home.as_ref().map(|h| h.join(".pg_service.conf")));
        let system_file = self
            .var("PGSYSCONFDIR")
            .map(|d| Path::new(d).join("pg_service.conf"));
        for file in [user_file, system_file].into_iter().flatten() {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            if let Some(settings) = service_section(&text, name) {
                return Ok(settings);
            }
        }
        Err(StateError::config(format!(
            "service {name:?} not found (in PGSERVICEFILE or ~/.pg_service.conf, or \
             PGSYSCONFDIR/pg_service.conf)"
        )))
    }
}

/// The `key=value` lines of section `[name]` of a service file.
fn service_section(text: &str, name: &str) -> Option<Vec<(String, String)>> {
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if found.is_some() {
                break;
            }
            if section.trim() == name {
                found = Some(Vec::new());
            }
            continue;
        }
        if let (Some(settings), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
            settings.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    found
}

impl LibpqEnv {
    /// The settings that fill what a connection string leaves unset, first come first
    /// applied: the service's (named in the string, else `PGSERVICE`), then the
    /// environment's, as libpq keywords (see the module notes).
    pub fn settings(&self, service: Option<&str>) -> StateResult<Vec<(String, String)>> {
        let mut all = self.service(service)?;
        for (var, key) in VARIABLES {
            if let Some(v) = self.var(var) {
                all.push((key.to_string(), v.to_string()));
            }
        }
        Ok(all)
    }

    /// The password file's password for the connection's host, port, database and user,
    /// when it has none yet (with several hosts, only when every one finds the same). A file
    /// readable by group or others is skipped, as libpq does, with a warning.
    pub fn apply_passfile(&self, pg: &mut tokio_postgres::Config) {
        if pg.get_password().is_some() {
            return;
        }
        let Some(file) = self
            .var("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| self.home.as_ref().map(|h| h.join(".pgpass")))
        else {
            return;
        };
        let Ok(meta) = std::fs::metadata(&file) else {
            return;
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %file.display(), "password file has group or world access; ignored (chmod 0600)");
                return;
            }
        }
        let _ = meta;
        let Ok(text) = std::fs::read_to_string(&file) else {
            return;
        };
        // Every host (with its port) must find the same password: one password is sent to
        // whichever host answers.
        let user = pg.get_user().unwrap_or_default().to_string();
        let db = pg.get_dbname().map_or_else(|| user.clone(), str::to_string);
        let ports = pg.get_ports();
        let mut found: Option<String> = None;
        for (i, host) in pg.get_hosts().iter().enumerate() {
            let host = match host {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(_) => "localhost".to_string(),
            };
            let port = ports
                .get(i)
                .or(ports.first())
                .copied()
                .unwrap_or(5432)
                .to_string();
            let password = passfile_match(&text, [&host, &port, &db, &user]);
            match (&found, password) {
                (_, None) => return,
                (None, Some(p)) => found = Some(p),
                (Some(f), Some(p)) if *f == p => {}
                (Some(_), Some(_)) => {
                    tracing::warn!(file = %file.display(), "the password file has different passwords for the hosts of one connection; not used");
                    return;
                }
            }
        }
        if let Some(password) = found {
            pg.password(password);
        }
    }
}

/// The password of the first line of a password file matching `want` (host, port,
/// database, user; `*` matches anything; `\:` and `\\` are escapes).
fn passfile_match(text: &str, want: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => field.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                c => field.push(c),
            }
        }
        fields.push(field);
        if fields.len() == 5
            && fields[..4]
                .iter()
                .zip(want)
                .all(|(f, w)| f == "*" || f == w)
        {
            return fields.pop();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_sections_and_password_lines_are_read_like_libpq() {
        let text = "# comment\n[a]\nhost=h1\nport = 5433\n\n[b]\nuser=bob\n";
        assert_eq!(
            service_section(text, "a").unwrap(),
            vec![
                ("host".to_string(), "h1".to_string()),
                ("port".to_string(), "5433".to_string())
            ]
        );
        assert!(service_section(text, "c").is_none());
        let pass = "h:5432:db:u:first\n*:*:*:u:any\\:colon\n";
        assert_eq!(
            passfile_match(pass, ["h", "5432", "db", "u"]).unwrap(),
            "first"
        );
        assert_eq!(
            passfile_match(pass, ["other", "1", "x", "u"]).unwrap(),
            "any:colon"
        );
        assert!(passfile_match(pass, ["h", "5432", "db", "v"]).is_none());
    }

    /// One password goes to whichever host answers: used only when every host finds the same.
    #[cfg(unix)]
    #[test]
    fn a_password_file_serves_several_hosts_only_with_one_password() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pgstate_pass_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pass");
        let env = LibpqEnv::of(&[("PGPASSFILE", file.to_str().unwrap())], None);
        let config = || {
            let mut pg = tokio_postgres::Config::new();
            pg.host("h1").host("h2").user("u").dbname("db");
            pg
        };
        for (text, expected) in [
            ("h1:5432:db:u:one\nh2:5432:db:u:two\n", None),
            (
                "h1:5432:db:u:same\nh2:5432:db:u:same\n",
                Some(b"same".as_slice()),
            ),
            ("*:*:*:u:any\n", Some(b"any".as_slice())),
            ("h1:5432:db:u:only-one\n", None),
        ] {
            std::fs::write(&file, text).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let mut pg = config();
            env.apply_passfile(&mut pg);
            assert_eq!(pg.get_password(), expected, "{text}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_service_comes_before_the_environment() {
        let dir = std::env::temp_dir().join(format!("pgstate_env_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(".pg_service.conf"),
            "[svc]\nport=6000\nuser=from_service\n",
        )
        .unwrap();
        let env = LibpqEnv::of(&[("PGPORT", "7000"), ("PGUSER", "from_env")], Some(&dir));
        let settings = env.settings(Some("svc")).unwrap();
        let first = |k: &str| {
            settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(first("port"), Some("6000"));
        assert_eq!(first("user"), Some("from_service"));
        assert_eq!(settings.len(), 4);
        let missing = env.settings(Some("nope")).unwrap_err();
        assert!(matches!(missing, StateError::Configuration(_)), "{missing}");
        assert!(LibpqEnv::default().settings(None).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}

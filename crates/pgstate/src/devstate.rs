//! The dev directory of `pgstate dev`: where the kept cluster's state lives (`cluster.json`
//! and `env`, both 0600, in a directory of the user's own kept at 0700), shared by the `dev`
//! commands that write it and by the other commands that find their server there.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use processor::state::redact;
use serde_json::json;

use crate::exit::CliError;

/// This process's user id (the owner of `/proc/self`).
pub fn my_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Where `pgstate dev` keeps its state when neither `--dev-dir` nor `$PGSTATE_DEV_DIR` says:
/// per user (`$XDG_RUNTIME_DIR/pgstate-dev`, else `pgstate-dev-<uid>` in the temporary
/// directory), never a folder other users share.
pub fn default_dev_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("pgstate-dev"),
        None => std::env::temp_dir().join(format!(
            "pgstate-dev-{}",
            my_uid().map_or_else(|| "unknown".to_string(), |u| u.to_string())
        )),
    }
}

/// A kept cluster, as `cluster.json` records it.
pub struct DevState {
    /// The cluster's directory (data directories, certificates, logs).
    pub dir: PathBuf,
    /// The primary's URL (TLS, verify-full).
    pub primary: String,
    /// The replicas' URLs.
    pub replicas: Vec<String>,
}

const STATE_FILE: &str = "cluster.json";
const ENV_FILE: &str = "env";

/// Checks that `dev_dir` (when it exists) belongs to this user, and makes it 0700: another
/// user's folder could name a server of theirs, or a folder for `dev down` to remove.
fn check_dir(dev_dir: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match fs::metadata(dev_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CliError::failed(format!("{}: {e}", dev_dir.display()))),
    };
    if !meta.is_dir() || Some(meta.uid()) != my_uid() {
        return Err(CliError::failed(format!(
            "refusing the dev directory {}: not a directory of yours",
            dev_dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dev_dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl DevState {
    /// The state in `dev_dir`, if a cluster was kept there.
    pub fn load(dev_dir: &Path) -> Result<Option<DevState>, CliError> {
        check_dir(dev_dir)?;
        let path = dev_dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CliError::failed(format!("reading {}: {e}", path.display()))),
        };
        let bad = || {
            CliError::failed(format!(
                "{} is not a pgstate dev state file",
                path.display()
            ))
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
        let text_of = |v: &serde_json::Value| v.as_str().map(str::to_string).ok_or_else(bad);
        Ok(Some(DevState {
            dir: PathBuf::from(text_of(&v["dir"])?),
            primary: text_of(&v["primary"])?,
            replicas: v["replicas"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(text_of)
                .collect::<Result<_, _>>()?,
        }))
    }

    /// Writes the state into `dev_dir` (created 0700 when missing): `cluster.json` and `env`.
    pub fn save(&self, dev_dir: &Path) -> Result<(), CliError> {
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dev_dir)?;
        }
        check_dir(dev_dir)?;
        let state = json!({
            "dir": self.dir.to_string_lossy(),
            "primary": self.primary,
            "replicas": self.replicas,
        });
        private_file(&dev_dir.join(STATE_FILE), &format!("{state:#}\n"))?;
        let env = format!(
            "DATABASE_URL='{}'\nPGSTATE_REPLICA_URLS='{}'\n",
            self.primary,
            self.replicas.join(",")
        );
        private_file(&dev_dir.join(ENV_FILE), &env)
    }

    /// Removes the kept cluster's files from `dev_dir` (once the cluster is stopped).
    pub fn forget(dev_dir: &Path) -> Result<(), CliError> {
        fs::remove_file(dev_dir.join(STATE_FILE))?;
        let _ = fs::remove_file(dev_dir.join(ENV_FILE));
        Ok(())
    }

    /// Prints the cluster's URLs (passwords redacted) and where its files are.
    pub fn print(&self, dev_dir: &Path) {
        println!("primary:   {}", redact(&self.primary));
        for (i, r) in self.replicas.iter().enumerate() {
            println!("replica {}: {}", i + 1, redact(r));
        }
        println!("files:     {}", self.dir.display());
        println!(
            "URLs with the password: {} (`set -a; . {0}` exports DATABASE_URL)",
            dev_dir.join(ENV_FILE).display()
        );
    }
}

/// Writes `text` to a new file at `path` that only its owner can read.
fn private_file(path: &Path, text: &str) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::failed(format!("writing {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

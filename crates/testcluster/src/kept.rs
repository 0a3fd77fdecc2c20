//! Clusters kept running after the process that started them ends (`pgstate dev up`), and
//! stopped later by another process (`pgstate dev down`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::tools::{run_server_tool, server_user};
use crate::{err, find_bindir, Cluster, Error, Result};

impl Cluster {
    /// Leaves the servers running after this process ends: no watchdog, no clean-up on drop.
    /// Returns the cluster's directory, for [`stop_kept`].
    pub fn keep(mut self) -> PathBuf {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let dir = self.dir.clone();
        // Dropping it would stop the servers.
        std::mem::forget(self);
        dir
    }
}

/// Stops the servers of a cluster kept with [`Cluster::keep`] (fast shutdown; a server that
/// is not running, e.g. after a reboot, counts as stopped) and removes its directory. Refuses
/// anything but a cluster's directory (`pgstate-*` in the temporary directory, holding a
/// primary's `node0/PG_VERSION`), so a wrong path removes nothing.
pub fn stop_kept(dir: &Path) -> Result<()> {
    let ours = dir.parent() == Some(std::env::temp_dir().as_path())
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pgstate-"));
    if !ours || !dir.join("node0").join("PG_VERSION").is_file() {
        return err(format!(
            "{} is not a pgstate cluster's directory (pgstate-* in {}, with node0/PG_VERSION)",
            dir.display(),
            std::env::temp_dir().display()
        ));
    }
    let bindir = find_bindir()?;
    let run_as = server_user()?;
    let entries =
        fs::read_dir(dir).map_err(|e| Error(format!("reading {}: {e}", dir.display())))?;
    let mut nodes: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("node") && !n.ends_with(".log"))
                && p.join("postmaster.pid").is_file()
        })
        .collect();
    // Replicas first, so none logs a lost primary while it stops.
    nodes.sort();
    nodes.reverse();
    for node in nodes {
        let data = node.to_string_lossy().to_string();
        // Exit status 3: no server runs on it (a stale pid file).
        let status = run_server_tool(
            run_as.as_ref(),
            &bindir,
            dir,
            "pg_ctl",
            &["-D", &data, "status"],
        );
        if status.is_err() {
            continue;
        }
        run_server_tool(
            run_as.as_ref(),
            &bindir,
            dir,
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"],
        )?;
    }
    fs::remove_dir_all(dir).map_err(|e| Error(format!("removing {}: {e}", dir.display())))
}

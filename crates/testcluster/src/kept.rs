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

/// Stops the servers of a cluster kept with [`Cluster::keep`] (fast shutdown) and removes its
/// directory. Refuses a directory that does not hold a cluster's primary (`node0` with a
/// `PG_VERSION`), so a wrong path removes nothing.
pub fn stop_kept(dir: &Path) -> Result<()> {
    if !dir.join("node0").join("PG_VERSION").is_file() {
        return err(format!(
            "{} does not hold a pgstate cluster (no node0/PG_VERSION)",
            dir.display()
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

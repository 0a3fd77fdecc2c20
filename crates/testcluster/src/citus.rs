//! Citus: the cluster's primary as a coordinator with workers of its own, from an installed
//! `citus` extension (not in Debian's archive: the README says how to build it).

use crate::{find_bindir, Cluster, ClusterOptions, Result};

/// Whether the `citus` extension is installed for the server binaries in use (its library
/// beside theirs, as `make install` puts it).
pub fn citus_installed() -> bool {
    find_bindir().is_ok_and(|bin| {
        bin.parent()
            .is_some_and(|root| root.join("lib").join("citus.so").is_file())
    })
}

impl Cluster {
    /// Starts `opts.citus_workers` workers (after the primary, which loads Citus too), creates
    /// the extension on every node and registers the coordinator and the workers.
    pub(crate) fn add_citus_workers(&mut self, opts: &ClusterOptions) -> Result<()> {
        for _ in 0..opts.citus_workers {
            let i = self.nodes.len();
            self.init_server(i, opts)?;
        }
        for i in 0..self.nodes.len() {
            self.psql(i, "CREATE EXTENSION IF NOT EXISTS citus")?;
        }
        let coordinator = self.nodes[0].port;
        self.psql(
            0,
            &format!("SELECT citus_set_coordinator_host('127.0.0.1', {coordinator})"),
        )?;
        let workers: Vec<u16> = self.nodes[1..].iter().map(|n| n.port).collect();
        for port in workers {
            self.psql(0, &format!("SELECT citus_add_node('127.0.0.1', {port})"))?;
        }
        Ok(())
    }
}

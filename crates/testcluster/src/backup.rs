//! WAL archiving, base backups and point-in-time recovery on a test cluster: the steps of the
//! README's backup procedure, with the server's own tools (`pg_basebackup`, `archive_command`,
//! `restore_command`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{append, err, free_port, Cluster, Error, Node, Result};

/// Where a restore stops replaying archived WAL (PostgreSQL's `recovery_target_*` settings).
#[derive(Clone, Debug)]
pub enum RecoveryTarget {
    /// A restore point made with `pg_create_restore_point(name)`.
    Name(String),
    /// A WAL position (`pg_current_wal_lsn()` as text, such as `0/3000148`).
    Lsn(String),
    /// A time (`timestamptz` text).
    Time(String),
}

impl RecoveryTarget {
    fn setting(&self) -> (&'static str, &str) {
        match self {
            RecoveryTarget::Name(v) => ("recovery_target_name", v),
            RecoveryTarget::Lsn(v) => ("recovery_target_lsn", v),
            RecoveryTarget::Time(v) => ("recovery_target_time", v),
        }
    }
}

/// A string as a quoted `postgresql.conf` value.
fn quoted(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

impl Cluster {
    /// The folder the primary archives its WAL to (with [`ClusterOptions::wal_archive`](crate::ClusterOptions::wal_archive)).
    pub fn wal_archive(&self) -> PathBuf {
        self.dir.join("wal_archive")
    }

    /// The primary's archiving settings: each finished WAL segment is copied to
    /// [`wal_archive`](Self::wal_archive), never over a file already there.
    pub(crate) fn archive_settings(&self) -> Result<String> {
        let archive = self.wal_archive();
        fs::create_dir_all(&archive)
            .map_err(|e| Error(format!("creating {}: {e}", archive.display())))?;
        self.chown(&archive)?;
        let a = archive.display();
        Ok(format!(
            "archive_mode = on\narchive_command = {}\n",
            quoted(&format!("test ! -f '{a}/%f' && cp '%p' '{a}/%f'"))
        ))
    }

    /// Copies the primary with `pg_basebackup` into `<cluster dir>/<name>` (plain format, with
    /// the WAL it needs), as a replica (`-R`) or as a backup; returns the folder.
    pub(crate) fn basebackup(&self, name: &str, replica: bool) -> Result<PathBuf> {
        let data = self.dir.join(name);
        // The password comes from the cluster's passfile (also for a replica's walreceiver,
        // which keeps this conninfo): never on a command line.
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres passfile={} application_name={name}",
            self.nodes[0].port,
            self.dir.join(crate::tools::PASSFILE).display()
        );
        let data_arg = data.to_string_lossy().to_string();
        let mut args = vec![
            "-D", &data_arg, "-X", "stream", "-c", "fast", "-d", &conninfo,
        ];
        if replica {
            args.push("-R");
        }
        self.run_tool("pg_basebackup", &args)?;
        Ok(data)
    }

    /// A base backup of the primary (`pg_basebackup`) into `<cluster dir>/<name>`.
    pub fn base_backup(&self, name: &str) -> Result<PathBuf> {
        self.basebackup(name, false)
    }

    /// Ends the primary's current WAL segment (`pg_switch_wal()`) and waits until the archiver
    /// has copied it: everything written so far is in the archive.
    pub fn archive_now(&self) -> Result<()> {
        let segment = self.psql(0, "SELECT pg_walfile_name(pg_switch_wal())")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = self.psql(
                0,
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            )?;
            if last.len() == segment.len() && last >= segment {
                return Ok(());
            }
            if Instant::now() > deadline {
                let failed = self.psql(0, "SELECT last_failed_wal FROM pg_stat_archiver")?;
                return err(format!(
                    "WAL segment {segment} not archived within 60 s (last archived {last:?}, last failed {failed:?})"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Point-in-time recovery: starts a new server on `backup` (consumed) that replays the
    /// archived WAL up to `target` and then ends recovery (`recovery_target_action =
    /// 'promote'`); waits until it accepts writes and returns its node index.
    pub fn restore(&mut self, backup: &Path, target: &RecoveryTarget) -> Result<usize> {
        let port = free_port()?;
        let (setting, value) = target.setting();
        let restore = format!("cp '{}/%f' '%p'", self.wal_archive().display());
        append(
            &backup.join("postgresql.conf"),
            &format!(
                "\n# point-in-time recovery\nport = {port}\narchive_mode = off\n\
                 restore_command = {}\n{setting} = {}\nrecovery_target_action = 'promote'\n",
                quoted(&restore),
                quoted(value)
            ),
        )?;
        let signal = backup.join("recovery.signal");
        fs::write(&signal, "").map_err(|e| Error(format!("writing {}: {e}", signal.display())))?;
        self.chown(&signal)?;
        self.nodes.push(Node {
            port,
            data_dir: backup.to_path_buf(),
        });
        let i = self.nodes.len() - 1;
        self.start_node(i)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.psql(i, "SELECT pg_is_in_recovery()")? != "f" {
            if Instant::now() > deadline {
                return err(format!(
                    "the restored server is still in recovery after 60 s (is {setting} = {value:?} in the archive?)"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(i)
    }
}

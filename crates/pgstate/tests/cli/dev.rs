//! `pgstate dev up | status | down`, and `pgstate demo` on a machine with no server given.

use std::process::Command;

use crate::{expect, ok, run, scratch};

/// `pgstate` with the dev state in `dir` and no `DATABASE_URL`.
fn with_dev(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = crate::bare();
    cmd.env("PGSTATE_DEV_DIR", dir).args(args);
    cmd
}

/// Runs `dev down` when the test ends, however it ends: a kept cluster has no watchdog.
struct Down(std::path::PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = with_dev(&self.0, &["dev", "down"]).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dev_up_keeps_a_cluster_that_other_commands_use_until_dev_down() {
    let dir = scratch("dev");
    let _down = Down(dir.clone());
    expect(&mut with_dev(&dir, &["dev", "status"]), 1);
    let up = ok(&mut with_dev(&dir, &["dev", "up"]));
    assert!(
        up.contains("primary:   postgresql://postgres:***@127.0.0.1:"),
        "{up}"
    );
    assert_eq!(up.matches("replica ").count(), 2, "{up}");
    assert!(up.contains("sslmode=verify-full"), "{up}");
    // The URLs with the password are in files only their owner reads.
    for file in ["cluster.json", "env"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(file)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    // A private cluster: a random password of its own, never printed.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap();
    let primary = state["primary"].as_str().unwrap().to_string();
    let password = primary
        .split("postgres:")
        .nth(1)
        .and_then(|rest| rest.split('@').next())
        .unwrap()
        .to_string();
    assert_eq!(password.len(), 32, "{password}");
    assert_ne!(password, crate::PASSWORD);
    assert!(!up.contains(&password));
    let files = std::path::PathBuf::from(state["dir"].as_str().unwrap());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&files).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the cluster's files are {mode:o}");
    // Nobody gets in without the password, not even over the Unix socket.
    let port = primary
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let socket = Command::new("psql")
        .args([
            "-X",
            "-w",
            "-h",
            files.to_str().unwrap(),
            "-p",
            port,
            "-U",
            "postgres",
        ])
        .args(["-c", "SELECT 1"])
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .output()
        .unwrap();
    assert!(!socket.status.success(), "trust on the socket: {socket:?}");

    // The process that started it has ended: the servers still run.
    let status = ok(&mut with_dev(&dir, &["dev", "status"]));
    assert_eq!(status.matches(" up ").count(), 3, "{status}");
    for out in [&up, &status] {
        assert!(!out.contains(&password));
    }
    // Without --url or DATABASE_URL, commands use it.
    ok(&mut with_dev(&dir, &["put", "dev-key", "dev-value"]));
    assert_eq!(ok(&mut with_dev(&dir, &["get", "dev-key"])), "dev-value\n");
    // Its replicas come with it: the replication figures name both.
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&mut with_dev(&dir, &["stats", "--json"]))).unwrap();
    assert_eq!(
        stats["replication"]["replicas"].as_array().unwrap().len(),
        2,
        "{stats:#}"
    );
    assert_eq!(stats["replication"]["connected_replicas"], 2, "{stats:#}");
    // Again: it says where the running one is.
    let again = ok(&mut with_dev(&dir, &["dev", "up"]));
    assert!(again.contains("already running"), "{again}");

    assert!(files.is_dir());
    let down = ok(&mut with_dev(&dir, &["dev", "down"]));
    assert!(down.contains("stopped"), "{down}");
    assert!(!files.exists(), "its files are removed");
    expect(&mut with_dev(&dir, &["dev", "status"]), 1);
    expect(&mut with_dev(&dir, &["get", "dev-key"]), 3);
}

/// The README's main command: with no server given, the demo starts its own cluster, runs
/// every feature group, stops the cluster and exits 0.
#[test]
fn demo_without_a_server_starts_its_own_cluster_and_tours_every_feature_group() {
    let out = run(crate::bare().arg("demo"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("starting a throwaway cluster"), "{stdout}");
    for (n, group) in [
        "Key-value state",
        "Replication",
        "Transactions",
        "Fast queries",
        "Coordination",
        "Data management",
        "High availability",
        "Observability",
        "Security",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            stdout.contains(&format!("== {}. {group}", n + 1)),
            "no section {group}:\n{stdout}"
        );
    }
    for fact in [
        "get(\"key\") = Some(\"value\")",
        "present true, after 700 ms false",
        "a write expecting v1 is refused: true",
        "account:b present = false",
        "scan(\"bulk:\") streamed 20000 entries",
        "fenced write committed",
        "leading: true",
        "durable notification #1",
        "experiment present: false",
        "\"recent\" stays: true",
        "restore_archived(user:123): true",
        "sslmode=verify-full: the server's certificate and name were checked",
        "Stopping the throwaway cluster",
        "Demo finished",
    ] {
        assert!(
            stdout.contains(fact),
            "the demo did not show {fact:?}:\n{stdout}"
        );
    }
    // Reads were spread over both replicas.
    let replica_reads: Vec<u64> = stdout
        .lines()
        .filter(|l| l.contains("reads served by 127.0.0.1:"))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(replica_reads.len(), 2, "{stdout}");
    assert!(replica_reads.iter().all(|n| *n > 0), "{stdout}");
}

//! Killing the processes a test started, best effort: a process tree (from `/proc`), processes
//! by command line, a process group.

use std::fs;
use std::process::{Child, Command, Stdio};

/// Kills (SIGKILL) process `root` and every process descending from it (from `/proc`).
pub(crate) fn kill_tree(root: u32) {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    let mut args = vec!["-KILL".to_string()];
    args.extend(tree.iter().map(u32::to_string));
    quietly("kill", &args);
}

/// Kills (SIGKILL) every process whose command line matches `pattern`.
pub(crate) fn kill_matching(pattern: &str) {
    quietly("pkill", &["-KILL".into(), "-f".into(), pattern.into()]);
}

/// Kills the process group `child` leads (it was started through `setsid`).
pub(crate) fn kill_group(child: &Child) {
    quietly(
        "kill",
        &["-KILL".into(), "--".into(), format!("-{}", child.id())],
    );
}

/// Runs `program` with `args`, ignoring its output and outcome (best-effort clean-up).
fn quietly(program: &str, args: &[String]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

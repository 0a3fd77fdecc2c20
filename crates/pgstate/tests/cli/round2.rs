//! The command, round 2: exit codes for refused logins, reads on the primary, strict imports.

use crate::{bare, expect, pgstate, unique, url, PASSWORD};

/// A wrong password (28P01) and a database that does not exist (3D000) are connection
/// problems: exit 3, as the help promises.
#[test]
fn a_wrong_password_and_a_missing_database_exit_3() {
    let good = url();
    assert!(good.contains(PASSWORD), "the test URL carries the password");
    let wrong = good.replace(PASSWORD, "not-the-password");
    expect(bare().args(["--url", &wrong, "get", "k"]), 3);
    // (The test URL is postgresql://user:password@host:port/postgres, without a query.)
    let missing = good.replace("/postgres", "/no_such_database");
    expect(bare().args(["--url", &missing, "get", "k"]), 3);
    // The server is fine: a key that is absent is still 1.
    expect(&mut pgstate(&unique("exit"), &["get", "absent"]), 1);
}

/// `bench` reads from the primary like every other command, unless `--read-replicas`.
#[test]
fn bench_reads_the_primary_unless_told_to_read_replicas() {
    let cluster = pgstate_testcluster::shared()
        .cluster()
        .expect("the local test cluster (its replicas)");
    let replicas = cluster.replica_urls().join(",");
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["--replica", replicas.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["bench", "--seconds", "1", "--tasks", "2", "--json"]);
        let out = expect(&mut pgstate(&unique("bench"), &args), 0);
        serde_json::from_str(out.trim()).expect("bench --json")
    };
    let primary = bench(&[]);
    assert!(
        primary["reads"]["primary"].as_u64().unwrap() > 0,
        "{primary}"
    );
    assert_eq!(primary["reads"]["replicas"], 0, "{primary}");
    let spread = bench(&["--read-replicas"]);
    assert!(
        spread["reads"]["replicas"].as_u64().unwrap() > 0,
        "{spread}"
    );
    // Latencies are labelled.
    assert!(
        primary["get_latency_us"]["p99"].as_u64().is_some(),
        "{primary}"
    );
}

/// An import line with a field the format does not have is refused, naming the line and the
/// field, and nothing of the file is written.
#[test]
fn import_refuses_unknown_fields() {
    let schema = unique("strict");
    let dir = crate::scratch("strict");
    let file = dir.join("typo.jsonl");
    std::fs::write(
        &file,
        "{\"key\":\"ok:1\",\"value\":\"a\"}\n{\"key\":\"typo:1\",\"value\":\"b\",\"ttl\":60,\"meta\":{\"x\":1}}\n",
    )
    .unwrap();
    let out = crate::run(&mut pgstate(&schema, &["import", file.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("typo.jsonl:2") && stderr.contains("\"ttl\""),
        "{stderr}"
    );
    expect(&mut pgstate(&schema, &["get", "ok:1"]), 1);
}

//! put, get, delete, list, stats --json, import and export, checkpoints.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::Value;

use crate::{expect, ok, pgstate, run, scratch, unique};

#[test]
fn put_get_list_delete_with_the_documented_exit_codes() {
    let s = unique("kv");
    ok(&mut pgstate(&s, &["put", "user:1", "alice"]));
    ok(&mut pgstate(
        &s,
        &["put", "user:2", "bob", "--metadata", r#"{"team":"b"}"#],
    ));
    ok(&mut pgstate(&s, &["put", "order:1", "x"]));
    assert_eq!(ok(&mut pgstate(&s, &["get", "user:1"])), "alice\n");
    // Absent: exit code 1, nothing on stdout, nothing on stderr either.
    let out = run(&mut pgstate(&s, &["get", "user:9"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    assert_eq!(ok(&mut pgstate(&s, &["list", "user:"])), "user:1\nuser:2\n");
    assert_eq!(ok(&mut pgstate(&s, &["list"])), "order:1\nuser:1\nuser:2\n");
    ok(&mut pgstate(&s, &["delete", "user:1"]));
    expect(&mut pgstate(&s, &["get", "user:1"]), 1);
    assert_eq!(ok(&mut pgstate(&s, &["list", "user:"])), "user:2\n");

    // Bad input: exit code 2, a message, nothing written.
    let long = "k".repeat(3000);
    let out = run(&mut pgstate(&s, &["put", &long, "v"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key"),
        "{out:?}"
    );
    let out = run(&mut pgstate(&s, &["put", "k", "v", "--metadata", "[1]"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    expect(&mut pgstate(&s, &["put", "k", "v", "--ttl", "-1"]), 2);
    expect(&mut pgstate(&s, &["get", "k"]), 1);
}

#[test]
fn stats_json_reports_the_table_pool_replication_and_latencies() {
    let s = unique("stats");
    for i in 0..3 {
        ok(&mut pgstate(&s, &["put", &format!("k{i}"), "v"]));
    }
    ok(&mut pgstate(&s, &["put", "gone", "v", "--ttl", "0.001"]));
    let stats: Value = serde_json::from_str(&ok(&mut pgstate(&s, &["stats", "--json"])))
        .expect("stats --json is one JSON object");
    assert_eq!(stats["entries"], 3, "{stats:#}");
    assert_eq!(stats["table"]["active_rows"], 3, "{stats:#}");
    assert_eq!(stats["table"]["expired_rows"], 1, "{stats:#}");
    assert_eq!(stats["table"]["counts_exact"], true);
    assert!(stats["table"]["table_size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(stats["pool"]["max_size"], 8);
    assert!(stats["pool"]["connections_created"].as_u64().unwrap() >= 1);
    assert_eq!(stats["replication"]["is_replica"], false);
    // The server's counters show the four inserts once PostgreSQL has published them (when
    // the writing sessions went idle: within seconds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let again: Value =
            serde_json::from_str(&ok(&mut pgstate(&s, &["stats", "--json"]))).unwrap();
        let inserted = again["activity"]["rows_inserted"].as_u64().unwrap();
        assert!(inserted <= 4, "{again:#}");
        if inserted == 4 {
            assert!(
                again["activity"]["index_scans"].as_u64().unwrap() > 0,
                "{again:#}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{again:#}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let gets = stats["operations"]["latencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["operation"] == "get")
        .cloned()
        .expect("get latencies");
    assert_eq!(gets["count"], 20, "the probe's reads: {gets}");
    let (p50, p99) = (
        gets["p50_us"].as_u64().unwrap(),
        gets["p99_us"].as_u64().unwrap(),
    );
    assert!(p50 > 0 && p50 <= p99, "{gets}");
    assert_eq!(
        stats["table_name"].as_str(),
        Some(format!("\"{s}\".\"state_entries\"").as_str())
    );
    // The table for people names the same figures.
    let human = ok(&mut pgstate(&s, &["stats"]));
    assert!(human.contains("3 live, 1 expired or deleted"), "{human}");
}

/// Entries as (key, value, metadata) from a JSON lines export (TTLs checked apart).
fn entries(text: &str) -> BTreeMap<String, (String, Value)> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            let key = v
                .get("key")
                .or_else(|| v.get("key_hex"))
                .and_then(Value::as_str)
                .expect("key")
                .to_string();
            let value = v
                .get("value")
                .or_else(|| v.get("value_hex"))
                .and_then(Value::as_str)
                .expect("value")
                .to_string();
            (
                key,
                (value, v.get("metadata").cloned().unwrap_or(Value::Null)),
            )
        })
        .collect()
}

/// The keys of a JSON lines export as bytes, in the order of its lines.
fn key_order(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            match v.get("key").and_then(Value::as_str) {
                Some(k) => k.as_bytes().to_vec(),
                None => {
                    let hex = v["key_hex"].as_str().unwrap();
                    (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                        .collect()
                }
            }
        })
        .collect()
}

/// 100 000 entries (plain, with metadata, with a TTL, and keys and values that are not
/// UTF-8) go out and back in through the bulk paths, unchanged.
#[test]
fn import_and_export_round_trip_100000_entries() {
    let dir = scratch("jsonl");
    let input = dir.join("in.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    for i in 0..100_000u32 {
        let line = match i % 1000 {
            0 => format!(r#"{{"key":"e:{i:06}","value":"v{i}","metadata":{{"n":{i}}}}}"#),
            1 => format!(r#"{{"key":"e:{i:06}","value":"v{i}","ttl_ms":3600000}}"#),
            2 => format!(r#"{{"key_hex":"ff{i:06x}","value_hex":"00fe{i:08x}"}}"#),
            _ => format!(r#"{{"key":"e:{i:06}","value":"v{i} \"quoted\" ünïcode"}}"#),
        };
        writeln!(f, "{line}").unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let s = unique("import");
    ok(&mut pgstate(&s, &["import", input.to_str().unwrap()]));
    let stats: Value = serde_json::from_str(&ok(&mut pgstate(&s, &["stats", "--json"]))).unwrap();
    assert_eq!(stats["entries"], 100_000);

    let out = dir.join("out.jsonl");
    ok(&mut pgstate(&s, &["export", out.to_str().unwrap()]));
    let exported = std::fs::read_to_string(&out).unwrap();
    let original = std::fs::read_to_string(&input).unwrap();
    assert_eq!(exported.lines().count(), 100_000);
    assert_eq!(entries(&exported), entries(&original));
    for line in exported.lines().filter(|l| l.contains("ttl_ms")) {
        let v: Value = serde_json::from_str(line).unwrap();
        let ttl = v["ttl_ms"].as_u64().unwrap();
        assert!(ttl > 3_000_000 && ttl <= 3_600_000, "{line}");
    }
    assert_eq!(exported.matches("ttl_ms").count(), 100);

    // In key order (bytes: the hex keys, 0xff..., come last).
    let order = key_order(&exported);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    assert_eq!(order.last().map(|k| k[0]), Some(0xff));

    // Into another schema and out again: the same lines, in the same order.
    let t = unique("reimport");
    ok(&mut pgstate(&t, &["import", out.to_str().unwrap()]));
    let again = ok(&mut pgstate(&t, &["export", "-"]));
    assert_eq!(entries(&again), entries(&exported));
    assert_eq!(key_order(&again), order);

    // A reader that stops early (`| head -1`): exit code 0, no error.
    let mut list = pgstate(&t, &["list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(list.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "e:000000\n");
    let done = list.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");

    // A line that is not UTF-8: exit code 2, naming it.
    let binary = dir.join("binary.jsonl");
    std::fs::write(
        &binary,
        b"{\"key\":\"a\",\"value\":\"1\"}\n{\"key\":\"\xff\"}\n",
    )
    .unwrap();
    let out = run(&mut pgstate(&t, &["import", binary.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("binary.jsonl:2: not UTF-8"),
        "{out:?}"
    );

    // A bad line anywhere: exit code 2 naming the line, nothing written.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"key\":\"a\",\"value\":\"1\"}\n{\"key\":\"b\"}\n").unwrap();
    let u = unique("bad");
    let out = run(&mut pgstate(&u, &["import", bad.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.jsonl:2"),
        "{out:?}"
    );
    // Not even the table: a reading command finds none (exit 1).
    expect(&mut pgstate(&u, &["list"]), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn checkpoint_create_list_and_restore() {
    let s = unique("ckpt");
    ok(&mut pgstate(&s, &["put", "a", "1"]));
    ok(&mut pgstate(&s, &["put", "b", "2"]));
    let id = ok(&mut pgstate(&s, &["checkpoint", "create", "nightly"]));
    let id = id.trim();
    assert!(id.parse::<i64>().is_ok(), "the id on stdout: {id:?}");
    ok(&mut pgstate(&s, &["delete", "a"]));
    ok(&mut pgstate(&s, &["put", "b", "changed"]));
    ok(&mut pgstate(&s, &["put", "c", "3"]));
    let list = ok(&mut pgstate(&s, &["checkpoint", "list"]));
    assert!(list.starts_with(&format!("{id}\tnightly\t2\t")), "{list}");
    ok(&mut pgstate(&s, &["checkpoint", "restore", id]));
    assert_eq!(ok(&mut pgstate(&s, &["get", "a"])), "1\n");
    assert_eq!(ok(&mut pgstate(&s, &["get", "b"])), "2\n");
    expect(&mut pgstate(&s, &["get", "c"]), 1);
    assert_eq!(ok(&mut pgstate(&s, &["list"])), "a\nb\n");
    // An id that does not exist: exit code 1.
    expect(&mut pgstate(&s, &["checkpoint", "restore", "987654"]), 1);
}

#[test]
fn retention_archive_vacuum_locks_and_leader() {
    let s = unique("admin");
    ok(&mut pgstate(&s, &["put", "old", "1"]));
    ok(&mut pgstate(&s, &["put", "brief", "1", "--ttl", "0.001"]));
    // "old" is 4 s old or more when archived, "new" far less than 3 s on any machine.
    std::thread::sleep(std::time::Duration::from_secs(4));
    ok(&mut pgstate(&s, &["put", "new", "2"]));
    let applied = ok(&mut pgstate(&s, &["retention", "apply"]));
    assert!(applied.starts_with("deleted 1 entries"), "{applied}");
    let archived = ok(&mut pgstate(
        &s,
        &["archive", "--name", "attic", "--older-than", "3"],
    ));
    assert!(
        archived.starts_with("moved 1 entries into attic"),
        "{archived}"
    );
    assert_eq!(ok(&mut pgstate(&s, &["list"])), "new\n");
    let vacuumed = ok(&mut pgstate(&s, &["vacuum"]));
    assert!(vacuumed.starts_with("vacuumed"), "{vacuumed}");
    // Nobody leads, no lock is held here: exit codes 1 and 0.
    expect(
        &mut pgstate(&s, &["leader", "status", "nobody-leads-this"]),
        1,
    );
    ok(&mut pgstate(&s, &["locks"]));
    expect(
        &mut pgstate(&s, &["archive", "--name", "bad name", "--older-than", "1"]),
        2,
    );
}

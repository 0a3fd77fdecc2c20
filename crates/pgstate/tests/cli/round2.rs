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
    // It says which table it writes (the one to watch).
    let table = primary["table"].as_str().unwrap();
    assert!(table.ends_with("\"state_entries_bench\""), "{table}");
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

/// A file mixing plain entries with ones carrying metadata or a TTL (and a key given twice)
/// imports in one COPY and one upsert per chunk of 10 000: every row was written by one
/// transaction per chunk, not one per entry with metadata or a TTL; and
/// the export shows every entry as it was given.
#[test]
fn a_mixed_import_writes_each_chunk_at_once_and_keeps_metadata_and_ttls() {
    let schema = unique("mixed");
    let dir = crate::scratch("mixed");
    let file = dir.join("mixed.jsonl");
    let mut text = String::new();
    for i in 0..20_000u32 {
        let line = match i % 9 {
            0..=3 => serde_json::json!({"key": format!("k:{i:05}"), "value": format!("v{i}")}),
            4 | 5 => serde_json::json!({"key": format!("k:{i:05}"), "value": format!("v{i}"),
                                        "metadata": {"n": i, "kind": "meta"}}),
            6 | 7 => serde_json::json!({"key": format!("k:{i:05}"), "value": format!("v{i}"),
                                        "ttl_ms": 3_600_000}),
            _ => serde_json::json!({"key": format!("k:{i:05}"), "value": format!("v{i}"),
                                    "metadata": {"n": i}, "ttl_ms": 7_200_000}),
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    // Keys given twice: the last line wins, also over the chunk written just before (k:15000
    // is in the second chunk of 10 000, its last line in the third).
    text.push_str("{\"key\":\"k:00004\",\"value\":\"last\",\"metadata\":{\"again\":true}}\n");
    text.push_str("{\"key\":\"k:15000\",\"value\":\"last too\"}\n");
    std::fs::write(&file, text).unwrap();
    crate::ok(&mut pgstate(&schema, &["import", file.to_str().unwrap()]));

    let cluster = pgstate_testcluster::shared()
        .cluster()
        .expect("the local test cluster");
    let writers = cluster
        .psql(
            0,
            &format!("SELECT count(DISTINCT xmin::text) FROM \"{schema}\".state_entries"),
        )
        .unwrap();
    let writers: u32 = writers.trim().parse().unwrap();
    // 20 002 lines: three chunks.
    assert!(writers <= 3, "rows written by {writers} transactions");

    let exported = crate::ok(&mut pgstate(&schema, &["export", "-"]));
    let lines: Vec<serde_json::Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20_000);
    let by_key = |k: &str| lines.iter().find(|l| l["key"] == k).unwrap().clone();
    assert_eq!(by_key("k:00000").get("metadata"), None);
    assert_eq!(by_key("k:00004")["value"], "last");
    assert_eq!(by_key("k:15000")["value"], "last too");
    assert_eq!(
        by_key("k:00004")["metadata"],
        serde_json::json!({"again": true})
    );
    assert_eq!(by_key("k:00005")["metadata"]["kind"], "meta");
    let ttl = by_key("k:00006")["ttl_ms"].as_u64().unwrap();
    assert!(ttl > 3_000_000 && ttl <= 3_600_000, "{ttl}");
    let both = by_key("k:00008");
    assert_eq!(both["metadata"]["n"], 8);
    assert!(both["ttl_ms"].as_u64().unwrap() > 3_600_000);
}

/// Commands that only read create nothing: on a table that does not exist they say so and
/// exit 1; `migrate --dry-run` and `migrate info` change nothing; `migrate` lists what it
/// applied.
#[test]
fn reading_commands_create_nothing_and_migrate_says_what_it_does() {
    let schema = unique("readonly");
    let cluster = pgstate_testcluster::shared()
        .cluster()
        .expect("the local test cluster");
    let tables = || {
        cluster
            .psql(
                0,
                &format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'"),
            )
            .unwrap()
            .trim()
            .to_string()
    };
    for args in [
        &["get", "k"][..],
        &["list"],
        &["stats"],
        &["export", "-"],
        &["checkpoint", "list"],
        &["--table", "nosuch", "stats"],
    ] {
        let out = crate::run(&mut pgstate(&schema, args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("does not exist") && stderr.contains("pgstate migrate"),
            "{stderr}"
        );
    }
    assert_eq!(tables(), "0", "a reading command created a table");

    let info = expect(&mut pgstate(&schema, &["migrate", "info"]), 0);
    assert!(
        info.contains("does not exist") && info.contains("pending  001"),
        "{info}"
    );
    let dry = expect(&mut pgstate(&schema, &["migrate", "--dry-run"]), 0);
    assert!(dry.contains("would apply 001"), "{dry}");
    assert_eq!(tables(), "0", "--dry-run created a table");

    let applied = expect(&mut pgstate(&schema, &["migrate"]), 0);
    assert!(
        applied.contains("applied 001") && applied.contains("up to date"),
        "{applied}"
    );
    let again = expect(&mut pgstate(&schema, &["migrate"]), 0);
    assert!(!again.contains("applied 0"), "{again}");
    let info = expect(&mut pgstate(&schema, &["migrate", "info"]), 0);
    assert!(
        info.contains("exists") && !info.contains("pending"),
        "{info}"
    );
    assert!(!info.contains("differs"), "{info}");
    // Now the table exists: reading works, an absent key is 1 with nothing printed.
    expect(&mut pgstate(&schema, &["get", "k"]), 1);
    crate::ok(&mut pgstate(&schema, &["stats"]));
}

/// redis-cli habits: binary keys by `--hex`, `get --raw` writes the bytes exactly, `list`
/// escapes what a terminal would not show (unless `--raw`) and takes `--limit`, `put K -`
/// reads the value from stdin, `inspect` shows an entry's TTL, metadata and version, and
/// `delete` says whether it removed anything.
#[test]
fn binary_keys_raw_values_stdin_inspect_and_delete_counts() {
    use std::io::Write;
    use std::process::Stdio;
    let s = unique("redis");
    // A binary key and a binary value from stdin.
    let mut put = pgstate(&s, &["--hex", "put", "0x00ff6b", "-"]);
    let mut child = put.stdin(Stdio::piped()).spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\x00\x01raw\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let out = crate::run(&mut pgstate(&s, &["--hex", "get", "00ff6b", "--raw"]));
    assert_eq!(
        out.stdout, b"\x00\x01raw\n",
        "exactly the bytes, no newline added"
    );
    crate::ok(&mut pgstate(&s, &["put", "b:1", "x"]));
    crate::ok(&mut pgstate(&s, &["put", "b:2", "y"]));
    let listed = expect(&mut pgstate(&s, &["list"]), 0);
    assert_eq!(listed, "\\x00\\xffk\nb:1\nb:2\n");
    let raw = crate::run(&mut pgstate(&s, &["list", "--raw"]));
    assert!(raw.stdout.starts_with(b"\x00\xffk\n"));
    assert_eq!(
        expect(&mut pgstate(&s, &["list", "b:", "--limit", "1"]), 0),
        "b:1\n"
    );
    assert_eq!(
        expect(&mut pgstate(&s, &["--hex", "list", "00"]), 0),
        "\\x00\\xffk\n"
    );
    // inspect: TTL, metadata, version.
    crate::ok(&mut pgstate(
        &s,
        &[
            "put",
            "b:1",
            "z",
            "--ttl",
            "600",
            "--metadata",
            "{\"src\":\"cli\"}",
        ],
    ));
    let info: serde_json::Value =
        serde_json::from_str(&expect(&mut pgstate(&s, &["inspect", "b:1"]), 0)).unwrap();
    assert_eq!(info["version"], 2);
    assert_eq!(info["metadata"]["src"], "cli");
    assert_eq!(info["value_bytes"], 1);
    let ttl = info["ttl_ms"].as_u64().unwrap();
    assert!(ttl > 500_000 && ttl <= 600_000, "{info}");
    expect(&mut pgstate(&s, &["inspect", "absent"]), 1);
    // delete: 1, then 0.
    assert_eq!(expect(&mut pgstate(&s, &["delete", "b:2"]), 0), "1\n");
    assert_eq!(expect(&mut pgstate(&s, &["delete", "b:2"]), 0), "0\n");
}

/// Small things: a negative --ttl is refused as a value, a URL with another scheme says so,
/// sslmodes are spelled as libpq spells them, help shows no environment values, and one
/// imported entry is "1 entry".
#[test]
fn small_things_read_right() {
    let s = unique("small");
    let out = crate::run(&mut pgstate(&s, &["put", "k", "v", "--ttl", "-5"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ttl"),
        "{out:?}"
    );
    let out = crate::run(bare().args(["--url", "http://localhost/x", "get", "k"]));
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("postgresql://"), "{stderr}");
    let out = crate::run(bare().args([
        "--url",
        "postgresql://u@127.0.0.1:1/db?sslmode=verify-full",
        "get",
        "k",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sslmode verify-full"), "{stderr}");
    let help = expect(
        bare()
            .env("PGSTATE_DEV_DIR", "/tmp/somewhere")
            .arg("--help"),
        0,
    );
    assert!(!help.contains("/tmp/somewhere"), "{help}");
    for command in ["put", "get", "list", "import", "migrate"] {
        let help = expect(bare().args([command, "--help"]), 0);
        assert!(help.contains("Example"), "{command}: {help}");
    }
    let dir = crate::scratch("small");
    let file = dir.join("one.jsonl");
    std::fs::write(&file, "{\"key\":\"a\",\"value\":\"1\"}\n").unwrap();
    let out = crate::run(&mut pgstate(&s, &["import", file.to_str().unwrap()]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("imported 1 entry into"),
        "{out:?}"
    );
    // Progress lines when stderr is not a terminal (every 1 ms here: one per chunk).
    let many = dir.join("many.jsonl");
    let lines: String = (0..25_000)
        .map(|i| format!("{{\"key\":\"p:{i}\",\"value\":\"v\"}}\n"))
        .collect();
    std::fs::write(&many, lines).unwrap();
    let out = crate::run(
        pgstate(&s, &["import", many.to_str().unwrap()]).env("PGSTATE_PROGRESS_MS", "1"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("importing: ") && stderr.contains(" of 25000"),
        "{stderr}"
    );
}

/// The demo against a given server tells one story: without --replica its backend reads from
/// the primary while the server streams to its replicas, and the counts say what they count.
#[test]
fn the_demo_with_a_url_does_not_contradict_itself() {
    let stdout = expect(
        bare().args(["--url", &url(), "--schema", &unique("demo"), "demo"]),
        0,
    );
    assert!(
        stdout.contains("no replica URLs given with --replica"),
        "{stdout}"
    );
    assert!(
        stdout.contains("the server streams to 2 replica(s)"),
        "{stdout}"
    );
    assert!(!stdout.contains("no replicas with --url"), "{stdout}");
    assert!(
        stdout.contains("entries written (puts and batch rows)"),
        "{stdout}"
    );
    assert!(stdout.contains(" calls  p50 "), "{stdout}");
}

/// `import -` reads stdin (read once, checked whole, then loaded): the entries all land.
#[test]
fn import_reads_stdin() {
    use std::io::Write;
    use std::process::Stdio;
    let s = unique("stdin");
    let lines: String = (0..50)
        .map(|i| format!("{{\"key\":\"in:{i:02}\",\"value\":\"v{i}\"}}\n"))
        .collect();
    let mut child = pgstate(&s, &["import", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("imported 50 entries"),
        "{out:?}"
    );
    assert_eq!(expect(&mut pgstate(&s, &["get", "in:49"]), 0), "v49\n");
    // --hex applies to export's prefix too.
    let exported = expect(
        &mut pgstate(&s, &["--hex", "export", "-", "--prefix", "696e3a3439"]),
        0,
    );
    assert_eq!(exported.lines().count(), 1, "{exported}");
}

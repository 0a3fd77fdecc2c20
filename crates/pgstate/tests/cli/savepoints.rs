//! `checkpoint export` and `checkpoint import`: a checkpoint as a file, moved from one state
//! table to another.

use crate::{expect, ok, pgstate, run, scratch, unique};

#[test]
fn a_checkpoint_moves_to_another_table_through_a_file() {
    let dir = scratch("savepoint");
    let file = dir.join("nightly.jsonl");
    let file = file.to_str().unwrap();
    let from = unique("sp_from");
    ok(&mut pgstate(&from, &["put", "a", "1"]));
    ok(&mut pgstate(&from, &["put", "b", "2"]));
    ok(&mut pgstate(&from, &["put", "c", "3", "--ttl", "3600"]));
    let id = ok(&mut pgstate(&from, &["checkpoint", "create", "nightly"]));
    let id = id.trim();
    // Changed after the checkpoint: not in the file.
    ok(&mut pgstate(&from, &["put", "a", "changed"]));
    ok(&mut pgstate(&from, &["put", "d", "4"]));
    ok(&mut pgstate(&from, &["checkpoint", "export", id, file]));
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("\"key\":\"a\"") && lines[0].contains("\"value\":\"1\""));
    assert!(
        lines[2].contains("\"ttl_ms\""),
        "c keeps its expiry: {text}"
    );

    let to = unique("sp_to");
    ok(&mut pgstate(&to, &["put", "z", "replaced"]));
    let new_id = ok(&mut pgstate(
        &to,
        &["checkpoint", "import", file, "--name", "moved"],
    ));
    assert!(new_id.trim().parse::<i64>().is_ok(), "{new_id}");
    assert_eq!(ok(&mut pgstate(&to, &["list"])), "a\nb\nc\n");
    assert_eq!(ok(&mut pgstate(&to, &["get", "a"])), "1\n");
    let list = ok(&mut pgstate(&to, &["checkpoint", "list"]));
    assert!(list.contains("\tmoved\t3\t"), "{list}");

    // An unknown checkpoint: exit 1; a bad file: exit 2 and nothing replaced.
    expect(
        &mut pgstate(&from, &["checkpoint", "export", "987654", file]),
        1,
    );
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"key\":\"x\",\"value\":\"1\"}\n{\"nokey\":1}\n").unwrap();
    let out = run(&mut pgstate(
        &to,
        &["checkpoint", "import", bad.to_str().unwrap()],
    ));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(ok(&mut pgstate(&to, &["list"])), "a\nb\nc\n");
    let _ = std::fs::remove_dir_all(dir);
}

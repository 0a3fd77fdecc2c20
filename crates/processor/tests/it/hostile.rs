//! Property test: random hostile strings (quotes, semicolons, NUL, backslashes, comment
//! markers, Unicode) at every entry point that takes a name or a path (schema, table,
//! savepoint, metadata path, key, lock name, channel name), at least 10 000 cases
//! each. Every one is either refused with `InvalidInput` or handled as data; afterwards the
//! state and the catalog are exactly as before.

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, IsolationLevel, PostgresListener,
    PostgresLockGuard, StateBackend,
};

use crate::support;

const CASES: usize = 10_000;

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "'",
            "\"",
            ";",
            "--",
            "/*",
            "*/",
            "\\",
            "\0",
            " ",
            "$$",
            "$1",
            "(",
            ")",
            ",",
            "=",
            "DROP TABLE state_entries",
            "pg_sleep(10)",
            "é",
            "𝕏",
            "🦀",
            "\u{202e}",
            "\n",
            "a",
            "Z",
            "_",
            "0",
            "9",
            "x",
            "state_entries",
            "public",
            "%",
            "'::jsonb",
            "E'\\x00'",
        ];
        let len = (self.next() % 12) as usize;
        (0..len)
            .map(|_| PIECES[(self.next() % PIECES.len() as u64) as usize])
            .collect()
    }
}

/// Every relation in `schema`, with its column list: what a stray statement would change.
async fn catalog_snapshot(admin: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    admin
        .query(
            "SELECT c.relname || ':' || c.relkind::text || ':' || \
             coalesce((SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
                       WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped), '') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn hostile_strings_at_every_entry_point_run_no_sql() {
    let cfg = support::config("hostile");
    let schema = cfg.schema().to_string();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    b.put(b"sentinel", b"intact").await.unwrap();
    let admin = support::raw(&support::url()).await;
    let catalog_before = catalog_snapshot(&admin, &schema).await;
    assert!(catalog_before.len() >= 5, "{catalog_before:?}");
    let mut g = Gen(0x5EED_1234_ABCD_0001);

    // Schema and table names: refused before any connection, or plain identifiers (quoted).
    let mut accepted = 0;
    for _ in 0..CASES {
        let name = g.string();
        for cfg in [
            EnhancedPostgresConfig::new(support::url()).with_table_name(name.clone()),
            EnhancedPostgresConfig::new(support::url()).with_schema(name.clone()),
        ] {
            let plain = !name.is_empty()
                && name.len() <= 40
                && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if plain {
                // A plain identifier is legitimate; it is quoted, so it cannot be SQL. Creating
                // thousands of schemas proves nothing more, so only count it.
                accepted += 1;
                continue;
            }
            let err = EnhancedPostgresBackend::new(cfg).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}: {err}");
        }
    }
    eprintln!("names: {} refused, {accepted} plain", 2 * CASES - accepted);

    // Savepoint names, all in one transaction that must stay usable throughout.
    let mut tx = b
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    let mut set = 0;
    for _ in 0..CASES {
        let name = g.string();
        match tx.savepoint(&name).await {
            Ok(()) => set += 1,
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?}: {e}"),
        }
        if let Err(e) = tx.rollback_to_savepoint(&name).await {
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?}: {e}");
        }
    }
    assert!(!tx.is_aborted());
    assert_eq!(tx.get(b"sentinel").await.unwrap(), Some(b"intact".to_vec()));
    tx.rollback().await.unwrap();
    eprintln!("savepoints: {set} set, {} refused", CASES - set);

    // Metadata paths and values travel as parameters.
    for i in 0..CASES {
        let path = g.string();
        let value = serde_json::Value::String(g.string());
        match b.query_by_metadata(&path, &value).await {
            Ok(found) => assert!(found.is_empty(), "{path:?} matched {found:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i} {path:?}: {e}"),
        }
    }

    // Keys, values and metadata made of the same material are stored and read back verbatim.
    let mut keys = Vec::with_capacity(CASES);
    for i in 0..CASES {
        let mut k = g.string().into_bytes();
        k.extend_from_slice(format!("#{i}").as_bytes());
        keys.push(k);
    }
    let entries: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), k.as_slice())).collect();
    b.batch_put(&entries).await.unwrap();
    for (i, k) in keys.iter().enumerate().step_by(97) {
        assert_eq!(
            b.get(k).await.unwrap().as_deref(),
            Some(k.as_slice()),
            "key {i}"
        );
        let meta = serde_json::json!({ "text": String::from_utf8_lossy(k).replace('\0', "") });
        b.put_with_metadata(k, k, meta.clone()).await.unwrap();
        let found = b.query_by_metadata("text", &meta["text"]).await.unwrap();
        assert!(
            found.iter().any(|e| &e.key == k),
            "key {i} not found by its metadata"
        );
    }
    assert_eq!(b.count().await.unwrap(), CASES + 1);

    // Lock names: hashed to a key; the name reaches SQL only as a parameter.
    let mut locked = 0;
    for i in 0..CASES {
        let name = g.string();
        match PostgresLockGuard::new(b.clone_handle(), &name, Duration::ZERO).await {
            Ok(Some(guard)) => {
                assert_eq!(guard.name(), name);
                guard.release().await.unwrap();
                locked += 1;
            }
            Ok(None) => panic!("case {i}: lock {name:?} busy"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i} {name:?}: {e}"),
        }
    }
    eprintln!("lock names: {locked} locked, {} refused", CASES - locked);

    // Channel names: LISTEN quotes them, pg_notify takes them as parameters.
    let mut listener = PostgresListener::from_backend(&b, &["hostile_base"])
        .await
        .unwrap();
    let mut heard = 0;
    for i in 0..CASES {
        let name = g.string();
        match listener.listen(&name).await {
            Ok(()) => {
                b.notify(&name, &i.to_string()).await.unwrap();
                let n = listener.recv_notification().await.unwrap();
                assert_eq!(
                    (n.channel.as_str(), n.payload),
                    (name.as_str(), i.to_string())
                );
                listener.unlisten(&name).await.unwrap();
                heard += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i} {name:?}: {e}");
                let e = b.notify(&name, "x").await.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i} {name:?}: {e}");
            }
        }
    }
    eprintln!("channels: {heard} heard, {} refused", CASES - heard);

    // Nothing outside the data changed.
    assert_eq!(b.get(b"sentinel").await.unwrap(), Some(b"intact".to_vec()));
    assert_eq!(
        catalog_snapshot(&admin, &schema).await,
        catalog_before,
        "the catalog changed"
    );
}

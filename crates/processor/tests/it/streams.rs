//! Streams in bounded memory: `scan`, `scan_keys` and `batch_copy_stream`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{stream, StreamExt, TryStreamExt};
use processor::state::{StateBackend, StateError};

use crate::support;

#[tokio::test]
async fn scans_stream_every_live_entry_of_a_prefix_in_key_order() {
    let b = support::backend("scan").await;
    // Values of growing size, so pages change size as they go.
    let keys: Vec<Vec<u8>> = (0..25_000u32)
        .map(|i| format!("p:{i:06}").into_bytes())
        .collect();
    let values: Vec<Vec<u8>> = (0..25_000usize).map(|i| vec![7u8; i / 10]).collect();
    let entries: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    b.batch_copy(&entries).await.unwrap();
    b.put(b"p;", b"after the prefix").await.unwrap();
    b.put(b"p", b"shorter than the prefix").await.unwrap();
    b.put_with_ttl(b"p:zz", b"expired", Duration::from_millis(1))
        .await
        .unwrap();
    b.delete(b"p:000007").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let scanned: Vec<_> = b.scan(b"p:").try_collect().await.unwrap();
    assert_eq!(scanned.len(), 24_999);
    let listed = b.list_keys(b"p:").await.unwrap();
    let keys_scanned: Vec<Vec<u8>> = scanned.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys_scanned, listed, "the same keys, in order, each once");
    for e in scanned.iter().step_by(997) {
        let i: usize = std::str::from_utf8(&e.key[2..]).unwrap().parse().unwrap();
        assert_eq!(e.value, values[i]);
        assert_eq!(e.version, 1);
    }
    let keys_only: Vec<Vec<u8>> = b.scan_keys(b"p:").try_collect().await.unwrap();
    assert_eq!(keys_only, listed);
    assert_eq!(
        b.scan(b"").count().await,
        b.count().await.unwrap(),
        "the empty prefix scans everything"
    );
    assert_eq!(b.scan(b"nothing").count().await, 0);
    // An invalid prefix is the stream's only item.
    let bad: Vec<_> = b.scan(&[0u8; 3000]).collect().await;
    assert!(
        matches!(bad.as_slice(), [Err(StateError::InvalidInput(_))]),
        "{bad:?}"
    );
}

#[tokio::test]
async fn a_scan_sees_keys_written_ahead_of_it_and_never_one_twice() {
    let b = support::backend("scan_live").await;
    let keys: Vec<Vec<u8>> = (0..30_000u32)
        .map(|i| format!("k{i:06}").into_bytes())
        .collect();
    let entries: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), &b"v"[..])).collect();
    b.batch_copy(&entries).await.unwrap();
    let mut scan = std::pin::pin!(b.scan(b"k"));
    let first = scan.next().await.unwrap().unwrap();
    assert_eq!(first.key, b"k000000");
    // Written while the scan runs: one key behind it, one far ahead, and an existing key
    // ahead rewritten.
    b.put(b"k000000a", b"behind").await.unwrap();
    b.put(b"k029999z", b"ahead").await.unwrap();
    b.put(b"k020000", b"rewritten").await.unwrap();
    let rest: Vec<_> = scan.try_collect().await.unwrap();
    let mut seen: Vec<&[u8]> = rest.iter().map(|e| e.key.as_slice()).collect();
    let n = seen.len();
    seen.dedup();
    assert_eq!(seen.len(), n, "no key twice");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in key order");
    assert!(seen.contains(&&b"k029999z"[..]));
    let rewritten = rest.iter().find(|e| e.key == b"k020000").unwrap();
    assert_eq!(rewritten.value, b"rewritten");
}

#[tokio::test]
async fn a_stream_of_entries_loads_in_chunks_last_value_winning() {
    let _bulk = support::bulk().await;
    let b = support::backend("copy_stream").await;
    // 120 000 entries: three chunks; every key of the first 10 000 comes again at the end.
    let source = stream::iter(
        (0..110_000u32)
            .chain(0..10_000)
            .enumerate()
            .map(|(n, i)| (format!("s{i:06}").into_bytes(), format!("{n}").into_bytes())),
    );
    let reported = AtomicU64::new(0);
    let reports = AtomicU64::new(0);
    let written = b
        .batch_copy_stream(source, |n| {
            assert!(n > reported.load(Ordering::Relaxed), "progress only grows");
            reported.store(n, Ordering::Relaxed);
            reports.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .unwrap();
    assert_eq!(written, 120_000);
    assert_eq!(reported.load(Ordering::Relaxed), 120_000);
    assert_eq!(reports.load(Ordering::Relaxed), 3, "one report per chunk");
    assert_eq!(b.count().await.unwrap(), 110_000);
    assert_eq!(b.get(b"s000005").await.unwrap(), Some(b"110005".to_vec()));
    assert_eq!(b.get(b"s050000").await.unwrap(), Some(b"50000".to_vec()));

    // An invalid entry stops the load before its chunk is sent; earlier chunks stay.
    let source = stream::iter((0..60_000u32).map(|i| {
        let key = if i == 55_000 {
            Vec::new()
        } else {
            format!("t{i:06}").into_bytes()
        };
        (key, b"v".to_vec())
    }));
    let e = b.batch_copy_stream(source, |_| {}).await.unwrap_err();
    assert!(matches!(e, StateError::InvalidInput(_)), "{e}");
    assert_eq!(b.list_keys(b"t").await.unwrap().len(), 50_000);
}

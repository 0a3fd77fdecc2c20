//! LISTEN/NOTIFY against the local cluster: plain and durable listeners across a terminated
//! connection, several channels, hostile channel names, payload limits, TLS, transactions and
//! pruning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, PostgresListener, StateBackend,
    StateError, MAX_NOTIFY_PAYLOAD,
};

use crate::coordination::terminate;
use crate::support;

/// `url` with one more query parameter.
pub fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

const EVENTS: usize = 1000;

/// Sends `EVENTS` numbered events (durable or plain) and kills the listener's connection after
/// a third of them; returns what the listener received, and the gaps it reported.
async fn run_through_a_kill(durable: bool) -> (Vec<usize>, Vec<String>, u64) {
    let b = support::backend(if durable { "durable" } else { "plain" }).await;
    let channel = support::unique("events");
    let mut listener = if durable {
        PostgresListener::durable(&b, &[&channel]).await.unwrap()
    } else {
        PostgresListener::from_backend(&b, &[&channel])
            .await
            .unwrap()
    };
    let pid = listener.backend_pid().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (b, channel, sent) = (b.clone_handle(), channel.clone(), sent.clone());
        tokio::spawn(async move {
            for i in 0..EVENTS {
                let payload = i.to_string();
                if durable {
                    b.notify_durable(&channel, &payload).await.unwrap();
                } else {
                    b.notify(&channel, &payload).await.unwrap();
                }
                sent.store(i + 1, Ordering::Relaxed);
            }
            // Plain mode: a notification sent while the listener is down is lost, so keep
            // marking the end until the listener has seen it.
            loop {
                b.notify(&channel, "end").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let killer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            while sent.load(Ordering::Relaxed) < EVENTS / 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            terminate(pid).await;
        })
    };
    let mut got = Vec::new();
    let mut gaps = Vec::new();
    let collect = async {
        loop {
            match listener.recv_notification().await {
                // Plain mode ends at the marker; durable events never include it.
                Ok(n) if n.payload == "end" => break,
                Ok(n) => {
                    got.push(n.payload.parse::<usize>().unwrap());
                    if durable && got.len() == EVENTS {
                        break;
                    }
                }
                Err(StateError::NotificationsMissed(why)) => gaps.push(why),
                Err(e) => panic!("recv: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .expect("all events within 120 s");
    killer.await.unwrap();
    producer.abort();
    (got, gaps, listener.reconnects())
}

#[tokio::test]
async fn durable_listener_delivers_every_event_once_in_order_across_a_kill() {
    let (got, gaps, reconnects) = run_through_a_kill(true).await;
    assert_eq!(reconnects, 1);
    assert!(gaps.is_empty(), "{gaps:?}");
    assert_eq!(got, (0..EVENTS).collect::<Vec<_>>());
}

#[tokio::test]
async fn plain_listener_reports_the_gap_after_a_kill() {
    let (got, gaps, reconnects) = run_through_a_kill(false).await;
    assert_eq!(reconnects, 1);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    // What arrived arrived once and in order.
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated"
    );
    eprintln!(
        "plain mode: {} of {EVENTS} received, gap reported: {}",
        got.len(),
        gaps[0]
    );
}

#[tokio::test]
async fn several_channels_hostile_names_and_limits() {
    let b = support::backend("channels").await;
    b.put(b"sentinel", b"intact").await.unwrap();
    let hostile = [
        "x'; DROP TABLE state_entries; --",
        "\"; DROP TABLE state_entries; --",
        "Mixed Case ü 🦀",
        "$$",
    ];
    let mut listener = PostgresListener::from_backend(&b, &hostile[..1])
        .await
        .unwrap();
    for c in &hostile[1..] {
        listener.listen(c).await.unwrap();
    }
    assert_eq!(listener.channels().len(), hostile.len());
    for (i, c) in hostile.iter().enumerate() {
        b.notify(c, &format!("payload {i}")).await.unwrap();
    }
    for (i, c) in hostile.iter().enumerate() {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv_notification())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n.channel, *c);
        assert_eq!(n.payload, format!("payload {i}"));
        assert_eq!(n.seq, None);
    }
    // Unlistened channels are not delivered.
    listener.unlisten(hostile[0]).await.unwrap();
    b.notify(hostile[0], "not for us").await.unwrap();
    b.notify(hostile[1], "for us").await.unwrap();
    assert_eq!(listener.recv().await.unwrap(), "for us");

    // The largest payload PostgreSQL takes goes through; one byte more is refused up front.
    let big = "p".repeat(MAX_NOTIFY_PAYLOAD);
    b.notify(hostile[1], &big).await.unwrap();
    assert_eq!(listener.recv().await.unwrap(), big);
    let too_big = "p".repeat(MAX_NOTIFY_PAYLOAD + 1);
    let err = b.notify(hostile[1], &too_big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    for bad in ["", "a\0b", &"c".repeat(64)] {
        let err = b.notify(bad, "x").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        let err = listener.listen(bad).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
    }
    let err = b.notify("ok", "nul\0").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(b.get(b"sentinel").await.unwrap(), Some(b"intact".to_vec()));
    assert!(b.get_stats().notifications_sent >= 7);
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn listener_from_a_url_honours_tls_settings() {
    let cluster = support::local_cluster();
    let certs = cluster.certs().expect("TLS cluster");
    let b = support::backend("tlslisten").await;
    let channel = support::unique("tls");
    let app = support::unique("tlsapp");
    let url = with_param(
        &with_param(
            &with_param(&cluster.primary_url(), "sslmode=verify-full"),
            &format!("sslrootcert={}", certs.ca_cert.display()),
        ),
        &format!("application_name={app}"),
    );
    let mut listener = PostgresListener::new(&url, &channel).await.unwrap();
    assert_eq!(
        support::sessions(&app).await,
        vec![(listener.backend_pid().unwrap(), true)]
    );
    b.notify(&channel, "over tls").await.unwrap();
    assert_eq!(listener.recv().await.unwrap(), "over tls");
    // A CA that did not sign the server's certificate: refused, with a TLS error.
    let wrong = with_param(
        &with_param(&cluster.primary_url(), "sslmode=verify-full"),
        &format!("sslrootcert={}", certs.other_ca_cert.display()),
    );
    let err = PostgresListener::new(&wrong, &channel).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    // A backend configured for TLS gives its listeners TLS.
    let app = support::unique("tlsbackend");
    let cfg = EnhancedPostgresConfig::new(with_param(
        &with_param(&cluster.primary_url(), "sslmode=verify-full"),
        &format!("sslrootcert={}", certs.ca_cert.display()),
    ))
    .with_schema(support::unique("tlsb"))
    .with_application_name(app.clone())
    .with_pool_config(support::small_pool());
    let tb = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let listener = PostgresListener::from_backend(&tb, &[&channel])
        .await
        .unwrap();
    let pid = listener.backend_pid().unwrap();
    assert!(support::sessions(&app).await.contains(&(pid, true)));
    // A dead server is a connection error, not a hang or a panic.
    let port = pgstate_testcluster::free_port().unwrap();
    let err = PostgresListener::new(&format!("postgresql://u@127.0.0.1:{port}/db"), "c")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
}

#[tokio::test]
async fn transactions_notify_on_commit_only() {
    let b = support::backend("txnotify").await;
    let channel = support::unique("tx");
    let durable_channel = support::unique("txd");
    let mut plain = PostgresListener::from_backend(&b, &[&channel])
        .await
        .unwrap();
    let mut durable = PostgresListener::durable(&b, &[&durable_channel])
        .await
        .unwrap();

    let mut tx = b.begin().await.unwrap();
    tx.put(b"k", b"rolled back").await.unwrap();
    tx.notify(&channel, "rolled back").await.unwrap();
    assert_eq!(
        tx.notify_durable(&durable_channel, "rolled back")
            .await
            .unwrap(),
        1
    );
    tx.rollback().await.unwrap();

    let mut tx = b.begin().await.unwrap();
    tx.put(b"k", b"committed").await.unwrap();
    tx.notify(&channel, "committed").await.unwrap();
    let seq = tx
        .notify_durable(&durable_channel, "committed")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The rolled-back event never existed: the sequence has no hole.
    assert_eq!(seq, 1);
    assert_eq!(plain.recv().await.unwrap(), "committed");
    let n = durable.recv_notification().await.unwrap();
    assert_eq!((n.payload.as_str(), n.seq), ("committed", Some(1)));
    assert_eq!(durable.position(&durable_channel), Some(1));
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"committed".to_vec()));
}

#[tokio::test]
async fn durable_listeners_resume_and_report_pruned_events() {
    let b = support::backend("prune").await;
    let channel = support::unique("prune");
    for i in 1..=5 {
        assert_eq!(
            b.notify_durable(&channel, &format!("e{i}")).await.unwrap(),
            i
        );
    }
    // Resuming after event 2 delivers 3, 4, 5.
    let mut l = PostgresListener::durable_from(&b, &[(&channel, Some(2))])
        .await
        .unwrap();
    for i in 3..=5 {
        assert_eq!(l.recv().await.unwrap(), format!("e{i}"));
    }
    assert_eq!(l.position(&channel), Some(5));
    // Large payloads are fine in durable mode.
    let big = "d".repeat(100_000);
    b.notify_durable(&channel, &big).await.unwrap();
    assert_eq!(l.recv().await.unwrap(), big);
    // Pruned before a listener read them: reported, then delivery goes on.
    assert_eq!(b.prune_events(Duration::ZERO).await.unwrap(), 6);
    b.notify_durable(&channel, "e7").await.unwrap();
    let mut behind = PostgresListener::durable_from(&b, &[(&channel, Some(0))])
        .await
        .unwrap();
    match behind.recv().await {
        Err(StateError::NotificationsMissed(why)) => assert!(why.contains("1..=6"), "{why}"),
        other => panic!("expected a reported gap, got {other:?}"),
    }
    assert_eq!(behind.recv().await.unwrap(), "e7");
    assert_eq!(l.recv().await.unwrap(), "e7");
    let err = b.notify_durable(&channel, "nul\0").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn a_listener_far_behind_is_told_and_never_stalls() {
    let b = support::backend("backlog").await;
    let channel = support::unique("backlog");
    let mut listener = PostgresListener::from_backend(&b, &[&channel])
        .await
        .unwrap();
    // More notifications than the listener buffers, while it reads none.
    let admin = support::raw(&support::url()).await;
    admin
        .execute(
            "SELECT pg_notify($1, g::text) FROM generate_series(1, 10000) g",
            &[&channel],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The listener's own statements still complete with the backlog queued.
    tokio::time::timeout(Duration::from_secs(10), listener.listen("another"))
        .await
        .expect("LISTEN completes behind a full buffer")
        .unwrap();
    let mut got = Vec::new();
    let mut gaps = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
            Err(_) => break,
            Ok(Ok(p)) => got.push(p.parse::<u32>().unwrap()),
            Ok(Err(StateError::NotificationsMissed(_))) => gaps += 1,
            Ok(Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!(gaps, 1);
    assert!(got.len() < 10_000 && got.len() >= 8000, "{}", got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]));
}

/// A durable listener reads a backlog in pages bounded in bytes (about 8 MiB of payloads per
/// query): a backlog of 24 MiB in 3 MiB events arrives whole, in order, over several pages.
#[tokio::test]
async fn a_durable_backlog_of_large_events_arrives_whole_in_pages_bounded_in_bytes() {
    let b = support::backend("big_events").await;
    let channel = support::unique("big_events");
    let payload = |i: usize| format!("{i:02}{}", "x".repeat(3 * 1024 * 1024));
    for i in 0..8 {
        b.notify_durable(&channel, &payload(i)).await.unwrap();
    }
    let mut l = PostgresListener::durable_from(&b, &[(&channel, Some(0))])
        .await
        .unwrap();
    for i in 0..8 {
        let got = tokio::time::timeout(Duration::from_secs(30), l.recv())
            .await
            .expect("every page of the backlog is read")
            .unwrap();
        assert!(got == payload(i), "event {i} whole and in order");
    }
    assert_eq!(l.position(&channel), Some(8));
}

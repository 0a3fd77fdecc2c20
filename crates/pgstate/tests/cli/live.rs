//! Commands that run on: listen and notify between two processes, metrics scraped over
//! HTTP, the live view in a real terminal (tmux), and locks and leaders held by another
//! process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};

use crate::{ok, pgstate, unique, url, PASSWORD};

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first line `from` gives within 60 s (a thread reads it, so a silent child cannot hang
/// the test).
fn first_line(from: impl Read + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(from).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no line from the child within 60 s")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn backend(schema: &str) -> EnhancedPostgresBackend {
    EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(url()).with_schema(schema))
        .await
        .expect("backend")
}

#[test]
fn listen_and_notify_between_two_processes() {
    let s = unique("events");
    let mut listener = Running(
        pgstate(&s, &["listen", "cli_events", "--count", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgstate listen"),
    );
    // Notifications sent before the LISTEN is registered would be lost: wait for it.
    let line = first_line(listener.0.stderr.take().unwrap());
    assert_eq!(line.trim(), "listening on cli_events");
    ok(&mut pgstate(&s, &["notify", "cli_events", "first payload"]));
    ok(&mut pgstate(&s, &["notify", "cli_events", "second"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = listener.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "listen did not end after two notifications"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let mut out = String::new();
    listener
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "first payload\nsecond\n");
    // A payload over the limit: exit code 2.
    crate::expect(
        &mut pgstate(&s, &["notify", "cli_events", &"x".repeat(9000)]),
        2,
    );
}

/// Fetches `path` from `addr` over HTTP/1.1; returns the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics server");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Prometheus samples: (name, labels, value).
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("name and value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {l}"));
            (name.to_string(), labels.to_string(), value)
        })
        .collect()
}

#[test]
fn metrics_listen_serves_prometheus_text_over_http() {
    let s = unique("metrics");
    for i in 0..5 {
        ok(&mut pgstate(&s, &["put", &format!("k{i}"), "v"]));
    }
    let mut server = Running(
        pgstate(&s, &["metrics", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgstate metrics"),
    );
    let line = first_line(server.0.stdout.take().unwrap());
    let addr = line
        .trim()
        .strip_prefix("serving metrics on http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("the address: {line:?}"))
        .to_string();
    let table = format!("table=\"{s}.state_entries\"");
    // The pool figures arrive with the backend's first publication (each second).
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        // The server publishes a session's counters when it goes idle, within seconds.
        let written = samples(&body).iter().any(|(n, l, v)| {
            n == "pgstate_table_rows_written_total"
                && l.contains(&table)
                && l.contains("inserted")
                && *v >= 5.0
        });
        if body.contains("pgstate_connections_created_total") && written {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no pool figures or server counters: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!body.contains(PASSWORD));
    let all = samples(&body);
    // pgstate's own names, and OpenTelemetry's duration under Prometheus' rules for names.
    assert!(
        all.iter()
            .all(|(n, _, _)| n.starts_with("pgstate_")
                || n.starts_with("db_client_operation_duration")),
        "{body}"
    );
    // Durations are histograms with buckets, so Prometheus can compute percentiles.
    if body.contains("pgstate_operation_duration_seconds") {
        assert!(
            body.contains("# TYPE pgstate_operation_duration_seconds histogram")
                && body.contains("pgstate_operation_duration_seconds_bucket{")
                && body.contains("le=\"+Inf\""),
            "{body}"
        );
    }
    let find = |name: &str, labels: &[&str]| {
        all.iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|x| l.contains(x)))
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{body}"))
    };
    assert_eq!(
        find("pgstate_table_rows", &[&table, "state=\"active\""]),
        5.0
    );
    assert!(find("pgstate_table_size_bytes", &[&table, "part=\"table\""]) > 0.0);
    assert!(
        find(
            "pgstate_connections_created_total",
            &[&table, "node=\"primary\""]
        ) >= 1.0
    );
    assert_eq!(
        find(
            "pgstate_table_rows_written_total",
            &[&table, "change=\"inserted\""]
        ),
        5.0,
        "the server's counter of the five puts by other processes"
    );
    // Another client writes: the table's figures follow at the next scrape.
    ok(&mut pgstate(&s, &["put", "k9", "v"]));
    let (_, body) = http_get(&addr, "/metrics");
    let all = samples(&body);
    let active = all
        .iter()
        .find(|(n, l, _)| n == "pgstate_table_rows" && l.contains(&table) && l.contains("active"))
        .map(|(_, _, v)| *v);
    assert_eq!(active, Some(6.0), "{body}");
    let (status, _) = http_get(&addr, "/nothing");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn locks_and_leader_status_show_another_process_holder() {
    let s = unique("coord");
    let rt = runtime();
    let b = rt.block_on(backend(&s));
    let guard = rt
        .block_on(processor::state::PostgresLockGuard::new(
            b.clone_handle(),
            "cli-nightly-job",
            Duration::from_secs(5),
        ))
        .expect("lock")
        .expect("free");
    let leadership = rt
        .block_on(b.campaign("cli-leader", Duration::from_secs(30)))
        .expect("leader");
    let locks = ok(&mut pgstate(&s, &["locks"]));
    let line = locks
        .lines()
        .find(|l| l.contains("cli-nightly-job"))
        .unwrap_or_else(|| panic!("the held lock: {locks}"));
    assert!(line.starts_with(&format!("{}\t", guard.key())), "{line}");
    assert!(line.contains("exclusive"), "{line}");
    let status = ok(&mut pgstate(&s, &["leader", "status", "cli-leader"]));
    assert!(
        status.starts_with(&format!("cli-leader\tterm {}\t", leadership.term())),
        "{status}"
    );
    rt.block_on(leadership.resign()).unwrap();
    rt.block_on(guard.release()).unwrap();
    crate::expect(&mut pgstate(&s, &["leader", "status", "cli-leader"]), 1);
}

/// Runs tmux on the server of `socket` (one per test, not the user's), with `DATABASE_URL`
/// in its environment (so the password is on no command line).
fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .env("DATABASE_URL", url())
        .output()
        .unwrap_or_else(|e| {
            panic!("running tmux (scripts/setup.sh installs the Debian package tmux): {e}")
        })
}

/// The number after `label` on the captured screen.
fn figure(screen: &str, label: &str) -> Option<f64> {
    let at = screen.find(label)? + label.len();
    screen[at..].split_whitespace().next()?.parse().ok()
}

/// `pgstate watch` in a real terminal: tmux runs it, capture-pane reads the screen while
/// another client writes, and the figures move; `q` ends it.
#[test]
fn watch_shows_moving_figures_in_a_real_terminal() {
    let s = unique("watch");
    let rt = runtime();
    let b = rt.block_on(backend(&s));
    let session = unique("tmux");
    let command = format!(
        "{} --schema {s} watch --leader cli-watch",
        env!("CARGO_BIN_EXE_pgstate")
    );
    let started = tmux(
        &session,
        &[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "120",
            "-y",
            "40",
            &command,
        ],
    );
    assert!(started.status.success(), "{started:?}");
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = tmux(&self.0, &["kill-server"]);
        }
    }
    let _kill = Kill(session.clone());
    let capture = || {
        let screen = tmux(&session, &["capture-pane", "-p", "-t", &session]);
        String::from_utf8_lossy(&screen.stdout).to_string()
    };
    let wait_for = |what: &str, ok: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = capture();
            if ok(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "never saw {what}:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let first = wait_for("the view", &|s| s.contains("probe reads"));
    assert!(first.contains("pgstate watch"), "{first}");
    assert!(!first.contains(PASSWORD));
    let probes = figure(&first, "probe reads").expect("a probe count");
    // Writes from another client while the view runs: the throughput shows them.
    let writer = rt.spawn(async move {
        for i in 0..100_000u32 {
            if b.put(format!("k{}", i % 500).as_bytes(), b"v")
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let moving = wait_for("writes per second above zero", &|s| {
        figure(s, "writes/s").is_some_and(|w| w > 0.0)
    });
    assert!(figure(&moving, "probe reads").unwrap() > probes, "{moving}");
    assert!(moving.contains("leader cli-watch: none"), "{moving}");
    // The rates say what they sample.
    assert!(moving.contains("(5 s average)"), "{moving}");
    writer.abort();
    tmux(&session, &["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux(&session, &["has-session", "-t", &session])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "q did not end the view");
        std::thread::sleep(Duration::from_millis(100));
    }
}

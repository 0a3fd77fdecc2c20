//! A real exactly-once pipeline under crashes and a zombie: word counts over the license
//! texts under `/usr/share/common-licenses`, repeated to 2 000 000 words
//! (`PGSTATE_WORD_COUNT_WORDS` sets another count), read from a source table by offset in
//! batches of 10 000, counts kept in state, and one output per word each time its count
//! reaches a power of two, committed per batch.
//!
//! The worker is this test binary started again as a child process. It is killed with
//! SIGKILL at random moments (at least 20 times) and restarted; then one worker is paused
//! with SIGSTOP, a second claims the operator, and the first, resumed, must be refused. At
//! the end the state must equal counts computed by SQL over the source, and the outbox must
//! hold every expected output exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, Output, SourceOffset, StateError,
};

use crate::support;

const WORKER_ENV: &str = "PGSTATE_WORD_COUNT_WORKER";
const OPERATOR: &str = "word_count";
const SOURCE: &str = "licenses";
const BATCH: i64 = 10_000;
const KILLS: usize = 20;

/// The words of the license texts, repeated until there are `n`.
fn corpus(n: usize) -> Vec<String> {
    let mut text = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir("/usr/share/common-licenses")
        .expect("the license texts under /usr/share/common-licenses (Debian's base-files)")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        if let Ok(t) = std::fs::read_to_string(&f) {
            text.extend(t.split_whitespace().map(str::to_string));
        }
    }
    assert!(!text.is_empty());
    text.iter().cycle().take(n).cloned().collect()
}

async fn state(url: &str, schema: &str) -> EnhancedPostgresBackend {
    let config = EnhancedPostgresConfig::new(url)
        .with_schema(schema)
        .with_pool_config(support::small_pool())
        // Also how long the server lets a paused instance hold a claim row.
        .with_operation_timeout(Duration::from_secs(3));
    EnhancedPostgresBackend::new(config).await.unwrap()
}

/// A worker: claims the operator and counts from the committed offset to the end.
#[tokio::test]
#[ignore = "the worker process of word_count::exactly_once_under_kills_and_a_zombie"]
async fn worker() {
    let task = std::env::var(WORKER_ENV).expect("started by word_count's pipeline test");
    let [url, schema]: [&str; 2] = task.split('\t').collect::<Vec<_>>().try_into().unwrap();
    let state = state(url, schema).await;
    let source = support::raw(url).await;
    let read = format!("SELECT position, word FROM {schema}.source WHERE position > $1 ORDER BY position LIMIT {BATCH}");
    let mut claim = loop {
        match state.claim(OPERATOR).await {
            Ok(c) => break c,
            // Waiting for a paused instance's transaction to be ended by the server.
            Err(e) if e.is_retryable() => println!("RETRY claim: {e}"),
            Err(e) => panic!("claim: {e}"),
        }
    };
    println!("CLAIMED {}", claim.epoch());
    let mut position = claim.offset(SOURCE, 0).unwrap_or(0);
    loop {
        let rows = source.query(read.as_str(), &[&position]).await.unwrap();
        let Some(last) = rows.last() else { break };
        let last: i64 = last.get(0);
        let words: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        let distinct: Vec<&[u8]> = words
            .iter()
            .map(String::as_bytes)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let found = loop {
            match claim.get_many(&distinct).await {
                Ok(v) => break v,
                Err(e @ StateError::EpochFenced { .. }) => return println!("FENCED {e}"),
                // A connection the server ended while this process was paused.
                Err(e) if e.is_retryable() => println!("RETRY get_many: {e}"),
                Err(e) => panic!("get_many: {e}"),
            }
        };
        let mut counts: HashMap<&[u8], i64> = distinct
            .iter()
            .zip(found)
            .map(|(k, v)| {
                (
                    *k,
                    v.map_or(0, |v| i64::from_be_bytes(v.try_into().unwrap())),
                )
            })
            .collect();
        let mut outputs = Vec::new();
        for w in &words {
            let c = counts.get_mut(w.as_bytes()).unwrap();
            *c += 1;
            if (*c as u64).is_power_of_two() {
                outputs.push(Output::new("crossings", w.as_bytes(), c.to_string()));
            }
        }
        for (k, c) in &counts {
            claim.put(k, &c.to_be_bytes()).unwrap();
        }
        let offsets = [SourceOffset::new(SOURCE, 0, last)];
        loop {
            match claim.commit(&offsets, &outputs).await {
                Ok(done) => {
                    println!("COMMIT {} {last}", done.number);
                    break;
                }
                Err(e @ StateError::EpochFenced { .. }) => return println!("FENCED {e}"),
                // Not committed: the buffer is kept, commit again (a replaced claim is then
                // refused).
                Err(e) if e.kind() != ErrorKind::OutcomeUnknown => {
                    println!("RETRY commit: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("commit: {e}"),
            }
        }
        position = last;
    }
    println!("DONE {position}");
}

/// A worker process and its output lines, each with when it was read.
struct Worker {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
}

impl Worker {
    fn start(url: &str, schema: &str) -> Worker {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["word_count::worker", "--exact", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, format!("{url}\t{schema}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                // libtest prints its own "test ... " before the first line.
                let at = ["CLAIMED", "RETRY", "COMMIT", "FENCED", "DONE"]
                    .iter()
                    .filter_map(|m| line.find(m))
                    .min();
                let line = line[at.unwrap_or(0)..].to_string();
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Worker {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to `limit`) for a line starting with one of `prefixes`; when it came.
    fn wait_for(&mut self, prefixes: &[&str], limit: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.seen.push(line.clone());
                    if prefixes.iter().any(|p| line.starts_with(p)) {
                        return Some((at, line));
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    fn signal(&self, sig: &str) {
        support::run(Command::new("kill").args([sig, &self.child.id().to_string()]));
    }
}

async fn load_source(client: &tokio_postgres::Client, schema: &str, words: &[String]) {
    use futures_util::SinkExt;
    client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.source (position bigint PRIMARY KEY, word text NOT NULL)"
        ))
        .await
        .unwrap();
    let sink = client
        .copy_in(&format!("COPY {schema}.source (position, word) FROM STDIN"))
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut buf = String::new();
    for (i, w) in words.iter().enumerate() {
        let escaped = w.replace('\\', "\\\\").replace('\t', "\\t");
        buf.push_str(&format!("{}\t{escaped}\n", i + 1));
        if buf.len() > 1 << 20 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(buf)).await.unwrap();
    sink.as_mut().finish().await.unwrap();
}

/// xorshift64*: random kill moments without a dependency (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "starts worker processes against the local cluster"
)]
async fn exactly_once_under_kills_and_a_zombie() {
    let _bulk = support::bulk().await;
    let n: usize = std::env::var("PGSTATE_WORD_COUNT_WORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let url = support::url();
    let schema = support::unique("word_count");
    let observer = state(&url, &schema).await;
    let client = support::raw(&url).await;
    load_source(&client, &schema, &corpus(n)).await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}, {n} words");
    let mut rng = Rng(seed);

    // Killed at random moments, each restarted at once.
    let mut kill_to_commit = Vec::new();
    let mut worker = Worker::start(&url, &schema);
    for _ in 0..KILLS {
        let alive = Duration::from_millis(50 + rng.below(400));
        let finished = worker.wait_for(&["DONE"], alive);
        assert!(
            finished.is_none(),
            "the pipeline ended before {KILLS} kills (use more words): {:?}",
            worker.seen
        );
        worker.child.kill().unwrap();
        let killed = Instant::now();
        worker.child.wait().unwrap();
        worker = Worker::start(&url, &schema);
        let (at, _) = worker
            .wait_for(&["COMMIT"], Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no commit after a restart: {:?}", worker.seen));
        kill_to_commit.push(at - killed);
    }

    // A zombie: paused after a commit, replaced, resumed; its next commit is refused.
    worker
        .wait_for(&["COMMIT"], Duration::from_secs(60))
        .expect("a commit before the pause");
    worker.signal("-STOP");
    let mut second = Worker::start(&url, &schema);
    let taken = second.wait_for(&["COMMIT"], Duration::from_secs(60));
    worker.signal("-CONT");
    assert!(
        taken.is_some(),
        "the second worker never committed: {:?}",
        second.seen
    );
    let refused = worker.wait_for(&["FENCED", "DONE"], Duration::from_secs(60));
    let status = worker.child.wait().unwrap();
    assert!(
        refused
            .as_ref()
            .is_some_and(|(_, l)| l.starts_with("FENCED")),
        "the resumed zombie was not refused: {refused:?} {:?}",
        worker.seen
    );
    assert!(status.success(), "{:?}", worker.seen);
    let done = second.wait_for(&["DONE"], Duration::from_secs(300));
    assert!(second.child.wait().unwrap().success());
    assert_eq!(done.map(|(_, l)| l), Some(format!("DONE {n}")));

    check(&client, &observer, &schema).await;
    kill_to_commit.sort();
    println!(
        "kill to first commit: median {:?}, max {:?} over {} kills",
        kill_to_commit[kill_to_commit.len() / 2],
        kill_to_commit.last().unwrap(),
        kill_to_commit.len()
    );
}

/// The state equals SQL's counts over the source; the outbox holds each expected output
/// once.
async fn check(client: &tokio_postgres::Client, state: &EnhancedPostgresBackend, schema: &str) {
    let expected: BTreeMap<Vec<u8>, i64> = client
        .query(
            &format!(
                "SELECT convert_to(word, 'UTF8'), count(*) FROM {schema}.source GROUP BY word"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let stored: BTreeMap<Vec<u8>, i64> = client
        .query(
            &format!(
                "SELECT key, value FROM {} WHERE expires_at IS NULL",
                state.table()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let v: Vec<u8> = r.get(1);
            (r.get(0), i64::from_be_bytes(v.try_into().unwrap()))
        })
        .collect();
    assert_eq!(stored.len(), expected.len());
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, c)| stored.get(*k) != Some(c))
        .take(5)
        .collect();
    assert!(wrong.is_empty(), "counts differ, e.g. {wrong:?}");

    let mut want: Vec<(Vec<u8>, String)> = Vec::new();
    for (word, count) in &expected {
        let mut p = 1;
        while p <= *count {
            want.push((word.clone(), p.to_string()));
            p *= 2;
        }
    }
    want.sort();
    let mut got: Vec<(Vec<u8>, String)> = Vec::new();
    let reader = state.outbox_reader("check").await.unwrap();
    let mut after = 0;
    loop {
        let page = reader.read_after(after, 50_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        got.extend(
            page.into_iter()
                .map(|r| (r.key, String::from_utf8(r.payload).unwrap())),
        );
    }
    let positions = got.len();
    got.sort();
    let mut unique = got.clone();
    unique.dedup();
    assert_eq!(unique.len(), positions, "an output was delivered twice");
    assert_eq!(got.len(), want.len(), "outputs missing or extra");
    assert!(got == want, "the outbox differs from the expected outputs");
}

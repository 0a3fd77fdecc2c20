//! Incremental checkpoints on 1 000 000 keys, against `psql` on the same throwaway server:
//!
//! - a first checkpoint of 1 000 000 keys, against psql copying the same rows
//!   (`CREATE TABLE .. AS SELECT`);
//! - with 1% of the keys changed since: a checkpoint, and a restore to the previous one;
//! - puts at 32 tasks for 5 s on 100 000 keys with checkpoints (one in place and every key
//!   written since; one every minute, over 2 minutes; one every 10 s, over 20 s; one every
//!   2.5 s; one every second), each right after a run as long on a table never checkpointed
//!   (twice each);
//! - storage: the state table and its history with checkpoints, and after deleting them all.
//!
//! ```text
//! cargo run --release --example checkpoint_bench
//! ```

#[path = "common/bench.rs"]
mod bench;

use std::time::{Duration, Instant};

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};

const ROWS: u32 = 1_000_000;

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// How checkpoints are taken during a put run.
#[derive(Clone, Copy, Debug)]
enum During {
    /// None exists.
    None,
    /// One exists, taken before the run, and every key was written once since (the cost of
    /// checking whether a write needs a pre-image, with none to save).
    Warm,
    /// One every this many milliseconds (each key's first write after one saves a pre-image).
    Every(u64),
}

/// How long puts run with checkpoints taken as `during` says: 5 s, or twice the interval
/// when checkpoints are further apart.
fn run_for(during: During) -> Duration {
    match during {
        During::Every(ms) if ms > 2500 => Duration::from_millis(2 * ms),
        _ => Duration::from_secs(5),
    }
}

/// Puts at 32 tasks for `run` on 100 000 keys with checkpoints taken as `during` says;
/// calls per second.
async fn puts(b: &EnhancedPostgresBackend, during: During, run: Duration) -> anyhow::Result<f64> {
    let hot: Vec<(Vec<u8>, Vec<u8>)> = (0..100_000)
        .map(|k| (format!("hot:{k}").into_bytes(), vec![b'v'; 100]))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = hot.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    if let During::Warm = during {
        b.create_checkpoint("before the run").await?;
    }
    b.batch_put(&refs).await?;
    let writers = bench::Writers::start(b, 32, |t, i| {
        let k = (t * 7919 + i * 104_729) % 100_000;
        (format!("hot:{k}"), vec![b'w'; 100])
    });
    let start = Instant::now();
    let mut last = Instant::now();
    while start.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let During::Every(ms) = during {
            if last.elapsed() >= Duration::from_millis(ms) {
                b.create_checkpoint("during puts").await?;
                last = Instant::now();
            }
        }
    }
    let (n, _) = writers.stop().await?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    for c in b.list_checkpoints().await? {
        b.delete_checkpoint(c.id).await?;
    }
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (cluster, url) = bench::throwaway()?;
    let config = |schema: &str| {
        EnhancedPostgresConfig::new(url.clone())
            .with_schema(schema)
            .with_expired_cleanup(false)
    };
    let b = EnhancedPostgresBackend::new(config("ours")).await?;
    let t = b.table().to_string();
    eprintln!("loading {ROWS} keys ...");
    bench::fill(&cluster, &t, ROWS, "k:")?;
    let size = |what: &str| -> anyhow::Result<i64> {
        Ok(cluster
            .psql(0, &format!("SELECT pg_total_relation_size('{what}')"))?
            .trim()
            .parse()?)
    };
    let history = format!("{}_checkpoint_history\"", t.trim_end_matches('"'));
    let table_before = size(&t)?;

    let start = Instant::now();
    cluster.psql(0, &format!("CREATE TABLE public.copy AS SELECT * FROM {t}"))?;
    let psql_copy = start.elapsed();
    cluster.psql(0, "DROP TABLE public.copy")?;

    let start = Instant::now();
    let first = b.create_checkpoint("first").await?;
    let first_took = start.elapsed();
    anyhow::ensure!(first.entry_count == u64::from(ROWS), "{first:?}");

    // 1% changed, then a checkpoint.
    let change = |round: u32| {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..ROWS / 100)
            .map(|i| {
                (
                    format!("k:{}", 1 + i * 100 + round).into_bytes(),
                    format!("round {round}").into_bytes(),
                )
            })
            .collect();
        entries
    };
    let one = change(1);
    let refs: Vec<(&[u8], &[u8])> = one.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    b.batch_put(&refs).await?;
    let start = Instant::now();
    let second = b.create_checkpoint("second").await?;
    let second_took = start.elapsed();

    // 1% changed again, then back to the second checkpoint.
    let two = change(2);
    let refs: Vec<(&[u8], &[u8])> = two.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    b.batch_put(&refs).await?;
    let start = Instant::now();
    let restored = b.restore_checkpoint(second.id).await?;
    let restore_took = start.elapsed();
    anyhow::ensure!(restored == u64::from(ROWS));
    let start = Instant::now();
    b.restore_checkpoint(first.id).await?;
    let restore_first_took = start.elapsed();
    anyhow::ensure!(
        b.get(b"k:2").await? == Some(vec![b'v'; 100]),
        "the first checkpoint's value is back"
    );

    let listed = b.list_checkpoints().await?;
    let table_with = size(&t)?;
    let history_with = size(&history)?;
    for c in &listed {
        b.delete_checkpoint(c.id).await?;
    }
    cluster.psql(0, &format!("VACUUM {t}"))?;
    let table_after = size(&t)?;
    let history_after = size(&history)?;

    // Write throughput: a table never checkpointed against the same with checkpoints.
    let plain = EnhancedPostgresBackend::new(config("plain")).await?;
    let tracked = EnhancedPostgresBackend::new(config("tracked")).await?;
    let modes = [
        During::Warm,
        During::Every(60_000),
        During::Every(10_000),
        During::Every(2500),
        During::Every(1000),
    ];
    // (mode, rates with, rates without): each run with checkpoints right after a run of the
    // same length on the table never checkpointed.
    let mut rates: Vec<(String, Vec<f64>, Vec<f64>)> = modes
        .iter()
        .map(|m| (format!("{m:?}"), Vec::new(), Vec::new()))
        .collect();
    for _ in 0..2 {
        for (mode, (_, with, without)) in modes.iter().zip(rates.iter_mut()) {
            let run = run_for(*mode);
            without.push(puts(&plain, During::None, run).await?);
            with.push(puts(&tracked, *mode, run).await?);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;

    println!("| figure | goal | measured |");
    println!("| --- | --- | ---: |");
    println!(
        "| first checkpoint of 1 000 000 keys (the cut, then counting what it holds) | >= 0.5x psql's copy | {} against psql's `CREATE TABLE .. AS SELECT` {}: {:.1}x |",
        secs(first_took),
        secs(psql_copy),
        psql_copy.as_secs_f64() / first_took.as_secs_f64()
    );
    println!(
        "| checkpoint with 1% (10 000 keys) changed since the previous | < 1 s | {} |",
        secs(second_took)
    );
    println!(
        "| restore to the previous checkpoint, 1% changed since | < 5 s (goal < 1 s) | {} |",
        secs(restore_took)
    );
    println!(
        "| restore to the first checkpoint, 2% changed since (and the restore) | | {} |",
        secs(restore_first_took)
    );
    for (mode, with, without) in &rates {
        println!(
            "| puts, 32 tasks, 100 000 keys, checkpoints {mode} / none (calls/s) | within 10% | {:.0} / {:.0} = {:.3} ({:?} / {:?}) |",
            mean(with),
            mean(without),
            mean(with) / mean(without),
            with.iter().map(|r| r.round()).collect::<Vec<_>>(),
            without.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }
    println!(
        "| state table + history with checkpoints / after deleting them all (MiB) | history gone, within 10% | {:.1} + {:.1} / {:.1} + {:.1} (before any: {:.1}) |",
        table_with as f64 / 1048576.0,
        history_with as f64 / 1048576.0,
        table_after as f64 / 1048576.0,
        history_after as f64 / 1048576.0,
        table_before as f64 / 1048576.0
    );
    for c in &listed {
        println!(
            "checkpoint {:?}: {} entries, history {} entries ({} bytes)",
            c.name, c.entry_count, c.history_entries, c.history_bytes
        );
    }
    Ok(())
}

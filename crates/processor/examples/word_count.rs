//! Exactly-once word counts: read words from a source table by offset, keep counts in
//! state, emit an output each time a word's count reaches a power of two, and commit state,
//! offset and outputs together per batch. Kill it at any moment and run it again: it goes
//! on from the last commit, and no count or output is lost or doubled.
//!
//! `cargo run --release --example word_count` (`WORDS` sets the corpus size, default
//! 1 000 000 words of the license texts under /usr/share/common-licenses).

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, Output, SourceOffset};

const BATCH: i64 = 10_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = common::server()?;
    let schema = "example_word_count";
    let state =
        EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(&url).with_schema(schema)).await?;
    let (source, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let words: i64 = std::env::var("WORDS").map_or(Ok(1_000_000), |w| w.parse())?;
    load(&source, schema, words).await?;

    // The processor: claim, recover, then read-count-emit-commit per batch.
    let started = Instant::now();
    let mut claim = state.claim("word_count").await?;
    let mut position = claim.offset("licenses", 0).unwrap_or(0);
    let read = format!(
        "SELECT position, word FROM {schema}.source WHERE position > $1 \
         ORDER BY position LIMIT {BATCH}"
    );
    let first = position;
    loop {
        let rows = source.query(read.as_str(), &[&position]).await?;
        let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) else {
            break;
        };
        let batch: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        // One round trip for the words not cached under the claim yet.
        let distinct: Vec<&[u8]> = batch
            .iter()
            .map(String::as_bytes)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let stored = claim.get_many(&distinct).await?;
        let mut counts: HashMap<&[u8], i64> = HashMap::new();
        for (word, value) in distinct.iter().zip(stored) {
            let count = value.map_or(Ok(0), |v| v.try_into().map(i64::from_be_bytes));
            counts.insert(word, count.map_err(|_| anyhow::anyhow!("not a count"))?);
        }
        let mut outputs = Vec::new();
        for word in &batch {
            let count = counts.entry(word.as_bytes()).or_default();
            *count += 1;
            if (*count as u64).is_power_of_two() {
                outputs.push(Output::new("crossings", word.as_bytes(), count.to_string()));
            }
        }
        for (word, count) in &counts {
            claim.put(word, &count.to_be_bytes())?;
        }
        // State, offset and outputs: all or nothing; refused if another instance claimed
        // the operator since (StateError::EpochFenced).
        claim
            .commit(&[SourceOffset::new("licenses", 0, last)], &outputs)
            .await?;
        position = last;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "counted {} words in {secs:.2} s: {:.0} words/s",
        position - first,
        (position - first) as f64 / secs
    );

    // A sink: read the outputs in commit order and acknowledge them.
    let mut sink = state.outbox_reader("printer").await?;
    let mut delivered = 0;
    loop {
        let page = sink.read(10_000).await?;
        let Some(last) = page.last() else { break };
        let last = last.position;
        delivered += page.len();
        sink.acknowledge(last).await?;
    }
    println!(
        "{delivered} outputs delivered; {} pruned",
        state.prune_outbox().await?
    );
    Ok(())
}

/// The source: `words` words of the license texts, numbered from 1 (loaded once).
async fn load(client: &tokio_postgres::Client, schema: &str, words: i64) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {schema}.source \
                 (position bigint PRIMARY KEY, word text NOT NULL)"
        ))
        .await?;
    let have: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.source"), &[])
        .await?
        .get(0);
    if have >= words {
        return Ok(());
    }
    let mut text = Vec::new();
    for entry in std::fs::read_dir("/usr/share/common-licenses")? {
        if let Ok(t) = std::fs::read_to_string(entry?.path()) {
            text.extend(t.split_whitespace().map(str::to_string));
        }
    }
    anyhow::ensure!(!text.is_empty(), "no text under /usr/share/common-licenses");
    let all: Vec<String> = text.into_iter().cycle().take(words as usize).collect();
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.source SELECT g, w FROM unnest($1::text[]) \
                 WITH ORDINALITY AS u(w, g) ON CONFLICT DO NOTHING"
            ),
            &[&all],
        )
        .await?;
    Ok(())
}

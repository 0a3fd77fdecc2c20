//! `put`, `get`, `delete`, `list`, `import` and `export`.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use processor::state::{check_entry, check_metadata, check_ttl};
use processor::state::{BatchEntry, EnhancedPostgresBackend, StateBackend};
use tokio::task::JoinHandle;

use crate::exit::CliError;
use crate::jsonl::{self, Line};
use crate::keys;
use crate::progress;
use crate::target::Target;

/// Entries written per bulk statement by `import`.
const IMPORT_CHUNK: usize = 10_000;

/// `pgstate put KEY VALUE [--ttl S] [--metadata JSON]`; VALUE `-` reads stdin.
pub async fn put(
    target: &Target,
    key: &[u8],
    value: &str,
    ttl: Option<f64>,
    metadata: Option<&str>,
) -> Result<(), CliError> {
    let metadata = match metadata {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| CliError::usage(format!("--metadata is not JSON: {e}")))?,
        None => serde_json::json!({}),
    };
    let ttl = ttl
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| CliError::usage("--ttl is a positive number of seconds"))
        })
        .transpose()?;
    let value = if value == "-" {
        let mut bytes = Vec::new();
        std::io::stdin().lock().read_to_end(&mut bytes)?;
        bytes
    } else {
        value.as_bytes().to_vec()
    };
    // Checked before connecting: bad input never reaches the server.
    check_entry(key, &value)?;
    check_metadata(&metadata)?;
    if let Some(ttl) = ttl {
        check_ttl(ttl)?;
    }
    let backend = target.backend().await?;
    let version = backend.put_entry(key, &value, metadata, ttl).await?;
    eprintln!("version {version}");
    Ok(())
}

/// `pgstate get KEY [--raw]`: the value (and a newline, unless `raw`) on stdout; exit code 1
/// and nothing on stdout when absent.
pub async fn get(target: &Target, key: &[u8], raw: bool) -> Result<(), CliError> {
    let backend = target.existing().await?;
    match backend.get(key).await? {
        Some(value) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            if !raw {
                out.write_all(b"\n")?;
            }
            out.flush()?;
            Ok(())
        }
        None => Err(CliError::silent_not_found()),
    }
}

/// `pgstate inspect KEY`: the entry, less its value, as one JSON object.
pub async fn inspect(target: &Target, key: &[u8]) -> Result<(), CliError> {
    let backend = target.existing().await?;
    let Some(e) = backend.get_entry(key).await? else {
        return Err(CliError::silent_not_found());
    };
    let now = SystemTime::now();
    let ms = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let report = serde_json::json!({
        "key": keys::escape(&e.key),
        "value_bytes": e.value.len(),
        "version": e.version,
        "metadata": e.metadata,
        "created_at_ms": ms(e.created_at),
        "updated_at_ms": ms(e.updated_at),
        "expires_at_ms": e.expires_at.map(ms),
        "ttl_ms": e.expires_at.map(|t| t.duration_since(now).map_or(0, |d| d.as_millis() as u64)),
    });
    println!("{report}");
    Ok(())
}

/// `pgstate delete KEY`: prints 1 when KEY had a live entry, 0 when it had none.
pub async fn delete(target: &Target, key: &[u8]) -> Result<(), CliError> {
    let backend = target.backend().await?;
    let existed = backend.contains(key).await?;
    backend.delete(key).await?;
    println!("{}", u8::from(existed));
    Ok(())
}

/// `pgstate list [PREFIX] [--raw] [--limit N]`: keys in order, one per line, escaped for a
/// terminal unless `raw`, in bounded memory.
pub async fn list(
    target: &Target,
    prefix: &[u8],
    raw: bool,
    limit: Option<u64>,
) -> Result<(), CliError> {
    let backend = target.existing().await?;
    let keys = backend.scan_keys(prefix);
    let mut keys = std::pin::pin!(keys);
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut shown = 0u64;
    while limit.is_none_or(|l| shown < l) {
        let Some(key) = keys.next().await else { break };
        let key = key?;
        if raw {
            out.write_all(&key)?;
        } else {
            out.write_all(keys::escape(&key).as_bytes())?;
        }
        out.write_all(b"\n")?;
        shown += 1;
    }
    out.flush()?;
    Ok(())
}

/// The lines of `path` with their numbers (from 1), skipping blank ones; a line that is not
/// UTF-8 is bad input naming its number.
pub(crate) fn lines(
    path: &Path,
) -> Result<impl Iterator<Item = Result<(usize, String), CliError>>, CliError> {
    let file = File::open(path)
        .map_err(|e| CliError::usage(format!("cannot open {}: {e}", path.display())))?;
    let shown = path.display().to_string();
    Ok(BufReader::new(file)
        .split(b'\n')
        .enumerate()
        .filter_map(move |(i, line)| {
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(CliError::from(e))),
            };
            match String::from_utf8(line) {
                Ok(text) if text.trim().is_empty() => None,
                Ok(text) => Some(Ok((i + 1, text))),
                Err(_) => Some(Err(CliError::usage(format!(
                    "{shown}:{}: not UTF-8 (JSON lines are UTF-8; bytes go in key_hex/value_hex)",
                    i + 1
                )))),
            }
        }))
}

/// Reads every line of `path` and checks it, writing nothing; returns the number of entries.
pub(crate) fn check_file(path: &Path) -> Result<u64, CliError> {
    let mut entries = 0;
    for line in lines(path)? {
        let (n, line) = line?;
        let bad = |why: String| CliError::usage(format!("{}:{n}: {why}", path.display()));
        let entry = jsonl::decode(&line).map_err(bad)?;
        check_entry(&entry.key, &entry.value).map_err(|e| bad(e.to_string()))?;
        check_metadata(&entry.metadata).map_err(|e| bad(e.to_string()))?;
        if let Some(ttl) = entry.ttl {
            check_ttl(ttl).map_err(|e| bad(e.to_string()))?;
        }
        entries += 1;
    }
    Ok(entries)
}

/// Writes one chunk: every entry, plain or with metadata or a TTL, in one binary COPY and one
/// upsert (a key that comes twice in it ends with its last line).
async fn write_chunk(backend: EnhancedPostgresBackend, chunk: Vec<Line>) -> Result<u64, CliError> {
    let entries: Vec<BatchEntry<'_>> = chunk.iter().map(Line::entry).collect();
    backend.batch_copy_entries(&entries).await?;
    Ok(chunk.len() as u64)
}

/// A chunk's write in the background: the entries written.
type Job = JoinHandle<Result<u64, CliError>>;

/// Chunks written in the background, at most two at a time: a chunk starts while the one
/// before it is still being written, unless they share a key (then after it, so that a key
/// ends with its last line); the one before that has always finished.
#[derive(Default)]
struct Pipeline {
    in_flight: Option<(Job, HashSet<Vec<u8>>)>,
    /// Entries of the chunks finished.
    written: u64,
}

impl Pipeline {
    /// Starts `chunk` with `start`, as soon as the order allows.
    async fn push<F>(&mut self, chunk: Vec<Line>, start: F) -> Result<(), CliError>
    where
        F: FnOnce(Vec<Line>) -> Job,
    {
        let keys: HashSet<Vec<u8>> = chunk.iter().map(|l| l.key.clone()).collect();
        let mut earlier = self.in_flight.take();
        if let Some((job, _)) = earlier.take_if(|(_, k)| !k.is_disjoint(&keys)) {
            self.written += finished(job).await?;
        }
        let job = start(chunk);
        if let Some((job, _)) = earlier {
            self.written += finished(job).await?;
        }
        self.in_flight = Some((job, keys));
        Ok(())
    }

    /// Waits for the last chunk; the entries written.
    async fn finish(mut self) -> Result<u64, CliError> {
        if let Some((job, _)) = self.in_flight.take() {
            self.written += finished(job).await?;
        }
        Ok(self.written)
    }
}

async fn finished(job: Job) -> Result<u64, CliError> {
    job.await
        .map_err(|e| CliError::failed(format!("an import task failed: {e}")))?
}

/// `pgstate import FILE`: checks the whole file first (a bad line: exit code 2, nothing
/// written), then loads it in chunks of 10 000 entries, each by one binary COPY of whole
/// entries (metadata and TTL included) and one upsert. While one chunk is written the next is
/// read, and written at the same time unless it shares a key with it (then after it, so a key
/// ends with its last line). Not one transaction: a failure part way leaves some chunks
/// written; importing again is safe (a key ends with its last value).
pub async fn import(target: &Target, path: &Path) -> Result<(), CliError> {
    // The file is read twice (checked whole, then loaded): a pipe or stdin (`-`) is copied
    // to a private temporary file first.
    let spooled = spool(path)?;
    let path = spooled.as_ref().map_or(path, |s| s.0.as_path());
    let total = check_file(path)?;
    let backend = target.backend().await?;
    let bar = progress::bar(total, "importing");
    let mut chunk: Vec<Line> = Vec::with_capacity(IMPORT_CHUNK);
    let mut pipeline = Pipeline::default();
    let mut lines = lines(path)?.peekable();
    while let Some(line) = lines.next() {
        let (_, line) = line?;
        chunk.push(jsonl::decode(&line).map_err(CliError::usage)?);
        if chunk.len() < IMPORT_CHUNK && lines.peek().is_some() {
            continue;
        }
        let start = |c| tokio::spawn(write_chunk(backend.clone_handle(), c));
        pipeline.push(std::mem::take(&mut chunk), start).await?;
        bar.set_position(pipeline.written);
    }
    let written = pipeline.finish().await?;
    bar.finish_and_clear();
    let entries = if written == 1 { "entry" } else { "entries" };
    eprintln!("imported {written} {entries} into {}", backend.table());
    Ok(())
}

/// A temporary copy of a file that cannot be read twice, removed when dropped.
pub(crate) struct Spooled(pub(crate) std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A private copy of `path` when it is stdin (`-`) or not a regular file (a pipe).
pub(crate) fn spool(path: &Path) -> Result<Option<Spooled>, CliError> {
    let stdin = path == Path::new("-");
    if !stdin && std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(None);
    }
    let copy = Spooled(std::env::temp_dir().join(format!(
        "pgstate-import-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&copy.0)?;
    if stdin {
        std::io::copy(&mut std::io::stdin().lock(), &mut out)?;
    } else {
        let mut input = File::open(path)
            .map_err(|e| CliError::usage(format!("cannot open {}: {e}", path.display())))?;
        std::io::copy(&mut input, &mut out)?;
    }
    Ok(Some(copy))
}

/// Where an export writes: `path`, created, or standard output for `-`; buffered.
pub(crate) fn output(path: &Path) -> Result<Box<dyn Write>, CliError> {
    if path == Path::new("-") {
        return Ok(Box::new(BufWriter::new(std::io::stdout().lock())));
    }
    let file = File::create(path)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", path.display())))?;
    Ok(Box::new(BufWriter::new(file)))
}

/// `pgstate export FILE [--prefix P]`: the live entries in key order, scanned page by page.
pub async fn export(target: &Target, path: &Path, prefix: &[u8]) -> Result<(), CliError> {
    let backend = target.existing().await?;
    let bar = if prefix.is_empty() {
        progress::bar(backend.count().await? as u64, "exporting")
    } else {
        progress::counter("exporting")
    };
    let mut out = output(path)?;
    let entries = backend.scan(prefix);
    let mut entries = std::pin::pin!(entries);
    let mut written = 0u64;
    while let Some(entry) = entries.next().await {
        let line = jsonl::encode(&entry?, SystemTime::now());
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        written += 1;
        if written % 1000 == 0 {
            bar.set_position(written);
        }
    }
    out.flush()?;
    bar.finish_and_clear();
    eprintln!("exported {written} entries from {}", backend.table());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn chunk(keys: &[&str]) -> Vec<Line> {
        keys.iter()
            .map(|k| Line {
                key: k.as_bytes().to_vec(),
                value: Vec::new(),
                metadata: serde_json::json!({}),
                ttl: None,
            })
            .collect()
    }

    /// A chunk sharing a key with the one being written starts only after it finished; one
    /// that shares none starts at once, beside it.
    #[tokio::test]
    async fn a_chunk_sharing_a_key_waits_for_the_one_before() {
        let done = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(Mutex::new(Vec::new()));
        let start = |name: &'static str, pause_ms: u64| {
            let (done, started) = (done.clone(), started.clone());
            move |c: Vec<Line>| {
                started.lock().unwrap().push(name);
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
                    done.lock().unwrap().push(name);
                    Ok(c.len() as u64)
                })
            }
        };
        let mut p = Pipeline::default();
        p.push(chunk(&["a", "b"]), start("first", 300))
            .await
            .unwrap();
        // Shares "b": waits for "first" (which takes longer).
        p.push(chunk(&["b", "c"]), start("second", 0))
            .await
            .unwrap();
        assert_eq!(*done.lock().unwrap(), ["first"]);
        // Shares nothing with "second": starts before "second" finished.
        p.push(chunk(&["d"]), start("third", 0)).await.unwrap();
        assert_eq!(*started.lock().unwrap(), ["first", "second", "third"]);
        assert_eq!(p.finish().await.unwrap(), 5);
        let done = done.lock().unwrap();
        assert_eq!((done.len(), done[0]), (3, "first"));
    }
}

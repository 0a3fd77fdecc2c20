//! `pgstate checkpoint export ID FILE` and `checkpoint import FILE`: a checkpoint as a file of
//! JSON lines (the format of `export` and `import`, see `jsonl`), so a savepoint can move
//! between databases. A TTL in the file is the time the entry had left at the checkpoint's
//! instant; an import counts it from the import.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use processor::state::BatchEntry;

use crate::data::{check_file, lines, output, spool};
use crate::exit::{CliError, NOT_FOUND};
use crate::jsonl::{self, Line};
use crate::progress;
use crate::target::Target;

/// Entries read per page while exporting.
const PAGE: usize = 10_000;

/// Writes checkpoint `id`'s entries to `path` (`-`: standard output), in key order.
pub async fn export(target: &Target, id: i64, path: &Path) -> Result<(), CliError> {
    let backend = target.existing().await?;
    let Some(info) = backend
        .list_checkpoints()
        .await?
        .into_iter()
        .find(|c| c.id == id)
    else {
        return Err(CliError::new(NOT_FOUND, format!("no checkpoint {id}")));
    };
    let mut out = output(path)?;
    let bar = progress::bar(info.entry_count, "exporting the checkpoint");
    let at = SystemTime::from(info.created_at);
    let mut after: Option<Vec<u8>> = None;
    let mut written = 0u64;
    loop {
        let page = backend
            .checkpoint_entries(id, after.as_deref(), PAGE)
            .await?;
        for entry in &page {
            out.write_all(jsonl::encode(entry, at).as_bytes())?;
            out.write_all(b"\n")?;
        }
        written += page.len() as u64;
        bar.set_position(written);
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.key.clone()),
            _ => break,
        }
    }
    out.flush()?;
    bar.finish_and_clear();
    eprintln!(
        "exported {written} entries of checkpoint {id} ({})",
        info.name
    );
    Ok(())
}

/// Replaces the live state with the entries of `path` (`-`: standard input), all or nothing,
/// then takes a checkpoint of it named `name`; prints its id.
pub async fn import(target: &Target, path: &Path, name: &str) -> Result<(), CliError> {
    let spooled = spool(path)?;
    let path = spooled.as_ref().map_or(path, |s| s.0.as_path());
    let total = check_file(path)?;
    let backend = target.backend().await?;
    let bar = progress::bar(total, "reading the file");
    let mut read: Vec<Line> = Vec::with_capacity(total as usize);
    for line in lines(path)? {
        let (_, line) = line?;
        read.push(jsonl::decode(&line).map_err(CliError::usage)?);
        if read.len() % 10_000 == 0 {
            bar.set_position(read.len() as u64);
        }
    }
    bar.finish_and_clear();
    let entries: Vec<BatchEntry<'_>> = read.iter().map(Line::entry).collect();
    let spinner = progress::counter("replacing the state");
    let written = backend.replace_state(&entries).await?;
    spinner.finish_and_clear();
    let info = backend.create_checkpoint(name).await?;
    println!("{}", info.id);
    eprintln!(
        "replaced the state of {} with {written} entries; checkpoint {} ({name})",
        backend.table(),
        info.id
    );
    Ok(())
}

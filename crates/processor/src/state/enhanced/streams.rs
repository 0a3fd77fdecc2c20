//! Streams in bounded memory: scans of a prefix (entries or keys) page by page, and a bulk
//! load from a stream of entries chunk by chunk.

use std::collections::VecDeque;

use futures_util::{stream, Stream, StreamExt};

use crate::state::error::StateResult;
use crate::state::limits::check_entry;
use crate::state::ops::conn_ops::StateEntry;

use super::EnhancedPostgresBackend;

/// Entries a scan asks for in its first page (small: their size is not known yet).
const SCAN_PAGE: usize = 100;
/// Entries a scan page may grow to.
const SCAN_PAGE_MAX: usize = 10_000;
/// Bytes (keys, values, metadata) a scan page aims at: the next page's size follows the last
/// page's bytes per entry.
const SCAN_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Keys per page of [`EnhancedPostgresBackend::scan_keys`].
const KEY_PAGE: usize = 10_000;
/// Entries per transaction of [`EnhancedPostgresBackend::batch_copy_stream`], at most.
const COPY_CHUNK_ROWS: usize = 50_000;
/// Key and value bytes per transaction of [`EnhancedPostgresBackend::batch_copy_stream`], at
/// most (a chunk ends at the entry that reaches it).
const COPY_CHUNK_BYTES: usize = 32 * 1024 * 1024;

/// Where a page-by-page scan stands.
struct Pages<T> {
    after: Option<Vec<u8>>,
    buffered: VecDeque<T>,
    page: usize,
    done: bool,
}

impl<T> Pages<T> {
    fn new(page: usize) -> Self {
        Pages {
            after: None,
            buffered: VecDeque::new(),
            page,
            done: false,
        }
    }
}

impl EnhancedPostgresBackend {
    /// The live entries whose keys start with `prefix`, in key order, as a stream that holds
    /// one page at a time: a table of any size is scanned in bounded memory. The first page
    /// holds 100 entries; each next one as many as make about 4 MiB of keys and values at the
    /// last page's size per entry (at least 1, at most 10 000). Metadata is not counted.
    ///
    /// Each page is one statement, routed like [`list_keys`](crate::state::StateBackend::list_keys)
    /// (a replica may serve it). The scan is not one snapshot: an entry written while it runs
    /// appears if its key is still ahead of the scan, and never twice. An error (also an
    /// invalid `prefix`) is the stream's last item.
    pub fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Stream<Item = StateResult<StateEntry>> + Send + 'a {
        stream::unfold(Pages::new(SCAN_PAGE), move |mut at| async move {
            loop {
                if let Some(entry) = at.buffered.pop_front() {
                    return Some((Ok(entry), at));
                }
                if at.done {
                    return None;
                }
                let page = self
                    .store()
                    .entries_page(prefix, at.after.as_deref(), at.page, self.scope())
                    .await;
                match page {
                    Ok(entries) => {
                        at.done = entries.len() < at.page;
                        let bytes: usize = entries
                            .iter()
                            .map(|e| e.key.len() + e.value.len() + 64)
                            .sum();
                        let per_entry = (bytes / entries.len().max(1)).max(1);
                        at.page = (SCAN_PAGE_BYTES / per_entry).clamp(1, SCAN_PAGE_MAX);
                        at.after = entries.last().map(|e| e.key.clone());
                        at.buffered.extend(entries);
                    }
                    Err(e) => {
                        at.done = true;
                        return Some((Err(e), at));
                    }
                }
            }
        })
    }

    /// The keys of the live entries that start with `prefix`, in key order, as a stream that
    /// holds one page (10 000 keys) at a time. Like [`scan`](Self::scan), not one snapshot.
    pub fn scan_keys<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Stream<Item = StateResult<Vec<u8>>> + Send + 'a {
        stream::unfold(Pages::new(KEY_PAGE), move |mut at| async move {
            loop {
                if let Some(key) = at.buffered.pop_front() {
                    return Some((Ok(key), at));
                }
                if at.done {
                    return None;
                }
                let page = self
                    .list_keys_page(prefix, at.after.as_deref(), at.page)
                    .await;
                match page {
                    Ok(keys) => {
                        at.done = keys.len() < at.page;
                        at.after = keys.last().cloned();
                        at.buffered.extend(keys);
                    }
                    Err(e) => {
                        at.done = true;
                        return Some((Err(e), at));
                    }
                }
            }
        })
    }

    /// Loads `entries` (key, value) from a stream of any length in bounded memory: chunks of
    /// up to 50 000 entries (or 32 MiB) each written by [`batch_copy`](Self::batch_copy) in
    /// a transaction of its own, one after the other, so a key that comes again later in the
    /// stream ends with its last value. Calls `progress` with the entries written so far
    /// after each chunk; returns their number.
    ///
    /// Not all-or-nothing: the chunks committed before an error (an invalid entry, a lost
    /// connection) stay, and `progress` has reported them. An invalid entry is found before
    /// its chunk is sent.
    pub async fn batch_copy_stream<S>(
        &self,
        entries: S,
        progress: impl Fn(u64) + Sync,
    ) -> StateResult<u64>
    where
        S: Stream<Item = (Vec<u8>, Vec<u8>)> + Send,
    {
        let mut entries = std::pin::pin!(entries);
        let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut bytes = 0usize;
        let mut written = 0u64;
        loop {
            let next = entries.next().await;
            if let Some((k, v)) = next.as_ref() {
                check_entry(k, v)?;
            }
            let end = next.is_none();
            if let Some((k, v)) = next {
                bytes += k.len() + v.len();
                chunk.push((k, v));
            }
            let full = chunk.len() >= COPY_CHUNK_ROWS || bytes >= COPY_CHUNK_BYTES;
            if (full || end) && !chunk.is_empty() {
                let refs: Vec<(&[u8], &[u8])> = chunk
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                written += self.batch_copy(&refs).await?;
                progress(written);
                chunk.clear();
                bytes = 0;
            }
            if end {
                return Ok(written);
            }
        }
    }
}

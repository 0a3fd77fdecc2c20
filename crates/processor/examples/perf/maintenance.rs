//! The data-management figures (performance issue, round 3), each against `psql` on the same
//! server: `clear()` of 1 000 000 entries against `TRUNCATE`, retention (`cleanup_expired`)
//! of 1 000 000 expired rows against one `DELETE`, and `batch_copy` of 100 000 new rows right
//! after a `clear()` against psql's binary `\copy` into an empty table. Each side has a table
//! of its own, filled the same way by psql; nothing else runs meanwhile.

use std::time::Instant;

use pgstate_testcluster::Cluster;
use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};

use crate::{reference, VALUE_LEN};

/// Rows of the clear and retention figures.
pub const ROWS: u32 = 1_000_000;
/// Rows loaded after a clear.
const AFTER_CLEAR_ROWS: u32 = 100_000;

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Maintenance {
    /// `clear()` of [`ROWS`] live entries, seconds.
    pub clear_s: f64,
    /// psql's `TRUNCATE` of the same, seconds.
    pub truncate_s: f64,
    /// `cleanup_expired()` of [`ROWS`] expired rows, rows/s.
    pub retention: f64,
    /// psql's `DELETE ... WHERE expires_at <= now()` of the same, rows/s.
    pub retention_psql: f64,
    /// `batch_copy` of 100 000 new rows right after `clear()`, rows/s (best of 3).
    pub after_clear: f64,
    /// psql's binary `\copy` of the same rows into a truncated table, rows/s (best of 3).
    pub copy_psql: f64,
}

/// `ROWS` rows into `table`, expired (`expired`) or live, then `VACUUM ANALYZE`.
fn fill(cluster: &Cluster, table: &str, expired: bool) -> anyhow::Result<()> {
    let expiry = if expired {
        "now() - interval '1 second'"
    } else {
        "NULL"
    };
    cluster.psql(
        0,
        &format!(
            "INSERT INTO {table} (key, value, expires_at) \
             SELECT convert_to('m:' || i, 'UTF8'), convert_to(repeat('v', {VALUE_LEN}), 'UTF8'), \
                    {expiry} FROM generate_series(1, {ROWS}) i"
        ),
    )?;
    cluster.psql(0, &format!("VACUUM ANALYZE {table}"))?;
    // No autovacuum in the middle of a measurement (either side's deletes would start it on
    // the 2 cores the measured side runs on).
    cluster.psql(
        0,
        &format!("ALTER TABLE {table} SET (autovacuum_enabled = false)"),
    )?;
    Ok(())
}

/// Runs the three figures on tables of their own (schemas `clear_ours`, `clear_psql`).
pub async fn measure(cluster: &Cluster, url: &str) -> anyhow::Result<Maintenance> {
    let backend = |schema: &str| {
        EnhancedPostgresBackend::new(
            EnhancedPostgresConfig::new(url.to_string())
                .with_schema(schema)
                .with_expired_cleanup(false),
        )
    };
    let ours = backend("clear_ours").await?;
    let theirs = backend("clear_psql").await?;
    let (t_ours, t_theirs) = (ours.table().to_string(), theirs.table().to_string());

    eprintln!("retention: {ROWS} expired rows, twice ...");
    fill(cluster, &t_ours, true)?;
    fill(cluster, &t_theirs, true)?;
    // Each side starts right after a checkpoint (none of the loads' WAL left to write out
    // during the measurement).
    cluster.psql(0, "CHECKPOINT")?;
    let start = Instant::now();
    let removed = ours.cleanup_expired().await?;
    let retention = f64::from(ROWS) / start.elapsed().as_secs_f64();
    anyhow::ensure!(removed == u64::from(ROWS), "cleanup removed {removed}");
    cluster.psql(0, "CHECKPOINT")?;
    let start = Instant::now();
    cluster.psql(
        0,
        &format!("DELETE FROM {t_theirs} WHERE expires_at <= now()"),
    )?;
    let retention_psql = f64::from(ROWS) / start.elapsed().as_secs_f64();

    eprintln!("clear: {ROWS} live rows, twice ...");
    fill(cluster, &t_ours, false)?;
    fill(cluster, &t_theirs, false)?;
    let start = Instant::now();
    ours.clear().await?;
    let clear_s = start.elapsed().as_secs_f64();
    anyhow::ensure!(ours.count().await? == 0, "clear left entries");
    let start = Instant::now();
    cluster.psql(0, &format!("TRUNCATE {t_theirs}"))?;
    let truncate_s = start.elapsed().as_secs_f64();

    eprintln!("load after clear: {AFTER_CLEAR_ROWS} rows, best of 3 ...");
    let value = vec![0xAB_u8; VALUE_LEN];
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..AFTER_CLEAR_ROWS)
        .map(|i| (format!("after:{i:08}").into_bytes(), value.clone()))
        .collect();
    let entries: Vec<(&[u8], &[u8])> = rows
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let file = cluster.dir().join("after_clear.copy");
    reference::write_binary_copy(&file, &rows)?;
    let (mut after_clear, mut copy_psql) = (0.0f64, 0.0f64);
    for _ in 0..3 {
        ours.clear().await?;
        let start = Instant::now();
        ours.batch_copy(&entries).await?;
        let rate = f64::from(AFTER_CLEAR_ROWS) / start.elapsed().as_secs_f64();
        after_clear = after_clear.max(rate);
        anyhow::ensure!(
            ours.count().await? == AFTER_CLEAR_ROWS as usize,
            "batch_copy lost rows"
        );
        cluster.psql(0, &format!("TRUNCATE {t_theirs}"))?;
        let seconds = reference::psql_copy(cluster, url, &t_theirs, &file)?;
        copy_psql = copy_psql.max(f64::from(AFTER_CLEAR_ROWS) / seconds);
    }
    ours.clear().await?;
    cluster.psql(0, &format!("TRUNCATE {t_theirs}"))?;
    Ok(Maintenance {
        clear_s,
        truncate_s,
        retention,
        retention_psql,
        after_clear,
        copy_psql,
    })
}

//! The references: `pgbench` running the backend's SQL, `psql`'s binary `\copy`, and the
//! setup a user would write by hand (tokio-postgres with deadpool-postgres and cached
//! prepared statements).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use pgstate_testcluster::Cluster;

use crate::drive::{percentile, pick, Op, Sample};

/// The key expression pgbench evaluates: the same bytes as `key(i)` in `main.rs`.
const PGBENCH_KEY: &str = "convert_to('key:' || lpad(:k::text, 8, '0'), 'UTF8')";
/// The live-row filter of every read (as in the backend's statements).
const LIVE: &str = "(expires_at IS NULL OR expires_at > now())";
/// What the backend's upsert sets on an existing row.
const REPLACE: &str = "value = EXCLUDED.value, metadata = EXCLUDED.metadata, \
    expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, version = e.version + 1, \
    created_at = CASE WHEN e.expires_at <= EXCLUDED.updated_at THEN EXCLUDED.created_at ELSE e.created_at END";

/// The backend's get, with `$1` the key.
pub fn get_sql(table: &str) -> String {
    format!("SELECT value FROM {table} WHERE key = $1 AND {LIVE}")
}

/// The backend's upsert (value, metadata, TTL), returning the new version.
pub fn put_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS e (key, value, metadata, expires_at) VALUES ($1::bytea, $2::bytea, \
         $3::jsonb, statement_timestamp() + $4::bigint * interval '1 microsecond') \
         ON CONFLICT (key) DO UPDATE SET {REPLACE} RETURNING version"
    )
}

/// The pgbench script running the same statement(s) as the workload `name`, if there is one.
pub fn pgbench_script(name: &str, table: &str, keys: u32, value_len: usize) -> Option<String> {
    let value = format!("decode(repeat('cd', {value_len}), 'hex')");
    let upsert = |metadata: &str| {
        put_sql(table)
            .replace("$1::bytea", PGBENCH_KEY)
            .replace("$2::bytea", &value)
            .replace("$3::jsonb", metadata)
            .replace("$4::bigint", "NULL::bigint")
    };
    let get = get_sql(table).replace("$1", PGBENCH_KEY);
    let body = match name {
        "get" => format!("{get};"),
        "put" => format!("{};", upsert("'{}'::jsonb")),
        "put_with_metadata" => format!(
            "{};",
            upsert("jsonb_build_object('source', 'bench', 'n', :k::int)")
        ),
        "delete" => format!(
            "UPDATE {table} SET value = '\\x'::bytea, metadata = '{{}}'::jsonb, \
             expires_at = '-infinity', updated_at = now(), version = version + 1 \
             WHERE key = {PGBENCH_KEY} AND {LIVE};"
        ),
        "scan" => format!(
            "SELECT key FROM {table} WHERE key >= 'key:'::bytea AND key > {PGBENCH_KEY} \
             AND key < 'key;'::bytea AND {LIVE} ORDER BY key LIMIT 1000;"
        ),
        "query_by_metadata" => format!(
            "SELECT key, value, metadata, version, created_at, updated_at, expires_at FROM {table} \
             WHERE metadata @> jsonb_build_object('group', :k::int % 1000) AND {LIVE} ORDER BY key;"
        ),
        "transaction" => format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED;\n{get};\n{};\nCOMMIT;",
            upsert("'{}'::jsonb")
        ),
        _ => return None,
    };
    Some(format!("\\set k random(0, {})\n{body}\n", keys - 1))
}

/// Runs pgbench with `script` on `clients` connections for `seconds`; its rate and latency
/// percentiles (from its per-transaction log).
pub fn pgbench(
    cluster: &Cluster,
    script: &str,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<Sample> {
    let dir = cluster.dir().join("pgbench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("script.sql");
    std::fs::write(&path, script)?;
    let port = cluster.nodes()[0].port.to_string();
    let seconds = (seconds.ceil() as u64).max(1).to_string();
    let out = Command::new(cluster.bindir().join("pgbench"))
        .env("PGPASSWORD", pgstate_testcluster::PASSWORD)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-n"])
        .args(["-M", "prepared", "-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string(), "-T", &seconds])
        .arg("--log")
        .arg(format!("--log-prefix={}", dir.join("log").display()))
        .arg("-f")
        .arg(&path)
        .arg("postgres")
        .current_dir(&dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no tps line in pgbench output: {text}"))?;
    let mut lat: Vec<u32> = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with("log.") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path())?.lines() {
            if let Some(us) = line.split_whitespace().nth(2).and_then(|f| f.parse().ok()) {
                lat.push(us);
            }
        }
    }
    lat.sort_unstable();
    Ok(Sample {
        calls_per_s: tps,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        rss_mib: 0.0,
    })
}

/// Copies the rows of `file` (binary COPY format) into `table` with `psql`; seconds taken.
pub fn psql_copy(cluster: &Cluster, url: &str, table: &str, file: &Path) -> anyhow::Result<f64> {
    let start = std::time::Instant::now();
    let out = Command::new(cluster.bindir().join("psql"))
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "\\copy {table} (key, value) FROM '{}' WITH (FORMAT binary)",
            file.display()
        ))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(start.elapsed().as_secs_f64())
}

/// Writes PostgreSQL's binary COPY format: header, (key, value) tuples, trailer.
pub fn write_binary_copy(path: &Path, entries: &[(Vec<u8>, Vec<u8>)]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(b"PGCOPY\n\xff\r\n\0")?;
    out.write_all(&0i32.to_be_bytes())?;
    out.write_all(&0i32.to_be_bytes())?;
    for (k, v) in entries {
        out.write_all(&2i16.to_be_bytes())?;
        for field in [k, v] {
            out.write_all(&i32::try_from(field.len())?.to_be_bytes())?;
            out.write_all(field)?;
        }
    }
    out.write_all(&(-1i16).to_be_bytes())?;
    out.flush()?;
    Ok(())
}

/// A deadpool-postgres pool of `size` connections to `url`, as a user would set one up.
pub fn deadpool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let pg: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Ok(deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .build()?)
}

/// The hand-written get or put over `pool` (prepared statements cached per connection).
pub fn deadpool_op(
    pool: deadpool_postgres::Pool,
    table: &str,
    put: bool,
    keys: u32,
    value_len: usize,
) -> Op {
    let sql: Arc<str> = if put { put_sql(table) } else { get_sql(table) }.into();
    Arc::new(move |_, rng| {
        let (pool, sql) = (pool.clone(), sql.clone());
        Box::pin(async move {
            let client = pool.get().await?;
            let stmt = client.prepare_cached(&sql).await?;
            let key = crate::key(pick(rng, keys));
            if put {
                let value = vec![0xCD_u8; value_len];
                let empty = serde_json::json!({});
                client
                    .query_one(&stmt, &[&key, &value, &empty, &None::<i64>])
                    .await?;
            } else {
                client.query_opt(&stmt, &[&key]).await?;
            }
            Ok(())
        })
    })
}

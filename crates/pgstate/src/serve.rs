//! `pgstate metrics --listen ADDR`: the `pgstate_` metrics in Prometheus' text format over
//! HTTP (`GET /metrics`). Each scrape refreshes the table's figures (rows, sizes, dead tuples,
//! and the server's counters of rows written and scans by every client);
//! the backend publishes its pool, connection and replica figures every second, and its
//! operation counters as they happen, through the `metrics` facade into this process's
//! registry.

use std::io::Write;
use std::time::Duration;

use processor::state::EnhancedPostgresBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::exit::CliError;
use crate::prometheus::{Prometheus, Registry};
use crate::target::Target;

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Sets the table gauges from a fresh `get_table_statistics`.
async fn refresh(backend: &EnhancedPostgresBackend, table: &str) -> Result<(), CliError> {
    let t = backend.get_table_statistics().await?;
    let t_ = table.to_string();
    for (state, n) in [
        ("total", t.total_rows),
        ("active", t.active_rows),
        ("expired", t.expired_rows),
    ] {
        metrics::gauge!("pgstate_table_rows", "table" => t_.clone(), "state" => state)
            .set(n as f64);
    }
    for (part, n) in [
        ("table", t.table_size),
        ("indexes", t.indexes_size),
        ("toast", t.toast_size),
    ] {
        metrics::gauge!("pgstate_table_size_bytes", "table" => t_.clone(), "part" => part)
            .set(n as f64);
    }
    metrics::gauge!("pgstate_table_dead_tuples", "table" => t_.clone()).set(t.dead_tuples as f64);
    metrics::gauge!("pgstate_table_estimated_bloat_bytes", "table" => t_.clone())
        .set(t.estimated_bloat_bytes as f64);
    // The server's counters of every client's work on the table.
    let a = backend.get_table_activity().await?;
    for (what, n) in [
        ("inserted", a.rows_inserted),
        ("updated", a.rows_updated),
        ("deleted", a.rows_deleted),
    ] {
        metrics::counter!("pgstate_table_rows_written_total", "table" => t_.clone(), "change" => what)
            .absolute(n);
    }
    for (kind, n) in [("index", a.index_scans), ("sequential", a.sequential_scans)] {
        metrics::counter!("pgstate_table_scans_total", "table" => t_.clone(), "kind" => kind)
            .absolute(n);
    }
    Ok(())
}

/// Reads a request head and answers it.
async fn answer(
    mut stream: TcpStream,
    backend: &EnhancedPostgresBackend,
    table: &str,
    registry: &Registry,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&head);
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "GET only\n".to_string())
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "see /metrics\n".to_string())
    } else {
        match refresh(backend, table).await {
            Ok(()) => ("200 OK", registry.render()),
            Err(e) => ("503 Service Unavailable", format!("{}\n", e.message)),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Runs `pgstate metrics --listen ADDR` until Ctrl-C.
pub async fn run(target: &Target, addr: &str) -> Result<(), CliError> {
    // Before the backend: its metrics register with the recorder installed when it starts.
    let registry: &'static Registry = Box::leak(Box::default());
    metrics::set_global_recorder(Prometheus(registry))
        .map_err(|e| CliError::failed(format!("installing the metrics recorder: {e}")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::usage(format!("cannot listen on {addr}: {e}")))?;
    let backend = target.existing().await?;
    let table = backend.table().replace('"', "");
    let local = listener.local_addr()?;
    println!("serving metrics on http://{local}/metrics");
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let backend = backend.clone_handle();
        let table = table.clone();
        tokio::spawn(async move {
            // A client that sends nothing is dropped after 10 s.
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                answer(stream, &backend, &table, registry),
            )
            .await;
        });
    }
}

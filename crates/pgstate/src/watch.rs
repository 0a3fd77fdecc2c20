//! `pgstate watch`: a live terminal view, refreshed once a second: the table's throughput by
//! every client (from the server's counters), rows, this view's own probe latencies and pool,
//! replicas with their roles and lag, advisory locks and leaders. `q`, Esc or Ctrl-C quits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use processor::state::{
    redact, AdvisoryLockInfo, EnhancedPostgresBackend, LeaderInfo, ReplicationStatus, StateBackend,
    TableActivity,
};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;
use tokio::sync::mpsc;

use crate::exit::CliError;
use crate::target::Target;

/// Probe reads per refresh (their latencies are the view's own).
const PROBES: usize = 5;

/// The refreshes the rates are averaged over (one a second): the server's table counters
/// move in steps (each session flushes its counts about once a second), so one second's
/// difference jumps while the load is steady.
const WINDOW: usize = 5;

/// Per second over `window` (oldest first; the newest last): (inserts, updates, deletes,
/// index scans); zeros with fewer than two samples.
fn rates(window: &VecDeque<(Instant, TableActivity)>) -> (f64, f64, f64, f64) {
    let (Some((t0, a0)), Some((t1, a1))) = (window.front(), window.back()) else {
        return (0.0, 0.0, 0.0, 0.0);
    };
    let secs = t1.duration_since(*t0).as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0, 0.0, 0.0);
    }
    let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
    (
        rate(a1.rows_inserted, a0.rows_inserted),
        rate(a1.rows_updated, a0.rows_updated),
        rate(a1.rows_deleted, a0.rows_deleted),
        rate(a1.index_scans, a0.index_scans),
    )
}

/// What one refresh shows.
struct Snapshot {
    activity: TableActivity,
    /// Per second over the last [`WINDOW`] of refreshes: (inserts, updates, deletes, index
    /// scans).
    rates: (f64, f64, f64, f64),
    probes: u64,
    latency: (u64, u64, u64),
    pool: (u32, u32, u32, u32),
    replication: Option<ReplicationStatus>,
    locks: Vec<AdvisoryLockInfo>,
    leaders: Vec<(String, Option<LeaderInfo>)>,
    error: Option<String>,
}

async fn refresh(
    backend: &EnhancedPostgresBackend,
    leaders: &[String],
    last: Option<&Snapshot>,
    window: &mut VecDeque<(Instant, TableActivity)>,
) -> Snapshot {
    let at = Instant::now();
    let mut error = None;
    for _ in 0..PROBES {
        if let Err(e) = backend.get(b"pgstate-watch:probe").await {
            error = Some(e.to_string());
        }
    }
    let activity = backend.get_table_activity().await.unwrap_or_else(|e| {
        error = Some(e.to_string());
        last.map(|l| l.activity.clone()).unwrap_or_default()
    });
    window.push_back((at, activity.clone()));
    while window.len() > WINDOW + 1 {
        window.pop_front();
    }
    let rates = rates(window);
    let stats = backend.get_stats();
    let latency = stats
        .latencies
        .iter()
        .find(|l| l.operation == "get")
        .map(|l| (l.p50_us, l.p95_us, l.p99_us))
        .unwrap_or_default();
    let pool = backend.get_pool_stats();
    let replication = backend.check_replication_status().await.ok();
    let locks = backend.list_advisory_locks().await.unwrap_or_default();
    let mut leader_info = Vec::new();
    for name in leaders {
        leader_info.push((
            name.clone(),
            backend.current_leader(name).await.ok().flatten(),
        ));
    }
    Snapshot {
        activity,
        rates,
        probes: stats.get_count,
        latency,
        pool: (pool.size, pool.idle, pool.active, pool.max_size),
        replication,
        locks,
        leaders: leader_info,
        error,
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// The replicas, locks and leaders of a refresh, a line each.
fn details(s: &Snapshot) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    match &s.replication {
        Some(r) => {
            lines.push(Line::from(format!(
                "primary {}   streaming replicas {}   failovers seen {}",
                r.primary.as_deref().unwrap_or("?"),
                r.connected_replicas,
                r.primary_changes
            )));
            for rep in &r.replicas {
                lines.push(Line::from(format!(
                    "  {:22} {:12} lag {:>6} ms {:>10} B  {}",
                    rep.name,
                    format!("{:?}", rep.role),
                    rep.lag_ms,
                    rep.lag_bytes,
                    if rep.in_rotation {
                        "serving reads"
                    } else {
                        "out of rotation"
                    }
                )));
            }
        }
        None => lines.push(Line::from("replication status unavailable")),
    }
    for l in s.locks.iter().take(5) {
        lines.push(Line::from(format!(
            "  lock {} {} ({} waiting)",
            l.key,
            l.name.as_deref().unwrap_or("-"),
            l.waiters
        )));
    }
    for (name, leader) in &s.leaders {
        lines.push(Line::from(match leader {
            Some(l) => format!(
                "  leader {name}: term {} {} ({:.1}s lease)",
                l.term,
                l.holder_id,
                l.lease_remaining.as_secs_f64()
            ),
            None => format!("  leader {name}: none"),
        }));
    }
    lines
}

/// A paragraph of `lines` in a bordered box titled `title`.
fn panel<'a>(lines: Vec<Line<'a>>, title: &'a str) -> Paragraph<'a> {
    Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title))
}

fn draw(frame: &mut Frame, title: &str, s: &Snapshot) {
    let rows = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .split(frame.area());
    frame.render_widget(
        Paragraph::new(title).style(Style::default().add_modifier(Modifier::BOLD)),
        rows[0],
    );
    let halves = |area| {
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).split(area)
    };
    let top = halves(rows[1]);
    let (ins, upd, del, scans) = s.rates;
    let throughput = vec![
        Line::from(format!(
            "writes/s   {:>10.0}   ({WINDOW} s average)",
            ins + upd + del
        )),
        Line::from(format!("  inserted {ins:>10.0}   updated {upd:>8.0}")),
        Line::from(format!("  deleted  {del:>10.0}")),
        Line::from(format!("reads/s    {scans:>10.0}   (index scans)")),
    ];
    frame.render_widget(panel(throughput, " Throughput, all clients "), top[0]);
    let a = &s.activity;
    let table = vec![
        Line::from(format!("live rows (estimate) {:>12}", a.live_rows_estimate)),
        Line::from(format!("dead tuples          {:>12}", a.dead_tuples)),
        Line::from(format!("rows inserted        {:>12}", a.rows_inserted)),
        Line::from(format!("rows updated         {:>12}", a.rows_updated)),
    ];
    frame.render_widget(panel(table, " Table "), top[1]);
    let mid = halves(rows[2]);
    let (p50, p95, p99) = s.latency;
    let latency = vec![
        Line::from(format!("probe reads {:>8}", s.probes)),
        Line::from(format!("p50 {:>10}   p95 {:>10}", ms(p50), ms(p95))),
        Line::from(format!("p99 {:>10}", ms(p99))),
    ];
    frame.render_widget(panel(latency, " Latency of this view's reads "), mid[0]);
    let (size, idle, active, max) = s.pool;
    let pool = vec![
        Line::from(format!(
            "open {size}   idle {idle}   in use {active}   max {max}"
        )),
        Line::from(format!("advisory locks held {}", s.locks.len())),
    ];
    frame.render_widget(panel(pool, " Pool (this view) and locks "), mid[1]);
    frame.render_widget(panel(details(s), " Replicas, locks, leaders "), rows[3]);
    let footer = match &s.error {
        Some(e) => format!("last error: {e}"),
        None => "q: quit".to_string(),
    };
    frame.render_widget(Paragraph::new(footer), rows[4]);
}

/// Reads keys on a thread of its own (crossterm blocks) and says when to quit.
fn spawn_keys() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => {
                if let Ok(Event::Key(k)) = event::read() {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if k.kind == KeyEventKind::Press
                        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                    {
                        let _ = tx.blocking_send(());
                        return;
                    }
                }
            }
            Ok(false) => {
                if tx.is_closed() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    rx
}

/// Runs `pgstate watch` until `q`.
pub async fn run(target: &Target, leaders: Vec<String>) -> Result<(), CliError> {
    let (url, _) = target.resolve()?;
    let backend = target.existing().await?;
    let title = format!("pgstate watch: {} on {}", backend.table(), redact(&url));
    let mut terminal = ratatui::try_init()
        .map_err(|e| CliError::failed(format!("cannot use this terminal: {e}")))?;
    let mut quit = spawn_keys();
    let mut last: Option<Snapshot> = None;
    let mut window = VecDeque::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = quit.recv() => break Ok(()),
        }
        // A refresh against a frozen server may take until the operation timeout: q still
        // quits at once.
        let snapshot = tokio::select! {
            s = refresh(&backend, &leaders, last.as_ref(), &mut window) => s,
            _ = quit.recv() => break Ok(()),
        };
        if let Err(e) = terminal.draw(|f| draw(f, &title, &snapshot)) {
            break Err(CliError::failed(format!("drawing: {e}")));
        }
        last = Some(snapshot);
    };
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters that move in steps give a steady rate over the window.
    #[test]
    fn rates_are_averaged_over_the_window() {
        let start = Instant::now();
        let mut window = VecDeque::new();
        for (i, inserted) in [0u64, 0, 200, 200, 400, 400].into_iter().enumerate() {
            let activity = TableActivity {
                rows_inserted: inserted,
                ..TableActivity::default()
            };
            window.push_back((start + Duration::from_secs(i as u64), activity));
        }
        let (ins, upd, _, _) = rates(&window);
        assert_eq!((ins, upd), (80.0, 0.0));
        assert_eq!(rates(&VecDeque::new()), (0.0, 0.0, 0.0, 0.0));
    }
}

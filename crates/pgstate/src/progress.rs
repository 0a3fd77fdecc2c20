//! Progress for long work, on stderr: a bar when stderr is a terminal; otherwise (a log, a
//! pipe, CI) a plain line every few seconds, so a long run shows it is alive.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a line is printed when stderr is not a terminal (`$PGSTATE_PROGRESS_MS` in
/// milliseconds overrides it).
const LINE_EVERY: Duration = Duration::from_secs(5);

fn line_every() -> Duration {
    std::env::var("PGSTATE_PROGRESS_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(LINE_EVERY, Duration::from_millis)
}

/// Progress of one piece of work.
pub struct Progress {
    bar: ProgressBar,
    what: String,
    total: Option<u64>,
    /// When stderr is not a terminal: when the last line was printed, and how often.
    lines: Option<(Mutex<Instant>, Duration)>,
}

impl Progress {
    fn new(bar: ProgressBar, what: &str, total: Option<u64>) -> Self {
        bar.set_message(what.to_string());
        let lines =
            (!std::io::stderr().is_terminal()).then(|| (Mutex::new(Instant::now()), line_every()));
        Progress {
            bar,
            what: what.to_string(),
            total,
            lines,
        }
    }

    /// `n` steps done.
    pub fn set_position(&self, n: u64) {
        self.bar.set_position(n);
        let Some((last, every)) = &self.lines else {
            return;
        };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= *every {
            *last = Instant::now();
            match self.total {
                Some(total) => eprintln!("{}: {n} of {total}", self.what),
                None => eprintln!("{}: {n}", self.what),
            }
        }
    }

    /// Replaces the bar's message.
    pub fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }

    /// Redraws the bar on its own (for work that reports no steps).
    pub fn enable_steady_tick(&self, every: Duration) {
        self.bar.enable_steady_tick(every);
    }

    /// Removes the bar.
    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }
}

/// A bar of `len` steps counting `what`.
pub fn bar(len: u64, what: &str) -> Progress {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Progress::new(bar, what, Some(len))
}

/// A counter of `what` without a known end.
pub fn counter(what: &str) -> Progress {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}: {pos} ({per_sec})") {
        bar.set_style(style);
    }
    Progress::new(bar, what, None)
}

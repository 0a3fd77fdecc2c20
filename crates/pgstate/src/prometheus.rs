//! A `metrics` recorder that keeps every series and renders them in Prometheus' text format
//! (version 0.0.4): counters and gauges as they are, histograms with cumulative buckets
//! (`_bucket{le=..}`, `_sum`, `_count`, so Prometheus can compute percentiles). Names that
//! Prometheus does not allow (OpenTelemetry's dotted `db.client.operation.duration`) are
//! written with `_` for each character it does not allow.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// The upper bounds of histogram buckets, in the recorded unit (seconds for durations):
/// 100 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// One series' value.
#[derive(Default)]
struct Series {
    counter: AtomicU64,
    /// A gauge's value, or a histogram's sum (as `f64` bits).
    value: Mutex<f64>,
    count: AtomicU64,
    /// A histogram's observations at or under each of [`BUCKETS`] (not cumulative).
    buckets: [AtomicU64; BUCKETS.len()],
}

impl CounterFn for Series {
    fn increment(&self, n: u64) {
        self.counter.fetch_add(n, Relaxed);
    }
    fn absolute(&self, n: u64) {
        // The source's own total (it may have been reset: Prometheus handles counter resets).
        self.counter.store(n, Relaxed);
    }
}

fn update(m: &Mutex<f64>, f: impl FnOnce(&mut f64)) {
    // A poisoned lock still holds a number.
    let mut guard = m.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}

impl GaugeFn for Series {
    fn increment(&self, v: f64) {
        update(&self.value, |x| *x += v);
    }
    fn decrement(&self, v: f64) {
        update(&self.value, |x| *x -= v);
    }
    fn set(&self, v: f64) {
        update(&self.value, |x| *x = v);
    }
}

impl HistogramFn for Series {
    fn record(&self, v: f64) {
        update(&self.value, |x| *x += v);
        self.count.fetch_add(1, Relaxed);
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
    }
}

/// `name` as Prometheus allows a metric or label name: `_` for each other character.
fn prometheus_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Default)]
struct Family {
    kind: Option<Type>,
    help: String,
    series: BTreeMap<String, Arc<Series>>,
}

/// Every metric recorded in this process.
#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Registry {
    fn series(&self, key: &Key, kind: Type) -> Arc<Series> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}=\"{}\"", prometheus_name(l.key()), escape(l.value())))
            .collect();
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let family = families.entry(prometheus_name(key.name())).or_default();
        family.kind = Some(kind);
        family.series.entry(labels.join(",")).or_default().clone()
    }

    fn describe(&self, name: &KeyName, help: &str) {
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        families
            .entry(prometheus_name(name.as_str()))
            .or_default()
            .help = help.replace('\n', " ");
    }

    /// Every series in Prometheus' text format.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, family) in families.iter() {
            let Some(kind) = family.kind else { continue };
            if !family.help.is_empty() {
                let _ = writeln!(out, "# HELP {name} {}", family.help);
            }
            let type_name = match kind {
                Type::Counter => "counter",
                Type::Gauge => "gauge",
                Type::Histogram => "histogram",
            };
            let _ = writeln!(out, "# TYPE {name} {type_name}");
            for (labels, s) in &family.series {
                let braces = |suffix: &str| {
                    if labels.is_empty() {
                        format!("{name}{suffix}")
                    } else {
                        format!("{name}{suffix}{{{labels}}}")
                    }
                };
                let value = *s.value.lock().unwrap_or_else(|p| p.into_inner());
                match kind {
                    Type::Counter => {
                        let _ = writeln!(out, "{} {}", braces(""), s.counter.load(Relaxed));
                    }
                    Type::Gauge => {
                        let _ = writeln!(out, "{} {value}", braces(""));
                    }
                    Type::Histogram => {
                        let le = |bound: &str| {
                            let sep = if labels.is_empty() { "" } else { "," };
                            format!("{name}_bucket{{{labels}{sep}le=\"{bound}\"}}")
                        };
                        let mut cumulative = 0;
                        for (bound, n) in BUCKETS.iter().zip(&s.buckets) {
                            cumulative += n.load(Relaxed);
                            let _ = writeln!(out, "{} {cumulative}", le(&bound.to_string()));
                        }
                        let count = s.count.load(Relaxed);
                        let _ = writeln!(out, "{} {count}", le("+Inf"));
                        let _ = writeln!(out, "{} {value}", braces("_sum"));
                        let _ = writeln!(out, "{} {count}", braces("_count"));
                    }
                }
            }
        }
        out
    }
}

/// The recorder over a registry that lives as long as the process.
pub struct Prometheus(pub &'static Registry);

impl Recorder for Prometheus {
    fn describe_counter(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.0.describe(&name, &help);
    }
    fn describe_gauge(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.0.describe(&name, &help);
    }
    fn describe_histogram(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.0.describe(&name, &help);
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.series(key, Type::Counter))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.series(key, Type::Gauge))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.0.series(key, Type::Histogram))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_type_with_escaped_labels() {
        let registry: &'static Registry = Box::leak(Box::default());
        let r = Prometheus(registry);
        let meta = Metadata::new("t", metrics::Level::INFO, None);
        r.describe_counter("ops_total".into(), None, "Operations".into());
        let key = Key::from_parts("ops_total", vec![metrics::Label::new("table", "a\"b")]);
        r.register_counter(&key, &meta).increment(3);
        r.register_gauge(&Key::from_name("open"), &meta).set(2.5);
        let h = r.register_histogram(&Key::from_name("wait_seconds"), &meta);
        h.record(0.5);
        h.record(1.0);
        let text = registry.render();
        assert!(text.contains("# HELP ops_total Operations\n# TYPE ops_total counter\nops_total{table=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("# TYPE open gauge\nopen 2.5\n"), "{text}");
        assert!(
            text.contains("wait_seconds_sum 1.5\nwait_seconds_count 2\n"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn histograms_have_cumulative_buckets_and_names_are_made_valid() {
        let registry: &'static Registry = Box::leak(Box::default());
        let recorder = Prometheus(registry);
        let key = Key::from_parts(
            "db.client.operation.duration",
            vec![metrics::Label::new("db.system.name", "postgresql")],
        );
        let h = recorder.register_histogram(&key, &Metadata::new("t", metrics::Level::INFO, None));
        for v in [0.0002, 0.003, 0.003, 20.0] {
            h.record(v);
        }
        let text = registry.render();
        assert!(
            text.contains("# TYPE db_client_operation_duration histogram"),
            "{text}"
        );
        let line = |le: &str| {
            format!(
                "db_client_operation_duration_bucket{{db_system_name=\"postgresql\",le=\"{le}\"}}"
            )
        };
        assert!(text.contains(&format!("{} 1\n", line("0.00025"))), "{text}");
        assert!(text.contains(&format!("{} 3\n", line("0.005"))), "{text}");
        assert!(text.contains(&format!("{} 3\n", line("10"))), "{text}");
        assert!(text.contains(&format!("{} 4\n", line("+Inf"))), "{text}");
        assert!(
            text.contains("db_client_operation_duration_count{db_system_name=\"postgresql\"} 4"),
            "{text}"
        );
    }
}

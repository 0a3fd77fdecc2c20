//! A `metrics` recorder that keeps every series and renders them in Prometheus' text format
//! (version 0.0.4): counters and gauges as they are, histograms as summaries (`_sum` and
//! `_count`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// One series' value.
#[derive(Default)]
struct Series {
    counter: AtomicU64,
    /// A gauge's value, or a histogram's sum (as `f64` bits).
    value: Mutex<f64>,
    count: AtomicU64,
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
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Type {
    Counter,
    Gauge,
    Summary,
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
            .map(|l| format!("{}=\"{}\"", l.key(), escape(l.value())))
            .collect();
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let family = families.entry(key.name().to_string()).or_default();
        family.kind = Some(kind);
        family.series.entry(labels.join(",")).or_default().clone()
    }

    fn describe(&self, name: &KeyName, help: &str) {
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        families.entry(name.as_str().to_string()).or_default().help = help.replace('\n', " ");
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
                Type::Summary => "summary",
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
                    Type::Summary => {
                        let _ = writeln!(out, "{} {value}", braces("_sum"));
                        let _ = writeln!(out, "{} {}", braces("_count"), s.count.load(Relaxed));
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
        Histogram::from_arc(self.0.series(key, Type::Summary))
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

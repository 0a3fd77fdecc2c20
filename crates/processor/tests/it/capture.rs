//! Test support for observability: a `metrics` recorder that keeps every value, and a
//! `tracing` subscriber that keeps every span's and event's fields.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_core::span::Current;

// ---------------------------------------------------------------------------------------------
// A recorder that keeps every metric's value, keyed by name and sorted labels.

#[derive(Default)]
struct Cell {
    counter: AtomicU64,
    gauge: Mutex<f64>,
    samples: AtomicU64,
}

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.counter.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.counter.fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        *self.gauge.lock().unwrap() += value;
    }
    fn decrement(&self, value: f64) {
        *self.gauge.lock().unwrap() -= value;
    }
    fn set(&self, value: f64) {
        *self.gauge.lock().unwrap() = value;
    }
}

impl HistogramFn for Cell {
    fn record(&self, _value: f64) {
        self.samples.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct TestRecorder {
    cells: Mutex<HashMap<String, Arc<Cell>>>,
}

fn id(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let id = id(key.name(), &labels);
        self.cells.lock().unwrap().entry(id).or_default().clone()
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<Arc<Cell>> {
        self.cells.lock().unwrap().get(&id(name, labels)).cloned()
    }

    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.find(name, labels)
            .map_or(0, |c| c.counter.load(Ordering::Relaxed))
    }

    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.find(name, labels).map(|c| *c.gauge.lock().unwrap())
    }

    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.find(name, labels)
            .map_or(0, |c| c.samples.load(Ordering::Relaxed))
    }

    pub fn names(&self) -> Vec<String> {
        self.cells.lock().unwrap().keys().cloned().collect()
    }
}

struct Shared(&'static TestRecorder);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.0.cell(key))
    }
}

/// The recorder of this test process, installed on first use (every metric carries its
/// backend's table, so tests running at once never see each other's figures).
pub fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(Shared(recorder)).expect("no other recorder installed");
        recorder
    })
}

// ---------------------------------------------------------------------------------------------
// A subscriber that keeps every span's and event's fields.

#[derive(Clone, Debug, Default)]
pub struct Captured {
    pub name: String,
    pub fields: Vec<(String, String)>,
}

impl Captured {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

#[derive(Default)]
struct CaptureState {
    spans: Mutex<Vec<Captured>>,
    events: Mutex<Vec<Captured>>,
    stack: Mutex<Vec<(Id, &'static tracing::Metadata<'static>)>>,
    metadata: Mutex<HashMap<u64, &'static tracing::Metadata<'static>>>,
}

#[derive(Clone, Default)]
pub struct Capture(Arc<CaptureState>);

impl Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut captured = Captured {
            name: span.metadata().name().to_string(),
            fields: Vec::new(),
        };
        span.record(&mut Fields(&mut captured.fields));
        let mut spans = self.0.spans.lock().unwrap();
        spans.push(captured);
        let id = spans.len() as u64;
        self.0.metadata.lock().unwrap().insert(id, span.metadata());
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.0.spans.lock().unwrap();
        if let Some(s) = spans.get_mut(span.into_u64() as usize - 1) {
            values.record(&mut Fields(&mut s.fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut captured = Captured {
            name: event.metadata().name().to_string(),
            fields: Vec::new(),
        };
        event.record(&mut Fields(&mut captured.fields));
        self.0.events.lock().unwrap().push(captured);
    }
    fn enter(&self, span: &Id) {
        let meta = self
            .0
            .metadata
            .lock()
            .unwrap()
            .get(&span.into_u64())
            .copied();
        if let Some(meta) = meta {
            self.0.stack.lock().unwrap().push((span.clone(), meta));
        }
    }
    fn exit(&self, span: &Id) {
        let mut stack = self.0.stack.lock().unwrap();
        if let Some(i) = stack.iter().rposition(|(s, _)| s == span) {
            stack.remove(i);
        }
    }
    fn current_span(&self) -> Current {
        match self.0.stack.lock().unwrap().last() {
            Some((id, meta)) => Current::new(id.clone(), meta),
            None => Current::none(),
        }
    }
}

impl Capture {
    pub fn spans(&self) -> Vec<Captured> {
        self.0.spans.lock().unwrap().clone()
    }
    pub fn events(&self) -> Vec<Captured> {
        self.0.events.lock().unwrap().clone()
    }
    /// Fails the test if any span or event field holds one of `secrets`.
    pub fn assert_never_shows(&self, secrets: &[&str]) {
        for c in self.spans().iter().chain(self.events().iter()) {
            for (k, v) in &c.fields {
                for s in secrets {
                    assert!(!v.contains(s), "{} field {k} shows {s:?}: {v}", c.name);
                }
            }
        }
    }
}

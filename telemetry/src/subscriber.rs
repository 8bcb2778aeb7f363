//! The `tracing` subscriber: keeps the spans of `TARGET` only, gives each a random W3C span
//! id, joins it to the trace its `traceparent` field names (or starts a trace), and hands it
//! to the exporter's queue when its last handle drops.
//!
//! Spans of the message path outlive any scope (an upstream span ends in the broker's
//! delivery callback, on librdkafka's thread), so nothing here depends on entering them:
//! parents are explicit (`traceparent`), never the thread's current span.

use crate::{Finished, Kind, Msg, Stats, Value, TARGET};
use im_shared::trace::TraceParent;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};

/// Spans open at once, at most (a leak of handles must not grow without bound: past this,
/// new spans are not recorded).
const OPEN_MAX: usize = 100_000;

struct Open {
    span: Finished,
    refs: usize,
}

pub struct Tracer {
    open: Mutex<HashMap<u64, Open>>,
    sink: SyncSender<Msg>,
    stats: Arc<Stats>,
}

impl Tracer {
    pub(crate) fn new(sink: SyncSender<Msg>, stats: Arc<Stats>) -> Tracer {
        Tracer {
            open: Mutex::new(HashMap::new()),
            sink,
            stats,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The context a child of span `id` (or a record it produces) carries.
    pub(crate) fn context(&self, id: &Id) -> Option<TraceParent> {
        let open = self.open();
        let s = &open.get(&id.into_u64())?.span;
        TraceParent::sampled(s.trace_id, s.span_id)
    }
}

fn is_ours(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.target() == TARGET
}

/// Whether the process's `log` logger takes an event like this one. Other crates' `tracing`
/// events (sqlx's slow statements and pool errors) reach the log only through `tracing`'s
/// fallback to `log`, which stops once a subscriber is installed: this one hands them on.
fn logs(meta: &Metadata<'_>) -> bool {
    meta.is_event()
        && log::logger().enabled(
            &log::Metadata::builder()
                .level(log_level(meta.level()))
                .target(meta.target())
                .build(),
        )
}

fn log_level(l: &tracing::Level) -> log::Level {
    match *l {
        tracing::Level::ERROR => log::Level::Error,
        tracing::Level::WARN => log::Level::Warn,
        tracing::Level::INFO => log::Level::Info,
        tracing::Level::DEBUG => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

/// An event's fields as one line: its message, then `key=value` for the rest.
#[derive(Default)]
struct Line {
    message: String,
    rest: String,
}

impl Line {
    fn text(&self) -> String {
        match (self.message.is_empty(), self.rest.is_empty()) {
            (_, true) => self.message.clone(),
            (true, false) => self.rest.clone(),
            (false, false) => format!("{} {}", self.message, self.rest),
        }
    }
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, v: &dyn fmt::Debug) {
        use std::fmt::Write as _;
        if field.name() == "message" {
            let _ = write!(self.message, "{v:?}");
        } else {
            let sep = if self.rest.is_empty() { "" } else { " " };
            let _ = write!(self.rest, "{sep}{}={v:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, v: &str) {
        use std::fmt::Write as _;
        if field.name() == "message" {
            self.message.push_str(v);
        } else {
            let sep = if self.rest.is_empty() { "" } else { " " };
            let _ = write!(self.rest, "{sep}{}={v}", field.name());
        }
    }
}

impl Subscriber for Tracer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        // Decided once per call site (the log's filter is set at start): everything else
        // costs nothing.
        if is_ours(meta) || logs(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        is_ours(meta) || logs(meta)
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut span = Finished {
            trace_id: [0; 16],
            span_id: [0; 8],
            parent: None,
            name: attrs.metadata().name(),
            kind: Kind::Internal,
            start_ns: crate::unix_ns(),
            end_ns: 0,
            attrs: Vec::new(),
            error: false,
        };
        attrs.record(&mut Fields(&mut span));
        if span.trace_id == [0; 16] {
            span.trace_id = crate::random_trace_id();
        }
        let mut open = self.open();
        if open.len() >= OPEN_MAX {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            // A fixed id nothing is stored under: closing it finds nothing.
            return Id::from_u64(u64::MAX);
        }
        let id = loop {
            let id = crate::random_span_id();
            if id != u64::MAX && !open.contains_key(&id) {
                break id;
            }
        };
        span.span_id = id.to_be_bytes();
        open.insert(id, Open { span, refs: 1 });
        Id::from_u64(id)
    }

    fn record(&self, id: &Id, values: &Record<'_>) {
        if let Some(o) = self.open().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut o.span));
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    /// Hands other crates' events to the `log` logger, as `tracing` did before this
    /// subscriber was installed.
    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut line = Line::default();
        event.record(&mut line);
        log::logger().log(
            &log::Record::builder()
                .level(log_level(meta.level()))
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .args(format_args!("{}", line.text()))
                .build(),
        );
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}

    fn clone_span(&self, id: &Id) -> Id {
        if let Some(o) = self.open().get_mut(&id.into_u64()) {
            o.refs += 1;
        }
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let mut open = self.open();
        let key = id.into_u64();
        let Some(o) = open.get_mut(&key) else {
            return false;
        };
        o.refs -= 1;
        if o.refs > 0 {
            return false;
        }
        let mut span = open.remove(&key).expect("looked up").span;
        drop(open);
        span.end_ns = crate::unix_ns().max(span.start_ns);
        match self.sink.try_send(Msg::Span(span)) {
            Ok(()) => {}
            // The exporter is behind (a slow collector): the span is lost, counted.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }
}

/// Reads a span's fields: `traceparent` (its parent), `otel.kind`, `otel.status_code`, and
/// the rest as attributes.
struct Fields<'a>(&'a mut Finished);

impl Fields<'_> {
    /// One value per key (OTLP wants attribute keys unique): a field recorded again
    /// replaces what it held.
    fn put(&mut self, field: &Field, v: Value) {
        match self.0.attrs.iter_mut().find(|(k, _)| *k == field.name()) {
            Some((_, old)) => *old = v,
            None => self.0.attrs.push((field.name(), v)),
        }
    }

    fn special(&mut self, field: &Field, v: &str) -> bool {
        match field.name() {
            "traceparent" => {
                if let Some(t) = TraceParent::parse(v.as_bytes()) {
                    self.0.trace_id = t.trace_id;
                    self.0.parent = Some(t.span_id);
                }
                true
            }
            "otel.kind" => {
                self.0.kind = Kind::parse(v);
                true
            }
            "otel.status_code" => {
                self.0.error = v.eq_ignore_ascii_case("error");
                true
            }
            _ => false,
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, v: &str) {
        if !self.special(field, v) {
            self.put(field, Value::Str(v.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, v: &dyn fmt::Debug) {
        let s = format!("{v:?}");
        if !self.special(field, &s) {
            self.put(field, Value::Str(s));
        }
    }

    fn record_u64(&mut self, field: &Field, v: u64) {
        // OTLP's integers are signed 64-bit: a larger one goes as its decimal string.
        match i64::try_from(v) {
            Ok(i) => self.put(field, Value::Int(i)),
            Err(_) => self.put(field, Value::Str(v.to_string())),
        }
    }

    fn record_i64(&mut self, field: &Field, v: i64) {
        self.put(field, Value::Int(v));
    }

    fn record_bool(&mut self, field: &Field, v: bool) {
        self.put(field, Value::Bool(v));
    }

    fn record_f64(&mut self, field: &Field, v: f64) {
        self.put(field, Value::F64(v));
    }
}

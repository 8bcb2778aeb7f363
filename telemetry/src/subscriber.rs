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

impl Subscriber for Tracer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        // Decided once per call site: everything else (sqlx's events, say) costs nothing.
        if is_ours(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        is_ours(meta)
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

    fn event(&self, _: &Event<'_>) {}

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
    fn put(&mut self, field: &Field, v: Value) {
        self.0.attrs.push((field.name(), v));
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
        self.put(field, Value::Int(v as i64));
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

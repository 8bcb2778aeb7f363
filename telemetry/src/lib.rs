//! Tracing along the message path (README.md, "Tracing"): a sampled `send` is followed from
//! the gateway through the bus and logic and back to the gateways that deliver it, one trace
//! whose spans each process exports over OTLP/HTTP to the collector `--otlp-endpoint` names.
//!
//! - **Call sites** use `tracing`'s span API with `target: TARGET` and `parent: None`; a
//!   span's parent is its `traceparent` field (W3C), which is how a span in logic joins the
//!   gateway's trace from the record header it consumed. `context(&span)` is the value a
//!   record produced under that span carries.
//! - **The subscriber** (`subscriber.rs`) records only those spans; the process installs it
//!   (`install`) only when an endpoint is given. Off, no subscriber exists, `sample()` is one
//!   atomic load that says no, nothing is traced, and an untraced record's only cost is the
//!   `None` beside it: "free when off" is measured in benches/RESULTS.md.
//! - **The exporter** (`export.rs`) is a thread of its own with a bounded queue: a full queue
//!   or a collector that is down loses spans (counted), never slows the message path.
//!
//! Sampling is decided once, where a trace starts (the gateway's bridge, for each `send`, at
//! `--otlp-sample-ratio`); the processes after it follow the record's sampled flag.

mod export;
mod subscriber;

pub use export::parse_endpoint;
pub use im_shared::trace::TraceParent;
pub use subscriber::Tracer;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The target of every span this crate records.
pub const TARGET: &str = "im::trace";
/// Finished spans waiting for the exporter, at most.
pub const QUEUE_MAX: usize = 8192;

#[derive(Clone, Debug)]
pub struct Config {
    /// `http://host:port[/prefix]`: spans go to `<prefix>/v1/traces` (OTLP/HTTP, JSON).
    pub endpoint: String,
    /// The resource's `service.name` (`im-gateway`, `im-logic`, `im`).
    pub service: String,
    /// `service.instance.id`: which process of the service.
    pub instance: String,
    /// The share of sends traced, 0 to 1.
    pub sample_ratio: f64,
}

/// What the exporter did, for `/metrics`.
#[derive(Default, Debug)]
pub struct Stats {
    pub exported: AtomicU64,
    /// Lost: the queue was full, or the collector refused or did not answer their batch.
    pub dropped: AtomicU64,
    pub export_failures: AtomicU64,
}

/// The span kinds of OTLP (`SpanKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s {
            "server" => Kind::Server,
            "client" => Kind::Client,
            "producer" => Kind::Producer,
            "consumer" => Kind::Consumer,
            _ => Kind::Internal,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    F64(f64),
}

/// A span once it ended, as the exporter sends it.
#[derive(Clone, Debug)]
pub(crate) struct Finished {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: &'static str,
    kind: Kind,
    start_ns: u64,
    end_ns: u64,
    attrs: Vec<(&'static str, Value)>,
    error: bool,
}

pub(crate) enum Msg {
    Span(Finished),
    /// Export what is queued now, then say so.
    Flush(SyncSender<()>),
}

/// The sampling threshold: a send is traced when a random u64 is at most this; 0 is off.
static THRESHOLD: AtomicU64 = AtomicU64::new(0);
static INSTALLED: OnceLock<(SyncSender<Msg>, Arc<Stats>)> = OnceLock::new();

/// Installs the subscriber as the process's and starts the exporter. Once per process.
pub fn install(cfg: Config) -> Result<(), String> {
    let target = export::parse_endpoint(&cfg.endpoint)?;
    if !(0.0..=1.0).contains(&cfg.sample_ratio) {
        return Err(format!(
            "--otlp-sample-ratio {} is not between 0 and 1",
            cfg.sample_ratio
        ));
    }
    let stats = Arc::new(Stats::default());
    let (tx, rx) = mpsc::sync_channel(QUEUE_MAX);
    let tracer = Tracer::new(tx.clone(), stats.clone());
    tracing::subscriber::set_global_default(tracer)
        .map_err(|e| format!("installing the tracer: {e}"))?;
    let s = stats.clone();
    let shown = target.shown();
    std::thread::Builder::new()
        .name("im-otlp".into())
        .spawn(move || export::run(rx, target, cfg.service, cfg.instance, s))
        .map_err(|e| format!("spawning the OTLP exporter: {e}"))?;
    let _ = INSTALLED.set((tx, stats));
    THRESHOLD.store(threshold(cfg.sample_ratio), Ordering::Relaxed);
    log::info!(
        "tracing: exporting to {shown} (OTLP/HTTP), {} of sends sampled",
        cfg.sample_ratio
    );
    Ok(())
}

fn threshold(ratio: f64) -> u64 {
    if ratio <= 0.0 {
        0
    } else if ratio >= 1.0 {
        u64::MAX
    } else {
        ((ratio * u64::MAX as f64) as u64).max(1)
    }
}

/// Whether this thread records spans: a record that arrives traced is followed only then.
/// (Asked only of traced records: a look at the thread's dispatcher.)
pub fn on() -> bool {
    tracing::dispatcher::get_default(|d| d.is::<Tracer>())
}

/// Whether to trace the send at hand: off, one relaxed load and a branch.
#[inline]
pub fn sample() -> bool {
    match THRESHOLD.load(Ordering::Relaxed) {
        0 => false,
        u64::MAX => true,
        t => next_random() <= t,
    }
}

/// The context a record produced under `span` carries (`None` for a span not recorded).
pub fn context(span: &tracing::Span) -> Option<TraceParent> {
    span.with_subscriber(|(id, dispatch)| dispatch.downcast_ref::<Tracer>()?.context(id))
        .flatten()
}

/// Exports what is queued, waiting at most `timeout` (at shutdown).
pub fn flush(timeout: Duration) {
    let Some((tx, _)) = INSTALLED.get() else {
        return;
    };
    let deadline = std::time::Instant::now() + timeout;
    let (ack, done) = mpsc::sync_channel(1);
    let mut msg = Msg::Flush(ack);
    // A full queue empties as the exporter works: wait for room, within the timeout.
    loop {
        match tx.try_send(msg) {
            Ok(()) => break,
            Err(mpsc::TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

/// The exporter's counters in Prometheus text (nothing when tracing is off).
pub fn render(out: &mut String) {
    let Some((_, stats)) = INSTALLED.get() else {
        return;
    };
    let mut p = im_shared::metrics::Prom::new(out);
    for (name, help, v) in [
        (
            "im_trace_spans_exported_total",
            "spans the OTLP collector accepted",
            &stats.exported,
        ),
        (
            "im_trace_spans_dropped_total",
            "spans lost: the export queue was full, or the collector refused or missed their batch",
            &stats.dropped,
        ),
        (
            "im_trace_export_failures_total",
            "OTLP export requests that failed",
            &stats.export_failures,
        ),
    ] {
        p.single(
            name,
            im_shared::metrics::Kind::Counter,
            help,
            &[],
            v.load(Ordering::Relaxed),
        );
    }
}

pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

thread_local! {
    /// xorshift64*, seeded from the OS once per thread: ids and sampling need to be unique
    /// and uniform, not secret.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: the time, the process and the thread, so that threads and
        // processes still draw different ids.
        let here = &b as *const _ as u64;
        let mixed = unix_ns() ^ (std::process::id() as u64).rotate_left(32) ^ here;
        b = im_shared::conv::mix64(mixed).to_ne_bytes();
    }
    u64::from_ne_bytes(b) | 1
}

fn next_random() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

pub(crate) fn random_span_id() -> u64 {
    loop {
        let id = next_random();
        if id != 0 {
            return id;
        }
    }
}

pub(crate) fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_span_id().to_be_bytes());
    id[8..].copy_from_slice(&next_random().to_be_bytes());
    id
}

#[cfg(test)]
mod tests;

/// For other crates' unit tests: a tracer of their own (install it with
/// `tracing::dispatcher::with_default`) whose finished spans they read back, no exporter.
pub mod testing {
    use super::*;

    /// A finished span, as a test reads it.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Captured {
        pub name: &'static str,
        pub trace_id: [u8; 16],
        pub span_id: [u8; 8],
        pub parent: Option<[u8; 8]>,
        pub error: bool,
        /// Attributes, values as text.
        pub attrs: Vec<(&'static str, String)>,
    }

    impl Captured {
        pub fn attr(&self, key: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    pub struct Capture(mpsc::Receiver<Msg>);

    impl Capture {
        /// The spans finished since the last call, in the order they ended.
        pub fn take(&self) -> Vec<Captured> {
            let mut out = Vec::new();
            while let Ok(Msg::Span(s)) = self.0.try_recv() {
                out.push(Captured {
                    name: s.name,
                    trace_id: s.trace_id,
                    span_id: s.span_id,
                    parent: s.parent,
                    error: s.error,
                    attrs: s
                        .attrs
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                Value::Str(s) => s.clone(),
                                Value::Int(i) => i.to_string(),
                                Value::Bool(b) => b.to_string(),
                                Value::F64(f) => f.to_string(),
                            };
                            (*k, v)
                        })
                        .collect(),
                });
            }
            out
        }
    }

    /// A dispatcher recording this crate's spans, and where they land.
    pub fn capture() -> (tracing::Dispatch, Capture) {
        let (tx, rx) = mpsc::sync_channel(QUEUE_MAX);
        let tracer = Tracer::new(tx, Arc::new(Stats::default()));
        (tracing::Dispatch::new(tracer), Capture(rx))
    }
}

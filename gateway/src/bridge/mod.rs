//! The gateway's bridge (ARCHITECTURE.md, "Processes"): threads beside the shards that own
//! the bus clients (Kafka, or the in-process bus in standalone) and the presence writer.
//!
//! - **up** (`up.rs`) — drains the shards' rings: `im.upstream` records go to the producer (on
//!   Kafka: acks=all, idempotent, a few ms of linger); presence changes go to the presence
//!   writer. A record the producer refuses (its bounded queue is full) or cannot deliver
//!   within `produce_timeout_ms` (the broker is down) is answered at once with a retryable
//!   `error` carrying the client's `cid`: senders never wait without bound and nothing
//!   queues without bound.
//! - **down** (`down.rs`) — consumes this gateway's own topic `im.downstream.<gateway-id>` from
//!   its end (what was sent to connections before this process started is for connections
//!   that are gone) and puts each record on the shard rings: a `Deliver` becomes one shared
//!   frame and, per home shard, one `FanoutMany` listing that shard's users (a group message
//!   is one ring entry per shard, not one per member); a `Reply` goes to the connection's
//!   shard. It records how old each record is (`im_bridge_downstream_age_milliseconds`), and
//!   drops a `msg` that would take its conversation backwards (`order.rs`).
//! - **trace** (`trace.rs`) — where a sampled send's trace starts and ends (README.md,
//!   "Tracing"); nothing when tracing is off.
//! - **presence** (`crate::presence`) — writes the changes in batches to a `Presence` (Redis,
//!   or the process's memory in standalone).

mod down;
mod order;
mod trace;
mod up;

use crate::presence;
use gateway_core::arena::Frame;
use gateway_core::bridge::BridgeEnd;
use gateway_core::codec::{self, opcode};
use im_bus::presence::Presence;
use im_bus::{Bus, Start};
use im_shared::metrics::{ErrorCounts, Kind, MillisHistogram, Prom};
use im_shared::records::topics;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// Topic-safe gateway id (see `records::topic_safe_id`).
    pub gateway_id: String,
    /// How long an upstream record may wait for the broker before its sender gets `error`.
    pub produce_timeout_ms: u32,
    /// How long the producer may hold a record to batch it with others.
    pub linger_ms: u32,
}

/// Counters, rendered with the gateway's `/metrics`.
#[derive(Default, Debug)]
pub struct BridgeStats {
    pub produced_total: AtomicU64,
    pub produce_refused_total: AtomicU64,
    pub produce_failed_total: AtomicU64,
    pub produce_expired_total: AtomicU64,
    pub downstream_records_total: AtomicU64,
    pub downstream_bad_records_total: AtomicU64,
    pub downstream_dropped_total: AtomicU64,
    /// `msg` records dropped because a later one of their conversation went out first
    /// (`order.rs`).
    pub downstream_out_of_order_total: AtomicU64,
    /// Presence events sent to logic (a user's connection opened or closed), and those the
    /// broker did not take (`crate::presence`).
    pub presence_events_total: Arc<AtomicU64>,
    pub presence_events_dropped_total: Arc<AtomicU64>,
    /// How old downstream records are when the bridge takes them (logic's produce → here:
    /// the broker's hop), from their CreateTime.
    pub downstream_age: MillisHistogram,
    /// `error` answers the bridge passed to connections, by code: logic's (a refused send,
    /// a database that is down) and the bridge's own (5030/5032 when the broker refused or
    /// lost a record).
    pub error_replies: ErrorCounts,
}

impl BridgeStats {
    pub fn render(&self, gateway_id: &str, out: &mut String) {
        let mut p = Prom::new(out);
        for (name, help, v) in [
            (
                "im_bridge_produced_total",
                "im.upstream records the broker acknowledged",
                &self.produced_total,
            ),
            (
                "im_bridge_produce_expired_total",
                "senders answered 5032 at the produce timeout while their record was still queued (it may yet be delivered)",
                &self.produce_expired_total,
            ),
            (
                "im_bridge_produce_refused_total",
                "records refused at once (producer queue full)",
                &self.produce_refused_total,
            ),
            (
                "im_bridge_produce_failed_total",
                "records the broker did not take in time",
                &self.produce_failed_total,
            ),
            (
                "im_bridge_downstream_records_total",
                "downstream records consumed",
                &self.downstream_records_total,
            ),
            (
                "im_bridge_downstream_bad_records_total",
                "downstream records that could not be decoded",
                &self.downstream_bad_records_total,
            ),
            (
                "im_bridge_downstream_dropped_total",
                "frames dropped because a shard ring stayed full",
                &self.downstream_dropped_total,
            ),
            (
                "im_bridge_downstream_out_of_order_total",
                "msg records dropped because a later one of their conversation went out first (an owner that woke from a pause)",
                &self.downstream_out_of_order_total,
            ),
            (
                "im_bridge_presence_events_total",
                "presence events sent to logic (a user's connection opened or closed)",
                &*self.presence_events_total,
            ),
            (
                "im_bridge_presence_events_dropped_total",
                "presence events the broker did not take (contacts learn of the change when they next ask)",
                &*self.presence_events_dropped_total,
            ),
        ] {
            let labels = [("gateway", gateway_id)];
            p.single(
                name,
                Kind::Counter,
                help,
                &labels,
                v.load(Ordering::Relaxed),
            );
        }
        self.downstream_age.render(
            &mut p,
            "im_bridge_downstream_age_milliseconds",
            "age of downstream records (since logic produced them) when the bridge takes them",
            &[("gateway", gateway_id)],
        );
        self.error_replies.render(
            &mut p,
            "im_bridge_error_replies_total",
            "error answers the bridge passed to connections (logic's, and its own 5030/5032 when the broker refused or lost a record), by code; those the shards made are im_gateway_error_frames_total",
            &[("gateway", gateway_id)],
        );
    }
}

pub struct BridgeHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BridgeHandle {
    /// Stops after the shards are gone: what they handed over is still produced (bounded by
    /// the produce timeout) and their last presence changes written.
    pub fn stop(self) {
        // The up thread notices within its idle wait; the down thread within its poll.
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Creates the gateway's downstream topic (one partition: the gateway reads it alone),
/// positions the consumer at its end, then starts the threads. Returns once the bridge is
/// ready, so nothing routed to this gateway after its first connection can be missed.
/// `stats` may be shared with the gateway's `/metrics` beforehand (`BridgeStats::render`).
pub fn start(
    cfg: BridgeConfig,
    bus: Arc<dyn Bus>,
    presence: Arc<dyn Presence>,
    end: BridgeEnd,
    stats: Arc<BridgeStats>,
) -> Result<BridgeHandle, String> {
    let topic = topics::downstream(&cfg.gateway_id);
    let rt = runtime()?;
    rt.block_on(bus.ensure_topics(&[(&topic, 1), (topics::UPSTREAM, bus.partitions())]))?;
    let consumer = rt.block_on(bus.partition_consumer(&topic, &[(0, Start::End)]))?;
    // The sender is answered at `produce_timeout_ms`; the record itself is retried for much
    // longer (`im_bus::RECORD_TIMEOUT_MS`), so a broker restart does not time it out locally.
    let producer = bus.producer(cfg.linger_ms, im_bus::RECORD_TIMEOUT_MS)?;

    let BridgeEnd { up: up_end, down } = end;
    let down = Arc::new(Mutex::new(down));
    let stop = Arc::new(AtomicBool::new(false));
    let (presence_tx, presence_rx) = mpsc::channel();
    let gw = cfg.gateway_id.clone();
    let events = Some(presence::Events {
        producer: producer.clone(),
        sent: stats.presence_events_total.clone(),
        dropped: stats.presence_events_dropped_total.clone(),
    });
    let mut threads = vec![spawn("im-presence", move || {
        presence::run_writer(presence, &gw, presence_rx, events)
    })?];
    let roots = Arc::new(trace::Roots::new(&cfg.gateway_id));
    let (d, s, st, r) = (down.clone(), stop.clone(), stats.clone(), roots.clone());
    threads.push(spawn("im-bridge-down", move || {
        down::run(rt, consumer, d, s, st, r)
    })?);
    let up = up::Up::new(
        producer,
        stats,
        down,
        presence_tx,
        cfg.produce_timeout_ms.max(1),
        roots,
    );
    let s = stop.clone();
    threads.push(spawn("im-bridge-up", move || up.run(up_end, s))?);
    log::info!(
        "bridge ready on the {}: consuming {topic}, producing {}",
        bus.describe(),
        topics::UPSTREAM
    );
    Ok(BridgeHandle { stop, threads })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| format!("spawning {name}: {e}"))
}

/// The down thread's runtime (the bus's consumers are async; this thread drives one).
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for the bridge: {e}"))
}

/// A client frame from JSON bytes.
fn frame(json: &[u8]) -> Frame {
    codec::server_frame(opcode::TEXT, json).into()
}

//! The gateway's bridge (ARCHITECTURE.md, "Processes"): threads beside the shards that own
//! the bus clients (Kafka, or the in-process bus in standalone) and the presence writer.
//!
//! - **up** — drains the shards' rings: `im.upstream` records go to the producer (on Kafka:
//!   acks=all, idempotent, a few ms of linger); presence changes go to the presence writer.
//!   A record the producer refuses (its bounded queue is full) or cannot deliver within
//!   `produce_timeout_ms` (the broker is down) is answered at once with a retryable `error`
//!   carrying the client's `cid`: senders never wait without bound and nothing queues without
//!   bound.
//! - **down** — consumes this gateway's own topic `im.downstream.<gateway-id>` from its end
//!   (what was sent to connections before this process started is for connections that are
//!   gone) and puts each record on the shard rings: a `Deliver` becomes one shared frame and a
//!   `Fanout` per user to the user's home shard; a `Reply` goes to the connection's shard.
//! - **presence** — `presence::run_writer` (Redis), or `MemoryPresence` in standalone.

use crate::bus::{self, Bus, Consumer, Done, Producer, SendError, Start};
use crate::presence::{self, Change, MemoryPresence};
use gateway_core::arena::Frame;
use gateway_core::bridge::{self as ring, BridgeEnd, DownEnd, UpEnd, UpMsg};
use gateway_core::codec::{self, opcode};
use gateway_core::mesh::{ConnRef, ShardMsg};
use im_shared::protocol;
use im_shared::records::{self, topics, DownstreamBody, UpstreamBody, Versioned};
use im_shared::ErrorCode;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the bridge writes presence.
#[derive(Clone)]
pub enum PresenceSink {
    /// Redis (the distributed mode); entries expire `ttl_s` after their last refresh.
    Redis { url: String, ttl_s: u64 },
    /// The process's own table (standalone: logic reads it in the same process).
    Memory(Arc<MemoryPresence>),
}

#[derive(Clone)]
pub struct BridgeConfig {
    /// Topic-safe gateway id (see `records::topic_safe_id`).
    pub gateway_id: String,
    pub presence: PresenceSink,
    /// How long an upstream record may wait for the broker before its sender gets `error`.
    pub produce_timeout_ms: u32,
    pub linger_ms: u32,
}

/// Counters, rendered with the gateway's `/metrics`.
#[derive(Default, Debug)]
pub struct BridgeStats {
    pub produced_total: AtomicU64,
    pub produce_refused_total: AtomicU64,
    pub produce_failed_total: AtomicU64,
    pub downstream_records_total: AtomicU64,
    pub downstream_bad_records_total: AtomicU64,
    pub downstream_dropped_total: AtomicU64,
}

impl BridgeStats {
    pub fn render(&self, gateway_id: &str, out: &mut String) {
        for (name, help, v) in [
            (
                "im_bridge_produced_total",
                "im.upstream records the broker acknowledged",
                &self.produced_total,
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
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{gateway=\"{gateway_id}\"}} {}", v.load(Ordering::Relaxed));
        }
    }
}

pub struct BridgeHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<BridgeStats>,
}

impl BridgeHandle {
    /// Stops after the shards are gone: what they handed over is still produced (bounded by
    /// the produce timeout) and their last presence changes written.
    pub fn stop(self) {
        // The up thread notices within its 100 ms wait.
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
    end: BridgeEnd,
    stats: Arc<BridgeStats>,
) -> Result<BridgeHandle, String> {
    let topic = topics::downstream(&cfg.gateway_id);
    let rt = runtime()?;
    rt.block_on(bus.ensure_topics(&[(&topic, 1), (topics::UPSTREAM, bus.partitions())]))?;
    let consumer = rt.block_on(bus.partition_consumer(&topic, &[(0, Start::End)]))?;
    let producer = bus.producer(cfg.linger_ms, cfg.produce_timeout_ms.max(1))?;
    let up = Up {
        producer,
        outcomes: Arc::new(Outcomes {
            failed: Mutex::new(Vec::new()),
            stats: stats.clone(),
        }),
    };

    let BridgeEnd { up: end_up, down } = end;
    let down = Arc::new(Mutex::new(down));
    let stop = Arc::new(AtomicBool::new(false));
    let (presence_tx, presence_rx) = mpsc::channel();
    let mut threads = Vec::new();
    let (gw, sink) = (cfg.gateway_id.clone(), cfg.presence.clone());
    threads.push(spawn("im-presence", move || match sink {
        PresenceSink::Redis { url, ttl_s } => presence::run_writer(&url, &gw, ttl_s, presence_rx),
        PresenceSink::Memory(table) => {
            for change in presence_rx {
                table.apply(&gw, change);
            }
        }
    })?);
    let (d, s, st) = (down.clone(), stop.clone(), stats.clone());
    threads.push(spawn("im-bridge-down", move || {
        run_down(rt, consumer, d, s, st)
    })?);
    let s = stop.clone();
    threads.push(spawn("im-bridge-up", move || {
        run_up(end_up, up, down, presence_tx, s)
    })?);
    log::info!(
        "bridge ready on the {}: consuming {topic}, producing {}",
        bus.describe(),
        topics::UPSTREAM
    );
    Ok(BridgeHandle {
        stop,
        threads,
        stats,
    })
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

/// A record the bus did not take: its connection and the `cid` of its `send`.
type Failed = (u64, Option<String>);

/// The producer side of the up thread.
struct Up {
    producer: Arc<dyn Producer>,
    outcomes: Arc<Outcomes>,
}

/// What delivery callbacks report to the up thread: counters, and the records the bus did
/// not take, for `error` answers.
struct Outcomes {
    failed: Mutex<Vec<Failed>>,
    stats: Arc<BridgeStats>,
}

impl Up {
    /// The callback that counts a record's outcome and notes a failure for its sender (the
    /// bus hands the record back on failure, so the `cid` is decoded only then).
    fn done(&self, conn: u64) -> Done {
        let o = self.outcomes.clone();
        Box::new(move |r: Result<(), bus::Undelivered<'_>>| match r {
            Ok(()) => {
                o.stats.produced_total.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, payload)) => {
                o.stats.produce_failed_total.fetch_add(1, Ordering::Relaxed);
                log::warn!("bridge: an upstream record was not delivered: {e}");
                let cid = origin_of(payload).and_then(|(_, cid)| cid);
                o.failed.lock().expect("not poisoned").push((conn, cid));
            }
        })
    }
}

/// The requesting connection and `cid` of an encoded upstream record.
fn origin_of(payload: &[u8]) -> Option<(u64, Option<String>)> {
    let r = records::Upstream::from_bytes(payload).ok()?;
    let cid = match r.body {
        Some(UpstreamBody::Send(s)) => Some(s.cid),
        _ => None,
    };
    Some((r.conn, cid))
}

const UP_BATCH_MAX: usize = 4096;

fn run_up(
    mut up: UpEnd,
    producer: Up,
    down: Arc<Mutex<DownEnd>>,
    presence: mpsc::Sender<Change>,
    stop: Arc<AtomicBool>,
) {
    let mut batch = Vec::with_capacity(UP_BATCH_MAX);
    let mut key = String::new();
    let mut refusals: Vec<(u64, Option<String>, ErrorCode)> = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if up.is_empty() && !stopping {
            up.waker().prepare_sleep();
            if up.is_empty() {
                // Wake for the shards, or to serve delivery reports while records are out.
                let ms = if producer.producer.in_flight() > 0 {
                    5
                } else {
                    100
                };
                wait_fd(up.waker().fd(), ms);
            }
            up.waker().cancel_sleep();
        }
        batch.clear();
        up.drain(UP_BATCH_MAX, &mut batch);
        for msg in batch.drain(..) {
            match msg {
                UpMsg::Record {
                    conv,
                    conn,
                    payload,
                } => {
                    key.clear();
                    let _ = write!(key, "{conv}");
                    let done = producer.done(ring::conn_token(conn));
                    let sent =
                        producer
                            .producer
                            .send(topics::UPSTREAM, None, &key, &payload, Some(done));
                    if let Err(e) = sent {
                        producer
                            .outcomes
                            .stats
                            .produce_refused_total
                            .fetch_add(1, Ordering::Relaxed);
                        let code = match e {
                            SendError::QueueFull => ErrorCode::Busy,
                            SendError::Failed(_) => ErrorCode::DependencyDown,
                        };
                        let cid = origin_of(&payload).and_then(|(_, cid)| cid);
                        refusals.push((ring::conn_token(conn), cid, code));
                    }
                }
                UpMsg::Online {
                    user,
                    conn,
                    jti,
                    device,
                } => {
                    let conn = ring::conn_token(conn);
                    let _ = presence.send(Change::Online {
                        user,
                        conn,
                        jti,
                        device,
                    });
                }
                UpMsg::Offline { user, conn } => {
                    let _ = presence.send(Change::Offline {
                        user,
                        conn: ring::conn_token(conn),
                    });
                }
                UpMsg::Refresh(users) => {
                    // In pieces, so one shard's refresh is not one huge Redis pipeline.
                    for chunk in users.chunks(presence::BATCH_MAX) {
                        let _ = presence.send(Change::Refresh(chunk.to_vec()));
                    }
                }
            }
        }
        let failed = std::mem::take(&mut *producer.outcomes.failed.lock().expect("not poisoned"));
        refusals.extend(
            failed
                .into_iter()
                .map(|(c, cid)| (c, cid, ErrorCode::DependencyDown)),
        );
        if !refusals.is_empty() {
            let mut d = down.lock().expect("not poisoned");
            for (conn, cid, code) in refusals.drain(..) {
                let msg = match code {
                    ErrorCode::Busy => {
                        "the message broker's queue is full: retry with the same cid"
                    }
                    _ => "the message broker is unavailable: retry with the same cid",
                };
                let mut json = Vec::new();
                protocol::encode_error(code, msg, cid.as_deref(), &mut json);
                let to = ring::conn_ref(conn);
                if to != ConnRef::NONE {
                    let _ = d.send(
                        to.shard,
                        ShardMsg::Reply {
                            to,
                            frame: frame(&json),
                        },
                    );
                }
            }
            d.flush();
        }
        if stopping && up.is_empty() {
            break;
        }
    }
    // The shards are gone: give what is in flight its chance, then stop.
    producer.producer.flush(Duration::from_secs(5));
}

fn wait_fd(fd: i32, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n > 0 {
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a u64 from our eventfd (non-blocking).
        unsafe { libc::read(fd, (&mut buf as *mut u64).cast(), 8) };
    }
}

fn frame(json: &[u8]) -> Frame {
    codec::server_frame(opcode::TEXT, json).into()
}

/// How long the down thread waits for room in a shard ring before dropping a frame (the
/// client's sync recovers it); meanwhile Kafka holds the rest.
const RING_WAIT: Duration = Duration::from_secs(1);

fn run_down(
    rt: tokio::runtime::Runtime,
    mut consumer: Box<dyn Consumer>,
    down: Arc<Mutex<DownEnd>>,
    stop: Arc<AtomicBool>,
    stats: Arc<BridgeStats>,
) {
    while !stop.load(Ordering::Acquire) {
        // Bounded, so a stop is noticed within 100 ms.
        let next = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await
        });
        let Ok(result) = next else {
            continue;
        };
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                log::warn!("bridge: downstream consume error: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        stats
            .downstream_records_total
            .fetch_add(1, Ordering::Relaxed);
        let rec = match records::Downstream::from_bytes(&m.payload) {
            Ok(r) => r,
            Err(e) => {
                stats
                    .downstream_bad_records_total
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "bridge: skipping downstream record at offset {}: {e}",
                    m.offset
                );
                continue;
            }
        };
        let mut d = down.lock().expect("not poisoned");
        let shards = d.shards();
        match rec.body {
            Some(DownstreamBody::Deliver(del)) => {
                let f = frame(&del.json);
                let except = ring::conn_ref(del.except_conn);
                for user in del.users {
                    let msg = ShardMsg::Fanout {
                        user,
                        frame: f.clone(),
                        except,
                    };
                    push(&mut d, ring::home_shard(user, shards), msg, &stats);
                }
            }
            Some(DownstreamBody::Reply(r)) => {
                let to = ring::conn_ref(r.conn);
                if to != ConnRef::NONE && (to.shard as usize) < shards {
                    push(
                        &mut d,
                        to.shard,
                        ShardMsg::Reply {
                            to,
                            frame: frame(&r.json),
                        },
                        &stats,
                    );
                }
            }
            Some(DownstreamBody::Close(c)) => {
                let to = ring::conn_ref(c.conn);
                if to != ConnRef::NONE && (to.shard as usize) < shards {
                    push(&mut d, to.shard, ShardMsg::Kick { to }, &stats);
                }
            }
            None => {}
        }
        d.flush();
    }
}

/// Puts `msg` on a shard ring, waiting (bounded) while the shard catches up.
fn push(d: &mut DownEnd, shard: u16, mut msg: ShardMsg, stats: &BridgeStats) {
    let deadline = Instant::now() + RING_WAIT;
    loop {
        match d.send(shard, msg) {
            Ok(()) => return,
            Err(m) if Instant::now() < deadline => {
                msg = m;
                d.flush();
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(_) => {
                stats
                    .downstream_dropped_total
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

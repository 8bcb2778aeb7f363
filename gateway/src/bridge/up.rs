//! The up thread: drains the shards' rings, produces `im.upstream` records, forwards
//! presence changes, and answers the senders of records the bus refused or lost.

use super::trace::Roots;
use super::{frame, BridgeStats};
use gateway_core::bridge::{DownEnd, UpEnd};
use gateway_core::msg::{conn_ref, conn_token, ConnRef, ShardMsg, UpMsg};
use im_bus::presence::{Change, BATCH_MAX};
use im_bus::{Done, Producer, SendError, Undelivered};
use im_shared::metrics::count_rarely;
use im_shared::protocol;
use im_shared::records::{self, topics, UpstreamBody, Versioned};
use im_shared::ErrorCode;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Messages taken from the shard rings per turn.
const UP_BATCH_MAX: usize = 4096;
/// How long the idle up thread sleeps: short while records are out (delivery reports to
/// serve), long otherwise (a shard's push wakes it anyway).
const WAIT_IN_FLIGHT_MS: i32 = 5;
const WAIT_IDLE_MS: i32 = 100;
/// How long records in flight may still be delivered once the shards are gone.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// A connection whose record was not taken, its `send`'s cid, and the code to answer.
type Refusal = (u64, Option<String>, ErrorCode);
/// Outcomes reported by the delivery callbacks (on the bus's thread): the record's number,
/// and whether it was delivered.
type Settled = Arc<Mutex<Vec<(u64, bool)>>>;

/// A record whose outcome is not known yet; its sender is answered 5032 at `due`.
struct InFlight {
    conn: u64,
    due: Instant,
    /// Kept (not copied: the bus copied it) to find the `cid` if its sender is answered.
    payload: Box<[u8]>,
    /// The trace of a sampled send (`trace.rs`), ended if the bridge answers it.
    trace: Option<[u8; 16]>,
}

pub(super) struct Up {
    producer: Arc<dyn Producer>,
    stats: Arc<BridgeStats>,
    down: Arc<Mutex<DownEnd>>,
    presence: mpsc::Sender<Change>,
    refusals: Vec<Refusal>,
    key: String,
    /// Records by number in produce order, so also in due order: record `first + i` is
    /// `in_flight[i]`, `None` once settled or answered. The produce timeout is ours, not the
    /// bus's (see `RECORD_TIMEOUT_MS`); the front leaves at its due time at the latest, so
    /// this holds at most one timeout's worth of records.
    in_flight: VecDeque<Option<InFlight>>,
    first: u64,
    settled: Settled,
    timeout: Duration,
    /// The clock, read once per turn.
    now: Instant,
    roots: Arc<Roots>,
}

impl Up {
    pub(super) fn new(
        producer: Arc<dyn Producer>,
        stats: Arc<BridgeStats>,
        down: Arc<Mutex<DownEnd>>,
        presence: mpsc::Sender<Change>,
        produce_timeout_ms: u32,
        roots: Arc<Roots>,
    ) -> Up {
        Up {
            producer,
            stats,
            down,
            presence,
            refusals: Vec::new(),
            key: String::new(),
            in_flight: VecDeque::new(),
            first: 0,
            settled: Arc::default(),
            timeout: Duration::from_millis(produce_timeout_ms as u64),
            now: Instant::now(),
            roots,
        }
    }

    /// Runs until `stop` is set and the shards' rings are empty.
    pub(super) fn run(mut self, mut end: UpEnd, stop: Arc<AtomicBool>) {
        let mut batch = Vec::with_capacity(UP_BATCH_MAX);
        loop {
            let stopping = stop.load(Ordering::Acquire);
            if end.is_empty() && !stopping {
                self.sleep(&end);
            }
            batch.clear();
            end.drain(UP_BATCH_MAX, &mut batch);
            self.now = Instant::now();
            for msg in batch.drain(..) {
                self.forward(msg);
            }
            self.settle();
            self.answer_refusals();
            if stopping && end.is_empty() {
                break;
            }
        }
        // The shards are gone: give what is in flight its chance, then stop.
        self.producer.flush(FINAL_FLUSH);
    }

    fn sleep(&self, end: &UpEnd) {
        end.waker().prepare_sleep();
        if end.is_empty() {
            let ms = if self.producer.in_flight() > 0 {
                WAIT_IN_FLIGHT_MS
            } else {
                WAIT_IDLE_MS
            };
            wait_fd(end.waker().fd(), ms);
        }
        end.waker().cancel_sleep();
    }

    fn forward(&mut self, msg: UpMsg) {
        match msg {
            UpMsg::Record {
                conv,
                conn,
                payload,
            } => self.produce(conv, conn, payload),
            UpMsg::Online {
                user,
                conn,
                jti,
                device,
            } => {
                let conn = conn_token(conn);
                let _ = self.presence.send(Change::Online {
                    user,
                    conn,
                    jti,
                    device,
                });
            }
            UpMsg::Offline { user, conn } => {
                let conn = conn_token(conn);
                let _ = self.presence.send(Change::Offline { user, conn });
            }
            UpMsg::Refresh(users) => {
                // In pieces, so one shard's refresh is not one huge write.
                for chunk in users.chunks(BATCH_MAX) {
                    let _ = self.presence.send(Change::Refresh(chunk.to_vec()));
                }
            }
        }
    }

    fn produce(&mut self, conv: im_shared::Conv, conn: ConnRef, payload: Box<[u8]>) {
        self.key.clear();
        let _ = write!(self.key, "{conv}");
        let conn = conn_token(conn);
        let no = self.first + self.in_flight.len() as u64;
        let started = if im_telemetry::sample() {
            let cid = cid_of(&payload).unwrap_or_default();
            self.roots.start(&self.key, &cid, self.now)
        } else {
            None
        };
        let (span, trace) = match started {
            Some(s) => (Some(s.upstream), Some(s.context)),
            None => (None, None),
        };
        // Kept to mark the span if the record is refused at once (`done` is then dropped
        // without being called).
        let refused_span = span.clone();
        let done = self.done(no, span);
        let sent = self.producer.send_traced(
            topics::UPSTREAM,
            None,
            &self.key,
            &payload,
            trace.as_ref(),
            Some(done),
        );
        let trace = trace.map(|t| t.trace_id);
        if let Err(e) = sent {
            self.stats
                .produce_refused_total
                .fetch_add(1, Ordering::Relaxed);
            let code = match e {
                SendError::QueueFull => ErrorCode::Busy,
                SendError::Failed(_) => ErrorCode::DependencyDown,
            };
            // Its number is not taken: `done` is never called for a refused record.
            self.refusals.push((conn, cid_of(&payload), code));
            if let Some(t) = &trace {
                self.roots.refused(t);
            }
            if let Some(span) = refused_span {
                span.record("otel.status_code", "error");
            }
            return;
        }
        let due = self.now + self.timeout;
        self.in_flight.push_back(Some(InFlight {
            conn,
            due,
            payload,
            trace,
        }));
    }

    /// Takes the outcomes the bus reported: a failed record's sender is answered 5032 now.
    /// Then answers 5032 to the senders of records still unknown at their due time. Such a
    /// record stays queued in the bus and may yet be delivered: the sender resends with the
    /// same cid and gets the one `sent`. Each sender is answered once, whichever comes first.
    fn settle(&mut self) {
        for (no, delivered) in std::mem::take(&mut *self.settled.lock().expect("not poisoned")) {
            let Some(slot) = no
                .checked_sub(self.first)
                .and_then(|i| self.in_flight.get_mut(i as usize))
            else {
                continue; // answered at its due time already
            };
            let Some(f) = slot.take() else { continue };
            if !delivered {
                let cid = cid_of(&f.payload);
                self.refusals.push((f.conn, cid, ErrorCode::DependencyDown));
                if let Some(t) = &f.trace {
                    self.roots.refused(t);
                }
            }
        }
        while let Some(front) = self.in_flight.front_mut() {
            match front {
                Some(f) if f.due > self.now => break,
                Some(_) => {
                    let f = front.take().expect("matched Some");
                    self.stats
                        .produce_expired_total
                        .fetch_add(1, Ordering::Relaxed);
                    let cid = cid_of(&f.payload);
                    self.refusals.push((f.conn, cid, ErrorCode::DependencyDown));
                    if let Some(t) = &f.trace {
                        self.roots.refused(t);
                    }
                }
                None => {}
            }
            self.in_flight.pop_front();
            self.first += 1;
        }
    }

    /// The callback that counts a record's outcome and reports it to `settle`, and ends
    /// the record's `im.upstream` span if it has one.
    fn done(&self, no: u64, span: Option<tracing::Span>) -> Done {
        let (stats, settled) = (self.stats.clone(), self.settled.clone());
        Box::new(move |r: Result<(), Undelivered<'_>>| {
            if let (Some(span), Err(_)) = (&span, &r) {
                span.record("otel.status_code", "error");
            }
            drop(span);
            let delivered = match r {
                Ok(()) => {
                    stats.produced_total.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err((e, _)) => {
                    // A broker outage fails them all: counted each, logged now and then.
                    if let Some(n) = count_rarely(&stats.produce_failed_total) {
                        log::warn!(
                            "bridge: an upstream record was not delivered ({e}); {n} so far"
                        );
                    }
                    false
                }
            };
            settled.lock().expect("not poisoned").push((no, delivered));
        })
    }

    /// Answers every refused or lost record with a retryable `error` to its connection.
    fn answer_refusals(&mut self) {
        if self.refusals.is_empty() {
            return;
        }
        let mut d = self.down.lock().expect("not poisoned");
        for (conn, cid, code) in self.refusals.drain(..) {
            self.stats.error_replies.count(code);
            let msg = match code {
                ErrorCode::Busy => "the message broker's queue is full: retry with the same cid",
                _ => "the message broker is unavailable: retry with the same cid",
            };
            let mut json = Vec::new();
            protocol::encode_error(code, msg, cid.as_deref(), &mut json);
            let to = conn_ref(conn);
            if to != ConnRef::NONE {
                let frame = frame(&json);
                let _ = d.send(to.shard, ShardMsg::Reply { to, frame });
            }
        }
        d.flush();
    }
}

/// The `cid` of an encoded upstream `send` record.
fn cid_of(payload: &[u8]) -> Option<String> {
    match records::Upstream::from_bytes(payload).ok()?.body {
        Some(UpstreamBody::Send(s)) => Some(s.cid),
        _ => None,
    }
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

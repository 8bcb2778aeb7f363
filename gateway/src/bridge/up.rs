//! The up thread: drains the shards' rings, produces `im.upstream` records, forwards
//! presence changes, and answers the senders of records the bus refused or lost.

use super::{frame, BridgeStats};
use gateway_core::bridge::{DownEnd, UpEnd};
use gateway_core::msg::{conn_ref, conn_token, ConnRef, ShardMsg, UpMsg};
use im_bus::presence::{Change, BATCH_MAX};
use im_bus::{Done, Producer, SendError, Undelivered};
use im_shared::protocol;
use im_shared::records::{self, topics, UpstreamBody, Versioned};
use im_shared::ErrorCode;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

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
/// Records the bus failed to deliver: their connection and cid (filled by delivery callbacks
/// on the bus's thread).
type Failed = Arc<Mutex<Vec<(u64, Option<String>)>>>;
/// Numbers of the records whose outcome is known (filled by the delivery callbacks).
type Settled = Arc<Mutex<Vec<u64>>>;

/// A record whose outcome is not known yet; its sender is answered 5032 at `due`.
struct InFlight {
    conn: u64,
    /// Kept (not copied: the bus copied it) to find the `cid` if the answer is due.
    payload: Box<[u8]>,
}

pub(super) struct Up {
    producer: Arc<dyn Producer>,
    stats: Arc<BridgeStats>,
    failed: Failed,
    down: Arc<Mutex<DownEnd>>,
    presence: mpsc::Sender<Change>,
    refusals: Vec<Refusal>,
    key: String,
    /// Records in flight by number, the numbers in produce order with their due time, and
    /// the next number: the produce timeout is ours, not the bus's (see `RECORD_TIMEOUT_MS`).
    in_flight: std::collections::HashMap<u64, InFlight>,
    due: std::collections::VecDeque<(u64, std::time::Instant)>,
    settled: Settled,
    next_no: u64,
    timeout: Duration,
}

impl Up {
    pub(super) fn new(
        producer: Arc<dyn Producer>,
        stats: Arc<BridgeStats>,
        down: Arc<Mutex<DownEnd>>,
        presence: mpsc::Sender<Change>,
        produce_timeout_ms: u32,
    ) -> Up {
        Up {
            producer,
            stats,
            failed: Arc::default(),
            down,
            presence,
            refusals: Vec::new(),
            key: String::new(),
            in_flight: Default::default(),
            due: Default::default(),
            settled: Arc::default(),
            next_no: 0,
            timeout: Duration::from_millis(produce_timeout_ms as u64),
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
            for msg in batch.drain(..) {
                self.forward(msg);
            }
            self.expire();
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
        let no = self.next_no;
        self.next_no += 1;
        let done = self.done(conn, no);
        let sent = self
            .producer
            .send(topics::UPSTREAM, None, &self.key, &payload, Some(done));
        if let Err(e) = sent {
            self.stats
                .produce_refused_total
                .fetch_add(1, Ordering::Relaxed);
            let code = match e {
                SendError::QueueFull => ErrorCode::Busy,
                SendError::Failed(_) => ErrorCode::DependencyDown,
            };
            self.refusals.push((conn, cid_of(&payload), code));
            return;
        }
        self.in_flight.insert(no, InFlight { conn, payload });
        self.due
            .push_back((no, std::time::Instant::now() + self.timeout));
    }

    /// Forgets the records whose outcome came, and answers 5032 to the senders of those
    /// still unknown at their due time. Such a record stays queued in the bus and may yet be
    /// delivered: the sender resends with the same cid and gets the one `sent`.
    fn expire(&mut self) {
        for no in std::mem::take(&mut *self.settled.lock().expect("not poisoned")) {
            self.in_flight.remove(&no);
        }
        let now = std::time::Instant::now();
        while let Some(&(no, due)) = self.due.front() {
            if due > now && !self.in_flight.is_empty() {
                break;
            }
            self.due.pop_front();
            if let Some(f) = self.in_flight.remove(&no) {
                self.stats
                    .produce_expired_total
                    .fetch_add(1, Ordering::Relaxed);
                let cid = cid_of(&f.payload);
                self.refusals.push((f.conn, cid, ErrorCode::DependencyDown));
            }
        }
    }

    /// The callback that counts a record's outcome and notes a failure for its sender (the
    /// bus hands the record back on failure, so the `cid` is decoded only then).
    fn done(&self, conn: u64, no: u64) -> Done {
        let (stats, failed) = (self.stats.clone(), self.failed.clone());
        let settled = self.settled.clone();
        Box::new(move |r: Result<(), Undelivered<'_>>| {
            match r {
                Ok(()) => {
                    stats.produced_total.fetch_add(1, Ordering::Relaxed);
                }
                Err((e, payload)) => {
                    stats.produce_failed_total.fetch_add(1, Ordering::Relaxed);
                    log::warn!("bridge: an upstream record was not delivered: {e}");
                    let cid = cid_of(payload);
                    failed.lock().expect("not poisoned").push((conn, cid));
                }
            }
            settled.lock().expect("not poisoned").push(no);
        })
    }

    /// Answers every refused or lost record with a retryable `error` to its connection.
    fn answer_refusals(&mut self) {
        let failed = std::mem::take(&mut *self.failed.lock().expect("not poisoned"));
        self.refusals.extend(
            failed
                .into_iter()
                .map(|(c, cid)| (c, cid, ErrorCode::DependencyDown)),
        );
        if self.refusals.is_empty() {
            return;
        }
        let mut d = self.down.lock().expect("not poisoned");
        for (conn, cid, code) in self.refusals.drain(..) {
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

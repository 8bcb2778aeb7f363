//! The shard: everything one core does for its connections, without I/O.
//!
//! A driver (io_uring, or epoll where io_uring is missing) feeds it accepted fds, received
//! bytes, send completions and the clock; the shard answers with a list of connections that
//! need I/O (`take_ready`) and, per connection, what to do (`plan`). All protocol work lives
//! here: the upgrade, framing, the close handshake, heartbeats, routing and backpressure. That
//! keeps the drivers thin and lets the tests drive a shard byte by byte.
//!
//! Routing in this process (the local router, until the logic service takes over sequencing):
//! a user's *home* shard (hash of the id) knows which shards hold the user's connections; a
//! conversation's *owner* shard (hash of the conversation id) assigns seq and message id.
//! A `send` travels origin → owner (sequenced; `sent` goes back to the origin) → home of each
//! party → every shard holding that party → its connections. Each hop is a FIFO ring, and one
//! owner sequences a conversation, so every device sees a conversation in seq order.
//!
//! Pipeline mode (a bridge is attached to the mesh port): `send`, `sync` and `read` become
//! `im.upstream` records handed to the bridge, which produces them to Kafka; logic sequences
//! and answers through this gateway's downstream topic, and the bridge puts those answers on
//! the same rings (`Fanout` to a user's home shard, `Reply` to one connection). Each
//! connection's open and close go up too, for presence.

use crate::arena::{Arena, Frame, RxState, NONE};
use crate::bridge::{self, UpMsg};
use crate::codec::{self, close, opcode, FrameError};
use crate::conn::{io, Conn, State};
use crate::handshake::{self, Refusal};
use crate::idmap::IdMap;
use crate::mesh::{ConnRef, MeshPort, ShardMsg, Submit};
use crate::metrics::{self, ShardStats};
use crate::wheel::Wheel;
use im_shared::config::GatewayConfig;
use im_shared::conv::{mix64, Conv};
use im_shared::protocol::{self, Message, Request, Target};
use im_shared::records::{self, UpstreamBody, Versioned};
use im_shared::snowflake::Snowflake;
use im_shared::{jwt, ErrorCode};
use slab::Slab;
use std::collections::VecDeque;
use std::sync::Arc;

/// Tells whether a token id (`jti`) has been revoked (logout). Called at each upgrade; it
/// must be cheap and must not block (an in-memory set, or a local cache of Redis).
pub type RevokedCheck = Arc<dyn Fn(&str, u64) -> bool + Send + Sync>;

/// Appends more Prometheus text to `/metrics` (the pipeline bridge's counters).
pub type MetricsHook = Arc<dyn Fn(&mut String) + Send + Sync>;

/// The clock, read once per loop turn by the driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct Now {
    /// Monotonic milliseconds (any origin; only differences matter).
    pub mono_ms: u64,
    /// Wall clock, Unix milliseconds (token expiry, message timestamps).
    pub unix_ms: u64,
}

/// What the driver should do for one connection now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IoPlan {
    /// Send these bytes (pointer stays valid until `on_sent`).
    pub send: Option<(*const u8, usize)>,
    /// Shut down our write side (after a close frame or HTTP answer went out).
    pub shutdown_wr: bool,
    /// Cancel the armed receive; its final completion comes through `recv_disarmed`.
    pub cancel_recv: bool,
    /// Cancel the in-flight send (a dead connection whose peer stopped reading would
    /// otherwise hold it forever); its completion comes through `on_sent`.
    pub cancel_send: bool,
    /// Arm a receive.
    pub arm_recv: bool,
    /// Close the fd and call `release`.
    pub close: bool,
}

/// Rate-limit credit units per message (credit is kept in sixteenths, so slow rates refill
/// within a tick).
const CREDIT_UNIT: u32 = 16;

/// Whether a connection may send one more message now.
enum Spend {
    Ok,
    /// Over the rate: refuse this message.
    Refuse,
    /// Refused a whole burst's worth and still sending: close with 1008.
    Close,
}

/// Linger after our close frame: how long we wait for the peer before closing anyway.
const LINGER_MS: u64 = 2_000;
/// Messages drained from the mesh per turn, so one busy peer cannot starve our sockets.
const MESH_BATCH_MAX: usize = 4096;
/// Conversations whose seq this shard keeps in memory (local router only).
const SEQ_CONVS_MAX: usize = 4_000_000;

struct Limits {
    /// Rate-limit refill per second and bucket size, in sixteenths of a message.
    credit_per_sec: u32,
    credit_max: i16,
    frame_bytes_max: usize,
    outbound_bytes_max: usize,
    conns_max: usize,
    tick_ms: u64,
    heartbeat_ticks: u32,
    handshake_ticks: u32,
    linger_ticks: u32,
    presence_refresh_ticks: u32,
}

pub struct Shard {
    id: u16,
    shards: u16,
    limits: Limits,
    secret: Arc<[u8]>,
    revoked: Option<RevokedCheck>,
    extra_metrics: Option<MetricsHook>,
    gateway_id: Arc<str>,
    driver: &'static str,
    conns: Slab<Conn>,
    next_gen: u32,
    wheel: Wheel,
    arena: Arena,
    /// user → first of the user's connections on this shard (the rest are linked through Conn).
    local: IdMap<u64, u32>,
    /// user (whose home is this shard) → bit mask of shards holding the user's connections.
    home: IdMap<u64, u64>,
    /// conversation (owned by this shard) → last seq.
    seqs: IdMap<Conv, u64>,
    snowflake: Snowflake,
    mesh: MeshPort,
    stats: Arc<[ShardStats]>,
    ready: Vec<u32>,
    inbox: VecDeque<ShardMsg>,
    expired: Vec<u32>,
    scratch: Vec<u8>,
    pong: Frame,
    /// A control Pong with no payload: what answers the usual empty Ping, without allocating.
    empty_pong: Frame,
    now: Now,
    shutting_down: bool,
    /// Tick at which the users on this shard are next sent up for a presence refresh.
    next_refresh: u32,
}

impl Shard {
    pub fn new(
        cfg: &GatewayConfig,
        mesh: MeshPort,
        stats: Arc<[ShardStats]>,
        driver: &'static str,
    ) -> Shard {
        Shard::with_revocations(cfg, mesh, stats, driver, None)
    }

    pub fn with_revocations(
        cfg: &GatewayConfig,
        mesh: MeshPort,
        stats: Arc<[ShardStats]>,
        driver: &'static str,
        revoked: Option<RevokedCheck>,
    ) -> Shard {
        let id = mesh.id();
        let shards = stats.len() as u16;
        let tick_ms = cfg.tick_ms.max(1);
        let ticks = |ms: u64| (ms.div_ceil(tick_ms)).clamp(1, u32::MAX as u64 / 4) as u32;
        let conns_max = cfg.conns_per_shard_max;
        Shard {
            id,
            shards,
            limits: Limits {
                credit_per_sec: cfg.msgs_per_sec_max.clamp(1, 1000) * CREDIT_UNIT,
                credit_max: (cfg.msgs_per_sec_max.clamp(1, 1000) * 2 * CREDIT_UNIT)
                    .min(i16::MAX as u32 / 2) as i16,
                frame_bytes_max: cfg.frame_bytes_max,
                outbound_bytes_max: cfg.outbound_bytes_max,
                conns_max,
                tick_ms,
                heartbeat_ticks: ticks(cfg.heartbeat_timeout_ms),
                handshake_ticks: ticks(cfg.handshake_timeout_ms),
                linger_ticks: ticks(LINGER_MS),
                presence_refresh_ticks: ticks(cfg.presence_refresh_ms),
            },
            secret: cfg.jwt_secret.clone().into(),
            revoked,
            extra_metrics: None,
            gateway_id: cfg.gateway_id.as_str().into(),
            driver,
            // Capacity is reserved, not touched: pages are only committed as connections arrive.
            conns: Slab::with_capacity(conns_max.min(1 << 20)),
            next_gen: 0,
            wheel: Wheel::new(4096, conns_max.min(1 << 20)),
            arena: Arena::new(cfg.arena_bytes_max),
            local: IdMap::default(),
            home: IdMap::default(),
            seqs: IdMap::default(),
            snowflake: Snowflake::new((cfg.worker_id + id) & im_shared::snowflake::WORKER_MAX),
            mesh,
            stats,
            ready: Vec::new(),
            inbox: VecDeque::new(),
            expired: Vec::new(),
            scratch: Vec::with_capacity(4096),
            pong: codec::server_frame(opcode::TEXT, protocol::PONG_JSON).into(),
            empty_pong: codec::server_frame(opcode::PONG, &[]).into(),
            now: Now::default(),
            shutting_down: false,
            next_refresh: 0,
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn set_metrics_hook(&mut self, hook: Option<MetricsHook>) {
        self.extra_metrics = hook;
    }

    fn st(&self) -> &ShardStats {
        &self.stats[self.id as usize]
    }

    fn tick(&self) -> u32 {
        (self.now.mono_ms / self.limits.tick_ms) as u32
    }

    /// Milliseconds until the wheel's next tick (how long the driver may sleep).
    pub fn sleep_ms(&self) -> u64 {
        let t = self.limits.tick_ms;
        t - self.now.mono_ms % t
    }

    pub fn set_now(&mut self, now: Now) {
        self.now = now;
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn fd(&self, key: u32) -> Option<i32> {
        self.conns.get(key as usize).map(|c| c.fd)
    }

    pub fn gen(&self, key: u32) -> Option<u32> {
        self.conns.get(key as usize).map(|c| c.gen)
    }

    /// Whether the peer has sent EOF (drivers stop watching its input).
    pub fn peer_eof(&self, key: u32) -> bool {
        self.conns.get(key as usize).is_some_and(|c| c.has(io::EOF))
    }

    /// The bytes a pending send should (re)try, for drivers that write synchronously.
    pub fn tx_front(&self, key: u32) -> Option<(*const u8, usize)> {
        let c = self.conns.get(key as usize)?;
        self.arena.tx(c.tx)?.front().map(|f| (f.as_ptr(), f.len()))
    }

    pub fn mesh(&self) -> &MeshPort {
        &self.mesh
    }

    // -----------------------------------------------------------------------------------------
    // Driver events.

    /// A new TCP connection. `None`: the shard is full or shutting down; close the fd.
    pub fn accept(&mut self, fd: i32) -> Option<u32> {
        ShardStats::add(&self.st().accepted_total, 1);
        if self.conns.len() >= self.limits.conns_max || self.shutting_down {
            ShardStats::add(&self.st().refused_full_total, 1);
            return None;
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let tick = self.tick();
        let key = self.conns.insert(Conn::new(fd, gen, tick)) as u32;
        self.wheel.insert(key, tick + self.limits.handshake_ticks);
        self.mark_ready(key);
        Some(key)
    }

    /// Bytes arrived. The shard may unmask them in place; they are not kept after the call
    /// unless a frame is incomplete (then the tail is copied into the arena).
    pub fn on_recv(&mut self, key: u32, data: &mut [u8]) {
        ShardStats::add(&self.st().bytes_in_total, data.len() as u64);
        let tick = self.tick();
        let Some(c) = self.conns.get_mut(key as usize) else {
            return;
        };
        if !matches!(c.state, State::Handshake | State::Open) {
            return; // closing: the peer's late bytes are read and dropped
        }
        // Refill the rate-limit bucket for the time since bytes last came (before moving it).
        let elapsed_ms =
            (tick.saturating_sub(c.last_seen) as u64 * self.limits.tick_ms).min(60_000) as i64;
        let refill = elapsed_ms * self.limits.credit_per_sec as i64 / 1000;
        c.credit = (c.credit as i64 + refill).min(self.limits.credit_max as i64) as i16;
        c.last_seen = tick;
        let mut rx = self.arena.take_rx(std::mem::replace(&mut c.rx, NONE));
        if rx.partial.is_empty() {
            let used = self.process(key, &mut rx, data);
            if used < data.len() && self.reading(key) {
                rx.partial.extend_from_slice(&data[used..]);
            }
        } else {
            rx.partial.extend_from_slice(data);
            let mut buf = std::mem::take(&mut rx.partial);
            let used = self.process(key, &mut rx, &mut buf);
            if used < buf.len() && self.reading(key) {
                buf.drain(..used);
                rx.partial = buf;
            }
        }
        if !self.reading(key) || rx.is_empty() {
            return;
        }
        // What a connection may hold is bounded by the frame limit (checked on the header) and
        // the upgrade-request limit; the arena as a whole by its budget.
        if !self.arena.fits(rx.partial.capacity() + rx.frag.capacity()) {
            if self.conns[key as usize].state == State::Handshake {
                let busy = handshake::json_error(
                    503,
                    ErrorCode::Busy.code(),
                    "server buffers are full; retry",
                );
                return self.http_answer(key, busy);
            }
            return self.begin_close(key, close::TRY_AGAIN, "server buffers are full");
        }
        let idx = self.arena.put_rx(rx);
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.rx = idx;
        }
    }

    /// The peer closed its side (recv returned 0).
    pub fn on_eof(&mut self, key: u32) {
        let Some(c) = self.conns.get_mut(key as usize) else {
            return;
        };
        c.io |= io::EOF;
        match c.state {
            State::Open | State::Handshake => {
                if c.state == State::Open {
                    ShardStats::add(&self.st().peer_resets_total, 1);
                }
                self.kill(key);
            }
            State::Linger => self.kill(key),
            // Still flushing our close frame; `plan` closes once it is out.
            State::Closing | State::Dead => self.mark_ready(key),
        }
    }

    /// A receive failed (reset, or any error other than running out of buffers).
    pub fn on_recv_error(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.io |= io::EOF;
            if c.state == State::Open {
                ShardStats::add(&self.st().peer_resets_total, 1);
            }
            self.kill(key);
        }
    }

    /// The armed receive ended (multishot finished, cancelled, or out of buffers).
    pub fn recv_disarmed(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.io &= !(io::RECV_ARMED | io::CANCELING);
            self.mark_ready(key);
        }
    }

    /// A send finished: `res` bytes taken, or a negative errno.
    pub fn on_sent(&mut self, key: u32, res: i32) {
        let Some(c) = self.conns.get_mut(key as usize) else {
            return;
        };
        c.io &= !(io::SEND_INFLIGHT | io::CANCELING_SEND);
        if res < 0 {
            // Already dead or not, it needs a plan: close once nothing is in flight.
            self.kill(key);
            self.mark_ready(key);
            return;
        }
        if self.arena.advance_tx(&mut c.tx, res as usize) > 0 {
            c.io &= !io::UPGRADE_UNSENT;
        }
        ShardStats::add(&self.stats[self.id as usize].bytes_out_total, res as u64);
        self.mark_ready(key);
    }

    /// What the driver should do for `key` now; updates the I/O flags as if it was done.
    pub fn plan(&mut self, key: u32) -> IoPlan {
        let mut plan = IoPlan::default();
        let Some(c) = self.conns.get_mut(key as usize) else {
            return plan;
        };
        c.io &= !io::READY;
        if c.state != State::Dead && !c.has(io::SEND_INFLIGHT) {
            if let Some(front) = self.arena.tx(c.tx).and_then(|t| t.front()) {
                plan.send = Some((front.as_ptr(), front.len()));
                c.io |= io::SEND_INFLIGHT;
            } else if c.state == State::Closing && !c.has(io::SHUT_WR) {
                plan.shutdown_wr = true;
                c.io |= io::SHUT_WR;
                if c.has(io::EOF) {
                    c.state = State::Dead;
                } else {
                    c.state = State::Linger;
                }
            }
        }
        if c.state == State::Dead {
            if c.has(io::RECV_ARMED) && !c.has(io::CANCELING) {
                plan.cancel_recv = true;
                c.io |= io::CANCELING;
            }
            if c.has(io::SEND_INFLIGHT) && !c.has(io::CANCELING_SEND) {
                plan.cancel_send = true;
                c.io |= io::CANCELING_SEND;
            }
            if !c.has(io::RECV_ARMED) && !c.has(io::SEND_INFLIGHT) {
                plan.close = true;
            }
        } else if !c.has(io::RECV_ARMED) && !c.has(io::EOF) {
            plan.arm_recv = true;
            c.io |= io::RECV_ARMED;
        }
        plan
    }

    /// The driver closed the fd: forget the connection.
    pub fn release(&mut self, key: u32) {
        if !self.conns.contains(key as usize) {
            return;
        }
        if self.conns[key as usize].state == State::Open {
            self.leave(key);
        }
        let c = self.conns.remove(key as usize);
        self.wheel.cancel(key);
        self.arena.release(c.rx, c.tx);
    }

    /// Connections whose I/O needs attention, into `out` (which should be empty).
    pub fn take_ready(&mut self, out: &mut Vec<u32>) {
        std::mem::swap(&mut self.ready, out);
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Drains cross-shard messages and handles them (bounded per call).
    pub fn poll_mesh(&mut self) {
        self.mesh.drain(MESH_BATCH_MAX, &mut self.inbox);
        self.run_inbox();
    }

    /// Advances the timing wheel to the current time.
    pub fn on_tick(&mut self) {
        let tick = self.tick();
        if self.mesh.has_bridge() && tick >= self.next_refresh {
            if self.next_refresh != 0 && !self.local.is_empty() {
                let users: Vec<u64> = self.local.keys().copied().collect();
                // A refresh that finds the ring full waits for the next one: the TTL covers three.
                let _ = self.mesh.send_up(UpMsg::Refresh(users), false);
            }
            self.next_refresh = tick + self.limits.presence_refresh_ticks;
        }
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(tick, &mut expired);
        for key in expired.drain(..) {
            let Some(c) = self.conns.get(key as usize) else {
                continue;
            };
            match c.state {
                State::Handshake => {
                    ShardStats::add(&self.st().handshake_timeouts_total, 1);
                    self.kill(key);
                }
                State::Open => {
                    let due = c.last_seen.saturating_add(self.limits.heartbeat_ticks);
                    if tick >= due {
                        ShardStats::add(&self.st().heartbeat_timeouts_total, 1);
                        self.begin_close(key, close::GOING_AWAY, "heartbeat timeout");
                    } else {
                        self.wheel.insert(key, due);
                    }
                }
                State::Closing | State::Linger => self.kill(key),
                State::Dead => {}
            }
        }
        self.expired = expired;
    }

    /// End of a loop turn: hand queued cross-shard messages over and publish gauges.
    pub fn end_turn(&mut self) {
        self.mesh.flush();
        let st = &self.stats[self.id as usize];
        ShardStats::set(&st.connections, self.conns.len() as u64);
        ShardStats::set(&st.ring_backlog, self.mesh.backlog_len() as u64);
        ShardStats::set(&st.timers_armed, self.wheel.armed() as u64);
        ShardStats::set(&st.arena_bytes, self.arena.bytes() as u64);
    }

    /// Whether the shard may block in the kernel: nothing to do until an event.
    pub fn idle(&self) -> bool {
        self.ready.is_empty() && self.inbox.is_empty() && !self.mesh.has_inbound()
    }

    /// Starts a graceful shutdown: close 1001 to every connection, refuse new ones.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            match self.conns[key as usize].state {
                State::Open => self.begin_close(key, close::GOING_AWAY, "server shutting down"),
                State::Handshake => self.kill(key),
                _ => {}
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Hard-closes every connection still open (the shutdown deadline passed).
    pub fn kill_all(&mut self) {
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            self.kill(key);
        }
    }

    pub fn count_recv_buffer_exhausted(&self) {
        ShardStats::add(&self.st().recv_buffer_exhausted_total, 1);
    }

    // -----------------------------------------------------------------------------------------
    // Bytes → frames → messages.

    fn reading(&self, key: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| matches!(c.state, State::Handshake | State::Open))
    }

    /// Consumes complete requests/frames from `buf`; returns the bytes used.
    fn process(&mut self, key: u32, rx: &mut RxState, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(c) = self.conns.get(key as usize) else {
                return buf.len();
            };
            match c.state {
                State::Handshake => match handshake::parse(&buf[pos..]) {
                    Ok(None) => return pos,
                    Ok(Some((req, n))) => {
                        self.on_http(key, req);
                        pos += n;
                    }
                    Err(Refusal::Status(status, reason)) => {
                        ShardStats::add(&self.st().refused_http_total, 1);
                        self.http_answer(key, handshake::json_error(status, 4000, reason));
                        return buf.len();
                    }
                },
                State::Open => {
                    match codec::parse_header(&buf[pos..], self.limits.frame_bytes_max) {
                        Ok(None) => return pos,
                        Err(e) => {
                            self.fail(key, e);
                            return buf.len();
                        }
                        Ok(Some(h)) => {
                            if buf.len() - pos < h.frame_len() {
                                return pos;
                            }
                            let (start, end) = (pos + h.header_len, pos + h.frame_len());
                            codec::unmask(&mut buf[start..end], h.mask);
                            self.on_frame(key, rx, h, &buf[start..end]);
                            pos = end;
                        }
                    }
                }
                _ => return buf.len(),
            }
        }
    }

    fn on_frame(&mut self, key: u32, rx: &mut RxState, h: codec::Header, payload: &[u8]) {
        ShardStats::add(&self.st().frames_in_total, 1);
        match h.opcode {
            opcode::PING => match self.spend(key) {
                Spend::Ok => {
                    let pong = if payload.is_empty() {
                        self.empty_pong.clone()
                    } else {
                        codec::server_frame(opcode::PONG, payload).into()
                    };
                    self.enqueue(key, pong)
                }
                Spend::Refuse => {}
                Spend::Close => self.begin_close(key, close::POLICY, "rate limit"),
            },
            opcode::PONG => {}
            opcode::CLOSE => match codec::check_close_payload(payload) {
                Ok(code) => self.begin_close(key, code, ""),
                Err(e) => self.fail(key, e),
            },
            opcode::TEXT | opcode::BINARY => {
                if rx.frag_opcode != 0 {
                    return self.fail(
                        key,
                        FrameError::Protocol("new message inside a fragmented one"),
                    );
                }
                if h.fin {
                    self.on_message(key, h.opcode, payload);
                } else {
                    rx.frag_opcode = h.opcode;
                    rx.frag.extend_from_slice(payload);
                }
            }
            _ => {
                // Continuation.
                if rx.frag_opcode == 0 {
                    return self.fail(key, FrameError::Protocol("continuation without a message"));
                }
                if rx.frag.len() + payload.len() > self.limits.frame_bytes_max {
                    return self.fail(key, FrameError::TooLarge);
                }
                rx.frag.extend_from_slice(payload);
                if h.fin {
                    let msg = std::mem::take(&mut rx.frag);
                    let op = std::mem::take(&mut rx.frag_opcode);
                    self.on_message(key, op, &msg);
                }
            }
        }
    }

    fn on_message(&mut self, key: u32, op: u8, payload: &[u8]) {
        if op == opcode::BINARY {
            return self.reply_error(
                key,
                ErrorCode::BadRequest,
                "binary frames are not supported: send JSON text frames",
                None,
            );
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.fail(key, FrameError::InvalidUtf8);
        };
        match self.spend(key) {
            Spend::Ok => {}
            Spend::Refuse => {
                let cid = protocol::parse_request(text).ok().and_then(|r| match r {
                    Request::Send { cid, .. } => Some(cid),
                    _ => None,
                });
                let msg = "rate limit: slow down and retry with the same cid";
                return self.reply_error(key, ErrorCode::RateLimited, msg, cid.as_deref());
            }
            Spend::Close => return self.begin_close(key, close::POLICY, "rate limit"),
        }
        match protocol::parse_request(text) {
            Ok(Request::Ping) => {
                let pong = self.pong.clone();
                self.enqueue(key, pong);
            }
            Ok(req) if self.mesh.has_bridge() => self.submit_upstream(key, req),
            Ok(Request::Send { cid, target: Target::User(to), content, content_type }) => {
                self.submit(key, &cid, to, content.into(), content_type.into())
            }
            Ok(Request::Send { cid, target: Target::Group(_), .. }) => self.reply_error(
                key,
                ErrorCode::Unavailable,
                "group messages need the logic service (`im logic`); this gateway runs its local router",
                Some(&cid),
            ),
            Ok(Request::Sync { .. } | Request::Read { .. }) => self.reply_error(
                key,
                ErrorCode::Unavailable,
                "history and read positions need the logic service (`im logic`)",
                None,
            ),
            Err(e) => self.reply_error(key, e.code, &e.message, e.cid.as_deref()),
        }
    }

    /// Takes one message's worth of rate-limit credit.
    fn spend(&mut self, key: u32) -> Spend {
        let max = self.limits.credit_max;
        let c = &mut self.conns[key as usize];
        c.credit = c.credit.saturating_sub(CREDIT_UNIT as i16);
        if c.credit >= 0 {
            Spend::Ok
        } else if c.credit > -max {
            Spend::Refuse
        } else {
            Spend::Close
        }
    }

    fn on_http(&mut self, key: u32, req: handshake::Request<'_>) {
        match req {
            handshake::Request::Upgrade {
                accept,
                token,
                protocol,
            } => {
                if self.shutting_down {
                    return self.http_answer(
                        key,
                        handshake::json_error(503, ErrorCode::Busy.code(), "shutting down"),
                    );
                }
                let verified = match token {
                    None => Err(
                        "missing token: pass ?token=<JWT> or Sec-WebSocket-Protocol: bearer.<JWT>"
                            .to_string(),
                    ),
                    Some(t) => {
                        let now_s = self.now.unix_ms / 1000;
                        jwt::verify(&self.secret, &t, now_s)
                            .map_err(|e| e.to_string())
                            .and_then(|c| match &self.revoked {
                                Some(revoked) if revoked(&c.jti, now_s) => {
                                    Err("invalid token: revoked".to_string())
                                }
                                _ => Ok(c),
                            })
                    }
                };
                match verified {
                    Err(why) => {
                        ShardStats::add(&self.st().refused_token_total, 1);
                        self.http_answer(key, handshake::json_error(401, 4010, &why));
                    }
                    Ok(claims) => {
                        let user = claims.user_id();
                        let response = handshake::switching_protocols(&accept, protocol, self.id);
                        let due = self.tick() + self.limits.heartbeat_ticks;
                        let c = &mut self.conns[key as usize];
                        c.user = user;
                        c.state = State::Open;
                        c.credit = self.limits.credit_max;
                        c.io |= io::UPGRADE_UNSENT;
                        self.arena.push_tx(&mut c.tx, response.into());
                        self.wheel.insert(key, due);
                        ShardStats::add(&self.st().handshakes_total, 1);
                        let token = (claims.jti.into(), claims.dev.map(Into::into));
                        self.join(key, user, token);
                        self.mark_ready(key);
                    }
                }
            }
            handshake::Request::Get { path } => {
                let answer = match path {
                    "/healthz" if self.shutting_down => {
                        handshake::response(503, "text/plain", b"shutting down\n")
                    }
                    "/healthz" => handshake::response(200, "text/plain", b"ok\n"),
                    "/metrics" => {
                        let mut text = metrics::render(&self.gateway_id, &self.stats, self.driver);
                        if let Some(hook) = &self.extra_metrics {
                            hook(&mut text);
                        }
                        handshake::response(200, "text/plain; version=0.0.4", text.as_bytes())
                    }
                    _ => {
                        ShardStats::add(&self.st().refused_http_total, 1);
                        handshake::json_error(404, 4040, "not found: the WebSocket endpoint is /ws")
                    }
                };
                self.http_answer(key, answer);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Routing.

    fn home_of(&self, user: u64) -> u16 {
        (mix64(user) % self.shards as u64) as u16
    }

    fn owner_of(&self, conv: Conv) -> u16 {
        (conv.hash64() % self.shards as u64) as u16
    }

    fn route(&mut self, dst: u16, msg: ShardMsg) -> Result<(), ShardMsg> {
        if dst == self.id {
            self.inbox.push_back(msg);
            Ok(())
        } else {
            self.mesh.send(dst, msg)
        }
    }

    /// Routes a message whose loss only costs a live delivery (the receiver syncs later).
    fn route_or_count(&mut self, dst: u16, msg: ShardMsg) {
        if self.route(dst, msg).is_err() {
            ShardStats::add(&self.st().ring_dropped_total, 1);
        }
    }

    /// Directory updates are never dropped: a lost Attach would hide a user's devices from
    /// live delivery until they all reconnect. At most two per connection, so still bounded.
    fn route_directory(&mut self, dst: u16, msg: ShardMsg) {
        if dst == self.id {
            self.inbox.push_back(msg);
        } else {
            self.mesh.send_unbounded(dst, msg);
        }
    }

    fn submit(&mut self, key: u32, cid: &str, to: u64, content: Box<str>, content_type: Box<str>) {
        let c = &self.conns[key as usize];
        let from = c.user;
        let Some(conv) = Conv::pair(from, to) else {
            return self.reply_error(
                key,
                ErrorCode::InvalidField,
                "cannot send a message to yourself",
                Some(cid),
            );
        };
        let origin = ConnRef {
            shard: self.id,
            key,
            gen: c.gen,
        };
        let msg = ShardMsg::Submit(Box::new(Submit {
            conv,
            from,
            to,
            cid: cid.into(),
            content,
            content_type,
            origin,
        }));
        if self.route(self.owner_of(conv), msg).is_err() {
            ShardStats::add(&self.st().ring_dropped_total, 1);
            self.reply_error(
                key,
                ErrorCode::Busy,
                "the gateway is overloaded: retry with the same cid",
                Some(cid),
            );
        }
    }

    /// Pipeline mode: turns a request into an `im.upstream` record for the bridge.
    fn submit_upstream(&mut self, key: u32, req: Request<'_>) {
        let c = &self.conns[key as usize];
        let (user, conn) = (
            c.user,
            ConnRef {
                shard: self.id,
                key,
                gen: c.gen,
            },
        );
        let (conv, cid, body) = match req {
            Request::Send {
                cid,
                target,
                content,
                content_type,
            } => {
                let (conv, to_user, to_group) = match target {
                    Target::User(to) => match Conv::pair(user, to) {
                        Some(conv) => (conv, to, 0),
                        None => {
                            return self.reply_error(
                                key,
                                ErrorCode::InvalidField,
                                "cannot send a message to yourself",
                                Some(&cid),
                            )
                        }
                    },
                    Target::Group(g) => (Conv::Group(g), 0, g),
                };
                let body = UpstreamBody::Send(records::Send {
                    cid: cid.to_string(),
                    to_user,
                    to_group,
                    content: content.into_owned(),
                    content_type: content_type.into_owned(),
                });
                (conv, Some(cid), body)
            }
            Request::Sync { conv, after, limit } => {
                let body = UpstreamBody::Sync(records::Sync {
                    conv: conv.to_string(),
                    after,
                    limit,
                });
                (conv, None, body)
            }
            Request::Read { conv, seq } => {
                let body = UpstreamBody::Read(records::Read {
                    conv: conv.to_string(),
                    seq,
                });
                (conv, None, body)
            }
            Request::Ping => return,
        };
        let record = records::Upstream {
            version: records::VERSION,
            reply_to: self.gateway_id.to_string(),
            conn: bridge::conn_token(conn),
            user,
            ts: self.now.unix_ms,
            body: Some(body),
        };
        let msg = UpMsg::Record {
            conv,
            conn,
            payload: record.to_bytes().into(),
        };
        if self.mesh.send_up(msg, false).is_err() {
            ShardStats::add(&self.st().ring_dropped_total, 1);
            self.reply_error(
                key,
                ErrorCode::Busy,
                "the gateway is overloaded: retry (with the same cid)",
                cid.as_deref(),
            );
        }
    }

    fn run_inbox(&mut self) {
        // Handling a message can queue more for ourselves (at most three hops); the loop ends.
        while let Some(msg) = self.inbox.pop_front() {
            self.on_shard_msg(msg);
        }
    }

    fn on_shard_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Attach { user, shard } => *self.home.entry(user).or_insert(0) |= 1 << shard,
            ShardMsg::Detach { user, shard } => {
                if let Some(mask) = self.home.get_mut(&user) {
                    *mask &= !(1 << shard);
                    if *mask == 0 {
                        self.home.remove(&user);
                    }
                }
            }
            ShardMsg::Submit(s) => self.sequence(*s),
            ShardMsg::Fanout {
                user,
                frame,
                except,
            } if self.shards == 1 => self.on_shard_msg(ShardMsg::Deliver {
                user,
                frame,
                except,
            }),
            ShardMsg::Fanout {
                user,
                frame,
                except,
            } => {
                let mut mask = self.home.get(&user).copied().unwrap_or(0);
                while mask != 0 {
                    let shard = mask.trailing_zeros() as u16;
                    mask &= mask - 1;
                    self.route_or_count(
                        shard,
                        ShardMsg::Deliver {
                            user,
                            frame: frame.clone(),
                            except,
                        },
                    );
                }
            }
            ShardMsg::Deliver {
                user,
                frame,
                except,
            } => {
                let mut key = self.local.get(&user).copied().unwrap_or(NONE);
                while key != NONE {
                    let c = &self.conns[key as usize];
                    let next = c.dev_next;
                    let is_origin =
                        except.shard == self.id && except.key == key && except.gen == c.gen;
                    if !is_origin {
                        ShardStats::add(&self.st().deliveries_total, 1);
                        self.enqueue(key, frame.clone());
                    }
                    key = next;
                }
            }
            ShardMsg::Kick { to } => {
                if self
                    .conns
                    .get(to.key as usize)
                    .is_some_and(|c| c.gen == to.gen)
                {
                    self.begin_close(to.key, close::POLICY, "token revoked");
                }
            }
            ShardMsg::Reply { to, frame } => {
                if self
                    .conns
                    .get(to.key as usize)
                    .is_some_and(|c| c.gen == to.gen)
                {
                    self.enqueue(to.key, frame);
                }
            }
        }
    }

    /// As the conversation's owner: assign seq and id, acknowledge, and route to both parties.
    fn sequence(&mut self, s: Submit) {
        let full = self.seqs.len() >= SEQ_CONVS_MAX;
        let seq = match self.seqs.get_mut(&s.conv) {
            Some(seq) => {
                *seq += 1;
                *seq
            }
            None if full => {
                let frame = self.error_frame(
                    ErrorCode::Busy,
                    "too many conversations in memory",
                    Some(&s.cid),
                );
                return self.route_or_count(
                    s.origin.shard,
                    ShardMsg::Reply {
                        to: s.origin,
                        frame,
                    },
                );
            }
            None => {
                self.seqs.insert(s.conv, 1);
                1
            }
        };
        let ts = self.now.unix_ms;
        let id = self.snowflake.next(ts);
        let m = Message {
            id,
            conv: s.conv,
            seq,
            from: s.from,
            to: Target::User(s.to),
            content: s.content.into_string(),
            content_type: s.content_type.into_string(),
            ts,
        };
        // Encoded once; every device of both parties gets the same bytes.
        let frame = self.text_frame(|out| protocol::encode_msg(&m, out));
        let sent = self.text_frame(|out| protocol::encode_sent(&s.cid, id, s.conv, seq, ts, out));
        ShardStats::add(&self.st().messages_routed_total, 1);
        self.route_or_count(
            s.origin.shard,
            ShardMsg::Reply {
                to: s.origin,
                frame: sent,
            },
        );
        self.route_or_count(
            self.home_of(s.to),
            ShardMsg::Fanout {
                user: s.to,
                frame: frame.clone(),
                except: ConnRef::NONE,
            },
        );
        self.route_or_count(
            self.home_of(s.from),
            ShardMsg::Fanout {
                user: s.from,
                frame,
                except: s.origin,
            },
        );
    }

    /// Adds `key` to this shard's directory (and tells the user's home shard on the first).
    /// `token`: the token's id and device, for presence (pipeline mode).
    fn join(&mut self, key: u32, user: u64, token: (Box<str>, Option<Box<str>>)) {
        if self.mesh.has_bridge() {
            let conn = ConnRef {
                shard: self.id,
                key,
                gen: self.conns[key as usize].gen,
            };
            let (jti, device) = token;
            let online = UpMsg::Online {
                user,
                conn,
                jti,
                device,
            };
            let _ = self.mesh.send_up(online, true);
        }
        match self.local.get(&user).copied() {
            Some(head) => {
                self.conns[key as usize].dev_next = head;
                self.conns[head as usize].dev_prev = key;
                self.local.insert(user, key);
            }
            None => {
                self.local.insert(user, key);
                // With one shard `local` is the whole directory; a home map would repeat it.
                if self.shards > 1 {
                    let home = self.home_of(user);
                    self.route_directory(
                        home,
                        ShardMsg::Attach {
                            user,
                            shard: self.id,
                        },
                    );
                }
            }
        }
    }

    fn leave(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let (user, prev, next) = (c.user, c.dev_prev, c.dev_next);
        c.dev_prev = NONE;
        c.dev_next = NONE;
        if self.mesh.has_bridge() {
            let conn = ConnRef {
                shard: self.id,
                key,
                gen: c.gen,
            };
            let _ = self.mesh.send_up(UpMsg::Offline { user, conn }, true);
        }
        if next != NONE {
            self.conns[next as usize].dev_prev = prev;
        }
        if prev != NONE {
            self.conns[prev as usize].dev_next = next;
        } else if next != NONE {
            self.local.insert(user, next);
        } else {
            self.local.remove(&user);
            if self.shards > 1 {
                let home = self.home_of(user);
                self.route_directory(
                    home,
                    ShardMsg::Detach {
                        user,
                        shard: self.id,
                    },
                );
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Output and closing.

    fn mark_ready(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            if !c.has(io::READY) {
                c.io |= io::READY;
                self.ready.push(key);
            }
        }
    }

    /// Encodes a text frame with `f` writing the JSON payload, into one shared allocation.
    fn text_frame(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> Frame {
        const H: usize = codec::SERVER_HEADER_MAX;
        self.scratch.clear();
        self.scratch.resize(H, 0);
        f(&mut self.scratch);
        let len = self.scratch.len() - H;
        let hl = codec::server_header_len(len);
        codec::write_server_header(opcode::TEXT, len, &mut self.scratch[H - hl..H]);
        Frame::from(&self.scratch[H - hl..])
    }

    fn error_frame(&mut self, code: ErrorCode, message: &str, cid: Option<&str>) -> Frame {
        self.text_frame(|out| protocol::encode_error(code, message, cid, out))
    }

    fn reply_error(&mut self, key: u32, code: ErrorCode, message: &str, cid: Option<&str>) {
        let frame = self.error_frame(code, message, cid);
        self.enqueue(key, frame);
    }

    /// Queues a frame for an open connection, enforcing the per-connection bound.
    fn enqueue(&mut self, key: u32, frame: Frame) {
        let Some(c) = self.conns.get_mut(key as usize) else {
            return;
        };
        if c.state != State::Open {
            return;
        }
        let queued = self.arena.tx_bytes(c.tx);
        if queued + frame.len() > self.limits.outbound_bytes_max || !self.arena.fits(frame.len()) {
            ShardStats::add(&self.st().slow_consumer_closes_total, 1);
            return self.begin_close(
                key,
                close::TRY_AGAIN,
                "outbound queue full: read your messages",
            );
        }
        self.arena.push_tx(&mut c.tx, frame);
        ShardStats::add(&self.st().frames_out_total, 1);
        self.mark_ready(key);
    }

    /// Answers an HTTP request and closes after the answer is flushed.
    fn http_answer(&mut self, key: u32, response: Vec<u8>) {
        let linger = self.tick() + self.limits.linger_ticks;
        let c = &mut self.conns[key as usize];
        self.arena.push_tx(&mut c.tx, response.into());
        c.state = State::Closing;
        self.wheel.insert(key, linger);
        self.mark_ready(key);
    }

    fn fail(&mut self, key: u32, e: FrameError) {
        self.begin_close(key, e.close_code(), e.reason());
    }

    /// Starts the close handshake: drop what is queued (but a frame already partly on the
    /// wire), send a close frame, shut down our side once it is out, and wait for the peer.
    fn begin_close(&mut self, key: u32, code: u16, reason: &str) {
        let linger = self.tick() + self.limits.linger_ticks;
        let Some(c) = self.conns.get(key as usize) else {
            return;
        };
        match c.state {
            State::Closing | State::Linger | State::Dead => return,
            State::Open => self.leave(key),
            State::Handshake => {}
        }
        let c = &mut self.conns[key as usize];
        let keep_front = c.has(io::SEND_INFLIGHT)
            || c.has(io::UPGRADE_UNSENT)
            || self.arena.tx(c.tx).is_some_and(|t| t.head_sent > 0);
        self.arena.truncate_tx(&mut c.tx, keep_front);
        self.arena
            .push_tx(&mut c.tx, codec::close_frame(code, reason).into());
        c.state = State::Closing;
        self.wheel.insert(key, linger);
        self.st().count_close(code);
        self.mark_ready(key);
    }

    /// Closes without ceremony; the driver closes the fd once no I/O is in flight.
    fn kill(&mut self, key: u32) {
        let Some(c) = self.conns.get(key as usize) else {
            return;
        };
        match c.state {
            State::Dead => return,
            State::Open => self.leave(key),
            _ => {}
        }
        let c = &mut self.conns[key as usize];
        c.state = State::Dead;
        let rx = std::mem::replace(&mut c.rx, NONE);
        self.arena.release(rx, NONE);
        self.wheel.cancel(key);
        self.mark_ready(key);
    }
}

#[cfg(test)]
mod tests;

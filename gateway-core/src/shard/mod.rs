//! The shard: everything one core does for its connections, without I/O.
//!
//! A driver (io_uring, or epoll where io_uring is missing) feeds it accepted fds, received
//! bytes, send completions and the clock; the shard answers with a list of connections that
//! need I/O (`take_ready`) and, per connection, what to do (`plan`). All protocol work lives
//! here: the upgrade, framing, the close handshake, heartbeats, routing and backpressure. That
//! keeps the drivers thin and lets the tests drive a shard byte by byte.
//!
//! One `Shard` type, split by concern:
//! - this file: the state, the driver-facing events, the I/O plan, timers;
//! - `frames` — bytes → frames → messages, and the per-connection rate limit;
//! - `upgrade` — the HTTP upgrade with its token check, `/healthz` and `/metrics`;
//! - `directory` — which shards hold a user's connections, and cross-shard delivery;
//! - `upstream` — pipeline mode: requests become `im.upstream` records for the bridge;
//! - `local_router` — without a bridge: sequencing in this process (gateway benchmarks);
//! - `output` — frames encoded once and queued within each connection's bound;
//! - `closing` — the close handshake, kills, shutdown.
//!
//! Pipeline mode (a bridge is attached to the mesh port) is what every deployment runs:
//! `send`, `sync` and `read` go to the logic service through the bridge, and its answers come
//! back on the same rings (`Fanout` to a user's home shard, `Reply` to one connection). Each
//! connection's open and close go up too, for presence.

mod closing;
mod directory;
mod frames;
mod local_router;
mod output;
mod upgrade;
mod upstream;

use crate::arena::{Arena, Frame, NONE};
use crate::codec::{self, close, opcode};
use crate::config::GatewayConfig;
use crate::conn::{flags, Conn, State};
use crate::handshake;
use crate::idmap::IdMap;
use crate::mesh::MeshPort;
use crate::metrics::ShardStats;
use crate::msg::{ShardMsg, UpMsg};
use crate::wheel::Wheel;
use frames::CREDIT_UNIT;
use im_shared::protocol;
use im_shared::ErrorCode;
use local_router::LocalRouter;
use slab::Slab;
use std::collections::VecDeque;
use std::sync::Arc;

/// Tells whether a token id (`jti`) has been revoked (logout), or `None` when that cannot be
/// known now (the revocation list cannot be read: the upgrade is refused, 503). Called at each
/// upgrade; it must be cheap and must not block (an in-memory set, or a local cache of Redis).
pub type RevokedCheck = Arc<dyn Fn(&str, u64) -> Option<bool> + Send + Sync>;

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
    /// Send these bytes (pointer stays valid until `on_sent`)...
    pub send: Option<(*const u8, usize)>,
    /// ...and, when this is over 1, the frames queued behind them, this many in all, in one
    /// vectored send (`send_iovecs` lists them; all stay valid until `on_sent`).
    pub send_frames: usize,
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

/// Frames one send may carry (a vectored send's iovecs).
pub const SEND_FRAMES_MAX: usize = 32;

/// Linger after our close frame: how long we wait for the peer before closing anyway.
const LINGER_MS: u64 = 2_000;
/// Deliveries (`ShardMsg::weight`) drained from the mesh per turn, so one busy peer cannot
/// starve our sockets. Large enough for several group messages a turn: a member's frames
/// queued in one turn leave in one vectored send.
const MESH_BATCH_MAX: usize = 32_768;
/// And at most this many messages a turn, whatever they weigh (a `Submit` or `Reply` weighs
/// one delivery but costs more).
const MESH_MSGS_MAX: usize = 4096;
/// Slots of the timing wheel: one turn covers 4,096 ticks (410 s at the default 100 ms), longer
/// than any deadline the shard arms, so a timer is visited once, when due.
const WHEEL_SLOTS: usize = 4096;
/// Connections whose slab and timer slots are reserved at start (address space only: pages
/// are committed as connections arrive); past it they grow on demand.
const PREALLOC_CONNS_MAX: usize = 1 << 20;

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
    /// The fan-out merge window (0: off).
    merge_ms: u64,
}

pub struct Shard {
    id: u16,
    shards: u16,
    limits: Limits,
    secret: Arc<[u8]>,
    token_lifetime_max_s: u64,
    /// `/metrics` is served on the WebSocket port (no `--metrics-listen`).
    metrics_here: bool,
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
    /// Sequencing in this process; `None` in pipeline mode (logic sequences).
    router: Option<LocalRouter>,
    mesh: MeshPort,
    stats: Arc<[ShardStats]>,
    ready: Vec<u32>,
    /// Connections whose deliveries wait for the merge window to close (`--fanout-merge-ms`),
    /// and when it closes (monotonic ms).
    held: Vec<u32>,
    held_until: u64,
    inbox: VecDeque<ShardMsg>,
    /// Per destination shard, the users of a `FanoutMany` it holds (kept for their capacity).
    fan_lists: Vec<Vec<u64>>,
    expired: Vec<u32>,
    scratch: Vec<u8>,
    pong: Frame,
    /// A control Pong with no payload: what answers the usual empty Ping, without allocating.
    empty_pong: Frame,
    now: Now,
    shutting_down: bool,
    /// While shutting down: the open connections still to be closed, popped from the end,
    /// out of `drain_total` lined up (`closing.rs`, `drain_to`).
    drain: Vec<u32>,
    drain_total: usize,
    drain_window_ms: u64,
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
        // Without a bridge this process sequences and routes by itself.
        let router = (!mesh.has_bridge()).then(|| LocalRouter::new(cfg.worker_id + id));
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
                merge_ms: cfg.fanout_merge_ms,
            },
            secret: cfg.jwt_secret.clone().into(),
            token_lifetime_max_s: cfg.token_lifetime_max_s,
            metrics_here: cfg.metrics_listen.is_none(),
            revoked,
            extra_metrics: None,
            gateway_id: cfg.gateway_id.as_str().into(),
            driver,
            // Capacity is reserved, not touched: pages are only committed as connections arrive.
            conns: Slab::with_capacity(conns_max.min(PREALLOC_CONNS_MAX)),
            next_gen: 0,
            wheel: Wheel::new(WHEEL_SLOTS, conns_max.min(PREALLOC_CONNS_MAX)),
            arena: Arena::new(cfg.arena_bytes_max),
            local: IdMap::default(),
            home: IdMap::default(),
            router,
            mesh,
            stats,
            ready: Vec::new(),
            held: Vec::new(),
            held_until: 0,
            inbox: VecDeque::new(),
            fan_lists: Vec::new(),
            expired: Vec::new(),
            scratch: Vec::with_capacity(4096),
            pong: codec::server_frame(opcode::TEXT, protocol::PONG_JSON).into(),
            empty_pong: codec::server_frame(opcode::PONG, &[]).into(),
            now: Now::default(),
            shutting_down: false,
            drain: Vec::new(),
            drain_total: 0,
            drain_window_ms: cfg.drain_window_ms,
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

    /// Milliseconds until the wheel's next tick or the end of the merge window (how long the
    /// driver may sleep).
    pub fn sleep_ms(&self) -> u64 {
        let t = self.limits.tick_ms;
        let tick = t - self.now.mono_ms % t;
        if self.held.is_empty() {
            tick
        } else {
            tick.min(self.held_until.saturating_sub(self.now.mono_ms).max(1))
        }
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
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.has(flags::EOF))
    }

    /// The bytes a pending send should (re)try, for drivers that write synchronously.
    pub fn tx_front(&self, key: u32) -> Option<(*const u8, usize)> {
        let c = self.conns.get(key as usize)?;
        self.arena.tx(c.tx)?.front().map(|f| (f.as_ptr(), f.len()))
    }

    pub fn mesh(&self) -> &MeshPort {
        &self.mesh
    }

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
        c.io |= flags::EOF;
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
            c.io |= flags::EOF;
            if c.state == State::Open {
                ShardStats::add(&self.st().peer_resets_total, 1);
            }
            self.kill(key);
        }
    }

    /// The armed receive ended (multishot finished, cancelled, or out of buffers).
    pub fn recv_disarmed(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.io &= !(flags::RECV_ARMED | flags::CANCELING);
            self.mark_ready(key);
        }
    }

    /// A send finished: `res` bytes taken, or a negative errno.
    pub fn on_sent(&mut self, key: u32, res: i32) {
        let Some(c) = self.conns.get_mut(key as usize) else {
            return;
        };
        c.io &= !(flags::SEND_INFLIGHT | flags::CANCELING_SEND);
        if let Some(tx) = self.arena.tx_mut(c.tx) {
            tx.in_flight = 0;
        }
        if res < 0 {
            // Already dead or not, it needs a plan: close once nothing is in flight.
            self.kill(key);
            self.mark_ready(key);
            return;
        }
        if self.arena.advance_tx(&mut c.tx, res as usize) > 0 {
            c.io &= !flags::UPGRADE_UNSENT;
        }
        ShardStats::add(&self.stats[self.id as usize].bytes_out_total, res as u64);
        self.mark_ready(key);
    }

    /// The frames of `key`'s send in flight (`IoPlan::send_frames` of them), the first from
    /// where the socket stopped, into `out`; returns how many it wrote.
    pub fn send_iovecs(&self, key: u32, out: &mut [libc::iovec]) -> usize {
        let Some(tx) = self
            .conns
            .get(key as usize)
            .and_then(|c| self.arena.tx(c.tx))
        else {
            return 0;
        };
        let mut n = 0;
        for (i, f) in tx
            .queue
            .iter()
            .take(tx.in_flight.min(out.len()))
            .enumerate()
        {
            let bytes = if i == 0 { &f[tx.head_sent..] } else { &f[..] };
            out[i] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            n += 1;
        }
        n
    }

    /// What the driver should do for `key` now; updates the I/O flags as if it was done.
    pub fn plan(&mut self, key: u32) -> IoPlan {
        let mut plan = IoPlan::default();
        let Some(c) = self.conns.get_mut(key as usize) else {
            return plan;
        };
        c.io &= !flags::READY;
        if c.state != State::Dead && !c.has(flags::SEND_INFLIGHT) {
            if let Some(tx) = self.arena.tx_mut(c.tx).filter(|t| !t.queue.is_empty()) {
                // Everything queued, up to a bound, leaves in one send.
                tx.in_flight = tx.queue.len().min(SEND_FRAMES_MAX);
                plan.send_frames = tx.in_flight;
                let front = tx.front().expect("a queued frame");
                plan.send = Some((front.as_ptr(), front.len()));
                c.io |= flags::SEND_INFLIGHT;
            } else if c.state == State::Closing && !c.has(flags::SHUT_WR) {
                plan.shutdown_wr = true;
                c.io |= flags::SHUT_WR;
                if c.has(flags::EOF) {
                    c.state = State::Dead;
                } else {
                    c.state = State::Linger;
                }
            }
        }
        if c.state == State::Dead {
            if c.has(flags::RECV_ARMED) && !c.has(flags::CANCELING) {
                plan.cancel_recv = true;
                c.io |= flags::CANCELING;
            }
            if c.has(flags::SEND_INFLIGHT) && !c.has(flags::CANCELING_SEND) {
                plan.cancel_send = true;
                c.io |= flags::CANCELING_SEND;
            }
            if !c.has(flags::RECV_ARMED) && !c.has(flags::SEND_INFLIGHT) {
                plan.close = true;
            }
        } else if !c.has(flags::RECV_ARMED) && !c.has(flags::EOF) {
            plan.arm_recv = true;
            c.io |= flags::RECV_ARMED;
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
        self.release_held();
        std::mem::swap(&mut self.ready, out);
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Drains cross-shard messages and handles them (bounded per call).
    pub fn poll_mesh(&mut self) {
        self.mesh
            .drain(MESH_BATCH_MAX, MESH_MSGS_MAX, &mut self.inbox);
        self.run_inbox();
    }

    /// Advances the timing wheel to the current time.
    pub fn on_tick(&mut self) {
        let tick = self.tick();
        if self.mesh.has_bridge() && tick >= self.next_refresh {
            if self.next_refresh != 0 && !self.local.is_empty() {
                let users: Vec<u64> = self.local.keys().copied().collect();
                // A refresh that finds the ring full waits for the next one: the TTL covers three.
                let _ = self.mesh.send_up(UpMsg::Refresh(users));
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

    pub fn count_recv_buffer_exhausted(&self) {
        ShardStats::add(&self.st().recv_buffer_exhausted_total, 1);
    }
}

#[cfg(test)]
mod tests;

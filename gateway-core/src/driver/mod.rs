//! Thin I/O drivers around [`Shard`](crate::shard::Shard). They own the kernel objects (ring or
//! epoll set, listener, receive buffers) and translate completions into shard calls; every
//! protocol decision stays in the shard.
//!
//! Why not monoio's task-per-connection API: each monoio connection is a future owning its read
//! buffer while it waits, and its 0.2 line has no provided-buffer receive — at a million idle
//! connections that is gigabytes. Driving io_uring directly, one multishot receive per
//! connection draws from a shard-wide ring of buffers only when bytes arrive.

pub mod epoll;
pub mod uring;

use crate::config::GatewayConfig;
use crate::shard::{IoPlan, Now, Shard};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which loop drives the shards of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl Driver {
    /// io_uring where this kernel runs it, unless `force_epoll`; epoll otherwise.
    pub fn choose(force_epoll: bool) -> Driver {
        if force_epoll {
            return Driver::Epoll;
        }
        match uring::available() {
            Ok(()) => Driver::Uring,
            Err(why) => {
                log::warn!("io_uring unavailable ({why}): falling back to epoll");
                Driver::Epoll
            }
        }
    }

    /// The name `/metrics` and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Uring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }

    /// Runs `shard` on `listener` until `stop` is set and its connections are closed.
    pub fn run(
        self,
        shard: Shard,
        listener: i32,
        stop: &AtomicBool,
        cfg: &GatewayConfig,
    ) -> io::Result<()> {
        match self {
            Driver::Uring => uring::run(
                shard,
                listener,
                stop,
                cfg.recv_buffers,
                cfg.recv_buffer_bytes,
            ),
            Driver::Epoll => epoll::run(shard, listener, stop, cfg.recv_buffer_bytes),
        }
    }
}

/// How long the loops sleep at most while shutting down (the drain goes on by the clock).
pub(crate) const STOPPING_POLL_MS: u64 = 10;

/// How long shutdown waits for close handshakes, after the drain window, before dropping
/// connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// `user_data` / epoll data: a tag in the top byte, the connection key in the low 32 bits.
pub(crate) mod tag {
    pub const ACCEPT: u64 = 1 << 56;
    pub const RECV: u64 = 2 << 56;
    pub const SEND: u64 = 3 << 56;
    pub const CANCEL: u64 = 4 << 56;
    pub const WAKE: u64 = 5 << 56;
    pub const MASK: u64 = 0xff << 56;

    pub fn key(ud: u64) -> u32 {
        ud as u32
    }
}

/// Where the shard's monotonic clock starts. Any origin works (only differences matter), but
/// not zero: the shard keeps some deadlines as ticks where 0 means "not set yet" (the first
/// presence refresh), which a clock starting at 0 would make a real instant.
const MONO_START_MS: u64 = 1_000_000;

/// The clock both drivers read once per turn.
pub(crate) struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    pub fn now(&self) -> Now {
        Now {
            mono_ms: self.start.elapsed().as_millis() as u64 + MONO_START_MS,
            unix_ms: im_shared::unix_ms(),
        }
    }
}

/// Shutdown bookkeeping shared by both loops. Returns true when the loop should exit.
pub(crate) struct Stopper {
    since: Option<Instant>,
}

impl Stopper {
    pub fn new() -> Stopper {
        Stopper { since: None }
    }

    /// Call once per turn; `on_start` runs once when shutdown begins (stop accepting and
    /// listening: `stop_listening`). The
    /// shard's connections are told to go (1012) evenly over its drain window; those still
    /// open `SHUTDOWN_GRACE` after the window are killed.
    pub fn check(&mut self, stop: &AtomicBool, shard: &mut Shard, on_start: impl FnOnce()) -> bool {
        if self.since.is_none() && stop.load(Ordering::Acquire) {
            self.since = Some(Instant::now());
            shard.shutdown();
            on_start();
        }
        let Some(since) = self.since else {
            return false;
        };
        let waited = since.elapsed();
        let window = Duration::from_millis(shard.drain_window_ms());
        let fraction = if window.is_zero() {
            1.0
        } else {
            waited.as_secs_f64() / window.as_secs_f64()
        };
        shard.drain_to(fraction);
        if shard.connections() == 0 {
            return true;
        }
        let past = waited.saturating_sub(window);
        if past > SHUTDOWN_GRACE {
            shard.kill_all();
        }
        // Dead connections close within a turn or two; never hang on a misbehaving one.
        past > SHUTDOWN_GRACE * 2
    }

    pub fn stopping(&self) -> bool {
        self.since.is_some()
    }
}

/// The shard work every turn ends with, whatever the driver: cross-shard messages, timers,
/// then each connection's I/O plan handed to `execute(shard, key, fd, plan)`.
pub(crate) fn run_plans<E>(
    shard: &mut Shard,
    ready: &mut Vec<u32>,
    mut execute: impl FnMut(&mut Shard, u32, i32, IoPlan) -> Result<(), E>,
) -> Result<(), E> {
    shard.poll_mesh();
    shard.on_tick();
    loop {
        shard.take_ready(ready);
        if ready.is_empty() {
            return Ok(());
        }
        for key in ready.drain(..) {
            let Some(fd) = shard.fd(key) else { continue };
            let plan = shard.plan(key);
            execute(shard, key, fd, plan)?;
        }
    }
}

/// Sets TCP_NODELAY: chat frames are small and latency-bound.
pub(crate) fn set_nodelay(fd: i32) {
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
}

pub(crate) fn close_fd(fd: i32) {
    // SAFETY: the caller owns fd and never uses it again.
    unsafe { libc::close(fd) };
}

/// A drain begins: the listener stops listening at once (its fd is closed with the loop), so
/// connections queued in its backlog are reset and new ones refused, and a balancer or
/// client goes elsewhere instead of waiting on a gateway that will never serve them.
pub(crate) fn stop_listening(listener: i32) {
    // SAFETY: shutdown(2) on our own listening socket; on Linux it leaves the listening state.
    unsafe { libc::shutdown(listener, libc::SHUT_RDWR) };
}

pub(crate) fn shutdown_wr(fd: i32) {
    // SAFETY: plain syscall on an fd we own; errors (peer gone) are irrelevant here.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

//! The epoll fallback, for kernels without io_uring (or with it disabled, as some container
//! runtimes do). Same shard, same plans: level-triggered readiness, reads into one shard-wide
//! scratch buffer, writes attempted at once and resumed on EPOLLOUT.

use super::{close_fd, run_plans, set_nodelay, shutdown_wr, tag, Clock, Stopper};
use crate::shard::{IoPlan, Shard, SEND_FRAMES_MAX};
use std::collections::HashSet;
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const EVENTS_MAX: usize = 1024;
/// Reads per readable connection per turn, so one fast sender cannot starve the others.
const READS_PER_TURN: usize = 4;
const ACCEPTS_PER_TURN: usize = 256;
/// The read buffer's floor, whatever `--recv-buffer-bytes` says: one read per turn and
/// connection should take a typical burst.
const SCRATCH_BYTES_MIN: usize = 16 * 1024;
/// How often a stopping loop looks again at its closing connections.
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn ctl(ep: i32, op: i32, fd: i32, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: valid epoll fd and event struct.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

const IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
const OUT: u32 = libc::EPOLLOUT as u32;

/// The epoll set and what the loop keeps between turns.
struct Poller {
    ep: i32,
    listener: i32,
    /// Connections waiting for EPOLLOUT (their send is "in flight").
    want_out: HashSet<u32>,
    /// Out of file descriptors: the listener is unwatched until then.
    accept_again_at: Option<Instant>,
}

pub fn run(
    mut shard: Shard,
    listener: i32,
    stop: &AtomicBool,
    scratch_bytes: usize,
) -> io::Result<()> {
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut p = Poller {
        ep,
        listener,
        want_out: HashSet::new(),
        accept_again_at: None,
    };
    let wake_fd = shard.mesh().waker().fd();
    p.watch_listener()?;
    ctl(
        ep,
        libc::EPOLL_CTL_ADD,
        wake_fd,
        libc::EPOLLIN as u32,
        tag::WAKE,
    )?;

    let clock = Clock::new();
    let mut stopper = Stopper::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
    let mut scratch = vec![0u8; scratch_bytes.max(SCRATCH_BYTES_MIN)];
    let mut ready = Vec::new();
    let mut timeout_ms: i32 = 0;
    loop {
        if p.accept_again_at.is_some_and(|t| Instant::now() >= t) && !stopper.stopping() {
            p.accept_again_at = None;
            p.watch_listener()?;
        }
        let waker = shard.mesh().waker();
        waker.prepare_sleep();
        let t = if shard.idle() { timeout_ms } else { 0 };
        // SAFETY: events buffer of EVENTS_MAX entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS_MAX as i32, t) };
        waker.cancel_sleep();
        if n < 0 && errno() != libc::EINTR {
            return Err(io::Error::last_os_error());
        }
        shard.set_now(clock.now());
        for ev in &events[..n.max(0) as usize] {
            let (data, flags) = (ev.u64, ev.events);
            match data & tag::MASK {
                tag::ACCEPT => p.accept_burst(&mut shard),
                tag::WAKE => {
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into a u64.
                    unsafe { libc::read(wake_fd, (&mut v as *mut u64).cast(), 8) };
                }
                _ => p.on_conn_event(&mut shard, tag::key(data), flags, &mut scratch),
            }
        }
        run_plans(&mut shard, &mut ready, |shard, key, fd, plan| {
            p.execute(shard, key, fd, plan)
        })?;
        shard.end_turn();
        let mut stop_listener = false;
        if stopper.check(stop, &mut shard, || stop_listener = true) {
            break;
        }
        if stop_listener {
            let _ = ctl(ep, libc::EPOLL_CTL_DEL, listener, 0, 0);
            super::stop_listening(listener);
        }
        timeout_ms = if stopper.stopping() {
            super::STOPPING_POLL_MS as i32
        } else {
            shard.sleep_ms() as i32
        };
    }
    close_fd(ep);
    close_fd(listener);
    Ok(())
}

impl Poller {
    fn watch_listener(&self) -> io::Result<()> {
        let ev = libc::EPOLLIN as u32;
        ctl(self.ep, libc::EPOLL_CTL_ADD, self.listener, ev, tag::ACCEPT)
    }

    /// Accepts what is pending, up to a bound per turn.
    fn accept_burst(&mut self, shard: &mut Shard) {
        for _ in 0..ACCEPTS_PER_TURN {
            // SAFETY: accept4 with null address arguments.
            let fd = unsafe {
                libc::accept4(
                    self.listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = errno();
                if e == libc::EMFILE || e == libc::ENFILE {
                    // Level-triggered: the listener stays readable and we would spin. Stop
                    // watching it for a moment.
                    let _ = ctl(self.ep, libc::EPOLL_CTL_DEL, self.listener, 0, 0);
                    self.accept_again_at = Some(Instant::now() + ACCEPT_BACKOFF);
                }
                return;
            }
            set_nodelay(fd);
            if shard.accept(fd).is_none() {
                close_fd(fd);
            }
        }
    }

    /// A connection is writable (resume its send) and/or readable (read a few times).
    fn on_conn_event(&mut self, shard: &mut Shard, key: u32, flags: u32, scratch: &mut [u8]) {
        if flags & OUT != 0 && self.want_out.remove(&key) {
            if let (Some(fd), Some((ptr, len))) = (shard.fd(key), shard.tx_front(key)) {
                let input = if shard.peer_eof(key) { 0 } else { IN };
                let _ = ctl(self.ep, libc::EPOLL_CTL_MOD, fd, input, key as u64);
                // All the frames the send covers (`send_iovecs` knows how many).
                self.write_once(shard, key, fd, ptr, len, SEND_FRAMES_MAX);
            }
        }
        if flags & (IN | libc::EPOLLHUP as u32 | libc::EPOLLERR as u32) == 0 {
            return;
        }
        let Some(fd) = shard.fd(key) else { return };
        for _ in 0..READS_PER_TURN {
            // SAFETY: reading into our scratch buffer.
            let r = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), scratch.len()) };
            if r > 0 {
                shard.on_recv(key, &mut scratch[..r as usize]);
                if (r as usize) < scratch.len() {
                    return;
                }
                continue;
            }
            let e = errno();
            if r < 0 && (e == libc::EAGAIN || e == libc::EINTR) {
                return;
            }
            // EOF or error: stop watching input, or level-triggered epoll reports the same
            // EOF every turn while we linger.
            let keep_out = if self.want_out.contains(&key) { OUT } else { 0 };
            let _ = ctl(self.ep, libc::EPOLL_CTL_MOD, fd, keep_out, key as u64);
            if r == 0 {
                shard.on_eof(key);
            } else {
                shard.on_recv_error(key);
            }
            return;
        }
    }

    /// Carries out one connection's plan.
    fn execute(&mut self, shard: &mut Shard, key: u32, fd: i32, plan: IoPlan) -> io::Result<()> {
        if plan.arm_recv {
            ctl(self.ep, libc::EPOLL_CTL_ADD, fd, IN, key as u64)?;
        }
        if let Some((ptr, len)) = plan.send {
            self.write_once(shard, key, fd, ptr, len, plan.send_frames);
        }
        if plan.shutdown_wr {
            shutdown_wr(fd);
        }
        if plan.cancel_recv {
            let _ = ctl(self.ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
            self.want_out.remove(&key);
            shard.recv_disarmed(key);
        }
        if plan.close {
            self.want_out.remove(&key);
            close_fd(fd);
            shard.release(key);
        }
        Ok(())
    }

    /// One non-blocking write of what is queued (`frames` frames); EAGAIN parks the connection on EPOLLOUT.
    fn write_once(
        &mut self,
        shard: &mut Shard,
        key: u32,
        fd: i32,
        ptr: *const u8,
        len: usize,
        frames: usize,
    ) {
        let r = if frames > 1 {
            // Everything queued in one sendmsg; the iovecs only need to live through the call.
            // SAFETY: msghdr and iovec are plain C structs; all-zero is a valid value.
            let mut iov: [libc::iovec; SEND_FRAMES_MAX] = unsafe { std::mem::zeroed() };
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iovlen = shard.send_iovecs(key, &mut iov);
            hdr.msg_iov = iov.as_mut_ptr();
            // SAFETY: the iovecs point into the shard's arena, valid until on_sent.
            unsafe { libc::sendmsg(fd, &hdr, libc::MSG_NOSIGNAL) }
        } else {
            // SAFETY: ptr/len come from the shard's arena and stay valid until on_sent.
            unsafe { libc::send(fd, ptr.cast(), len, libc::MSG_NOSIGNAL) }
        };
        if r >= 0 {
            shard.on_sent(key, r as i32);
            return;
        }
        let e = errno();
        if e == libc::EAGAIN || e == libc::EINTR {
            self.want_out.insert(key);
            let input = if shard.peer_eof(key) { 0 } else { IN };
            let _ = ctl(self.ep, libc::EPOLL_CTL_MOD, fd, input | OUT, key as u64);
        } else {
            shard.on_sent(key, -e);
        }
    }
}

//! The epoll fallback, for kernels without io_uring (or with it disabled, as some container
//! runtimes do). Same shard, same plans: level-triggered readiness, reads into one shard-wide
//! scratch buffer, writes attempted at once and resumed on EPOLLOUT.

use super::{close_fd, run_plans, set_nodelay, shutdown_wr, tag, Clock, Stopper};
use crate::shard::Shard;
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const EVENTS_MAX: usize = 1024;
/// Reads per readable connection per turn, so one fast sender cannot starve the others.
const READS_PER_TURN: usize = 4;
const ACCEPTS_PER_TURN: usize = 256;
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
    let wake_fd = shard.mesh().waker().fd();
    let watch_listener = || {
        ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            listener,
            libc::EPOLLIN as u32,
            tag::ACCEPT,
        )
    };
    watch_listener()?;
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
    let mut scratch = vec![0u8; scratch_bytes.max(16 * 1024)];
    let mut ready = Vec::new();
    // Connections waiting for EPOLLOUT (their send is "in flight").
    let mut want_out: std::collections::HashSet<u32> = std::collections::HashSet::new();
    let mut timeout_ms: i32 = 0;
    let mut accept_again_at: Option<Instant> = None;
    loop {
        if accept_again_at.is_some_and(|t| Instant::now() >= t) && !stopper.stopping() {
            accept_again_at = None;
            watch_listener()?;
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
            let key = tag::key(data);
            match data & tag::MASK {
                tag::ACCEPT => {
                    for _ in 0..ACCEPTS_PER_TURN {
                        // SAFETY: accept4 with null address arguments.
                        let fd = unsafe {
                            libc::accept4(
                                listener,
                                std::ptr::null_mut(),
                                std::ptr::null_mut(),
                                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                            )
                        };
                        if fd < 0 {
                            let e = errno();
                            if e == libc::EMFILE || e == libc::ENFILE {
                                // Level-triggered: the listener stays readable and we would
                                // spin. Stop watching it for a moment.
                                let _ = ctl(ep, libc::EPOLL_CTL_DEL, listener, 0, 0);
                                accept_again_at = Some(Instant::now() + ACCEPT_BACKOFF);
                            }
                            break;
                        }
                        set_nodelay(fd);
                        if shard.accept(fd).is_none() {
                            close_fd(fd);
                        }
                    }
                }
                tag::WAKE => {
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into a u64.
                    unsafe { libc::read(wake_fd, (&mut v as *mut u64).cast(), 8) };
                }
                _ => {
                    if flags & OUT != 0 && want_out.remove(&key) {
                        if let (Some(fd), Some((ptr, len))) = (shard.fd(key), shard.tx_front(key)) {
                            let input = if shard.peer_eof(key) { 0 } else { IN };
                            let _ = ctl(ep, libc::EPOLL_CTL_MOD, fd, input, key as u64);
                            write_once(&mut shard, key, fd, ptr, len, &mut want_out, ep);
                        }
                    }
                    if flags & (IN | libc::EPOLLHUP as u32 | libc::EPOLLERR as u32) != 0 {
                        let Some(fd) = shard.fd(key) else { continue };
                        for _ in 0..READS_PER_TURN {
                            // SAFETY: reading into our scratch buffer.
                            let r = unsafe {
                                libc::read(fd, scratch.as_mut_ptr().cast(), scratch.len())
                            };
                            if r > 0 {
                                shard.on_recv(key, &mut scratch[..r as usize]);
                                if (r as usize) < scratch.len() {
                                    break;
                                }
                            } else {
                                let e = errno();
                                if r < 0 && (e == libc::EAGAIN || e == libc::EINTR) {
                                    break;
                                }
                                // EOF or error: stop watching input, or level-triggered epoll
                                // reports the same EOF every turn while we linger.
                                let keep_out = if want_out.contains(&key) { OUT } else { 0 };
                                let _ = ctl(ep, libc::EPOLL_CTL_MOD, fd, keep_out, key as u64);
                                if r == 0 {
                                    shard.on_eof(key);
                                } else {
                                    shard.on_recv_error(key);
                                }
                                break;
                            }
                        }
                    }
                }
            }
        }
        run_plans(&mut shard, &mut ready, |shard, key, fd, plan| {
            if plan.arm_recv {
                ctl(ep, libc::EPOLL_CTL_ADD, fd, IN, key as u64)?;
            }
            if let Some((ptr, len)) = plan.send {
                write_once(shard, key, fd, ptr, len, &mut want_out, ep);
            }
            if plan.shutdown_wr {
                shutdown_wr(fd);
            }
            if plan.cancel_recv {
                let _ = ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
                want_out.remove(&key);
                shard.recv_disarmed(key);
            }
            if plan.close {
                want_out.remove(&key);
                close_fd(fd);
                shard.release(key);
            }
            io::Result::Ok(())
        })?;
        shard.end_turn();
        let mut stop_listener = false;
        if stopper.check(stop, &mut shard, || stop_listener = true) {
            break;
        }
        if stop_listener {
            let _ = ctl(ep, libc::EPOLL_CTL_DEL, listener, 0, 0);
        }
        timeout_ms = if stopper.stopping() {
            10
        } else {
            shard.sleep_ms() as i32
        };
    }
    close_fd(ep);
    close_fd(listener);
    Ok(())
}

/// One non-blocking write of the front frame; EAGAIN parks the connection on EPOLLOUT.
fn write_once(
    shard: &mut Shard,
    key: u32,
    fd: i32,
    ptr: *const u8,
    len: usize,
    want_out: &mut std::collections::HashSet<u32>,
    ep: i32,
) {
    // SAFETY: ptr/len come from the shard's arena and stay valid until on_sent.
    let r = unsafe { libc::send(fd, ptr.cast(), len, libc::MSG_NOSIGNAL) };
    if r >= 0 {
        shard.on_sent(key, r as i32);
        return;
    }
    let e = errno();
    if e == libc::EAGAIN || e == libc::EINTR {
        want_out.insert(key);
        let input = if shard.peer_eof(key) { 0 } else { IN };
        let _ = ctl(ep, libc::EPOLL_CTL_MOD, fd, input | OUT, key as u64);
    } else {
        shard.on_sent(key, -e);
    }
}

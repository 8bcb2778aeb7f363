//! The io_uring driver: multishot accept, one multishot receive per connection drawing from a
//! provided-buffer ring shared by the shard, sends straight from the arena, and a read on the
//! shard's eventfd for cross-shard wake-ups. One `io_uring_enter` per turn submits and waits.

use super::{close_fd, run_plans, set_nodelay, shutdown_wr, tag, Clock, Stopper};
use crate::shard::{IoPlan, Shard, SEND_FRAMES_MAX};
use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

const BUF_GROUP: u16 = 0;
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
// Submissions are batched per turn and flushed when full, so a modest SQ suffices; the CQ is
// deeper because multishot receives can complete many times per submission.
const SQ_ENTRIES: u32 = 1024;

/// A kernel-registered ring of receive buffers (IORING_REGISTER_PBUF_RING).
struct BufRing {
    entries: *mut BufRingEntry,
    ring_bytes: usize,
    mask: u16,
    tail: u16,
    bufs: Vec<u8>,
    buf_bytes: usize,
}

impl BufRing {
    fn new(ring: &IoUring, count: usize, buf_bytes: usize) -> io::Result<BufRing> {
        let n = count.clamp(1, 32768).next_power_of_two();
        let ring_bytes = n * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping; page-aligned as the kernel requires.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut br = BufRing {
            entries: ptr.cast(),
            ring_bytes,
            mask: (n - 1) as u16,
            tail: 0,
            bufs: vec![0u8; n * buf_bytes],
            buf_bytes,
        };
        for bid in 0..n as u16 {
            br.push(bid);
        }
        br.publish();
        // SAFETY: `entries` is a live, page-aligned mapping of `n` entries that outlives the
        // registration (we unregister in Drop before unmapping).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ptr as u64, n as u16, BUF_GROUP, 0)?
        };
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx < n entries of our mapping.
        let e = unsafe { &mut *self.entries.add(idx) };
        e.set_addr(self.bufs.as_ptr() as u64 + bid as u64 * self.buf_bytes as u64);
        e.set_len(self.buf_bytes as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's `resv`, inside our mapping; the kernel reads
        // it concurrently, hence the atomic release store.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn buf(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = bid as usize * self.buf_bytes;
        &mut self.bufs[start..start + len.min(self.buf_bytes)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; the ring that used it is dropped first (see run).
        unsafe { libc::munmap(self.entries.cast(), self.ring_bytes) };
    }
}

/// Whether this kernel can run the io_uring driver (multishot receive needs Linux 6.0).
pub fn available() -> Result<(), String> {
    // SAFETY: utsname is plain bytes; all zeros is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct.
    unsafe { libc::uname(&mut uts) };
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (6, 0) {
        return Err(format!(
            "kernel {release} is older than 6.0 (multishot receive)"
        ));
    }
    IoUring::new(8)
        .map(|_| ())
        .map_err(|e| format!("io_uring_setup failed: {e}"))
}

fn build_ring() -> io::Result<IoUring> {
    // SINGLE_ISSUER + DEFER_TASKRUN: completions run only when we enter the kernel to wait,
    // in our thread, in a batch. Fall back to a plain ring on kernels that refuse them.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(SQ_ENTRIES * 8)
        .build(SQ_ENTRIES)
        .or_else(|_| {
            IoUring::builder()
                .setup_cqsize(SQ_ENTRIES * 8)
                .build(SQ_ENTRIES)
        })
}

fn push(ring: &mut IoUring, e: squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an entry points at (arena frames, the buffer ring, the wake
        // counter) stays alive until its completion arrives; see Shard::plan and run().
        if unsafe { ring.submission().push(&e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

pub fn run(
    shard: Shard,
    listener: i32,
    stop: &AtomicBool,
    recv_buffers: usize,
    recv_buffer_bytes: usize,
) -> io::Result<()> {
    let result = (|| {
        let mut ring = build_ring()?;
        let mut bufs = BufRing::new(&ring, recv_buffers, recv_buffer_bytes)?;
        let mut wake_buf = Box::new(0u64);
        let r = event_loop(shard, listener, stop, &mut ring, &mut bufs, &mut wake_buf);
        // On every path the ring goes first: closing it ends the kernel's use of the receive
        // buffers and the wake counter, which are freed only after.
        drop(ring);
        drop(bufs);
        drop(wake_buf);
        r
    })();
    close_fd(listener);
    result
}

/// Multishot accept on the listener, re-armed when the kernel ends it; paused for a moment
/// when the process is out of file descriptors, instead of spinning or sleeping.
struct Acceptor {
    listener: i32,
    accepting: bool,
    again_at: Option<Instant>,
}

impl Acceptor {
    fn arm(&self, ring: &mut IoUring) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(self.listener))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        push(ring, e.user_data(tag::ACCEPT))
    }

    /// Re-arms once the pause after running out of descriptors is over.
    fn resume(&mut self, ring: &mut IoUring) -> io::Result<()> {
        if self.accepting && self.again_at.is_some_and(|t| Instant::now() >= t) {
            self.again_at = None;
            self.arm(ring)?;
        }
        Ok(())
    }

    fn on_complete(
        &mut self,
        shard: &mut Shard,
        ring: &mut IoUring,
        res: i32,
        flags: u32,
    ) -> io::Result<()> {
        if res >= 0 {
            set_nodelay(res);
            if shard.accept(res).is_none() {
                close_fd(res);
            }
        } else if res != -libc::ECANCELED && self.accepting {
            log::warn!(
                "shard {}: accept failed: {}",
                shard.id(),
                io::Error::from_raw_os_error(-res)
            );
        }
        if !cqueue::more(flags) && self.accepting {
            if res == -libc::EMFILE || res == -libc::ENFILE {
                self.again_at = Some(Instant::now() + ACCEPT_BACKOFF);
            } else {
                self.arm(ring)?;
            }
        }
        Ok(())
    }

    /// Shutdown: no more connections.
    fn stop(&mut self, ring: &mut IoUring) -> io::Result<()> {
        self.accepting = false;
        let e = opcode::AsyncCancel::new(tag::ACCEPT).build();
        push(ring, e.user_data(tag::CANCEL))?;
        super::stop_listening(self.listener);
        Ok(())
    }
}

/// One vectored send's header and iovecs: the kernel reads them until the send completes.
struct VecSend {
    hdr: libc::msghdr,
    iov: [libc::iovec; SEND_FRAMES_MAX],
}

/// The vectored sends in flight, by connection (one send per connection at a time), and
/// spare boxes for the next ones: in the steady state a send allocates nothing.
#[derive(Default)]
struct Vectored {
    in_flight: HashMap<u32, Box<VecSend>>,
    // Boxed on purpose: the kernel holds pointers into a box while its send is in flight,
    // and moving a box between the map and this list must not move what it points to.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<VecSend>>,
}

impl Vectored {
    /// Spare boxes kept (a box is ~550 bytes).
    const SPARE_MAX: usize = 256;

    /// The send for `key`'s queued frames, its memory held until `done(key)`.
    fn prepare(&mut self, shard: &Shard, key: u32) -> *const libc::msghdr {
        let mut v = self.spare.pop().unwrap_or_else(|| {
            // SAFETY: msghdr and iovec are plain C structs; all-zero is a valid (empty) value.
            Box::new(unsafe { std::mem::zeroed::<VecSend>() })
        });
        let n = shard.send_iovecs(key, &mut v.iov);
        v.hdr.msg_iov = v.iov.as_mut_ptr();
        v.hdr.msg_iovlen = n;
        let hdr: *const libc::msghdr = &v.hdr;
        // Moving the Box moves the pointer, not the heap memory `hdr` points into.
        self.in_flight.insert(key, v);
        hdr
    }

    fn done(&mut self, key: u32) {
        if let Some(v) = self.in_flight.remove(&key) {
            if self.spare.len() < Self::SPARE_MAX {
                self.spare.push(v);
            }
        }
    }
}

/// The read on the shard's eventfd that ends a sleep when a peer pushed work.
fn arm_wake(ring: &mut IoUring, wake_fd: i32, buf: &mut u64) -> io::Result<()> {
    let e = opcode::Read::new(Fd(wake_fd), (buf as *mut u64).cast(), 8).build();
    push(ring, e.user_data(tag::WAKE))
}

fn event_loop(
    mut shard: Shard,
    listener: i32,
    stop: &AtomicBool,
    ring: &mut IoUring,
    bufs: &mut BufRing,
    wake_buf: &mut u64,
) -> io::Result<()> {
    let wake_fd = shard.mesh().waker().fd();
    let mut acceptor = Acceptor {
        listener,
        accepting: true,
        again_at: None,
    };
    acceptor.arm(ring)?;
    arm_wake(ring, wake_fd, wake_buf)?;

    let clock = Clock::new();
    let mut stopper = Stopper::new();
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(SQ_ENTRIES as usize * 4);
    let mut ready = Vec::new();
    let mut vectored = Vectored::default();
    loop {
        shard.set_now(clock.now());
        acceptor.resume(ring)?;
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            match ud & tag::MASK {
                tag::ACCEPT => acceptor.on_complete(&mut shard, ring, res, flags)?,
                tag::RECV => on_recv(&mut shard, bufs, tag::key(ud), res, flags),
                tag::SEND => {
                    vectored.done(tag::key(ud));
                    shard.on_sent(tag::key(ud), res)
                }
                tag::WAKE => arm_wake(ring, wake_fd, wake_buf)?,
                _ => {} // cancel completions carry nothing we need
            }
        }
        bufs.publish();
        run_plans(&mut shard, &mut ready, |shard, key, fd, plan| {
            execute(ring, &mut vectored, shard, key, fd, plan)
        })?;
        shard.end_turn();
        let mut stop_accepting = false;
        if stopper.check(stop, &mut shard, || stop_accepting = true) {
            return Ok(());
        }
        if stop_accepting {
            acceptor.stop(ring)?;
        }
        enter(ring, &shard, &stopper)?;
    }
}

/// A multishot receive completed: bytes (from the provided-buffer ring, given back at once),
/// EOF, an error, or the end of the multishot.
fn on_recv(shard: &mut Shard, bufs: &mut BufRing, key: u32, res: i32, flags: u32) {
    if res > 0 {
        let bid = cqueue::buffer_select(flags).expect("a receive with data carries a buffer id");
        shard.on_recv(key, bufs.buf(bid, res as usize));
        bufs.push(bid);
    } else if res == 0 {
        shard.on_eof(key);
    } else if res == -libc::ENOBUFS {
        shard.count_recv_buffer_exhausted();
    } else if res != -libc::ECANCELED {
        shard.on_recv_error(key);
    }
    if !cqueue::more(flags) {
        shard.recv_disarmed(key);
    }
}

/// Turns one connection's plan into submissions (and the close, which is synchronous).
fn execute(
    ring: &mut IoUring,
    vectored: &mut Vectored,
    shard: &mut Shard,
    key: u32,
    fd: i32,
    plan: IoPlan,
) -> io::Result<()> {
    if let Some((ptr, len)) = plan.send {
        // Several queued frames (a busy group member's) leave in one sendmsg.
        let e = if plan.send_frames > 1 {
            opcode::SendMsg::new(Fd(fd), vectored.prepare(shard, key))
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        } else {
            opcode::Send::new(Fd(fd), ptr, len as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        };
        push(ring, e.user_data(tag::SEND | key as u64))?;
    }
    if plan.shutdown_wr {
        shutdown_wr(fd);
    }
    if plan.arm_recv {
        let e = opcode::RecvMulti::new(Fd(fd), BUF_GROUP).build();
        push(ring, e.user_data(tag::RECV | key as u64))?;
    }
    if plan.cancel_recv {
        let e = opcode::AsyncCancel::new(tag::RECV | key as u64).build();
        push(ring, e.user_data(tag::CANCEL | key as u64))?;
    }
    if plan.cancel_send {
        let e = opcode::AsyncCancel::new(tag::SEND | key as u64).build();
        push(ring, e.user_data(tag::CANCEL | key as u64))?;
    }
    if plan.close {
        close_fd(fd);
        shard.release(key);
    }
    Ok(())
}

/// Submits the turn's entries and waits for completions: sleeps until the next tick when
/// idle (telling peers, so their pushes wake us), else only collects what is ready. Even busy
/// we enter the kernel: with DEFER_TASKRUN nothing completes unless we ask for events.
fn enter(ring: &mut IoUring, shard: &Shard, stopper: &Stopper) -> io::Result<()> {
    let waker = shard.mesh().waker();
    waker.prepare_sleep();
    let idle = shard.idle() && ring.completion().is_empty();
    let timeout = match (idle, stopper.stopping()) {
        (false, _) => Duration::ZERO,
        // Draining: wake often enough to tell the next connections to go.
        (true, true) => Duration::from_millis(shard.sleep_ms().min(super::STOPPING_POLL_MS)),
        (true, false) => Duration::from_millis(shard.sleep_ms()),
    };
    let ts = Timespec::from(timeout);
    let args = SubmitArgs::new().timespec(&ts);
    let r = ring.submitter().submit_with_args(1, &args);
    waker.cancel_sleep();
    match r {
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

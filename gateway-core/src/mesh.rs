//! Cross-shard messaging: one `rtrb` SPSC ring per ordered pair of shards, drained in batches,
//! plus an eventfd per shard to wake it when it sleeps in the kernel.
//!
//! A full ring never blocks the sender: the message waits in a bounded per-peer backlog that
//! is moved into the ring on later turns; past the bound it is refused (the caller answers
//! `error` to the sender, or counts a drop) — ARCHITECTURE.md, "Bounded everything".

use crate::arena::Frame;
use crate::bridge::{BridgeLink, UpMsg};
use im_shared::conv::Conv;
use rtrb::{Consumer, Producer, RingBuffer};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Names one connection anywhere in this gateway process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub shard: u16,
    pub key: u32,
    pub gen: u32,
}

impl ConnRef {
    pub const NONE: ConnRef = ConnRef {
        shard: u16::MAX,
        key: u32::MAX,
        gen: 0,
    };
}

/// A message to be sequenced by the shard that owns its conversation.
#[derive(Debug)]
pub struct Submit {
    pub conv: Conv,
    pub from: u64,
    pub to: u64,
    pub cid: Box<str>,
    pub content: Box<str>,
    pub content_type: Box<str>,
    pub origin: ConnRef,
}

#[derive(Debug)]
pub enum ShardMsg {
    /// `shard` now holds connections of `user` (sent to the user's home shard).
    Attach { user: u64, shard: u16 },
    /// `shard` holds no more connections of `user`.
    Detach { user: u64, shard: u16 },
    /// To the conversation's owner: assign id and seq, then route.
    Submit(Box<Submit>),
    /// To the user's home shard: forward `frame` to every shard holding the user.
    Fanout {
        user: u64,
        frame: Frame,
        except: ConnRef,
    },
    /// To a shard holding the user: write `frame` to each of the user's connections.
    Deliver {
        user: u64,
        frame: Frame,
        except: ConnRef,
    },
    /// To the origin shard: write `frame` (a `sent` or `error`) to one connection.
    Reply { to: ConnRef, frame: Frame },
    /// Close one connection with 1008 (its token was revoked).
    Kick { to: ConnRef },
}

/// Wakes a shard sleeping in its event loop.
pub struct Waker {
    efd: RawFd,
    sleeping: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        // SAFETY: plain syscall; the fd is owned by the Waker and closed on drop.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Waker {
            efd,
            sleeping: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.efd
    }

    /// Called by another thread after pushing work. Writes the eventfd only when the shard
    /// said it is about to sleep, so busy shards cost no syscall.
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.force();
        }
    }

    /// Unconditional wake (shutdown).
    pub fn force(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter full) still
        // leaves it readable, which is all we need.
        unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
    }

    /// The owner announces it will block; it must re-check its rings afterwards.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    pub fn cancel_sleep(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.efd) };
    }
}

/// One shard's ends of the mesh.
pub struct MeshPort {
    id: u16,
    out: Vec<Option<Producer<ShardMsg>>>,
    inbound: Vec<Option<Consumer<ShardMsg>>>,
    backlog: Vec<VecDeque<ShardMsg>>,
    backlog_len: usize,
    backlog_max: usize,
    wakers: Arc<[Waker]>,
    to_wake: u64,
    /// The rings to and from the pipeline bridge (pipeline mode only).
    bridge: Option<BridgeLink>,
    /// Records waiting for room in the bridge ring (bounded by `backlog_max`, but presence
    /// changes, which are bounded by the connection count).
    up_backlog: VecDeque<UpMsg>,
    wake_bridge: bool,
}

/// Builds the full mesh for `n` shards (n ≤ 64).
pub fn build(
    n: usize,
    ring_capacity: usize,
    backlog_max: usize,
    wakers: Arc<[Waker]>,
) -> Vec<MeshPort> {
    assert!((1..=64).contains(&n), "1..=64 shards per process, not {n}");
    assert_eq!(wakers.len(), n);
    let mut ports: Vec<MeshPort> = (0..n)
        .map(|id| MeshPort {
            id: id as u16,
            out: (0..n).map(|_| None).collect(),
            inbound: (0..n).map(|_| None).collect(),
            backlog: (0..n).map(|_| VecDeque::new()).collect(),
            backlog_len: 0,
            backlog_max,
            wakers: wakers.clone(),
            to_wake: 0,
            bridge: None,
            up_backlog: VecDeque::new(),
            wake_bridge: false,
        })
        .collect();
    for src in 0..n {
        for dst in 0..n {
            if src != dst {
                let (p, c) = RingBuffer::new(ring_capacity);
                ports[src].out[dst] = Some(p);
                ports[dst].inbound[src] = Some(c);
            }
        }
    }
    ports
}

impl MeshPort {
    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog_len + self.up_backlog.len()
    }

    /// Connects this shard to the pipeline bridge.
    pub fn attach_bridge(&mut self, link: BridgeLink) {
        self.bridge = Some(link);
    }

    pub fn has_bridge(&self) -> bool {
        self.bridge.is_some()
    }

    /// Hands `msg` to the bridge. `Err` gives it back when the ring and the backlog are full;
    /// `must` parks it past the bound (presence changes: at most two per connection).
    pub fn send_up(&mut self, msg: UpMsg, must: bool) -> Result<(), UpMsg> {
        let Some(link) = self.bridge.as_mut() else {
            return Err(msg);
        };
        self.wake_bridge = true;
        if self.up_backlog.is_empty() {
            match link.up.push(msg) {
                Ok(()) => return Ok(()),
                Err(rtrb::PushError::Full(m)) => return self.park_up(m, must),
            }
        }
        self.park_up(msg, must)
    }

    fn park_up(&mut self, msg: UpMsg, must: bool) -> Result<(), UpMsg> {
        if !must && self.up_backlog.len() >= self.backlog_max {
            return Err(msg);
        }
        self.up_backlog.push_back(msg);
        Ok(())
    }

    /// Queues `msg` for shard `dst` (not ourselves). `Err` gives it back when the ring and the
    /// backlog are both full.
    pub fn send(&mut self, dst: u16, msg: ShardMsg) -> Result<(), ShardMsg> {
        let d = dst as usize;
        debug_assert_ne!(dst, self.id);
        self.to_wake |= 1 << d;
        let q = &mut self.backlog[d];
        if q.is_empty() {
            let ring = self.out[d].as_mut().expect("a ring to every other shard");
            match ring.push(msg) {
                Ok(()) => return Ok(()),
                Err(rtrb::PushError::Full(m)) => return self.park(d, m),
            }
        }
        self.park(d, msg)
    }

    /// Like `send`, for the few messages that must not be dropped (directory updates, bounded
    /// by the connection count): past the backlog bound they are parked anyway.
    pub fn send_unbounded(&mut self, dst: u16, msg: ShardMsg) {
        if let Err(msg) = self.send(dst, msg) {
            self.backlog[dst as usize].push_back(msg);
            self.backlog_len += 1;
        }
    }

    fn park(&mut self, d: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        if self.backlog_len >= self.backlog_max {
            return Err(msg);
        }
        self.backlog[d].push_back(msg);
        self.backlog_len += 1;
        Ok(())
    }

    /// Moves backlog into rings and wakes the peers we sent to this turn.
    pub fn flush(&mut self) {
        if self.backlog_len > 0 {
            for d in 0..self.backlog.len() {
                let Some(ring) = self.out[d].as_mut() else {
                    continue;
                };
                while !self.backlog[d].is_empty() && ring.slots() > 0 {
                    let m = self.backlog[d].pop_front().expect("not empty");
                    if ring.push(m).is_err() {
                        unreachable!("ring had a free slot");
                    }
                    self.backlog_len -= 1;
                }
                if !self.backlog[d].is_empty() {
                    self.to_wake |= 1 << d;
                }
            }
        }
        if let Some(link) = self.bridge.as_mut() {
            while !self.up_backlog.is_empty() && link.up.slots() > 0 {
                let m = self.up_backlog.pop_front().expect("not empty");
                if link.up.push(m).is_err() {
                    unreachable!("ring had a free slot");
                }
            }
            if std::mem::take(&mut self.wake_bridge) || !self.up_backlog.is_empty() {
                link.bridge_waker.wake();
            }
        }
        let mut w = std::mem::take(&mut self.to_wake);
        while w != 0 {
            let d = w.trailing_zeros() as usize;
            w &= w - 1;
            self.wakers[d].wake();
        }
    }

    /// Pops up to `budget` inbound messages, round-robin over peers, into `out`.
    pub fn drain(&mut self, budget: usize, out: &mut VecDeque<ShardMsg>) -> usize {
        let mut n = 0;
        if let Some(link) = self.bridge.as_mut() {
            let take = link.down.slots().min(budget / 2);
            if let Ok(chunk) = link.down.read_chunk(take) {
                out.extend(chunk);
                n += take;
            }
        }
        for c in self.inbound.iter_mut().flatten() {
            let take = c.slots().min(budget - n);
            if take == 0 {
                continue;
            }
            if let Ok(chunk) = c.read_chunk(take) {
                out.extend(chunk);
                n += take;
            }
            if n >= budget {
                break;
            }
        }
        n
    }

    pub fn has_inbound(&self) -> bool {
        self.inbound.iter().flatten().any(|c| c.slots() > 0)
            || self.bridge.as_ref().is_some_and(|l| l.down.slots() > 0)
    }

    pub fn has_backlog(&self) -> bool {
        self.backlog_len > 0 || !self.up_backlog.is_empty()
    }

    pub fn waker(&self) -> &Waker {
        &self.wakers[self.id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wakers(n: usize) -> Arc<[Waker]> {
        (0..n)
            .map(|_| Waker::new().unwrap())
            .collect::<Vec<_>>()
            .into()
    }

    fn attach(user: u64) -> ShardMsg {
        ShardMsg::Attach { user, shard: 0 }
    }

    #[test]
    fn messages_arrive_in_order_per_pair() {
        let mut ports = build(3, 8, 16, wakers(3));
        for u in 1..=5 {
            ports[0].send(2, attach(u)).unwrap();
        }
        ports[0].flush();
        let mut got = VecDeque::new();
        assert_eq!(ports[2].drain(100, &mut got), 5);
        let users: Vec<u64> = got
            .iter()
            .map(|m| {
                if let ShardMsg::Attach { user, .. } = m {
                    *user
                } else {
                    0
                }
            })
            .collect();
        assert_eq!(users, vec![1, 2, 3, 4, 5]);
        assert!(!ports[1].has_inbound());
    }

    #[test]
    fn full_ring_spills_to_a_bounded_backlog_then_refuses() {
        let mut ports = build(2, 4, 3, wakers(2));
        for u in 0..7 {
            ports[0].send(1, attach(u)).unwrap();
        }
        assert_eq!(ports[0].backlog_len(), 3);
        assert!(
            ports[0].send(1, attach(99)).is_err(),
            "backlog bound must hold"
        );
        let mut got = VecDeque::new();
        ports[1].drain(100, &mut got);
        ports[0].flush(); // backlog moves into the freed ring, in order
        ports[1].drain(100, &mut got);
        assert_eq!(got.len(), 7);
        assert_eq!(ports[0].backlog_len(), 0);
        if let ShardMsg::Attach { user, .. } = got[6] {
            assert_eq!(user, 6);
        } else {
            panic!()
        }
    }

    #[test]
    fn wake_writes_the_eventfd_only_for_a_sleeper() {
        let w = Waker::new().unwrap();
        let mut buf = 0u64;
        let read = |buf: &mut u64| unsafe { libc::read(w.fd(), (buf as *mut u64).cast(), 8) };
        w.wake();
        assert_eq!(read(&mut buf), -1, "not sleeping: no write");
        w.prepare_sleep();
        w.wake();
        assert_eq!(read(&mut buf), 8);
    }
}

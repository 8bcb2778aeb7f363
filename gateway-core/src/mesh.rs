//! Cross-shard messaging: one `rtrb` SPSC ring per ordered pair of shards, drained in batches,
//! plus an eventfd per shard (`Waker`) to wake it when it sleeps in the kernel. The messages
//! are in `msg`; the shard's rings to and from the pipeline bridge (`bridge`) hang off its
//! port here, so a shard drains one place.
//!
//! A full ring never blocks the sender: the message waits in a bounded per-peer backlog that
//! is moved into the ring on later turns; past the bound it is refused (the caller answers
//! `error` to the sender, or counts a drop) — ARCHITECTURE.md, "Bounded everything".

use crate::bridge::BridgeLink;
use crate::msg::{ShardMsg, UpMsg, SHARDS_MAX};
use crate::ring;
use crate::waker::{WakeSet, Waker};
use rtrb::{Consumer, Producer, RingBuffer};
use std::collections::VecDeque;
use std::sync::Arc;

/// One shard's ends of the mesh.
pub struct MeshPort {
    id: u16,
    out: Vec<Option<Producer<ShardMsg>>>,
    inbound: Vec<Option<Consumer<ShardMsg>>>,
    backlog: Vec<VecDeque<ShardMsg>>,
    backlog_len: usize,
    backlog_max: usize,
    wakers: Arc<[Waker]>,
    to_wake: WakeSet,
    /// The rings to and from the pipeline bridge (pipeline mode only).
    bridge: Option<BridgeLink>,
    /// Records waiting for room in the bridge ring (bounded by `backlog_max`, but presence
    /// changes, which are bounded by the connection count).
    up_backlog: VecDeque<UpMsg>,
    wake_bridge: bool,
    /// The peer whose ring `drain` visits first next turn.
    next_peer: usize,
}

/// Builds the full mesh for `n` shards (n ≤ `SHARDS_MAX`).
pub fn build(
    n: usize,
    ring_capacity: usize,
    backlog_max: usize,
    wakers: Arc<[Waker]>,
) -> Vec<MeshPort> {
    assert!(
        (1..=SHARDS_MAX).contains(&n),
        "1..={SHARDS_MAX} shards per process, not {n}"
    );
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
            to_wake: WakeSet::default(),
            bridge: None,
            up_backlog: VecDeque::new(),
            wake_bridge: false,
            next_peer: 0,
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

    /// Hands `msg` to the bridge. `Err` gives it back when there is no bridge, or when the
    /// ring and the backlog are full.
    pub fn send_up(&mut self, msg: UpMsg) -> Result<(), UpMsg> {
        if self.bridge.is_none() {
            return Err(msg);
        }
        match self.push_up(msg) {
            Ok(()) => Ok(()),
            Err(msg) if self.up_backlog.len() < self.backlog_max => {
                self.up_backlog.push_back(msg);
                Ok(())
            }
            Err(msg) => Err(msg),
        }
    }

    /// Hands `msg` to the bridge, parking it past the backlog bound when the ring is full:
    /// for presence changes, which must not be lost and are bounded anyway (two per
    /// connection). Without a bridge it is dropped.
    pub fn send_up_always(&mut self, msg: UpMsg) {
        if let Err(msg) = self.push_up(msg) {
            if self.bridge.is_some() {
                self.up_backlog.push_back(msg);
            }
        }
    }

    /// Pushes into the bridge ring when nothing waits before `msg`; gives it back otherwise.
    fn push_up(&mut self, msg: UpMsg) -> Result<(), UpMsg> {
        let Some(link) = self.bridge.as_mut() else {
            return Err(msg);
        };
        self.wake_bridge = true;
        if !self.up_backlog.is_empty() {
            return Err(msg);
        }
        link.up.push(msg).map_err(|rtrb::PushError::Full(m)| m)
    }

    /// Queues `msg` for shard `dst` (not ourselves). `Err` gives it back when the ring and the
    /// backlog are both full.
    pub fn send(&mut self, dst: u16, msg: ShardMsg) -> Result<(), ShardMsg> {
        let d = dst as usize;
        debug_assert_ne!(dst, self.id);
        self.to_wake.add(d);
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
                    self.to_wake.add(d);
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
        self.to_wake.wake(&self.wakers);
    }

    /// Pops inbound messages worth up to `budget` deliveries (`ShardMsg::weight`; one heavy
    /// message may overshoot it) and at most `msgs_max` messages, into `out`. Peers are
    /// visited from a different one each turn, so none is always last.
    pub fn drain(&mut self, budget: usize, msgs_max: usize, out: &mut VecDeque<ShardMsg>) {
        // The bridge gets at most half of each bound: peers are never starved by it.
        let (n, k) = match self.bridge.as_mut() {
            Some(link) => ring::drain_weighted(
                [&mut link.down],
                budget / 2,
                msgs_max / 2,
                ShardMsg::weight,
                out,
            ),
            None => (0, 0),
        };
        let start = self.next_peer % self.inbound.len();
        self.next_peer = self.next_peer.wrapping_add(1);
        let (before, from) = self.inbound.split_at_mut(start);
        ring::drain_weighted(
            from.iter_mut().chain(before.iter_mut()).flatten(),
            budget - n.min(budget / 2),
            msgs_max - k.min(msgs_max / 2),
            ShardMsg::weight,
            out,
        );
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
        ports[2].drain(100, 100, &mut got);
        assert_eq!(got.len(), 5);
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
        ports[1].drain(100, 100, &mut got);
        ports[0].flush(); // backlog moves into the freed ring, in order
        ports[1].drain(100, 100, &mut got);
        assert_eq!(got.len(), 7);
        assert_eq!(ports[0].backlog_len(), 0);
        if let ShardMsg::Attach { user, .. } = got[6] {
            assert_eq!(user, 6);
        } else {
            panic!()
        }
    }
}

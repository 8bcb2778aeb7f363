//! The shard's buffer arena: the only place a connection's bytes live outside the kernel, and
//! only while they must — a partial inbound frame, a fragmented message being reassembled, or
//! outbound frames the socket has not taken yet. An idle connection holds none of it.
//!
//! A byte budget bounds the whole arena; the shard sheds a connection (close 1013) rather than
//! grow past it.

use slab::Slab;
use std::collections::VecDeque;
use std::sync::Arc;

/// An encoded server frame. Shared: a message fanned out on a shard is encoded once.
pub type Frame = Arc<[u8]>;

/// Inbound state of a connection that is in the middle of something.
#[derive(Default)]
pub struct RxState {
    /// Bytes of an incomplete frame (or upgrade request), unprocessed.
    pub partial: Vec<u8>,
    /// Unmasked payload of a fragmented message so far.
    pub frag: Vec<u8>,
    /// Opcode of the fragmented message (text or binary); 0 when none is in progress.
    pub frag_opcode: u8,
}

impl RxState {
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.frag_opcode == 0
    }

    fn bytes(&self) -> usize {
        self.partial.capacity() + self.frag.capacity()
    }
}

/// Outbound frames of a connection that the socket has not fully taken.
#[derive(Default)]
pub struct TxState {
    pub queue: VecDeque<Frame>,
    /// Bytes of `queue[0]` already sent.
    pub head_sent: usize,
    /// Unsent bytes in `queue`.
    pub bytes: usize,
    /// Frames at the front of `queue` that the send in flight reads (0 when none is): they
    /// must stay where they are until it completes.
    pub in_flight: usize,
}

impl TxState {
    /// The bytes to hand the socket next.
    pub fn front(&self) -> Option<&[u8]> {
        self.queue.front().map(|f| &f[self.head_sent..])
    }
}

/// Emptied outbound queues kept for reuse, so a delivery to an idle connection allocates
/// nothing in the steady state (a shard delivers to idle connections all the time).
const SPARE_QUEUES_MAX: usize = 1024;
/// A queue that grew past this many frames (a slow reader's) is freed, not kept.
const SPARE_QUEUE_FRAMES_MAX: usize = 16;

pub struct Arena {
    rx: Slab<RxState>,
    /// Bytes charged per rx slot (what the slot held when it was last put back).
    rx_charged: Vec<usize>,
    tx: Slab<TxState>,
    spare_queues: Vec<VecDeque<Frame>>,
    bytes: usize,
    bytes_max: usize,
}

pub const NONE: u32 = u32::MAX;

impl Arena {
    pub fn new(bytes_max: usize) -> Arena {
        Arena {
            rx: Slab::new(),
            rx_charged: Vec::new(),
            tx: Slab::new(),
            spare_queues: Vec::new(),
            bytes: 0,
            bytes_max,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `more` bytes fit the budget.
    pub fn fits(&self, more: usize) -> bool {
        self.bytes + more <= self.bytes_max
    }

    /// Takes a connection's rx state out to work on it (a fresh one if `idx` is `NONE`).
    pub fn take_rx(&mut self, idx: u32) -> RxState {
        if idx == NONE {
            return RxState::default();
        }
        let st = std::mem::take(&mut self.rx[idx as usize]);
        self.bytes -= std::mem::take(&mut self.rx_charged[idx as usize]);
        self.rx.remove(idx as usize);
        st
    }

    /// Puts rx state back; an empty state is dropped and `NONE` returned.
    pub fn put_rx(&mut self, st: RxState) -> u32 {
        if st.is_empty() {
            return NONE;
        }
        let charged = st.bytes();
        let idx = self.rx.insert(st);
        if idx >= self.rx_charged.len() {
            self.rx_charged.resize(idx + 1, 0);
        }
        self.rx_charged[idx] = charged;
        self.bytes += charged;
        idx as u32
    }

    /// Appends a frame to a connection's tx state (created when `*idx` is `NONE`).
    pub fn push_tx(&mut self, idx: &mut u32, frame: Frame) {
        if *idx == NONE {
            let queue = self.spare_queues.pop().unwrap_or_default();
            *idx = self.tx.insert(TxState {
                queue,
                ..TxState::default()
            }) as u32;
        }
        let tx = &mut self.tx[*idx as usize];
        tx.bytes += frame.len();
        self.bytes += frame.len();
        tx.queue.push_back(frame);
    }

    pub fn tx(&self, idx: u32) -> Option<&TxState> {
        if idx == NONE {
            None
        } else {
            self.tx.get(idx as usize)
        }
    }

    pub fn tx_mut(&mut self, idx: u32) -> Option<&mut TxState> {
        if idx == NONE {
            None
        } else {
            self.tx.get_mut(idx as usize)
        }
    }

    pub fn tx_bytes(&self, idx: u32) -> usize {
        self.tx(idx).map_or(0, |t| t.bytes)
    }

    /// Records that the socket took `n` bytes; frees the state when nothing is left. Returns
    /// how many frames went out completely.
    pub fn advance_tx(&mut self, idx: &mut u32, mut n: usize) -> usize {
        if *idx == NONE {
            return 0;
        }
        let mut done = 0;
        let tx = &mut self.tx[*idx as usize];
        let taken = n.min(tx.bytes);
        tx.bytes -= taken;
        self.bytes -= taken;
        while n > 0 {
            let Some(front) = tx.queue.front() else { break };
            let left = front.len() - tx.head_sent;
            if n >= left {
                n -= left;
                tx.head_sent = 0;
                tx.queue.pop_front();
                done += 1;
            } else {
                tx.head_sent += n;
                n = 0;
            }
        }
        if tx.queue.is_empty() {
            self.free_tx(idx);
        }
        done
    }

    /// Drops an emptied tx state, keeping its queue's allocation for the next one.
    fn free_tx(&mut self, idx: &mut u32) {
        let tx = self.tx.remove(*idx as usize);
        *idx = NONE;
        let q = tx.queue;
        if self.spare_queues.len() < SPARE_QUEUES_MAX && q.capacity() <= SPARE_QUEUE_FRAMES_MAX {
            debug_assert!(q.is_empty());
            self.spare_queues.push(q);
        }
    }

    /// Drops queued frames but the first `keep` (partly sent, or read by a send in flight:
    /// cutting them would corrupt the stream or free what the kernel is reading).
    pub fn truncate_tx(&mut self, idx: &mut u32, keep: usize) {
        if *idx == NONE {
            return;
        }
        let tx = &mut self.tx[*idx as usize];
        let keep = keep.min(tx.queue.len());
        let dropped: usize = tx.queue.iter().skip(keep).map(|f| f.len()).sum::<usize>()
            - if keep == 0 { tx.head_sent } else { 0 };
        tx.queue.truncate(keep);
        if keep == 0 {
            tx.head_sent = 0;
        }
        tx.bytes -= dropped;
        self.bytes -= dropped;
        if tx.queue.is_empty() {
            self.free_tx(idx);
        }
    }

    /// Frees whatever a closing connection still holds.
    pub fn release(&mut self, rx: u32, tx: u32) {
        if rx != NONE {
            drop(self.take_rx(rx));
        }
        let mut tx = tx;
        self.truncate_tx(&mut tx, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Frame {
        vec![7u8; n].into()
    }

    #[test]
    fn tx_accounting_through_partial_sends() {
        let mut a = Arena::new(1 << 20);
        let mut idx = NONE;
        a.push_tx(&mut idx, frame(10));
        a.push_tx(&mut idx, frame(5));
        assert_eq!((a.bytes(), a.tx_bytes(idx)), (15, 15));
        a.advance_tx(&mut idx, 4);
        assert_eq!(a.tx(idx).unwrap().front().unwrap().len(), 6);
        a.advance_tx(&mut idx, 8);
        assert_eq!(a.tx(idx).unwrap().front().unwrap().len(), 3);
        a.advance_tx(&mut idx, 3);
        assert_eq!((idx, a.bytes()), (NONE, 0));
    }

    #[test]
    fn truncate_keeps_a_partly_sent_front() {
        let mut a = Arena::new(1 << 20);
        let mut idx = NONE;
        for _ in 0..4 {
            a.push_tx(&mut idx, frame(10));
        }
        a.advance_tx(&mut idx, 3);
        a.truncate_tx(&mut idx, 1);
        assert_eq!((a.tx_bytes(idx), a.bytes()), (7, 7));
        a.truncate_tx(&mut idx, 0);
        assert_eq!((idx, a.bytes()), (NONE, 0));
    }

    #[test]
    fn emptied_queues_are_reused_within_a_bound() {
        let mut a = Arena::new(1 << 20);
        let mut idx = NONE;
        a.push_tx(&mut idx, frame(10));
        a.advance_tx(&mut idx, 10);
        assert_eq!(a.spare_queues.len(), 1);
        a.push_tx(&mut idx, frame(10));
        assert_eq!(a.spare_queues.len(), 0, "taken again");
        // A slow reader's long queue is not kept.
        for _ in 0..100 {
            a.push_tx(&mut idx, frame(1));
        }
        a.truncate_tx(&mut idx, 0);
        assert_eq!((idx, a.spare_queues.len()), (NONE, 0));
    }

    #[test]
    fn empty_rx_state_is_not_kept() {
        let mut a = Arena::new(1 << 20);
        assert_eq!(a.put_rx(RxState::default()), NONE);
        let mut st = RxState::default();
        st.partial.extend_from_slice(b"abc");
        let idx = a.put_rx(st);
        assert!(a.bytes() >= 3);
        let st = a.take_rx(idx);
        assert_eq!(st.partial, b"abc");
        assert_eq!(a.bytes(), 0);
    }
}

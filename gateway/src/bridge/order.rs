//! Live order per conversation at the gateway (PROTOCOL.md, "In order per conversation").
//!
//! Logic routes a message only once it is durable and its ownership of the partition is
//! confirmed, and one owner routes a conversation's messages in seq order. But a process can
//! stop at any instant after that confirmation — SIGSTOP, a VM paused, a long stall — with the
//! message's downstream record still in its producer's queue or its `route` half done. Past
//! its session timeout the group hands the partition to another instance, which goes on
//! delivering later seqs; when the paused one wakes, its old record lands in the gateway's
//! topic after theirs. Nothing at the source can prevent that (the pause can fall between
//! any two instructions), so the gateway drops a `msg` whose seq is not above the last one it
//! delivered for that conversation: the device never sees a conversation go backwards, and the
//! message it misses live comes back by `sync` like any other live miss.
//!
//! Memory is bounded: conversations are keyed by a 64-bit hash of their id, in two tables of
//! at most `CAP` entries; when the current one fills, it becomes the previous one and the
//! older previous one is dropped. A conversation is remembered until `CAP` to `2 × CAP` others
//! have been delivered to after it. A late record can wait in the paused owner's producer for
//! up to its message timeout (`im_bus::RECORD_TIMEOUT_MS`, 2 minutes), so the check holds
//! for a gateway delivering to fewer than about 550 distinct conversations a second; above
//! that, a pause long enough can still let a stale `msg` through (bounded memory's price;
//! carrying the owner's fencing epoch per partition would close it). A hash collision can
//! only drop a live `msg` (recovered by `sync`), never deliver one out of order.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Conversations remembered per table (two tables: 2 × 65,536 × ~16 bytes ≈ 2–4 MiB).
pub(super) const CAP: usize = 1 << 16;

/// The last seq delivered live per conversation, on one gateway's down thread.
pub(super) struct LiveOrder {
    current: HashMap<u64, u64>,
    previous: HashMap<u64, u64>,
    cap: usize,
}

impl LiveOrder {
    pub(super) fn new(cap: usize) -> LiveOrder {
        assert!(cap > 0);
        LiveOrder {
            current: HashMap::new(),
            previous: HashMap::new(),
            cap,
        }
    }

    /// Whether a `msg` of `conv` at `seq` may go out now (and, if so, notes it). Records that
    /// carry no seq (receipts, read events, typing; older logic builds) always may.
    pub(super) fn admit(&mut self, conv: &str, seq: u64) -> bool {
        if seq == 0 || conv.is_empty() {
            return true;
        }
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            conv.hash(&mut h);
            h.finish()
        };
        let last = self
            .current
            .get(&key)
            .or_else(|| self.previous.get(&key))
            .copied()
            .unwrap_or(0);
        if seq <= last {
            return false;
        }
        if self.current.len() >= self.cap && !self.current.contains_key(&key) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, seq);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_never_goes_backwards() {
        let mut o = LiveOrder::new(CAP);
        assert!(o.admit("p:1:2", 5));
        assert!(o.admit("p:1:2", 6));
        // The late record of a paused owner, and a duplicate.
        assert!(!o.admit("p:1:2", 4));
        assert!(!o.admit("p:1:2", 6));
        // A gap is not this check's business: live delivery is best effort, sync fills it.
        assert!(o.admit("p:1:2", 9));
        // Other conversations are independent.
        assert!(o.admit("g:7", 1));
        assert!(o.admit("p:1:3", 2));
        // Frames without a seq always go.
        assert!(o.admit("", 0));
        assert!(o.admit("p:1:2", 0));
    }

    #[test]
    fn memory_is_bounded_and_recent_conversations_are_remembered() {
        let mut o = LiveOrder::new(4);
        for c in 0..4 {
            assert!(o.admit(&format!("g:{c}"), 10));
        }
        // The fifth turns the tables over: the first four are still remembered (previous).
        assert!(o.admit("g:4", 10));
        assert!(!o.admit("g:0", 9));
        // A conversation delivered to again moves to the current table.
        assert!(o.admit("g:0", 11));
        for c in 5..12 {
            assert!(o.admit(&format!("g:{c}"), 10));
        }
        assert!(o.current.len() <= 4 && o.previous.len() <= 4);
        // Forgotten after two turnovers: an old seq passes again (bounded memory's price).
        assert!(o.admit("g:1", 3));
    }
}

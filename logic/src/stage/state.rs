//! What one logic instance knows about the partitions it owns: each conversation's last seq
//! and the recent (sender, cid) → ack map that recognises client retries.
//!
//! One writer per partition: the consumer group gives each `im.upstream` partition to one
//! instance, and every conversation's records are in one partition (the key is the
//! conversation id), so the owner can hand out seqs from memory. On assignment it recovers:
//! everything before the persist group's committed offset in `im.messages` is in the database
//! (persist commits only after its batch is in), and the rest is read back from the topic —
//! the tail. A conversation not in the tail takes its last seq from the database on first use.
//!
//! "One writer" is what the consumer group intends, not what it guarantees: an instance that
//! was paused past its session timeout still believes it owns its partitions when it wakes.
//! So each owner writes a fence into the partition before reading the tail, stamps its
//! records with its epoch (group generation + 1), and the tail is read as persist reads it: what a
//! fenced-off owner wrote after a newer fence is not part of the partition's history
//! (README.md, "Fencing").

use im_shared::records::{Fencing, Judged, Stored, Versioned};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

/// What a `sent` needs, kept for retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub id: u64,
    pub conv: String,
    pub seq: u64,
    pub ts: u64,
}

/// Retries recognised from memory per partition; older ones are found in the database once
/// persisted (the window is this many messages of the partition).
pub const SENT_MAX: usize = 200_000;

/// A remembered answer, 40 bytes: the conversation id is shared with `seqs`.
struct Kept {
    id: u64,
    seq: u64,
    ts: u64,
    conv: Arc<str>,
}

/// The retry window's key: the sender and a 64-bit fingerprint of its cid (SipHash with this
/// partition's random key). About 110 bytes an entry, all told, where (sender, cid) → `Ack`
/// with owned strings in a hash table took 244, and more once the table doubled (a test
/// measures it, before and after the window turns over); a full window of one partition is
/// ≈ 22 MB. Two cids of one sender within its window share a fingerprint with a probability
/// of about (messages of that sender in the window) / 2^64 — then the second would be answered
/// as a retry of the first.
type Key = (u64, u64);

#[derive(Default)]
pub struct Partition {
    /// The epoch of this instance's ownership (group generation + 1): stamped on its records.
    pub epoch: i32,
    /// The fence as read so far (the database's, then the tail's).
    fencing: Fencing,
    /// conv → last seq handed out (conversations seen since recovery).
    seqs: HashMap<Arc<str>, u64>,
    /// A B-tree, not a hash table: a full window turns over (an insert and a removal per
    /// message), and hashbrown reuses removed slots in place only while at most half full, so
    /// a table sized for the window doubles once, late (it was the step 25 minutes into the
    /// soak at 2,000 msg/s, 4 × 21 MB). The B-tree's nodes split and merge instead: its size
    /// follows its length. A lookup walks a few nodes: well under a microsecond.
    sent: BTreeMap<Key, Kept>,
    order: VecDeque<Key>,
    /// The fingerprints' key.
    cid_hash: RandomState,
}

impl Partition {
    /// State for an owner in `epoch`, before the tail is read; `fence` is the
    /// database's fence for the partition.
    pub fn new(epoch: i32, fence: i32) -> Partition {
        Partition {
            epoch,
            fencing: Fencing { fence },
            ..Default::default()
        }
    }

    /// The highest epoch fenced in what was read: above this owner's own epoch,
    /// a newer owner exists and this one must not write.
    pub fn fence(&self) -> i32 {
        self.fencing.fence
    }

    fn key(&self, sender: u64, cid: &str) -> Key {
        (sender, self.cid_hash.hash_one(cid))
    }

    /// The answer given to (sender, cid), if it is in the window.
    pub fn ack(&self, sender: u64, cid: &str) -> Option<Ack> {
        self.sent.get(&self.key(sender, cid)).map(|k| Ack {
            id: k.id,
            conv: k.conv.to_string(),
            seq: k.seq,
            ts: k.ts,
        })
    }

    pub fn remember(&mut self, sender: u64, cid: &str, ack: Ack) {
        let key = self.key(sender, cid);
        let conv = match self.seqs.get_key_value(ack.conv.as_str()) {
            Some((c, _)) => c.clone(),
            None => ack.conv.into(),
        };
        let kept = Kept {
            id: ack.id,
            seq: ack.seq,
            ts: ack.ts,
            conv,
        };
        if self.sent.insert(key, kept).is_none() {
            self.order.push_back(key);
            if self.order.len() > SENT_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.sent.remove(&old);
                }
            }
        }
    }

    /// Takes a record of the `im.messages` tail into account (fences, and messages whose
    /// writer was not fenced off; a stale one was not stored and its request is sequenced
    /// again by its partition's owner).
    pub fn replay(&mut self, payload: &[u8]) {
        let Ok(m) = Stored::from_bytes(payload) else {
            return;
        };
        if self.fencing.judge(&m) != Judged::Current {
            return;
        }
        match self.seqs.get_mut(m.conv.as_str()) {
            Some(seq) => *seq = (*seq).max(m.seq),
            None => {
                self.seqs.insert(m.conv.as_str().into(), m.seq);
            }
        }
        let ack = Ack {
            id: m.id,
            conv: m.conv,
            seq: m.seq,
            ts: m.ts,
        };
        self.remember(m.from, &m.cid, ack);
    }

    /// The next seq of `conv`, given the database's last seq for conversations not yet known.
    pub fn next_seq(&mut self, conv: &str, db_max: Option<u64>) -> u64 {
        let seq = match self.seqs.get_mut(conv) {
            Some(s) => s,
            None => self.seqs.entry(conv.into()).or_insert(db_max.unwrap_or(0)),
        };
        *seq += 1;
        *seq
    }

    /// Conversations known (seen since recovery).
    pub fn conversations(&self) -> usize {
        self.seqs.len()
    }

    pub fn last_seq(&self, conv: &str) -> Option<u64> {
        self.seqs.get(conv).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_shared::records::VERSION;

    fn stored(conv: &str, seq: u64, from: u64, cid: &str) -> Vec<u8> {
        Stored {
            version: VERSION,
            id: seq * 10,
            conv: conv.into(),
            seq,
            from,
            cid: cid.into(),
            ..Default::default()
        }
        .to_bytes()
    }

    #[test]
    fn recovery_from_the_tail_continues_seqs_and_knows_retries() {
        let mut p = Partition::default();
        p.replay(&stored("p:1:2", 7, 1, "a"));
        p.replay(&stored("p:1:2", 8, 2, "b"));
        p.replay(&b"garbage"[..]);
        // The tail wins over an older database value; unknown conversations take the database's.
        assert_eq!(p.next_seq("p:1:2", Some(5)), 9);
        assert_eq!(p.next_seq("g:3", Some(41)), 42);
        assert_eq!(p.next_seq("g:4", None), 1);
        assert_eq!(p.ack(2, "b").map(|a| a.seq), Some(8));
        assert!(p.ack(1, "b").is_none());
    }

    #[test]
    fn the_tail_is_read_as_persist_reads_it_past_fences() {
        let stamped = |seq, cid: &str, epoch| {
            let mut m = Stored::from_bytes(&stored("p:1:2", seq, 1, cid)).unwrap();
            m.epoch = epoch;
            m.to_bytes()
        };
        // The database knew fence 2; this owner is in epoch 5.
        let mut p = Partition::new(5, 2);
        p.replay(&stamped(1, "old", 1)); // before the database's fence: never stored
        p.replay(&stamped(1, "a", 2));
        p.replay(&Stored::fence(3).to_bytes());
        p.replay(&stamped(2, "zombie", 2)); // its writer lost the partition at 3
        p.replay(&stamped(2, "b", 3));
        p.replay(&Stored::fence(5).to_bytes()); // this owner's own fence
        assert_eq!(p.fence(), 5);
        assert_eq!(p.next_seq("p:1:2", None), 3);
        assert!(p.ack(1, "old").is_none() && p.ack(1, "zombie").is_none());
        assert_eq!(p.ack(1, "b").map(|a| a.seq), Some(2));
        // A newer owner's fence in the tail: this instance is the one fenced off.
        let mut q = Partition::new(5, 0);
        q.replay(&Stored::fence(5).to_bytes());
        q.replay(&Stored::fence(6).to_bytes());
        assert!(q.fence() > q.epoch);
    }

    #[test]
    fn the_retry_window_is_bounded() {
        let mut p = Partition::default();
        for i in 0..(SENT_MAX + 10) as u64 {
            p.remember(
                1,
                &i.to_string(),
                Ack {
                    id: i,
                    conv: "c".into(),
                    seq: i,
                    ts: 0,
                },
            );
        }
        assert_eq!(p.sent.len(), SENT_MAX);
        assert!(p.ack(1, "0").is_none());
        assert!(p.ack(1, &(SENT_MAX + 9).to_string()).is_some());
    }

    #[test]
    fn a_window_entry_is_40_bytes_before_its_keys() {
        // What it costs in a full window, with the B-tree's nodes: logic/tests/window_cost.rs
        // (a process of its own, so that no other test's allocations are counted).
        assert_eq!(std::mem::size_of::<Kept>(), 40);
    }
}

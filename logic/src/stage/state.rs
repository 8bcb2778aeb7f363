//! What one logic instance knows about the partitions it owns: each conversation's last seq
//! and the recent (sender, cid) → ack map that recognises client retries.
//!
//! One writer per partition: the consumer group gives each `im.upstream` partition to one
//! instance, and every conversation's records are in one partition (the key is the
//! conversation id), so the owner can hand out seqs from memory. On assignment it recovers:
//! everything before the persist group's committed offset in `im.messages` is in the database
//! (persist commits only after its batch is in), and the rest is read back from the topic —
//! the tail. A conversation not in the tail takes its last seq from the database on first use.

use im_shared::records::{Stored, Versioned};
use std::collections::{HashMap, VecDeque};

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

#[derive(Default)]
pub struct Partition {
    /// conv → last seq handed out (conversations seen since recovery).
    pub seqs: HashMap<String, u64>,
    sent: HashMap<(u64, String), Ack>,
    order: VecDeque<(u64, String)>,
}

impl Partition {
    pub fn ack(&self, sender: u64, cid: &str) -> Option<&Ack> {
        // A tuple key cannot be looked up by borrowed parts; cids are short.
        self.sent.get(&(sender, cid.to_owned()))
    }

    pub fn remember(&mut self, sender: u64, cid: String, ack: Ack) {
        let key = (sender, cid);
        if self.sent.insert(key.clone(), ack).is_none() {
            self.order.push_back(key);
            if self.order.len() > SENT_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.sent.remove(&old);
                }
            }
        }
    }

    /// Takes a record of the `im.messages` tail into account.
    pub fn replay(&mut self, payload: &[u8]) {
        let Ok(m) = Stored::from_bytes(payload) else {
            return;
        };
        let seq = self.seqs.entry(m.conv.clone()).or_insert(0);
        *seq = (*seq).max(m.seq);
        let ack = Ack {
            id: m.id,
            conv: m.conv,
            seq: m.seq,
            ts: m.ts,
        };
        self.remember(m.from, m.cid, ack);
    }

    /// The next seq of `conv`, given the database's last seq for conversations not yet known.
    pub fn next_seq(&mut self, conv: &str, db_max: Option<u64>) -> u64 {
        let seq = match self.seqs.get_mut(conv) {
            Some(s) => s,
            None => self
                .seqs
                .entry(conv.to_owned())
                .or_insert(db_max.unwrap_or(0)),
        };
        *seq += 1;
        *seq
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
    fn the_retry_window_is_bounded() {
        let mut p = Partition::default();
        for i in 0..(SENT_MAX + 10) as u64 {
            p.remember(
                1,
                i.to_string(),
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
}

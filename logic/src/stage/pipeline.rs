//! The batches whose `im.messages` produces are outstanding, without I/O. The stage no longer
//! waits for one batch's acknowledgements before sequencing the next (stop-and-wait made its
//! throughput one batch per broker round trip): batch N+1 is checked, sequenced and produced
//! while N's acknowledgements are still on their way. What must stay in order does:
//!
//! - Seqs: the `Sequencer` hands them out in consumption order whatever is in flight, so N+1
//!   continues where N left off (a retry of a send still in flight is `RetryOf` its ack).
//! - Answers, routing and offset commits: a batch is released (`pop_ready`) only when every
//!   one of its records is acknowledged *and* every batch before it has been released, so a
//!   sender never hears `sent` before its message is durable, a `RetryOf` never answers
//!   before the message it repeats, and a committed offset never passes an unlogged record.
//! - Acknowledgements may arrive in any order (partitions are independent logs; a broker
//!   acknowledges them separately): `acked` only marks.
//! - A failed produce (`failed`) is retried with the *same* record (same id, same seq): no
//!   seq is handed out twice and none is skipped, so there is no gap for a client to wait
//!   on. The log may then hold seq 6 before seq 5 of a conversation; persist stores rows by
//!   (conv, seq) and recovery takes the highest seq, so only delivery order matters, and that
//!   is the release order above. After `PRODUCE_ATTEMPTS` failures the stage gives up (as
//!   before pipelining: a restart recovers from the log, and no answer of the failed batch or
//!   any later one has gone out).
//! - A rebalance abandons what is in flight (`abandon`): unanswered, unrouted, uncommitted.
//!   Answering it after the partitions were revoked would race their next owner, whose
//!   recovery reads these records back if they landed before its fence (it answers their
//!   senders' replays as retries) and stales them if they landed after (it sequences the
//!   requests again). Outcomes that arrive for an abandoned batch are ignored.

use std::collections::VecDeque;

/// How many times one record is produced before the stage gives up.
pub const PRODUCE_ATTEMPTS: u8 = 3;

/// A batch's number, in the order batches were pushed.
pub type BatchNo = u64;

/// What the driver does after a failed produce.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Produce record `index` of batch `batch` again (this is its `attempt`th try).
    Retry { attempt: u8 },
    /// Out of attempts: the stage stops with this error.
    GiveUp(String),
    /// The batch was abandoned: nothing to do.
    Abandoned,
}

struct InFlight<T> {
    no: BatchNo,
    batch: T,
    /// Per record: still waiting for its acknowledgement.
    waiting: Vec<bool>,
    outstanding: usize,
    attempts: Vec<u8>,
}

/// Batches in flight, released in order. `T` is whatever the driver needs to answer a batch.
pub struct Pipeline<T> {
    next: BatchNo,
    queue: VecDeque<InFlight<T>>,
    records: usize,
    batches_max: usize,
    records_max: usize,
    /// Batches numbered below this were abandoned (or released).
    abandoned_before: BatchNo,
}

impl<T> Pipeline<T> {
    /// At most `batches_max` batches and `records_max` unacknowledged records in flight.
    pub fn new(batches_max: usize, records_max: usize) -> Pipeline<T> {
        assert!(batches_max > 0 && records_max > 0);
        Pipeline {
            next: 0,
            queue: VecDeque::new(),
            records: 0,
            batches_max,
            records_max,
            abandoned_before: 0,
        }
    }

    /// Drops every batch in flight, unanswered; returns how many there were.
    pub fn abandon(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        self.records = 0;
        self.abandoned_before = self.next;
        n
    }

    /// Whether another batch may start (else the driver waits for acknowledgements).
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.batches_max && self.records < self.records_max
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Batches in flight.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Records produced and not yet acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.records
    }

    /// Registers a batch; `produced[i]` says whether its record `i` was produced and must be
    /// acknowledged (a batch with none still waits for the batches before it).
    pub fn push(&mut self, batch: T, produced: Vec<bool>) -> BatchNo {
        let no = self.next;
        self.next += 1;
        let outstanding = produced.iter().filter(|p| **p).count();
        self.records += outstanding;
        self.queue.push_back(InFlight {
            no,
            batch,
            attempts: vec![1; produced.len()],
            waiting: produced,
            outstanding,
        });
        no
    }

    /// Batch `no`, while it is in flight.
    pub fn get(&self, no: BatchNo) -> Option<&T> {
        let first = self.queue.front()?.no;
        self.queue
            .get(no.checked_sub(first)? as usize)
            .map(|b| &b.batch)
    }

    fn find(&mut self, no: BatchNo, index: usize) -> Option<&mut InFlight<T>> {
        let first = self.queue.front()?.no;
        let b = self.queue.get_mut(no.checked_sub(first)? as usize)?;
        (index < b.waiting.len() && b.waiting[index]).then_some(b)
    }

    /// Record `index` of batch `no` is durable. An acknowledgement for something not waiting
    /// (already acknowledged, or unknown) is ignored.
    pub fn acked(&mut self, no: BatchNo, index: usize) {
        if let Some(b) = self.find(no, index) {
            b.waiting[index] = false;
            b.outstanding -= 1;
            self.records -= 1;
        }
    }

    /// Record `index` of batch `no` was refused: retry it, or give up.
    pub fn failed(&mut self, no: BatchNo, index: usize, why: &str) -> Failure {
        if no < self.abandoned_before && self.queue.front().is_none_or(|b| no < b.no) {
            return Failure::Abandoned;
        }
        let Some(b) = self.find(no, index) else {
            return Failure::GiveUp(format!(
                "batch {no} record {index} failed unexpectedly: {why}"
            ));
        };
        if b.attempts[index] >= PRODUCE_ATTEMPTS {
            return Failure::GiveUp(format!(
                "producing a message failed {PRODUCE_ATTEMPTS} times: {why}"
            ));
        }
        b.attempts[index] += 1;
        Failure::Retry {
            attempt: b.attempts[index],
        }
    }

    /// The oldest batch, once all of it is acknowledged (call until `None`).
    pub fn pop_ready(&mut self) -> Option<T> {
        if self.queue.front()?.outstanding > 0 {
            return None;
        }
        self.queue.pop_front().map(|b| b.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::sequencer::{Admitted, Decision, Sequencer};
    use crate::stage::state::Partition;
    use std::collections::HashMap;

    /// A 1:1 send (the sequencer's tests build them).
    fn send(from: u64, cid: &str, to_user: u64, partition: i32) -> Admitted {
        crate::stage::sequencer::tests::send(from, cid, to_user, 0, partition)
    }

    fn seqs(decisions: &[Decision]) -> Vec<(String, u64)> {
        decisions
            .iter()
            .map(|d| match d {
                Decision::Assigned(s) => (s.conv.clone(), s.seq),
                Decision::RetryOf(a) => (format!("retry {}", a.conv), a.seq),
                Decision::Refused(..) => ("refused".into(), 0),
            })
            .collect()
    }

    /// Sequences `sends` as the stage does and registers the batch.
    fn start(
        seq: &mut Sequencer,
        p: &mut Pipeline<Vec<Decision>>,
        sends: &[Admitted],
    ) -> (BatchNo, Vec<Decision>) {
        let d = seq.decide(sends, &HashMap::new(), &HashMap::new(), 1_000);
        let produced = d
            .iter()
            .map(|d| matches!(d, Decision::Assigned(_)))
            .collect();
        (p.push(d.clone(), produced), d)
    }

    fn sequencer() -> Sequencer {
        let mut s = Sequencer::new(std::sync::Arc::new(
            im_shared::snowflake::WorkerLease::fixed(1),
        ));
        s.recovered(0, Partition::default());
        s.recovered(1, Partition::default());
        s
    }

    #[test]
    fn acks_out_of_order_across_partitions_release_batches_in_order() {
        let mut seq = sequencer();
        let mut p = Pipeline::new(8, 100);
        // Batch 0: one message in each partition; batch 1 continues both conversations
        // before batch 0 is acknowledged.
        let (b0, d0) = start(&mut seq, &mut p, &[send(1, "a", 2, 0), send(3, "b", 4, 1)]);
        let (b1, d1) = start(&mut seq, &mut p, &[send(1, "c", 2, 0), send(3, "d", 4, 1)]);
        assert_eq!(
            seqs(&d0),
            [("p:1:2".to_string(), 1), ("p:3:4".to_string(), 1)]
        );
        assert_eq!(
            seqs(&d1),
            [("p:1:2".to_string(), 2), ("p:3:4".to_string(), 2)]
        );
        assert_eq!(p.unacknowledged(), 4);
        // Partition 1 answers first, and batch 1 is complete before batch 0.
        p.acked(b1, 1);
        p.acked(b0, 1);
        p.acked(b1, 0);
        assert!(p.pop_ready().is_none(), "batch 1 must wait for batch 0");
        p.acked(b1, 0); // a duplicate acknowledgement changes nothing
        assert_eq!(p.unacknowledged(), 1);
        p.acked(b0, 0);
        assert_eq!(p.pop_ready(), Some(d0));
        assert_eq!(p.pop_ready(), Some(d1));
        assert!(p.pop_ready().is_none() && p.is_empty());
    }

    #[test]
    fn a_failed_produce_is_retried_with_its_seq_and_holds_later_batches() {
        let mut seq = sequencer();
        let mut p = Pipeline::new(8, 100);
        let (b0, d0) = start(&mut seq, &mut p, &[send(1, "a", 2, 0)]);
        // Batch 1 carries the next message and a client retry of batch 0's message.
        let (b1, d1) = start(&mut seq, &mut p, &[send(1, "b", 2, 0), send(1, "a", 2, 0)]);
        assert_eq!(
            seqs(&d1),
            [("p:1:2".to_string(), 2), ("retry p:1:2".to_string(), 1)]
        );
        p.acked(b1, 0);
        // Batch 0's record fails: retried (the same record, seq 1), and nothing is released.
        assert_eq!(
            p.failed(b0, 0, "broker down"),
            Failure::Retry { attempt: 2 }
        );
        assert!(p.pop_ready().is_none());
        assert_eq!(
            p.failed(b0, 0, "broker down"),
            Failure::Retry { attempt: 3 }
        );
        p.acked(b0, 0);
        // Released in order: seq 1, then seq 2 and the retry's ack (seq 1) — no gap, no
        // reordering, and the retry answered only after the message it repeats is durable.
        assert_eq!(p.pop_ready(), Some(d0));
        assert_eq!(p.pop_ready(), Some(d1));
    }

    #[test]
    fn a_produce_out_of_attempts_gives_up_before_anything_later_is_released() {
        let mut seq = sequencer();
        let mut p = Pipeline::new(8, 100);
        let (b0, _) = start(&mut seq, &mut p, &[send(1, "a", 2, 0)]);
        let (b1, _) = start(&mut seq, &mut p, &[send(1, "b", 2, 0)]);
        p.acked(b1, 0);
        for attempt in 2..=PRODUCE_ATTEMPTS {
            assert_eq!(p.failed(b0, 0, "x"), Failure::Retry { attempt });
        }
        assert!(matches!(p.failed(b0, 0, "x"), Failure::GiveUp(_)));
        assert!(p.pop_ready().is_none(), "batch 1 is never answered");
    }

    #[test]
    fn an_abandoned_batch_is_never_released_and_its_late_outcomes_are_ignored() {
        let mut seq = sequencer();
        let mut p = Pipeline::new(8, 100);
        let (b0, _) = start(&mut seq, &mut p, &[send(1, "a", 2, 0)]);
        let (b1, _) = start(&mut seq, &mut p, &[send(1, "b", 2, 0)]);
        p.acked(b0, 0);
        assert_eq!(p.abandon(), 2);
        assert!(p.is_empty() && p.unacknowledged() == 0 && p.has_room());
        p.acked(b1, 0);
        assert_eq!(p.failed(b1, 0, "late"), Failure::Abandoned);
        assert!(p.pop_ready().is_none());
        // Numbering goes on: a new batch is not mistaken for an abandoned one.
        let (b2, d2) = start(&mut seq, &mut p, &[send(1, "c", 2, 0)]);
        assert!(b2 > b1);
        assert_eq!(p.failed(b1, 0, "late"), Failure::Abandoned);
        assert_eq!(p.failed(b2, 0, "x"), Failure::Retry { attempt: 2 });
        p.acked(b2, 0);
        assert_eq!(p.pop_ready(), Some(d2));
    }

    #[test]
    fn batches_without_produces_wait_their_turn_and_room_is_bounded() {
        let mut p: Pipeline<&str> = Pipeline::new(2, 3);
        let a = p.push("a", vec![true, true]);
        assert!(p.has_room());
        p.push("refusals only", vec![false]);
        assert!(!p.has_room(), "two batches at most");
        assert!(p.pop_ready().is_none(), "the empty batch waits for `a`");
        p.acked(a, 0);
        p.acked(a, 1);
        assert_eq!(p.pop_ready(), Some("a"));
        assert_eq!(p.pop_ready(), Some("refusals only"));
        p.push("big", vec![true; 3]);
        assert!(!p.has_room(), "three unacknowledged records at most");
        assert_eq!(p.len(), 1);
    }
}

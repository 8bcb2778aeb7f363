//! The sans-I/O half of persist: what is buffered, when a batch is due, and which offsets may
//! be committed once it is in the database. No Kafka, no database, no clock: the driver
//! (`consumer.rs`) feeds it payloads with their partition, offset and the current time.

use im_shared::records::{DecodeError, Fencing, Judged, Stored, Versioned};
use std::collections::{BTreeMap, HashMap};

/// What `Batcher::push` made of a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// A row to write.
    Row,
    /// A fence (README.md, "Fencing"); written with the batch when it raised one.
    Fence,
    /// A message written by a logic instance that had lost the partition before it wrote
    /// it: not stored. Its sender was not answered (logic checks its membership before
    /// answering) and the partition's owner sequences the same request again.
    Stale {
        id: u64,
        conv: String,
        seq: u64,
        epoch: i32,
        fence: i32,
    },
}

/// Records waiting to be written, and the offsets their write will make committable.
#[derive(Debug)]
pub struct Batcher {
    batch_rows: usize,
    batch_ms: u64,
    /// Decoded records, in arrival order.
    records: Vec<Stored>,
    /// `partitions[i]` is the partition `records[i]` came from.
    partitions: Vec<i32>,
    /// Per partition: the offset to commit (highest offset seen + 1), skipped records included.
    next_offsets: BTreeMap<i32, i64>,
    /// When the oldest uncommitted record (written or skipped) arrived.
    oldest_ms: Option<u64>,
    /// Per partition read since it was assigned: the fence so far (the database's, then
    /// the log's). A partition not here needs `set_fence` before its first record.
    fencing: HashMap<i32, Fencing>,
    /// Fences raised since the last write, to be written with it.
    raised: BTreeMap<i32, i32>,
}

impl Batcher {
    /// A batch is due at `batch_rows` rows, or `batch_ms` after its first record arrived.
    pub fn new(batch_rows: usize, batch_ms: u64) -> Batcher {
        assert!(batch_rows > 0, "a batch holds at least one row");
        Batcher {
            batch_rows,
            batch_ms,
            records: Vec::with_capacity(batch_rows),
            partitions: Vec::with_capacity(batch_rows),
            next_offsets: BTreeMap::new(),
            oldest_ms: None,
            fencing: HashMap::new(),
            raised: BTreeMap::new(),
        }
    }

    /// Whether `partition`'s fence must be read from the database before its next record.
    pub fn needs_fence(&self, partition: i32) -> bool {
        !self.fencing.contains_key(&partition)
    }

    /// The fence the database holds for `partition`.
    pub fn set_fence(&mut self, partition: i32, epoch: i32) {
        self.fencing.insert(partition, Fencing { fence: epoch });
    }

    /// Fences raised since the last write: `(partition, epoch)`.
    pub fn fences(&self) -> Vec<(i32, i32)> {
        self.raised.iter().map(|(&p, &g)| (p, g)).collect()
    }

    /// Takes the record at `offset` of `partition`. A payload that does not decode (garbage,
    /// a newer schema, a record no writer should produce) is refused, but its offset still
    /// counts: skipping it must not hold the partition's commits back forever.
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Pushed, DecodeError> {
        debug_assert!(
            self.records.len() < self.batch_rows,
            "flush a due batch first"
        );
        let next = self.next_offsets.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
        self.oldest_ms.get_or_insert(now_ms);
        let record = decode(payload)?;
        match self.fencing.entry(partition).or_default().judge(&record) {
            Judged::Current => {
                self.records.push(record);
                self.partitions.push(partition);
                Ok(Pushed::Row)
            }
            Judged::Fence { raised } => {
                if raised {
                    self.raised.insert(partition, record.epoch);
                }
                Ok(Pushed::Fence)
            }
            Judged::Stale { fence } => Ok(Pushed::Stale {
                id: record.id,
                conv: record.conv,
                seq: record.seq,
                epoch: record.epoch,
                fence,
            }),
        }
    }

    /// Buffered rows.
    pub fn rows(&self) -> usize {
        self.records.len()
    }

    /// The rows to write, in arrival order.
    pub fn records(&self) -> &[Stored] {
        &self.records
    }

    /// Whether anything waits: rows to write, or offsets of skipped records to commit.
    pub fn has_pending(&self) -> bool {
        !self.next_offsets.is_empty()
    }

    /// Whether the batch should be written now.
    pub fn due(&self, now_ms: u64) -> bool {
        self.records.len() >= self.batch_rows || self.wait_ms(now_ms) == Some(0)
    }

    /// How long the oldest pending record has waited; 0 when nothing is pending.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        self.oldest_ms.map_or(0, |t| now_ms.saturating_sub(t))
    }

    /// How long until the batch is due by age; `None` when nothing is pending.
    pub fn wait_ms(&self, now_ms: u64) -> Option<u64> {
        self.oldest_ms
            .map(|t| self.batch_ms.saturating_sub(now_ms.saturating_sub(t)))
    }

    /// Call once `records()` are in the database: empties the batch and returns what to
    /// commit, `(partition, offset)` with offset = highest offset + 1.
    pub fn take_commit(&mut self) -> Vec<(i32, i64)> {
        self.records.clear();
        self.raised.clear();
        self.partitions.clear();
        self.oldest_ms = None;
        std::mem::take(&mut self.next_offsets).into_iter().collect()
    }

    /// A commit of these offsets failed: they go out with the next one (whatever is
    /// committed is in the database, so committing it late is always safe).
    pub fn requeue(&mut self, offsets: &[(i32, i64)], now_ms: u64) {
        for &(partition, offset) in offsets {
            let next = self.next_offsets.entry(partition).or_insert(offset);
            *next = (*next).max(offset);
        }
        if !offsets.is_empty() {
            self.oldest_ms.get_or_insert(now_ms);
        }
    }

    /// Forgets everything from partitions this consumer no longer owns; returns the rows
    /// dropped. Their new owner reads them again from the last commit.
    pub fn revoke(&mut self, partitions: &[i32]) -> usize {
        let before = self.records.len();
        let mut i = 0;
        self.records.retain(|_| {
            let keep = !partitions.contains(&self.partitions[i]);
            i += 1;
            keep
        });
        self.partitions.retain(|p| !partitions.contains(p));
        self.next_offsets.retain(|p, _| !partitions.contains(p));
        // Their next owner may raise the fence meanwhile: read it again if they come back.
        self.fencing.retain(|p, _| !partitions.contains(p));
        self.raised.retain(|p, _| !partitions.contains(p));
        if self.next_offsets.is_empty() {
            self.oldest_ms = None;
        }
        before - self.records.len()
    }
}

/// A record this build can store, or why not.
fn decode(payload: Option<&[u8]>) -> Result<Stored, DecodeError> {
    let bytes = payload.ok_or_else(|| DecodeError::Malformed("empty record".into()))?;
    let r = Stored::from_bytes(bytes)?;
    if r.fence {
        return Ok(r);
    }
    // Logic never writes these; as rows they would collide on id or seq with real messages.
    if r.id == 0 || r.seq == 0 || r.conv.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "message without id, seq or conversation (id {}, seq {}, conv {:?})",
            r.id, r.seq, r.conv
        )));
    }
    Ok(r)
}

/// Capped exponential backoff: `first_ms`, doubling, never above `max_ms`.
#[derive(Debug)]
pub struct Backoff {
    next_ms: u64,
    max_ms: u64,
}

impl Backoff {
    pub fn new(first_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            next_ms: first_ms.max(1),
            max_ms: max_ms.max(1),
        }
    }

    /// The wait before the next attempt.
    pub fn next_ms(&mut self) -> u64 {
        let wait = self.next_ms.min(self.max_ms);
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> Vec<u8> {
        Stored {
            version: im_shared::records::VERSION,
            id,
            conv: "p:1:2".into(),
            seq: id,
            from: 1,
            to_user: 2,
            cid: format!("c{id}"),
            ..Default::default()
        }
        .to_bytes()
    }

    #[test]
    fn due_at_rows_or_age() {
        let mut b = Batcher::new(3, 50);
        assert!(!b.has_pending());
        assert_eq!(b.wait_ms(1_000), None);
        assert!(!b.due(1_000_000), "an empty batch is never due");
        b.push(0, 10, Some(&rec(1)), 1_000).unwrap();
        assert_eq!(b.wait_ms(1_020), Some(30));
        assert!(!b.due(1_049));
        assert!(b.due(1_050), "due batch_ms after the first record");
        b.push(0, 11, Some(&rec(2)), 1_001).unwrap();
        b.push(1, 7, Some(&rec(3)), 1_002).unwrap();
        assert!(b.due(1_002), "due at batch_rows rows");
        assert_eq!(
            b.records().iter().map(|r| r.id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(b.take_commit(), [(0, 12), (1, 8)]);
        assert_eq!(
            (b.rows(), b.has_pending(), b.wait_ms(2_000)),
            (0, false, None)
        );
        // The clock starts again with the next record.
        b.push(0, 12, Some(&rec(4)), 5_000).unwrap();
        assert!(!b.due(5_010));
    }

    #[test]
    fn undecodable_records_are_skipped_but_their_offsets_advance() {
        let mut b = Batcher::new(10, 50);
        b.push(2, 40, Some(&rec(1)), 0).unwrap();
        assert!(matches!(
            b.push(2, 41, Some(&[0xff, 0xff, 0xff]), 0),
            Err(DecodeError::Malformed(_))
        ));
        let newer = Stored {
            version: im_shared::records::VERSION + 1,
            ..Default::default()
        };
        assert_eq!(
            b.push(2, 42, Some(&newer.to_bytes()), 0),
            Err(DecodeError::Version(im_shared::records::VERSION + 1))
        );
        assert!(b.push(2, 43, None, 0).is_err(), "a tombstone");
        let no_seq = Stored {
            id: 5,
            conv: "g:1".into(),
            ..Default::default()
        };
        assert!(b.push(2, 44, Some(&no_seq.to_bytes()), 0).is_err());
        assert_eq!(b.rows(), 1);
        assert_eq!(b.take_commit(), [(2, 45)]);

        // A partition of nothing but garbage still gets committed, on time.
        assert!(b.push(3, 0, Some(b"junk"), 100).is_err());
        assert!(b.has_pending() && b.rows() == 0);
        assert!(!b.due(149) && b.due(150));
        assert_eq!(b.take_commit(), [(3, 1)]);
    }

    #[test]
    fn offsets_are_the_highest_plus_one_per_partition() {
        let mut b = Batcher::new(10, 50);
        for (p, o) in [(1, 5), (0, 100), (1, 6), (0, 99), (2, 0)] {
            b.push(p, o, Some(&rec(o as u64 + 1)), 0).unwrap();
        }
        assert_eq!(b.take_commit(), [(0, 101), (1, 7), (2, 1)]);
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut b = Batcher::new(10, 50);
        b.push(0, 1, Some(&rec(1)), 0).unwrap();
        b.push(1, 1, Some(&rec(2)), 0).unwrap();
        b.push(0, 2, Some(&rec(3)), 0).unwrap();
        assert!(b.push(2, 9, Some(b"junk"), 0).is_err());
        assert_eq!(b.revoke(&[0, 2]), 2);
        assert_eq!(
            b.records().iter().map(|r| r.id).collect::<Vec<_>>(),
            [2],
            "rows and their partitions stay paired"
        );
        assert_eq!(b.take_commit(), [(1, 2)]);
        b.push(0, 3, Some(&rec(4)), 0).unwrap();
        assert_eq!(b.revoke(&[0]), 1);
        assert!(!b.has_pending() && b.wait_ms(0).is_none());
    }

    fn rec_of(id: u64, epoch: i32) -> Vec<u8> {
        let mut r = Stored::from_bytes(&rec(id)).unwrap();
        r.epoch = epoch;
        r.to_bytes()
    }

    #[test]
    fn a_fenced_off_owners_records_are_not_stored_and_raised_fences_are_written() {
        let mut b = Batcher::new(10, 50);
        assert!(b.needs_fence(0));
        // The database knew fence 4 for partition 0; partition 1 has none.
        b.set_fence(0, 4);
        b.set_fence(1, 0);
        assert!(!b.needs_fence(0));
        let fence = |g| Stored::fence(g).to_bytes();
        assert_eq!(b.push(0, 1, Some(&rec_of(1, 4)), 0), Ok(Pushed::Row));
        assert!(matches!(
            b.push(0, 2, Some(&rec_of(2, 3)), 0),
            Ok(Pushed::Stale {
                id: 2,
                epoch: 3,
                fence: 4,
                ..
            })
        ));
        // A new owner at epoch 6 takes the partition; the old one (4) writes on.
        assert_eq!(b.push(0, 3, Some(&fence(6)), 0), Ok(Pushed::Fence));
        assert!(matches!(
            b.push(0, 4, Some(&rec_of(3, 4)), 0),
            Ok(Pushed::Stale { fence: 6, .. })
        ));
        assert_eq!(b.push(0, 5, Some(&rec_of(4, 6)), 0), Ok(Pushed::Row));
        // A late fence of an older epoch raises nothing; partitions are independent.
        assert_eq!(b.push(0, 6, Some(&fence(5)), 0), Ok(Pushed::Fence));
        assert_eq!(b.push(1, 0, Some(&rec_of(5, 2)), 0), Ok(Pushed::Row));
        assert_eq!(
            b.records().iter().map(|r| r.id).collect::<Vec<_>>(),
            [1, 4, 5]
        );
        assert_eq!(b.fences(), [(0, 6)]);
        assert_eq!(b.take_commit(), [(0, 7), (1, 1)]);
        assert!(b.fences().is_empty(), "written with the batch");
        // A batch of nothing but a fence is still pending: the fence must be written.
        assert_eq!(b.push(1, 1, Some(&fence(3)), 10), Ok(Pushed::Fence));
        assert_eq!((b.rows(), b.has_pending()), (0, true));
        assert_eq!(b.fences(), [(1, 3)]);
        // Revoked: the fence is read again from the database when the partition returns.
        b.revoke(&[1]);
        assert!(b.needs_fence(1) && b.fences().is_empty());
    }

    #[test]
    fn failed_commits_go_out_with_the_next() {
        let mut b = Batcher::new(10, 50);
        b.requeue(&[], 0);
        assert!(!b.has_pending());
        b.requeue(&[(0, 12), (1, 3)], 1_000);
        b.push(0, 12, Some(&rec(1)), 1_010).unwrap();
        assert!(b.due(1_050), "the requeued offsets' age counts");
        assert_eq!(b.take_commit(), [(0, 13), (1, 3)]);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(10, 100);
        let waits: Vec<u64> = (0..6).map(|_| b.next_ms()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 100, 100]);
        let mut small = Backoff::new(10, 5);
        assert_eq!((small.next_ms(), small.next_ms()), (5, 5));
    }
}

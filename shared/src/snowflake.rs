//! Snowflake message ids: 41 bits of milliseconds since 2024-01-01, 10 bits of worker id,
//! 12 bits of sequence. Ids from one worker increase strictly; ids sort roughly by time.
//!
//! A generator is owned by one thread (a shard, a logic partition writer): no atomics.

/// 2024-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
pub const WORKER_BITS: u32 = 10;
pub const SEQ_BITS: u32 = 12;
pub const WORKER_MAX: u16 = (1 << WORKER_BITS) - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

#[derive(Debug)]
pub struct Snowflake {
    worker: u64,
    last_ms: u64,
    seq: u64,
}

impl Snowflake {
    pub fn new(worker: u16) -> Snowflake {
        assert!(
            worker <= WORKER_MAX,
            "snowflake worker id {worker} > {WORKER_MAX}"
        );
        Snowflake {
            worker: worker as u64,
            last_ms: 0,
            seq: 0,
        }
    }

    /// The next id at wall-clock `now_ms`. A clock that steps back does not make ids go back:
    /// we keep using the last millisecond and, when its 4096 ids are spent, borrow the next one.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let now = now_ms.saturating_sub(EPOCH_MS);
        if now > self.last_ms {
            self.last_ms = now;
            self.seq = 0;
        } else {
            self.seq += 1;
            if self.seq > SEQ_MASK {
                self.last_ms += 1;
                self.seq = 0;
            }
        }
        (self.last_ms << (WORKER_BITS + SEQ_BITS)) | (self.worker << SEQ_BITS) | self.seq
    }

    /// Unix milliseconds encoded in an id.
    pub fn timestamp_ms(id: u64) -> u64 {
        (id >> (WORKER_BITS + SEQ_BITS)) + EPOCH_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_when_clock_steps_back_or_burst_exceeds_seq() {
        let mut g = Snowflake::new(7);
        let t = EPOCH_MS + 1_000_000;
        let mut last = 0;
        for i in 0..10_000u64 {
            // Same millisecond for a long burst, then a step back.
            let now = if i < 9_000 { t } else { t - 500 };
            let id = g.next(now);
            assert!(id > last, "id {i} did not increase");
            last = id;
        }
        assert_eq!((last >> SEQ_BITS) & WORKER_MAX as u64, 7);
        assert!(Snowflake::timestamp_ms(last) >= t);
    }

    #[test]
    fn workers_never_collide() {
        let (mut a, mut b) = (Snowflake::new(1), Snowflake::new(2));
        let t = EPOCH_MS + 5;
        assert_ne!(a.next(t), b.next(t));
    }
}

//! Snowflake message ids: 41 bits of milliseconds since 2024-01-01, 10 bits of worker id,
//! 12 bits of sequence. Ids from one worker increase strictly; ids sort roughly by time.
//!
//! A generator is owned by one thread (a shard, a logic partition writer): no atomics.
//!
//! Two generators with the same worker id can mint the same id in the same millisecond, and
//! persist's `INSERT IGNORE` would then drop the second message as a replay. So a worker id is
//! held under a lease (`WorkerLease`): fixed in a one-process deployment, leased from Redis by
//! each logic instance in the distributed one (`im_bus::lease`). `Leased` mints only while its
//! lease is valid.

/// 2024-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
pub const WORKER_BITS: u32 = 10;
pub const SEQ_BITS: u32 = 12;
pub const WORKER_MAX: u16 = (1 << WORKER_BITS) - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// How far ahead of the clock a worker may run when a millisecond's ids are spent.
pub const BORROW_MS_MAX: u64 = 10;

#[derive(Debug)]
pub struct Snowflake {
    worker: u64,
    /// The millisecond (since `EPOCH_MS`) of the last id, and its sequence number.
    last_ms: u64,
    seq: u64,
    /// The latest clock reading seen: a clock stepping back counts as standing still.
    seen_ms: u64,
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
            seen_ms: 0,
        }
    }

    /// The next id at wall-clock `now_ms`. A clock that steps back does not make ids go back:
    /// we keep using the last millisecond and, when its 4,096 ids are spent, borrow the next
    /// one, but never more than `BORROW_MS_MAX` ahead of the latest clock reading seen: past
    /// that, this waits (re-reading the clock) for time to catch up. At 4,096 ids a
    /// millisecond a worker can only get there in a burst of millions of ids.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let mut now = now_ms;
        loop {
            match self.try_next(now) {
                Ok(id) => return id,
                Err(_) => {
                    std::thread::yield_now();
                    now = crate::unix_ms();
                }
            }
        }
    }

    /// The next id at `now_ms`, or `Err(ms)`: this worker has issued every id it may until
    /// about `ms` later (the sans-I/O form of `next`).
    pub fn try_next(&mut self, now_ms: u64) -> Result<u64, u64> {
        let now = now_ms.saturating_sub(EPOCH_MS).max(self.seen_ms);
        self.seen_ms = now;
        if now > self.last_ms {
            self.last_ms = now;
            self.seq = 0;
        } else if self.seq < SEQ_MASK {
            self.seq += 1;
        } else if self.last_ms + 1 > now + BORROW_MS_MAX {
            return Err(self.last_ms + 1 - now - BORROW_MS_MAX);
        } else {
            self.last_ms += 1;
            self.seq = 0;
        }
        Ok((self.last_ms << (WORKER_BITS + SEQ_BITS)) | (self.worker << SEQ_BITS) | self.seq)
    }

    /// Unix milliseconds encoded in an id.
    pub fn timestamp_ms(id: u64) -> u64 {
        (id >> (WORKER_BITS + SEQ_BITS)) + EPOCH_MS
    }
}

/// A worker id and how long this process may mint with it: one atomic word, written by the
/// lease's keeper (a renewal task) and read by the generators at every id. Validity is kept
/// on this process's monotonic clock, so a wall clock stepping back cannot extend a lease.
#[derive(Debug)]
pub struct WorkerLease {
    /// `((valid_until_ms + 1) << 16) | worker`, `valid_until_ms` counted from `base`; 0: none.
    word: std::sync::atomic::AtomicU64,
    base: std::time::Instant,
}

/// `valid_until` of a lease that never runs out (2^47 ms is ≈ 4,400 years).
const FOREVER_MS: u64 = (1 << 47) - 1;

impl WorkerLease {
    /// A lease held from the start and never lost: one process that owns its ids outright
    /// (standalone, a gateway's local router).
    pub fn fixed(worker: u16) -> WorkerLease {
        let l = WorkerLease::none();
        l.grant_until(worker, FOREVER_MS);
        l
    }

    /// No lease yet: nothing may be minted until `grant`.
    pub fn none() -> WorkerLease {
        WorkerLease {
            word: std::sync::atomic::AtomicU64::new(0),
            base: std::time::Instant::now(),
        }
    }

    /// `worker` may be used until `until` (a renewal that the store confirmed, measured from
    /// when the renewal was sent, less a margin for clock rates).
    pub fn grant(&self, worker: u16, until: std::time::Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.grant_until(worker, ms.min(FOREVER_MS));
    }

    fn grant_until(&self, worker: u16, ms: u64) {
        assert!(worker <= WORKER_MAX, "worker id {worker} > {WORKER_MAX}");
        self.word.store(
            ((ms + 1) << 16) | worker as u64,
            std::sync::atomic::Ordering::Release,
        );
    }

    /// The lease is lost (another holder has the id): stop minting at once.
    pub fn revoke(&self) {
        self.word.store(0, std::sync::atomic::Ordering::Release);
    }

    /// The worker id, while the lease is valid.
    pub fn current(&self) -> Option<u16> {
        self.at(std::time::Instant::now())
    }

    /// The worker id at `now`, if the lease is valid then.
    pub fn at(&self, now: std::time::Instant) -> Option<u16> {
        let w = self.word.load(std::sync::atomic::Ordering::Acquire);
        let until = w >> 16;
        let now_ms = now.saturating_duration_since(self.base).as_millis() as u64;
        (until != 0 && now_ms + 1 < until).then_some((w & 0xffff) as u16)
    }
}

/// A generator that mints only under a valid lease, and follows the lease to a new worker id.
#[derive(Debug)]
pub struct Leased {
    lease: std::sync::Arc<WorkerLease>,
    gen: Option<Snowflake>,
}

impl Leased {
    pub fn new(lease: std::sync::Arc<WorkerLease>) -> Leased {
        Leased { lease, gen: None }
    }

    /// The next id at wall-clock `now_ms`, or `None` while this process holds no valid lease
    /// (its sender gets a retryable error; nothing is minted under an id another may hold).
    pub fn next(&mut self, now_ms: u64) -> Option<u64> {
        let worker = self.lease.current()?;
        match &self.gen {
            Some(g) if g.worker == worker as u64 => {}
            // A new id: the lease store handed it over only after its last holder's lease
            // ran out, so its ids are older than any minted here.
            _ => self.gen = Some(Snowflake::new(worker)),
        }
        self.gen.as_mut().map(|g| g.next(now_ms))
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
    fn at_most_4096_ids_a_millisecond_and_borrowing_is_bounded() {
        let mut g = Snowflake::new(3);
        let t = EPOCH_MS + 10_000;
        let mut per_ms = std::collections::HashMap::<u64, u64>::new();
        let mut last = 0;
        // A clock that stands still: the generator borrows up to BORROW_MS_MAX, then refuses.
        let refused_at = loop {
            match g.try_next(t) {
                Ok(id) => {
                    assert!(id > last);
                    last = id;
                    *per_ms.entry(Snowflake::timestamp_ms(id)).or_default() += 1;
                }
                Err(wait) => break wait,
            }
        };
        assert_eq!(refused_at, 1);
        assert!(per_ms.values().all(|&n| n == 1 << SEQ_BITS));
        assert_eq!(per_ms.len() as u64, BORROW_MS_MAX + 1);
        assert_eq!(Snowflake::timestamp_ms(last), t + BORROW_MS_MAX);
        // A step back counts as standing still; time moving on lets it go again.
        assert!(g.try_next(t - 1_000).is_err());
        let id = g
            .try_next(t + 1)
            .expect("a millisecond later, one more millisecond of ids");
        assert!(id > last);
    }

    #[test]
    fn a_leased_generator_mints_only_while_its_lease_is_valid() {
        use std::time::{Duration, Instant};
        let lease = std::sync::Arc::new(WorkerLease::none());
        let mut g = Leased::new(lease.clone());
        let t = EPOCH_MS + 1_000;
        assert_eq!(g.next(t), None, "no lease yet");
        lease.grant(5, Instant::now() + Duration::from_secs(60));
        let a = g.next(t).unwrap();
        assert_eq!((a >> SEQ_BITS) & WORKER_MAX as u64, 5);
        // Moved to another id: the ids carry it from the next one on.
        lease.grant(9, Instant::now() + Duration::from_secs(60));
        let b = g.next(t + 1).unwrap();
        assert_eq!((b >> SEQ_BITS) & WORKER_MAX as u64, 9);
        // Lost, or run out: nothing more.
        lease.revoke();
        assert_eq!(g.next(t + 2), None);
        lease.grant(9, Instant::now());
        assert_eq!(g.next(t + 3), None, "a lease that ends now is over");
        assert_eq!(lease.at(Instant::now()), None);
        // A fixed lease never ends.
        let fixed = WorkerLease::fixed(WORKER_MAX);
        assert_eq!(
            fixed.at(Instant::now() + Duration::from_secs(100 * 365 * 86_400)),
            Some(WORKER_MAX)
        );
        assert_eq!(std::mem::size_of::<WorkerLease>(), 24);
    }

    #[test]
    fn workers_never_collide() {
        let (mut a, mut b) = (Snowflake::new(1), Snowflake::new(2));
        let t = EPOCH_MS + 5;
        assert_ne!(a.next(t), b.next(t));
    }
}

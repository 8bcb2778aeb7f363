//! The batch and the database: buffers records (`Batcher`), writes a due batch with
//! `Store::insert_messages`, and retries the same batch with capped exponential backoff until
//! the database takes it. Only after that may the driver commit its offsets.

use crate::batch::{Backoff, Batcher, Pushed};
use crate::stats::PersistStats;
use im_shared::metrics::count_rarely;
use im_store::Store;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The first wait after a failed write; it doubles up to `retry_max_ms`.
const FIRST_RETRY_MS: u64 = 10;

pub(crate) struct Writer {
    store: Arc<dyn Store>,
    stats: Arc<PersistStats>,
    pub(crate) batcher: Batcher,
    retry_max_ms: u64,
    /// How long a failing write may still be retried once the service is stopping.
    grace: Duration,
    /// Set once stopping: retries end here.
    stop_by: Option<Instant>,
    epoch: Instant,
}

impl Writer {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        stats: Arc<PersistStats>,
        batcher: Batcher,
        retry_max_ms: u64,
        grace: Duration,
    ) -> Writer {
        Writer {
            store,
            stats,
            batcher,
            retry_max_ms,
            grace,
            stop_by: None,
            epoch: Instant::now(),
        }
    }

    /// Monotonic milliseconds, the `Batcher`'s clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn stats(&self) -> &PersistStats {
        &self.stats
    }

    /// From now on a failing write gives up after the grace period.
    pub(crate) fn stop(&mut self) {
        self.stop_by.get_or_insert(Instant::now() + self.grace);
    }

    /// Buffers one consumed record; one that cannot be decoded is counted, logged and skipped.
    pub(crate) fn push(&mut self, partition: i32, offset: i64, payload: Option<&[u8]>) {
        let now = self.now_ms();
        match self.batcher.push(partition, offset, payload, now) {
            Ok(Pushed::Row | Pushed::Fence) => {}
            Ok(Pushed::Stale {
                id,
                conv,
                seq,
                epoch,
                fence,
            }) => {
                if let Some(n) = count_rarely(&self.stats.fenced_total) {
                    log::warn!(
                        "persist: not storing message {id} ({conv} seq {seq}) at {partition}/{offset}: \
                         its writer was in epoch {epoch}, fenced off by {fence} ({n} so far); \
                         the partition's owner sequences its request again"
                    );
                }
            }
            Err(e) => {
                let n = self.stats.skipped_total.fetch_add(1, Ordering::Relaxed) + 1;
                // A flood of garbage must not become a flood of log lines.
                if n <= 10 || n.is_power_of_two() {
                    log::warn!(
                        "persist: skipping the record at {partition}/{offset} ({n} skipped so far): {e}"
                    );
                }
            }
        }
    }

    /// Reads `partition`'s fence from the database unless it is known, retrying until the
    /// database answers. `Err` when asked to stop meanwhile (nothing of the partition is
    /// pushed then, so nothing of it is committed).
    pub(crate) async fn load_fence(
        &mut self,
        partition: i32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ()> {
        let mut backoff = Backoff::new(FIRST_RETRY_MS, self.retry_max_ms);
        while self.batcher.needs_fence(partition) {
            match self.store.fence(partition).await {
                Ok(g) => self.batcher.set_fence(partition, g),
                Err(e) => {
                    let wait = Duration::from_millis(backoff.next_ms());
                    log::warn!("persist: reading the fence of partition {partition}: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return Err(()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets what came from partitions this consumer lost.
    pub(crate) fn revoke(&mut self, partitions: &[i32]) {
        let dropped = self.batcher.revoke(partitions);
        if dropped > 0 {
            self.stats
                .revoked_rows_total
                .fetch_add(dropped as u64, Ordering::Relaxed);
            log::info!(
                "persist: partitions {partitions:?} revoked; {dropped} buffered rows left to their next owner"
            );
        }
    }

    /// Writes the buffered rows, retrying the same batch until the database takes it. A
    /// shutdown signal during a retry starts the grace period; when it is over, gives up and
    /// returns the number of rows left unwritten (still buffered, their offsets uncommitted).
    pub(crate) async fn write(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), usize> {
        let rows = self.batcher.rows();
        let fences = self.batcher.fences();
        if rows == 0 && fences.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut backoff = Backoff::new(FIRST_RETRY_MS, self.retry_max_ms);
        let mut failures = 0u32;
        loop {
            match self
                .store
                .insert_messages(self.batcher.records(), &fences)
                .await
            {
                Ok(inserted) => {
                    let took = started.elapsed();
                    let s = &self.stats;
                    s.rows_total.fetch_add(inserted, Ordering::Relaxed);
                    s.duplicates_total
                        .fetch_add((rows as u64).saturating_sub(inserted), Ordering::Relaxed);
                    s.batches_total.fetch_add(1, Ordering::Relaxed);
                    s.last_batch_us
                        .store(took.as_micros() as u64, Ordering::Relaxed);
                    if failures > 0 {
                        log::info!("persist: database back after {failures} failed writes");
                    }
                    log::debug!(
                        "persist: wrote {rows} rows ({inserted} new) in {:.1} ms",
                        took.as_secs_f64() * 1e3
                    );
                    return Ok(());
                }
                Err(e) => {
                    failures += 1;
                    self.stats.retries_total.fetch_add(1, Ordering::Relaxed);
                    let wait = Duration::from_millis(backoff.next_ms());
                    log::warn!(
                        "persist: writing {rows} rows failed ({failures} in a row), again in {} ms: {e}",
                        wait.as_millis()
                    );
                    match self.stop_by {
                        Some(t) if Instant::now() + wait > t => return Err(rows),
                        Some(_) => tokio::time::sleep(wait).await,
                        None => {
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = shutdown.changed() => self.stop(),
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_shared::records::{Stored, Versioned, VERSION};
    use im_store::SqliteStore;

    fn tempdir() -> std::path::PathBuf {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "im-persist-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(id: u64, seq: u64) -> Vec<u8> {
        Stored {
            version: VERSION,
            id,
            conv: "p:1:2".into(),
            seq,
            from: 1,
            to_user: 2,
            content: format!("m{id}"),
            content_type: "text".into(),
            ts: 1_700_000_000_000,
            cid: format!("c{id}"),
            ..Default::default()
        }
        .to_bytes()
    }

    async fn writer(
        migrated: bool,
        grace_ms: u64,
    ) -> (Writer, Arc<SqliteStore>, std::path::PathBuf) {
        let dir = tempdir();
        let store = Arc::new(SqliteStore::open(&dir.join("im.db")).await.unwrap());
        if migrated {
            store.migrate().await.unwrap();
        }
        let w = Writer::new(
            store.clone(),
            Arc::new(PersistStats::default()),
            Batcher::new(100, 50),
            40,
            Duration::from_millis(grace_ms),
        );
        (w, store, dir)
    }

    #[tokio::test]
    async fn batches_land_in_the_database_and_replays_are_harmless() {
        let (mut w, store, dir) = writer(true, 0).await;
        let (_tx, mut rx) = watch::channel(false);
        w.push(0, 0, Some(&rec(11, 1)));
        w.push(0, 1, Some(b"\xff\xff\xff"));
        w.push(1, 5, Some(&rec(12, 2)));
        w.push(0, 2, Some(&rec(13, 3)));
        assert_eq!(w.write(&mut rx).await, Ok(()));
        assert_eq!(w.batcher.take_commit(), [(0, 3), (1, 6)]);
        let seqs: Vec<u64> = store
            .messages_after("p:1:2", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(
            store.max_seqs(&["p:1:2".into()]).await.unwrap(),
            [("p:1:2".into(), 3)]
        );
        let s = &w.stats;
        assert_eq!(
            (
                s.rows_total.load(Ordering::Relaxed),
                s.batches_total.load(Ordering::Relaxed),
                s.skipped_total.load(Ordering::Relaxed),
                s.retries_total.load(Ordering::Relaxed)
            ),
            (3, 1, 1, 0)
        );

        // After a crash the log is read again from the last commit: nothing is stored twice.
        w.push(0, 0, Some(&rec(11, 1)));
        w.push(0, 1, Some(&rec(14, 4)));
        assert_eq!(w.write(&mut rx).await, Ok(()));
        assert_eq!(store.messages_after("p:1:2", 0, 10).await.unwrap().len(), 4);
        assert_eq!(w.stats.rows_total.load(Ordering::Relaxed), 4);
        assert_eq!(w.stats.duplicates_total.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_failing_database_gets_the_same_batch_until_it_takes_it() {
        // No tables yet: every write fails until the migration runs.
        let (mut w, store, dir) = writer(false, 0).await;
        let (_tx, mut rx) = watch::channel(false);
        w.push(3, 7, Some(&rec(21, 1)));
        w.push(3, 8, Some(&rec(22, 2)));
        let fixer = {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                store.migrate().await.unwrap();
            })
        };
        assert_eq!(w.write(&mut rx).await, Ok(()));
        fixer.await.unwrap();
        // 10, 20, 40, 40 … ms: several failures before the tables exist.
        assert!(w.stats.retries_total.load(Ordering::Relaxed) >= 3);
        assert_eq!(w.stats.rows_total.load(Ordering::Relaxed), 2);
        assert_eq!(w.batcher.take_commit(), [(3, 9)]);
        assert_eq!(store.messages_after("p:1:2", 0, 10).await.unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn stopping_while_the_database_is_down_gives_up_without_committing() {
        let (mut w, _store, dir) = writer(false, 100).await;
        let (tx, mut rx) = watch::channel(false);
        w.push(0, 0, Some(&rec(31, 1)));
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(true).unwrap();
            tx
        });
        let started = Instant::now();
        assert_eq!(w.write(&mut rx).await, Err(1));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(stopper.await.unwrap());
        // Still buffered: nothing was committed, the next owner reads it again.
        assert_eq!(w.batcher.rows(), 1);
        assert!(w.batcher.has_pending());
        assert_eq!(w.stats.batches_total.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}

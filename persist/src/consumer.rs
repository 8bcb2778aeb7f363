//! The bus driver: a member of group "persist" on `im.messages` (Kafka, or the in-process
//! bus in standalone), feeding the `Writer` and committing offsets once their batch is in the
//! database.
//!
//! Rebalances: buffered records of revoked partitions are dropped, not flushed. Flushing when
//! the revocation is announced would mean blocking on the database inside librdkafka's
//! rebalance callback, which runs synchronously inside our own `recv()` on a runtime thread,
//! for as long as the database takes (an outage would stall the group's rebalance). Dropping
//! is correct because nothing of theirs was committed: the new owner reads them again from
//! the last commit, and inserts are idempotent. The bus only notes the revoked partitions;
//! the loop forgets them right after the `recv()` in which the revocation happened, before
//! taking the message that `recv()` returned (which belongs to the new assignment) and before
//! any commit.

use crate::writer::Writer;
use im_bus::{Consumer, Rebalance};
use im_shared::records::topics;
use std::time::Duration;
use tokio::sync::watch;

/// Consumer group of the persist service.
pub const GROUP: &str = im_shared::records::groups::PERSIST;
/// The longest wait for a record while nothing is buffered (bounds how late a shutdown or a
/// revocation is noticed).
const IDLE_POLL_MS: u64 = 500;
/// After a consumer error, before polling again.
const ERROR_PAUSE_MS: u64 = 100;

fn stop_requested(rx: &watch::Receiver<bool>) -> bool {
    *rx.borrow() || rx.has_changed().is_err()
}

fn forget_revoked(consumer: &mut dyn Consumer, w: &mut Writer) {
    for r in consumer.take_rebalances() {
        if let Rebalance::Revoked(parts) = r {
            w.revoke(&parts);
        }
    }
}

/// Consumes until `shutdown`, then writes and commits what is buffered.
pub(crate) async fn consume(
    mut consumer: Box<dyn Consumer>,
    mut w: Writer,
    linger_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    // Group commit: a batch is written as soon as the bus has nothing more ready (so a lone
    // message waits for no timer), when it is full, or when its oldest row has waited
    // `batch_ms` while more kept arriving. Under load, rows pile up while a write is under
    // way and the next batch is bigger by itself.
    let mut idle = false;
    while !stop_requested(&shutdown) {
        forget_revoked(&mut *consumer, &mut w);
        let buffered = w.batcher.has_pending();
        if w.batcher.due(w.now_ms()) || (buffered && idle) {
            idle = false;
            if let Err(left) = w.write(&mut shutdown).await {
                return Err(gave_up(left));
            }
            commit(&mut *consumer, &mut w);
            continue;
        }
        let linger_left = linger_ms.saturating_sub(w.batcher.age_ms(w.now_ms()));
        if buffered && linger_left == 0 {
            // Take what is ready without waiting; nothing ready means write now.
            tokio::select! {
                biased;
                got = consumer.recv() => taken(&mut *consumer, &mut w, got, &mut shutdown).await?,
                _ = std::future::ready(()) => idle = true,
            }
            continue;
        }
        let wait_ms = if buffered { linger_left } else { IDLE_POLL_MS };
        tokio::select! {
            _ = shutdown.changed() => {}
            got = tokio::time::timeout(Duration::from_millis(wait_ms), consumer.recv()) => {
                // Nothing came: the loop looks at the batch and the shutdown flag again.
                if let Ok(got) = got {
                    taken(&mut *consumer, &mut w, got, &mut shutdown).await?;
                }
            }
        }
    }
    w.stop();
    forget_revoked(&mut *consumer, &mut w);
    let rows = w.batcher.rows();
    if let Err(left) = w.write(&mut shutdown).await {
        return Err(gave_up(left));
    }
    commit(&mut *consumer, &mut w);
    log::info!("persist: stopped; the last {rows} buffered rows written and committed");
    Ok(())
}

/// Buffers what `recv` returned (after forgetting partitions revoked inside that `recv`, and
/// reading the partition's fence first when it is new to this consumer). `Err` when asked
/// to stop while the database could not tell the fence: that record and everything after
/// it stay uncommitted, and are read again.
async fn taken(
    consumer: &mut dyn Consumer,
    w: &mut Writer,
    got: Result<im_bus::Record, String>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    forget_revoked(consumer, w);
    match got {
        Ok(m) => {
            if w.load_fence(m.partition, shutdown).await.is_err() {
                return Err(format!(
                    "stopped before the fence of partition {} could be read",
                    m.partition
                ));
            }
            w.push(m.partition, m.offset, Some(&m.payload))
        }
        Err(e) => {
            log::warn!("persist: consuming {}: {e}", topics::MESSAGES);
            tokio::time::sleep(Duration::from_millis(ERROR_PAUSE_MS)).await;
        }
    }
    Ok(())
}

fn gave_up(rows: usize) -> String {
    format!(
        "stopped with {rows} rows not written (the database kept failing); their offsets \
         are not committed, so they will be read again"
    )
}

/// Commits what the last write made committable. Synchronous: when it returns, a crash can
/// no longer replay these records. A refused commit is retried with the next one (replaying
/// records already stored is harmless, so this is never fatal).
fn commit(consumer: &mut dyn Consumer, w: &mut Writer) {
    let offsets = w.batcher.take_commit();
    if offsets.is_empty() {
        return;
    }
    match consumer.commit(&offsets, true) {
        Ok(()) => log::debug!("persist: committed {offsets:?}"),
        Err(e) => {
            w.stats()
                .commit_failures_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            log::warn!("persist: committing {offsets:?} failed, retried with the next batch: {e}");
            let now = w.now_ms();
            w.batcher.requeue(&offsets, now);
        }
    }
}

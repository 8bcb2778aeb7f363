//! The Kafka driver: a `StreamConsumer` in group "persist" on `im.messages`, feeding the
//! `Writer` and committing offsets once their batch is in the database.
//!
//! Rebalances: buffered records of revoked partitions are dropped, not flushed. Flushing in
//! the `pre_rebalance` hook would mean blocking on the database inside librdkafka's callback,
//! which runs synchronously inside our own `recv()` on a runtime thread, for as long as the
//! database takes (an outage would stall the group's rebalance). Dropping is correct because
//! nothing of theirs was committed: the new owner reads them again from the last commit, and
//! inserts are idempotent. The hook only notes the revoked partitions; the loop forgets them
//! right after the `recv()` in which the revocation happened, before taking the message that
//! `recv()` returned (which belongs to the new assignment) and before any commit.

use crate::writer::Writer;
use im_shared::records::topics;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// Consumer group of the persist service.
pub const GROUP: &str = "persist";
/// The longest wait for a record while nothing is buffered (bounds how late a shutdown or a
/// revocation is noticed).
const IDLE_POLL_MS: u64 = 500;
/// After a consumer error, before polling again.
const ERROR_PAUSE_MS: u64 = 100;

/// Notes revocations for the loop; everything else as librdkafka does by default.
#[derive(Default)]
pub(crate) struct PersistContext {
    revoked: Mutex<Vec<i32>>,
}

impl ClientContext for PersistContext {}

impl ConsumerContext for PersistContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
            for e in tpl.elements_for_topic(topics::MESSAGES) {
                if !revoked.contains(&e.partition()) {
                    revoked.push(e.partition());
                }
            }
        }
    }
}

impl PersistContext {
    fn take_revoked(&self) -> Vec<i32> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

pub(crate) type PersistConsumer = StreamConsumer<PersistContext>;

fn stop_requested(rx: &watch::Receiver<bool>) -> bool {
    *rx.borrow() || rx.has_changed().is_err()
}

fn forget_revoked(consumer: &PersistConsumer, w: &mut Writer) {
    let revoked = consumer.context().take_revoked();
    if !revoked.is_empty() {
        w.revoke(&revoked);
    }
}

/// Consumes until `shutdown`, then writes and commits what is buffered.
pub(crate) async fn consume(
    consumer: PersistConsumer,
    mut w: Writer,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    while !stop_requested(&shutdown) {
        forget_revoked(&consumer, &mut w);
        if w.batcher.due(w.now_ms()) {
            if let Err(left) = w.write(&mut shutdown).await {
                return Err(gave_up(left));
            }
            commit(&consumer, &mut w);
            continue;
        }
        let wait_ms = w
            .batcher
            .wait_ms(w.now_ms())
            .unwrap_or(IDLE_POLL_MS)
            .clamp(1, IDLE_POLL_MS);
        tokio::select! {
            _ = shutdown.changed() => {}
            got = tokio::time::timeout(Duration::from_millis(wait_ms), consumer.recv()) => {
                forget_revoked(&consumer, &mut w);
                match got {
                    // Nothing came: the loop checks the batch's age.
                    Err(_) => {}
                    Ok(Ok(m)) => w.push(m.partition(), m.offset(), m.payload()),
                    Ok(Err(e)) => {
                        log::warn!("persist: consuming {}: {e}", topics::MESSAGES);
                        tokio::time::sleep(Duration::from_millis(ERROR_PAUSE_MS)).await;
                    }
                }
            }
        }
    }
    w.stop();
    forget_revoked(&consumer, &mut w);
    let rows = w.batcher.rows();
    if let Err(left) = w.write(&mut shutdown).await {
        return Err(gave_up(left));
    }
    commit(&consumer, &mut w);
    log::info!("persist: stopped; the last {rows} buffered rows written and committed");
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
fn commit(consumer: &PersistConsumer, w: &mut Writer) {
    let offsets = w.batcher.take_commit();
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for &(partition, offset) in &offsets {
        if let Err(e) =
            tpl.add_partition_offset(topics::MESSAGES, partition, Offset::Offset(offset))
        {
            log::warn!("persist: offset {offset} of partition {partition}: {e}");
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
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

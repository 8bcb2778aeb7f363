//! Recovery of a partition's state when this instance is given it (state.rs says why it is
//! needed): the owner fences the partition first (a fence record at its epoch, its group
//! generation + 1; README.md, "Fencing"), then reads back the records after the persist group's
//! committed offset in `im.messages` — the tail; everything before that offset is in the
//! database. Reading up to the fence (the log's end once the fence is acknowledged) means
//! that anything an earlier owner wrote is either before the fence, and so in this state, or
//! after it, and so stale for persist and for every later recovery.

use super::state::Partition;
use super::{with_retry, CONSUME_ERROR_PAUSE, QUEUE_FULL_PAUSE};
use im_bus::{send_acked, Bus, Producer, SendError, Start};
use im_shared::records::{epoch_of, groups, topics, Stored, Versioned};
use std::time::Duration;

/// How long reading back a partition's tail may take.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// What recovering a partition found.
pub(super) enum Recovered {
    /// This instance owns the partition: its state.
    Owned(Partition),
    /// A newer owner fenced the partition: this instance must not write to it.
    Fenced,
}

/// Fences `partition` at the epoch of group `generation` with a record produced through
/// `log` and rebuilds the
/// partition's state from the database's fence and the log's tail.
pub(super) async fn recover(
    bus: &dyn Bus,
    store: &dyn im_store::Store,
    log: &dyn Producer,
    partition: i32,
    generation: i32,
) -> Result<Recovered, String> {
    let epoch = epoch_of(generation);
    let fence = Stored::fence(epoch).to_bytes();
    loop {
        match send_acked(log, topics::MESSAGES, Some(partition), "", &fence).await {
            Ok(()) => break,
            Err(SendError::QueueFull) => tokio::time::sleep(QUEUE_FULL_PAUSE).await,
            Err(SendError::Failed(e)) => return Err(format!("fencing partition {partition}: {e}")),
        }
    }
    let db_fence = with_retry("reading a partition's fence", || store.fence(partition)).await;
    let committed = bus
        .committed(groups::PERSIST, topics::MESSAGES, partition)
        .await?;
    let (low, high) = bus.watermarks(topics::MESSAGES, partition).await?;
    let start = committed.unwrap_or(low).max(low);
    let mut part = Partition::new(epoch, db_fence);
    let mut reader = bus
        .partition_consumer(topics::MESSAGES, &[(partition, Start::Offset(start))])
        .await?;
    let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
    let mut next = start;
    while next < high {
        match tokio::time::timeout_at(deadline, reader.recv()).await {
            Err(_) => {
                return Err(format!(
                "recovering partition {partition}: the tail did not arrive in {RECOVERY_TIMEOUT:?}"
            ))
            }
            Ok(Ok(m)) => {
                part.replay(&m.payload);
                next = m.offset + 1;
            }
            Ok(Err(e)) => {
                log::warn!("logic: reading the tail of {partition}: {e}");
                tokio::time::sleep(CONSUME_ERROR_PAUSE).await;
            }
        }
    }
    if part.fence() > epoch {
        log::warn!(
            "logic: partition {partition} is fenced off: a newer owner fenced it at epoch {} (this instance is at {epoch}, generation {generation}); not writing to it",
            part.fence()
        );
        return Ok(Recovered::Fenced);
    }
    log::info!(
        "logic: partition {partition} recovered in generation {generation}: {} records after persist's offset {start}, {} conversations",
        high - start,
        part.conversations()
    );
    Ok(Recovered::Owned(part))
}

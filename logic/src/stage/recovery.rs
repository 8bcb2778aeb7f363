//! Recovery of a partition's state when this instance is given it (state.rs says why it is
//! needed): everything before the persist group's committed offset in `im.messages` is in the
//! database, and the records after it — the tail — are read back.

use super::state::Partition;
use super::CONSUME_ERROR_PAUSE;
use im_bus::{Bus, Start};
use im_shared::records::{groups, topics};
use std::time::Duration;

/// How long reading back a partition's tail may take.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// Rebuilds a partition's state: the persist group's committed offset in `im.messages` is
/// where the database ends; the records after it are read back.
pub(super) async fn recover(bus: &dyn Bus, partition: i32) -> Result<Partition, String> {
    let committed = bus
        .committed(groups::PERSIST, topics::MESSAGES, partition)
        .await?;
    let (low, high) = bus.watermarks(topics::MESSAGES, partition).await?;
    let start = committed.unwrap_or(low).max(low);
    let mut part = Partition::default();
    if start >= high {
        log::info!(
            "logic: partition {partition} recovered (nothing after persist's offset {start})"
        );
        return Ok(part);
    }
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
    log::info!(
        "logic: partition {partition} recovered: {} records after persist's offset {start}, {} conversations",
        high - start,
        part.seqs.len()
    );
    Ok(part)
}

//! The gateway's presence writer: a thread of its own, so a slow Redis never stalls a shard
//! or the bridge. It takes the shards' changes from a channel and applies them in batches of
//! up to `BATCH_MAX` (one pipelined round trip on Redis). While the store is down it keeps the
//! batch and retries it with capped backoff; the channel holds at most two changes per
//! connection plus refreshes, so nothing grows without bound.

use im_bus::presence::{Change, Presence, BATCH_MAX};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// How long one write may take before it counts as failed (and is retried).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause after a failed write; it doubles up to the cap.
const RETRY_FIRST_MS: u64 = 10;
const RETRY_MAX_MS: u64 = 2_000;

/// Writes presence changes until the channel closes (the bridge stopped).
pub(crate) fn run_writer(presence: Arc<dyn Presence>, gateway_id: &str, rx: Receiver<Change>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("presence: no runtime ({e}); presence is off");
            // Drain so senders never block on a dead writer.
            for _ in rx {}
            return;
        }
    };
    let mut pending: Vec<Change> = Vec::new();
    let mut backoff_ms = RETRY_FIRST_MS;
    let mut closed = false;
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(c) => pending.push(c),
                Err(_) => return,
            }
        }
        while pending.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(c) => pending.push(c),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // The timer must be made inside the runtime, hence the `async` block.
        let write = async {
            tokio::time::timeout(WRITE_TIMEOUT, presence.apply(gateway_id, &pending)).await
        };
        match rt.block_on(write) {
            Ok(Ok(())) => {
                pending.clear();
                backoff_ms = RETRY_FIRST_MS;
            }
            result => {
                let why = match result {
                    Ok(Err(e)) => e,
                    _ => format!("no answer in {WRITE_TIMEOUT:?}"),
                };
                log::warn!("presence: write failed ({why}); retrying in {backoff_ms} ms");
                std::thread::sleep(Duration::from_millis(backoff_ms));
                backoff_ms = (backoff_ms * 2).min(RETRY_MAX_MS);
            }
        }
    }
}

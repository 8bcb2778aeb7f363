//! The persist service (ARCHITECTURE.md, "Processes"): consumes `im.messages` as consumer
//! group "persist" and writes the messages to MySQL (SQLite in standalone) in batches, a
//! multi-row INSERT per batch. `run(config, shutdown)` is `im persist`; standalone builds a
//! `Persist` on its own bus and store.
//!
//! Why it is built this way:
//! - **Batch ACK.** Offsets are committed only after the batch is in the database, so a crash
//!   at any point replays records, it never loses them. Records that cannot be decoded are
//!   counted and skipped, and their offsets committed with the rest: one bad record must not
//!   stall its partition forever.
//! - **Idempotent on message id.** Replays are normal (after a crash, a rebalance, a commit
//!   that failed), so a row whose id — or (conversation, seq), or (sender, client id) — is
//!   already stored is skipped (`Store::insert_messages`). At-least-once in, exactly once in
//!   the table.
//! - **Backoff while MySQL is down.** A failed batch is retried, the same batch, with capped
//!   exponential backoff, and nothing more is consumed meanwhile: consumer lag grows, nothing
//!   is lost or skipped, and the writes resume where they stopped. (An outage longer than
//!   the consumer's `max.poll.interval.ms` makes this member leave the group and rejoin;
//!   that is a rebalance like any other.)
//!
//! Where to look: `batch` (sans-I/O: what is buffered, when a batch is due, what to commit),
//! `writer` (the database side and its retries), `consumer` (the Kafka driver and
//! rebalances), `stats` (counters and their Prometheus form).

mod batch;
mod consumer;
mod stats;
mod writer;

pub use batch::{Backoff, Batcher};
pub use consumer::GROUP;
pub use stats::{render_metrics, PersistStats};

use im_bus::{Bus, KafkaBus, KafkaConfig};
use im_shared::records::topics;
use im_shared::redact_url;
use im_store::{MySqlStore, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long the final write at shutdown may keep retrying a failing database.
const SHUTDOWN_GRACE_MS: u64 = 5_000;

#[derive(Clone, Debug)]
pub struct PersistConfig {
    /// A batch is written when it holds this many rows…
    pub batch_rows: usize,
    /// …or this long after its first record arrived, while more keep arriving…
    pub batch_ms: u64,
    /// …or as soon as the bus has nothing more ready, once its first record has waited this
    /// long (group commit; 0: at once). A little linger trades latency for fewer, larger
    /// commits under load.
    pub linger_ms: u64,
    /// The cap of the backoff between attempts to write a failing batch.
    pub retry_max_ms: u64,
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            batch_rows: 500,
            batch_ms: 50,
            linger_ms: 0,
            retry_max_ms: 5_000,
        }
    }
}

/// The service, before it runs: lets the caller keep its counters (`stats`) to serve them.
pub struct Persist {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    cfg: PersistConfig,
    stats: Arc<PersistStats>,
}

impl Persist {
    pub fn new(bus: Arc<dyn Bus>, store: Arc<dyn Store>, cfg: PersistConfig) -> Persist {
        Persist {
            bus,
            store,
            cfg,
            stats: Arc::new(PersistStats::default()),
        }
    }

    /// The counters `run` updates (render them with `render_metrics`).
    pub fn stats(&self) -> Arc<PersistStats> {
        self.stats.clone()
    }

    /// Creates `im.messages` if needed, then consumes it until `shutdown` turns true (or its
    /// sender is dropped); then writes and commits what is buffered and returns `Ok`. An
    /// `Err` is a start-up failure (broker, topic, consumer), or a shutdown while the
    /// database kept failing (what was left is uncommitted and will be read again).
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), String> {
        let cfg = &self.cfg;
        let bus = &self.bus;
        bus.ensure_topics(&[(topics::MESSAGES, bus.partitions())])
            .await?;
        let consumer = bus.group_consumer(GROUP, topics::MESSAGES)?;
        log::info!(
            "persist: consuming {} on the {} as group {GROUP} into {}, {} rows or {} ms a batch",
            topics::MESSAGES,
            bus.describe(),
            self.store.backend(),
            cfg.batch_rows.max(1),
            cfg.batch_ms,
        );
        let writer = writer::Writer::new(
            self.store.clone(),
            self.stats.clone(),
            Batcher::new(cfg.batch_rows.max(1), cfg.batch_ms),
            cfg.retry_max_ms,
            Duration::from_millis(SHUTDOWN_GRACE_MS),
        );
        consumer::consume(consumer, writer, cfg.linger_ms, shutdown).await
    }
}

/// `im persist`: where its backends are.
#[derive(Clone, Debug)]
pub struct Config {
    pub persist: PersistConfig,
    pub mysql_url: String,
    pub kafka: KafkaConfig,
}

/// How long `run` waits for the consumer to stop after `shutdown`, beyond the final write's
/// own grace: a broker that is down must not keep a stopping process alive.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `im persist`: connects MySQL (creating the database and migrating it) and Kafka, then
/// consumes until `shutdown` turns true.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let store = MySqlStore::connect_or_create(&cfg.mysql_url)
        .await
        .map_err(|e| format!("connecting to {}: {e}", redact_url(&cfg.mysql_url)))?;
    store
        .migrate()
        .await
        .map_err(|e| format!("migrating {}: {e}", redact_url(&cfg.mysql_url)))?;
    let bus: Arc<dyn Bus> = Arc::new(KafkaBus::new(cfg.kafka));
    let mut stopped = shutdown.clone();
    let task = tokio::spawn(Persist::new(bus, Arc::new(store), cfg.persist).run(shutdown));
    tokio::pin!(task);
    tokio::select! {
        r = &mut task => return r.map_err(|e| e.to_string())?,
        _ = stopped.wait_for(|s| *s) => {}
    }
    match tokio::time::timeout(STOP_GRACE, task).await {
        Ok(r) => r.map_err(|e| e.to_string())?,
        // Uncommitted batches are replayed by the next owner, and inserts are idempotent.
        Err(_) => Err(format!(
            "persist did not stop in {STOP_GRACE:?}; exiting anyway"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = PersistConfig::default();
        assert_eq!((c.batch_rows, c.batch_ms, c.retry_max_ms), (500, 50, 5_000));
    }

    /// Callers spawn it on their runtime: the future must be `Send` (checked by compiling).
    #[allow(dead_code)]
    fn run_is_spawnable(
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        rx: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        Persist::new(bus, store, PersistConfig::default()).run(rx)
    }
}

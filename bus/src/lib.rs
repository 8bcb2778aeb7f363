//! What the processes talk over, each with a real distributed implementation and an
//! in-process one for standalone:
//! - the message bus (this module's `Bus`): Kafka (`kafka`) or bounded in-memory logs (`memory`);
//! - presence, which gateways hold a user's connections (`presence`): Redis or memory;
//! - revoked tokens (`revocation`): Redis with a local set per gateway, or memory;
//! - the gateway registry (`registry`): where clients should connect; Redis.
//!
//! The Redis implementations are behind the `redis` feature (persist uses neither).
//!
//! ## The bus
//!
//! - `KafkaBus` (`kafka`): the distributed mode. Topics, partitions, consumer groups and
//!   committed offsets are Kafka's; a record is acknowledged once the brokers hold it
//!   (acks=all, idempotent producer).
//! - `MemoryBus` (`memory`): standalone, everything in one process. The same topics,
//!   partitions, groups and offsets, held in bounded in-memory logs. It is not durable by
//!   itself, so a topic can be declared *acknowledged after commit* by a group: in
//!   standalone, a record of `im.messages` is acknowledged once persist has written it to
//!   SQLite and committed it — the same durability point, moved to the database.
//!
//! The gateway's bridge, logic's stage and client, and persist are written once against
//! these traits, so standalone runs exactly the code paths of the distributed mode.
//!
//! The surface is the part of Kafka those callers use, no more: keyed or partition-addressed
//! produce with a delivery callback, group consumers with explicit commits and rebalance
//! notes, consumers of chosen partitions from chosen offsets, committed offsets and
//! watermarks (for logic's recovery).

pub mod kafka;
#[cfg(feature = "redis")]
pub mod lease;
pub mod memory;
pub mod presence;
pub mod registry;
pub mod revocation;

pub use kafka::{KafkaBus, KafkaConfig};

/// How long a producer keeps retrying a record before it gives up (librdkafka's
/// `message.timeout.ms`), where the caller answers its own user sooner (the gateway after
/// `--produce-timeout-ms`, logic's deliveries): long enough to ride out a broker restart.
/// A record that times out locally makes an idempotent producer bump its epoch, a step some
/// Kafka-protocol brokers do not implement (nisshi 0.6 answers every later produce of that
/// producer with an error, so the service never recovers): on such a broker only outages
/// longer than this stay fatal.
pub const RECORD_TIMEOUT_MS: u32 = 120_000;
pub use memory::MemoryBus;

/// One PING over a plain connection, answered within 10 s. A Redis that refuses this process
/// (protected mode, a password, nothing listening) is reported at once with its reason;
/// redis-rs's connection manager would retry it with backoff for about two minutes and then
/// say little more.
#[cfg(feature = "redis")]
pub(crate) async fn redis_ping(client: &redis::Client) -> Result<(), String> {
    const WITHIN: Duration = Duration::from_secs(10);
    let ping = async {
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(WITHIN, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {WITHIN:?}")),
    }
}

pub use im_shared::trace::TraceParent;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    /// When the record was produced (Kafka's CreateTime, set by the producer; the memory
    /// bus's append time), Unix ms: consumers export how old records are when they arrive.
    pub timestamp_ms: Option<i64>,
    /// The record's `traceparent` header, when its producer traced it (a sampled message).
    pub trace: Option<TraceParent>,
}

/// A record that will never be durable: why, and the record itself (so a caller need not
/// keep a copy of every record just in case one fails).
pub type Undelivered<'a> = (String, &'a [u8]);

/// Called once with a record's outcome: `Ok` once it is durable (as the bus defines it),
/// `Err` when it never will be (timed out, refused by the broker).
pub type Done = Box<dyn for<'a> FnOnce(Result<(), Undelivered<'a>>) + Send + Sync>;

/// Why a record was not even queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The producer's bounded queue is full: slow down and retry.
    QueueFull,
    Failed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::QueueFull => f.write_str("the producer queue is full"),
            SendError::Failed(e) => f.write_str(e),
        }
    }
}

/// Where a partition consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At this offset (clamped to what the log still holds).
    Offset(i64),
    /// After the last record now in the partition: only what is produced from now on.
    End,
}

pub trait Producer: Send + Sync {
    /// Queues a record for `topic`: to `partition` when given, else to the partition of
    /// `key` (records with one key stay in order). `done`, when given, hears the outcome.
    /// `trace` goes with it as its `traceparent` header (Kafka record headers; the memory
    /// bus keeps it beside the payload).
    fn send_traced(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        trace: Option<&TraceParent>,
        done: Option<Done>,
    ) -> Result<(), SendError>;

    /// `send_traced` with no trace: what every untraced record takes.
    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        done: Option<Done>,
    ) -> Result<(), SendError> {
        self.send_traced(topic, partition, key, payload, None, done)
    }

    /// Records queued and not yet acknowledged or failed.
    fn in_flight(&self) -> usize;

    /// Waits (bounded) until what is queued is delivered or failed.
    fn flush(&self, timeout: Duration);
}

/// Sends, and returns a receiver that hears the record's outcome (for callers that queue
/// many records and then wait for them all). A full queue is `Err(QueueFull)` at once.
pub fn send_with_receipt(
    producer: &dyn Producer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &[u8],
) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, SendError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done: Done = Box::new(move |r: Result<(), Undelivered<'_>>| {
        let _ = tx.send(r.map_err(|(why, _)| why));
    });
    producer.send(topic, partition, key, payload, Some(done))?;
    Ok(rx)
}

/// Sends and waits for the record's acknowledgement. A full queue is `Err(QueueFull)` at
/// once; the caller decides whether to wait.
pub async fn send_acked(
    producer: &dyn Producer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &[u8],
) -> Result<(), SendError> {
    let rx = send_with_receipt(producer, topic, partition, key, payload)?;
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SendError::Failed(e)),
        Err(_) => Err(SendError::Failed("the producer went away".into())),
    }
}

/// A change of a group consumer's partitions, noted by the bus for the consume loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rebalance {
    /// Noted before the partitions go: nothing of them is committed after this.
    Revoked(Vec<i32>),
    /// The group's `generation` (Kafka's consumer group generation, read when the
    /// assignment arrived) gave this member `partitions`. Logic stamps what it writes with
    /// it, so that a reader can tell an owner's records from a fenced-off one's.
    Assigned {
        partitions: Vec<i32>,
        generation: i32,
    },
}

pub trait Consumer: Send {
    /// The next record. Cancel-safe: a caller may select on it and drop it without losing
    /// a record.
    fn recv(&mut self) -> BoxFuture<'_, Result<Record, String>>;

    /// Rebalances since the last call, oldest first (group consumers; empty otherwise).
    fn take_rebalances(&mut self) -> Vec<Rebalance>;

    /// The group generation this member is in now, as the client last heard from the
    /// group's coordinator (0 outside a group). It moves on when the member rejoins, before
    /// the rebalance's `Assigned` is taken.
    fn generation(&self) -> i32;

    /// Commits the next offsets to read, `(partition, offset)` (group consumers). With
    /// `wait`, returns once the group holds them: the coordinator accepted them from this
    /// member at its current generation, so an `Ok` also says this member had not been
    /// fenced off (expelled, or the group moved to a newer generation) when it committed.
    fn commit(&mut self, offsets: &[(i32, i64)], wait: bool) -> Result<(), String>;
}

pub trait Bus: Send + Sync {
    /// For logs: `kafka 127.0.0.1:9092`, `in-process`.
    fn describe(&self) -> String;

    /// Partitions of `im.upstream` and `im.messages` this bus creates.
    fn partitions(&self) -> i32;

    /// Creates the topics that do not exist yet, `(name, partitions)`.
    fn ensure_topics<'a>(
        &'a self,
        topics: &'a [(&'a str, i32)],
    ) -> BoxFuture<'a, Result<(), String>>;

    /// A producer whose records wait at most `timeout_ms` for the bus (0: forever), batched
    /// for up to `linger_ms`.
    fn producer(&self, linger_ms: u32, timeout_ms: u32) -> Result<Arc<dyn Producer>, String>;

    /// A member of consumer group `group` on `topic`, committing only what it is told.
    fn group_consumer(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String>;

    /// A consumer of chosen partitions of `topic` outside any group (commits nothing).
    fn partition_consumer(
        &self,
        topic: &str,
        partitions: &[(i32, Start)],
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, String>>;

    /// The next offset `group` committed on `topic`/`partition`, if any.
    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: i32,
    ) -> BoxFuture<'a, Result<Option<i64>, String>>;

    /// (first offset still held, next offset to be written) of a partition.
    fn watermarks<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
    ) -> BoxFuture<'a, Result<(i64, i64), String>>;
}

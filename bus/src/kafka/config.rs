//! Kafka client settings every process uses, and topic creation.
//!
//! Nothing here depends on a particular broker: the tests run against tansu, production points
//! `--kafka-brokers` at a Kafka cluster.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use std::time::Duration;

/// How long a fetch waits at the broker for data. Kafka answers a waiting fetch as soon as
/// data arrives, so this bounds idle polling, not latency; short waits make idle consumers
/// poll the broker hard (measured on tansu: 10 ms kept a core busy with nothing to do).
const FETCH_WAIT_MS: &str = "100";

/// Extra librdkafka settings for every client, `key=value` pairs separated by commas, applied
/// last (so they override ours): for example `IM_KAFKA_CONFIG=linger.ms=5,fetch.wait.max.ms=50`.
pub const CONFIG_ENV: &str = "IM_KAFKA_CONFIG";

fn overrides(mut c: ClientConfig) -> ClientConfig {
    if let Ok(extra) = std::env::var(CONFIG_ENV) {
        for kv in extra.split(',').filter(|s| !s.trim().is_empty()) {
            match kv.split_once('=') {
                Some((k, v)) => {
                    c.set(k.trim(), v.trim());
                }
                None => log::warn!("{CONFIG_ENV}: `{kv}` is not key=value; ignored"),
            }
        }
    }
    c
}

/// Where the brokers are and how topics are laid out.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Partitions of `im.upstream` and `im.messages` (they must be equal: logic writes a
    /// message to the same partition number it read the request from).
    pub partitions: i32,
    /// Replication factor for topics this process creates.
    pub replication: i32,
    /// Static group membership (KIP-345, `group.instance.id`): a restarted process with the
    /// same id takes its partitions back at once instead of waiting for the broker to expire
    /// the crashed member. Unique per process within a group. `Some("")`: dynamic
    /// membership, chosen on purpose.
    pub instance_id: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            partitions: 4,
            replication: 1,
            instance_id: None,
        }
    }
}

impl KafkaConfig {
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // Keep the logs ours: librdkafka's own go through `log` at warning and above.
            .set("log_level", "4")
            .set("socket.keepalive.enable", "true");
        // librdkafka's own tracing, e.g. IM_KAFKA_DEBUG=cgrp,topic (logged at debug level).
        if let Ok(d) = std::env::var("IM_KAFKA_DEBUG") {
            c.set("debug", d);
        }
        c
    }

    /// A producer whose acknowledgements mean durable: acks=all and idempotent (no
    /// duplicates or reordering from its own retries). `linger_ms` trades latency for
    /// batching; `timeout_ms` bounds how long a record may wait for the broker (0: forever).
    pub fn producer(&self, linger_ms: u32, timeout_ms: u32) -> ClientConfig {
        let mut c = self.base();
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            // Snappy batches cannot be read back from some Kafka-compatible brokers; lz4 can.
            .set("compression.type", "lz4")
            .set("linger.ms", linger_ms.to_string())
            .set("message.timeout.ms", timeout_ms.to_string())
            // Bounded: a full queue is refused at once (the caller answers `error`).
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144");
        overrides(c)
    }

    /// A consumer in `group` that commits only what the caller says is done.
    pub fn group_consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // The classic protocol: the KIP-848 one is not available on every broker.
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "10000")
            // Also the rebalance timeout: how long a rebalance waits for members to rejoin.
            // A member killed without leaving holds its partitions until then on some
            // brokers, so it bounds the pause after a crash. The consume loops poll far more
            // often than this, even while retrying a write.
            .set("max.poll.interval.ms", "20000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .set("isolation.level", "read_uncommitted");
        // Empty: dynamic membership, asked for explicitly (see `instance_id`).
        if let Some(id) = self.instance_id.as_deref().filter(|id| !id.is_empty()) {
            c.set("group.instance.id", id);
        }
        overrides(c)
    }

    /// A consumer outside any group (it assigns partitions itself and commits nothing).
    pub fn plain_consumer(&self) -> ClientConfig {
        let mut c = self.base();
        // librdkafka wants a group id even when no group is joined; nothing is committed.
        c.set("group.id", "im-unused")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS);
        overrides(c)
    }

    /// Creates the topics that do not exist yet (an existing topic is fine, whatever its
    /// partitions: operators may have created it).
    pub async fn ensure_topics(&self, topics: &[(&str, i32)]) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = self
            .base()
            .create()
            .map_err(|e| format!("kafka admin client: {e}"))?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, parts)| {
                NewTopic::new(name, *parts, TopicReplication::Fixed(self.replication))
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new, &opts)
            .await
            .map_err(|e| format!("creating topics on {}: {e}", self.brokers))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, e)) => return Err(format!("creating topic {name}: {e}")),
            }
        }
        Ok(())
    }
}

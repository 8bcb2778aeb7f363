//! The bus on Kafka (any Kafka-protocol broker): librdkafka through `rdkafka`, with the
//! client settings of `config::KafkaConfig`.

mod config;

pub use config::{KafkaConfig, CONFIG_ENV};

use crate::{
    BoxFuture, Bus, Consumer, Done, Producer, Rebalance, Record, SendError, Start, TraceParent,
};
use im_shared::trace;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance as KRebalance,
    StreamConsumer,
};
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long metadata, offset and watermark queries may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaBus {
    cfg: KafkaConfig,
}

impl KafkaBus {
    pub fn new(cfg: KafkaConfig) -> KafkaBus {
        KafkaBus { cfg }
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.cfg
    }
}

/// Hands each record's outcome to its `Done` (on librdkafka's delivery-report thread).
struct DeliveryContext;

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Option<Done>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        if let Some(done) = *done {
            done(match result {
                Ok(_) => Ok(()),
                Err((e, m)) => Err((e.to_string(), m.payload().unwrap_or_default())),
            });
        }
    }
}

struct KafkaProducer {
    inner: ThreadedProducer<DeliveryContext>,
}

impl Producer for KafkaProducer {
    fn send_traced(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        trace: Option<&TraceParent>,
        done: Option<Done>,
    ) -> Result<(), SendError> {
        let mut rec = BaseRecord::with_opaque_to(topic, Box::new(done))
            .key(key)
            .payload(payload);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        // Only a traced record carries headers (an allocation librdkafka makes for it).
        if let Some(t) = trace {
            let value = t.encode();
            rec = rec.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                key: trace::HEADER,
                value: Some(&value[..]),
            }));
        }
        self.inner
            .send(rec)
            .map_err(|(e, _)| match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::QueueFull) => SendError::QueueFull,
                _ => SendError::Failed(e.to_string()),
            })
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight_count().max(0) as usize
    }

    fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}

/// Notes rebalances for the consume loop (`Consumer::take_rebalances`). Revocations are
/// noted before the partitions go, assignments after they arrive; both inside `recv`.
#[derive(Default)]
struct GroupContext {
    events: Mutex<Vec<Rebalance>>,
}

impl ClientContext for GroupContext {}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, r: &KRebalance<'_>) {
        if let KRebalance::Revoke(tpl) = r {
            let parts = partitions_of(tpl);
            log::info!("kafka: partitions revoked {parts:?}");
            self.events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Rebalance::Revoked(parts));
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, r: &KRebalance<'_>) {
        match r {
            KRebalance::Assign(tpl) => {
                let partitions = partitions_of(tpl);
                let generation = generation_of(c.client());
                log::info!("kafka: partitions assigned {partitions:?} in generation {generation}");
                self.events
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Rebalance::Assigned {
                        partitions,
                        generation,
                    });
            }
            KRebalance::Error(e) => log::warn!("kafka: rebalance error: {e}"),
            KRebalance::Revoke(_) => {}
        }
    }
}

/// The consumer group generation librdkafka is in now (-1 when it is in none). rdkafka has no
/// safe accessor; librdkafka's `rd_kafka_consumer_group_metadata_generation_id` is public.
fn generation_of<C: ClientContext>(client: &rdkafka::client::Client<C>) -> i32 {
    use rdkafka::bindings as rd;
    // SAFETY: `native_ptr` is the live client's handle; the metadata is a copy that we own
    // and destroy after reading one integer from it.
    unsafe {
        let md = rd::rd_kafka_consumer_group_metadata(client.native_ptr());
        if md.is_null() {
            return -1;
        }
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(md);
        rd::rd_kafka_consumer_group_metadata_destroy(md);
        generation
    }
}

/// The `traceparent` header among a record's headers, if valid.
fn trace_of(h: &BorrowedHeaders) -> Option<TraceParent> {
    h.iter()
        .find(|h| h.key == trace::HEADER)
        .and_then(|h| TraceParent::parse(h.value?))
}

struct KafkaConsumer {
    inner: StreamConsumer<GroupContext>,
    topic: String,
}

impl Consumer for KafkaConsumer {
    fn recv(&mut self) -> BoxFuture<'_, Result<Record, String>> {
        Box::pin(async move {
            let m = self
                .inner
                .recv()
                .await
                .map_err(|e| format!("consuming {}: {e}", self.topic))?;
            Ok(Record {
                partition: m.partition(),
                offset: m.offset(),
                payload: m.payload().unwrap_or_default().to_vec(),
                timestamp_ms: m.timestamp().to_millis(),
                trace: m.headers().and_then(trace_of),
            })
        })
    }

    fn take_rebalances(&mut self) -> Vec<Rebalance> {
        std::mem::take(
            &mut *self
                .inner
                .context()
                .events
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn generation(&self) -> i32 {
        generation_of(self.inner.client())
    }

    fn commit(&mut self, offsets: &[(i32, i64)], wait: bool) -> Result<(), String> {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for &(p, o) in offsets {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(o))
                .map_err(|e| format!("offset {o} of {}/{p}: {e}", self.topic))?;
        }
        let mode = if wait {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        let commit = || {
            self.inner
                .commit(&tpl, mode)
                .map_err(|e| format!("committing {}: {e}", self.topic))
        };
        // A waiting commit blocks for a broker round trip: on a multi-threaded runtime, let
        // the runtime move its other tasks off this thread meanwhile.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if wait && multi_thread {
            tokio::task::block_in_place(commit)
        } else {
            commit()
        }
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("kafka query task: {e}"))?
}

impl Bus for KafkaBus {
    fn describe(&self) -> String {
        format!("kafka {}", self.cfg.brokers)
    }

    fn partitions(&self) -> i32 {
        self.cfg.partitions
    }

    fn ensure_topics<'a>(
        &'a self,
        topics: &'a [(&'a str, i32)],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.cfg.ensure_topics(topics))
    }

    fn producer(&self, linger_ms: u32, timeout_ms: u32) -> Result<Arc<dyn Producer>, String> {
        let inner: ThreadedProducer<DeliveryContext> = self
            .cfg
            .producer(linger_ms, timeout_ms)
            .create_with_context(DeliveryContext)
            .map_err(|e| format!("kafka producer: {e}"))?;
        Ok(Arc::new(KafkaProducer { inner }))
    }

    fn group_consumer(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String> {
        let inner: StreamConsumer<GroupContext> = self
            .cfg
            .group_consumer(group)
            .create_with_context(GroupContext::default())
            .map_err(|e| format!("kafka consumer on {}: {e}", self.cfg.brokers))?;
        inner
            .subscribe(&[topic])
            .map_err(|e| format!("subscribing to {topic}: {e}"))?;
        Ok(Box::new(KafkaConsumer {
            inner,
            topic: topic.to_owned(),
        }))
    }

    fn partition_consumer(
        &self,
        topic: &str,
        partitions: &[(i32, Start)],
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, String>> {
        let (cfg, topic, partitions) = (self.cfg.clone(), topic.to_owned(), partitions.to_vec());
        Box::pin(blocking(move || {
            let inner: StreamConsumer<GroupContext> = cfg
                .plain_consumer()
                .create_with_context(GroupContext::default())
                .map_err(|e| format!("kafka consumer on {}: {e}", cfg.brokers))?;
            let mut tpl = TopicPartitionList::new();
            for (p, start) in partitions {
                let offset = match start {
                    Start::Offset(o) => o,
                    Start::End => {
                        inner
                            .fetch_watermarks(&topic, p, QUERY_TIMEOUT)
                            .map_err(|e| format!("offsets of {topic}/{p}: {e}"))?
                            .1
                    }
                };
                tpl.add_partition_offset(&topic, p, Offset::Offset(offset))
                    .map_err(|e| e.to_string())?;
            }
            inner
                .assign(&tpl)
                .map_err(|e| format!("assigning {topic}: {e}"))?;
            Ok(Box::new(KafkaConsumer { inner, topic }) as Box<dyn Consumer>)
        }))
    }

    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: i32,
    ) -> BoxFuture<'a, Result<Option<i64>, String>> {
        let (cfg, group, topic) = (self.cfg.clone(), group.to_owned(), topic.to_owned());
        Box::pin(blocking(move || {
            let mut c = cfg.plain_consumer();
            // Reading a group's offsets does not join the group.
            c.set("group.id", &group);
            let reader: BaseConsumer = c.create().map_err(|e| format!("kafka consumer: {e}"))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let committed = reader
                .committed_offsets(tpl, QUERY_TIMEOUT)
                .map_err(|e| format!("offsets of group {group}: {e}"))?;
            Ok(
                match committed
                    .find_partition(&topic, partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
        }))
    }

    fn watermarks<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
    ) -> BoxFuture<'a, Result<(i64, i64), String>> {
        let (cfg, topic) = (self.cfg.clone(), topic.to_owned());
        Box::pin(blocking(move || {
            let reader: BaseConsumer = cfg
                .plain_consumer()
                .create()
                .map_err(|e| format!("kafka consumer: {e}"))?;
            reader
                .fetch_watermarks(&topic, partition, QUERY_TIMEOUT)
                .map_err(|e| format!("offsets of {topic}/{partition}: {e}"))
        }))
    }
}

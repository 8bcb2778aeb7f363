//! The REST API's way into the pipeline: `POST /messages/send` becomes an `im.upstream`
//! record like a WebSocket `send`, and its answer comes back on this instance's own
//! downstream topic (`im.downstream.<logic-id>`), matched by a request number in `conn`.

use im_pipeline::KafkaConfig;
use im_shared::records::{self, topics, DownstreamBody, Versioned};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

pub struct PipelineClient {
    id: String,
    producer: FutureProducer,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>,
    next: AtomicU64,
    stop: Arc<AtomicBool>,
}

/// Requests waiting for an answer at once; past it, `send` is refused (bounded).
const PENDING_MAX: usize = 10_000;

impl PipelineClient {
    /// `id`: topic-safe and unique among logic instances.
    pub async fn start(kafka: &KafkaConfig, id: &str) -> Result<Arc<PipelineClient>, String> {
        let topic = topics::downstream(id);
        kafka
            .ensure_topics(&[(&topic, 1), (topics::UPSTREAM, kafka.partitions)])
            .await?;
        let producer: FutureProducer = kafka
            .producer(1, 10_000)
            .create()
            .map_err(|e| format!("kafka producer: {e}"))?;
        let consumer: BaseConsumer = kafka
            .plain_consumer()
            .create()
            .map_err(|e| format!("kafka consumer: {e}"))?;
        let (_, high) = consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .map_err(|e| format!("offsets of {topic}: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(high))
            .map_err(|e| e.to_string())?;
        consumer
            .assign(&tpl)
            .map_err(|e| format!("assigning {topic}: {e}"))?;
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pending.clone(), stop.clone());
        std::thread::Builder::new()
            .name("im-logic-replies".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Ok(rec) = records::Downstream::from_bytes(m.payload().unwrap_or_default())
                    else {
                        continue;
                    };
                    if let Some(DownstreamBody::Reply(r)) = rec.body {
                        if let Some(tx) = p.lock().expect("not poisoned").remove(&r.conn) {
                            let _ = tx.send(r.json);
                        }
                    }
                }
            })
            .map_err(|e| format!("spawning the reply reader: {e}"))?;
        Ok(Arc::new(PipelineClient {
            id: id.to_owned(),
            producer,
            pending,
            next: AtomicU64::new(1),
            stop,
        }))
    }

    /// Sends a request and waits for its answer (the client JSON: `sent` or `error`).
    /// `Err` when the broker did not take it, or no answer came in `timeout`.
    pub async fn request(
        &self,
        user: u64,
        key: &str,
        body: records::UpstreamBody,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().expect("not poisoned");
            if p.len() >= PENDING_MAX {
                return Err("too many requests in flight".into());
            }
            p.insert(conn, tx);
        }
        let rec = records::Upstream {
            version: records::VERSION,
            reply_to: self.id.clone(),
            conn,
            user,
            ts: im_shared::unix_ms(),
            body: Some(body),
        };
        let payload = rec.to_bytes();
        let produced = self
            .producer
            .send(
                FutureRecord::to(topics::UPSTREAM)
                    .key(key)
                    .payload(&payload),
                Duration::ZERO,
            )
            .await;
        let result = match produced {
            Err((e, _)) => Err(format!("the message broker did not take the message: {e}")),
            Ok(_) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(json)) => Ok(json),
                _ => Err("no answer from the pipeline in time".into()),
            },
        };
        self.pending.lock().expect("not poisoned").remove(&conn);
        result
    }
}

impl PipelineClient {
    /// Closes one connection on a gateway with 1008 (its token was revoked).
    pub fn close(&self, gateway: &str, conn: u64, reason: &str) -> Result<(), String> {
        let rec = records::Downstream {
            version: records::VERSION,
            body: Some(DownstreamBody::Close(records::Close {
                conn,
                reason: reason.to_owned(),
            })),
        };
        let payload = rec.to_bytes();
        let topic = topics::downstream(gateway);
        let key = conn.to_string();
        self.producer
            .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
            .map(|_| ())
            .map_err(|(e, _)| format!("closing a connection on {gateway}: {e}"))
    }
}

impl Drop for PipelineClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

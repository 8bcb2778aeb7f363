//! The REST API's way into the pipeline: `POST /messages/send` becomes an `im.upstream`
//! record like a WebSocket `send`, and its answer comes back on this instance's own
//! downstream topic (`im.downstream.<logic-id>`), matched by a request number in `conn`.

use im_bus::{Bus, Producer, Start};
use im_shared::records::{self, topics, DownstreamBody, Versioned};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

pub struct PipelineClient {
    id: String,
    producer: Arc<dyn Producer>,
    pending: Pending,
    next: AtomicU64,
    /// Dropped with the client: the reply reader stops.
    _stop: oneshot::Sender<()>,
}

/// Requests waiting for an answer at once; past it, `send` is refused (bounded).
const PENDING_MAX: usize = 10_000;
/// How long a request may wait for the bus before it fails.
const PRODUCE_TIMEOUT_MS: u32 = im_bus::RECORD_TIMEOUT_MS;
/// How long the producer may hold a request to batch it.
const LINGER_MS: u32 = 1;
/// The pause after an error reading the reply topic.
const CONSUME_ERROR_PAUSE: Duration = Duration::from_millis(100);

impl PipelineClient {
    /// `id`: topic-safe and unique among logic instances. Spawns the reply reader on the
    /// current runtime.
    pub async fn start(bus: Arc<dyn Bus>, id: &str) -> Result<Arc<PipelineClient>, String> {
        let topic = topics::downstream(id);
        bus.ensure_topics(&[(&topic, 1), (topics::UPSTREAM, bus.partitions())])
            .await?;
        let producer = bus.producer(LINGER_MS, PRODUCE_TIMEOUT_MS)?;
        let mut consumer = bus.partition_consumer(&topic, &[(0, Start::End)]).await?;
        let pending: Pending = Default::default();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let p = pending.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = &mut stopped => break,
                    m = consumer.recv() => m,
                };
                let Ok(m) = m else {
                    tokio::time::sleep(CONSUME_ERROR_PAUSE).await;
                    continue;
                };
                let Ok(rec) = records::Downstream::from_bytes(&m.payload) else {
                    continue;
                };
                if let Some(DownstreamBody::Reply(r)) = rec.body {
                    if let Some(tx) = p.lock().expect("not poisoned").remove(&r.conn) {
                        let _ = tx.send(r.json);
                    }
                }
            }
        });
        Ok(Arc::new(PipelineClient {
            id: id.to_owned(),
            producer,
            pending,
            next: AtomicU64::new(1),
            _stop: stop,
        }))
    }

    /// Sends a request and waits for its answer (the client JSON: `sent` or `error`).
    /// `Err` when the bus did not take it, or no answer came in `timeout`.
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
        let produced =
            im_bus::send_acked(&*self.producer, topics::UPSTREAM, None, key, &payload).await;
        let result = match produced {
            Err(e) => Err(format!("the message bus did not take the message: {e}")),
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(json)) => Ok(json),
                _ => Err("no answer from the pipeline in time".into()),
            },
        };
        self.pending.lock().expect("not poisoned").remove(&conn);
        result
    }

    /// Closes one connection on a gateway with 1008 (its token was revoked).
    pub fn close(&self, gateway: &str, conn: u64, reason: &str) -> Result<(), String> {
        let body = DownstreamBody::Close(records::Close {
            conn,
            reason: reason.to_owned(),
        });
        self.downstream(gateway, &conn.to_string(), body)
            .map_err(|e| format!("closing a connection on {gateway}: {e}"))
    }

    /// Queues one record for `gateway`'s topic.
    pub fn downstream(&self, gateway: &str, key: &str, body: DownstreamBody) -> Result<(), String> {
        let rec = records::Downstream {
            version: records::VERSION,
            body: Some(body),
        };
        let topic = topics::downstream(gateway);
        self.producer
            .send(&topic, None, key, &rec.to_bytes(), None)
            .map_err(|e| e.to_string())
    }
}

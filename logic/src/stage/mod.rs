//! The logic service's pipeline stage (ARCHITECTURE.md, "Processes" and "Delivery
//! guarantees"): consumes `im.upstream` in consumer group `logic`, and for each `send` checks
//! the sender's rights, drops client retries already seen, assigns the Snowflake id and the
//! conversation's next seq, produces the message to `im.messages`, and — once that produce is
//! acknowledged — routes it: one `im.downstream.<gateway>` record per gateway holding any
//! recipient, plus the `sent` ack to the sender's connection. Upstream offsets are committed
//! only after the batch's messages are acknowledged, so a crash replays and the retry check
//! turns the replay into the same acks. Batches are pipelined: the next one is sequenced and
//! produced while earlier ones wait for their acknowledgements, and answers, routing and
//! commits follow in batch order (`pipeline.rs` says what stays in order and why).
//!
//! Fencing (README.md, "Fencing"): an instance paused past its session timeout wakes up
//! believing it still owns its partitions. Its records carry its epoch (its group generation
//! plus one) and every owner fences a partition before using it, so persist does not store
//! what it writes after a newer owner's fence; and before answering or routing a durable
//! batch, the stage commits its offsets and waits: the coordinator accepts that commit only
//! from a current member, so a fenced-off instance answers nobody (its senders hear from the
//! new owner, which sequences the same requests again).
//!
//! The decisions are the `Sequencer`'s (`sequencer.rs`, no I/O, tested on its own); this
//! file is the thin async driver around it: it consumes, does the lookups and produces the
//! sequencer asks for, and answers.
//!
//! Modules: `sequencer` (the decisions), `pipeline` (batches in flight, released in order),
//! `release` (answering them once ownership is confirmed), `state` (per-partition seqs and
//! retries, and recovery's replay), `recovery` (reading a partition's tail back), `stats`
//! (the counters), `members` (the group member cache), `answers` (`sync` and `read` from the
//! database), `route` (live delivery and offline push), `downstream` (records to gateways), `client` (the REST API's way in), and the
//! live relays that store nothing: `receipts`, `typing`, `online` (presence), `blocks`.

mod answers;
pub mod blocks;
pub mod client;
mod downstream;
pub mod members;
pub(crate) mod online;
pub mod pipeline;
pub(crate) mod receipts;
mod recovery;
mod release;
mod route;
pub mod sequencer;
pub mod state;
mod stats;
mod trace;
pub(crate) mod typing;

use crate::push::Pusher;
use answers::Answers;
use downstream::Downstream;
use im_bus::presence::Presence;
use im_bus::{Bus, Consumer, Producer, Rebalance, Record, SendError, TraceParent};
use im_shared::records::{self, groups, topics, Stored, UpstreamBody, Versioned};
use im_shared::snowflake::WorkerLease;
use im_shared::{Conv, ErrorCode};
use im_store::Store;
use members::Members;
use pipeline::{BatchNo, Failure, Pipeline};
use recovery::{recover, Recovered};
use sequencer::{Admitted, Check, Decision, Sequencer};
use state::Ack;
pub use stats::StageStats;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(Clone, Debug)]
pub struct StageConfig {
    /// Records taken per batch, and how long a batch waits to fill.
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    /// How long `sync` waits for persist to catch up with the conversation's last seq.
    pub sync_wait_ms: u64,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            batch_max: 1000,
            batch_wait_ms: 0,
            sync_wait_ms: 2_000,
        }
    }
}

/// How long a live delivery may wait for the bus before it is dropped (sync recovers it).
const DOWNSTREAM_TIMEOUT_MS: u32 = im_bus::RECORD_TIMEOUT_MS;
/// How long the producers may hold a record to batch it.
const LINGER_MS: u32 = 1;
/// How long a full `im.messages` producer queue is waited on before trying again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);
/// The pause after a consume error.
const CONSUME_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Batches, and records, in flight between their produce and their answers.
const IN_FLIGHT_BATCHES: usize = 64;
const IN_FLIGHT_RECORDS: usize = 20_000;
/// How long the producers may deliver what they hold once the stage stops.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

struct Stage {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    members: Arc<Members>,
    cfg: StageConfig,
    /// Produces im.messages: waits for the bus as long as it takes (nothing is acked to a
    /// sender before its message is durable, and nothing may be skipped).
    log: Arc<dyn Producer>,
    down: Downstream,
    answers: Answers,
    typing: Arc<typing::TypingRelay>,
    online: Arc<online::OnlineRelay>,
    blocks: Arc<blocks::Blocks>,
    /// Offline push: notifications for recipients with no device online.
    pusher: Option<Arc<Pusher>>,
    seq: Sequencer,
    stats: Arc<StageStats>,
    /// Upstream offsets released and not yet committed.
    uncommitted: std::collections::BTreeMap<i32, i64>,
    /// The group generation of the current assignment: stamped on what this instance
    /// writes, and compared with the consumer's after each confirming commit.
    generation: i32,
    /// Partitions a newer owner has fenced: their records are skipped (not sequenced, not
    /// committed) until the next rebalance says what this instance owns.
    fenced_off: HashSet<i32>,
    /// A confirming commit failed: nothing more is taken or answered until every batch in
    /// flight is acknowledged (so that the log holds all of this instance's records before
    /// any partition is recovered again, under the same epoch), then all state is forgotten.
    unconfirmed: bool,
}

/// Runs the stage until `shutdown` turns true. Errors are fatal to the stage (the bus
/// refused a message for good); the caller exits and a restart recovers.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    (members, blocks, pusher): (Arc<Members>, Arc<blocks::Blocks>, Option<Arc<Pusher>>),
    cfg: StageConfig,
    lease: Arc<WorkerLease>,
    stats: Arc<StageStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let n = bus.partitions();
    bus.ensure_topics(&[(topics::UPSTREAM, n), (topics::MESSAGES, n)])
        .await?;
    let mut consumer = bus.group_consumer(groups::LOGIC, topics::UPSTREAM)?;
    let lists = (members, blocks);
    let mut stage = Stage::new(bus.clone(), store, presence, lists, cfg, lease, stats)?;
    stage.pusher = pusher;
    log::info!(
        "logic pipeline: consuming {} in group logic on the {}",
        topics::UPSTREAM,
        bus.describe()
    );
    let (acks_tx, mut acks) = mpsc::unbounded_channel::<Acked>();
    let mut pipe: Pipeline<Produced> = Pipeline::new(IN_FLIGHT_BATCHES, IN_FLIGHT_RECORDS);
    let mut batch: Vec<Record> = Vec::new();
    loop {
        batch.clear();
        tokio::select! {
            // Acknowledgements first: they free room and release answers.
            biased;
            _ = shutdown.changed() => {}
            Some(a) = acks.recv(), if !pipe.is_empty() => {
                stage.on_ack(&mut pipe, a, &acks_tx).await?;
                stage.release(&mut pipe, &mut *consumer).await;
                continue;
            }
            m = consumer.recv(), if pipe.has_room() && !stage.unconfirmed => match m {
                Ok(m) => batch.push(m),
                Err(e) => {
                    log::warn!("logic: consume error: {e}");
                    tokio::time::sleep(CONSUME_ERROR_PAUSE).await;
                }
            },
        }
        if *shutdown.borrow() {
            break;
        }
        fill(&mut *consumer, &mut batch, &stage.cfg).await;
        let rebalances = consumer.take_rebalances();
        if !rebalances.is_empty() {
            // What is in flight was sequenced under the old assignment: left to the
            // partitions' next owner (pipeline.rs, "A rebalance abandons").
            let n = pipe.abandon();
            if n > 0 {
                stage
                    .stats
                    .unconfirmed_batches_total
                    .fetch_add(n as u64, Ordering::Relaxed);
                log::info!(
                    "logic: rebalance: {n} batches in flight left to the partitions' next owner"
                );
            }
            stage.uncommitted.clear();
            stage.unconfirmed = false;
        }
        for r in rebalances {
            let parts = match r {
                Rebalance::Assigned {
                    partitions,
                    generation,
                } => {
                    stage.generation = generation;
                    partitions
                }
                Rebalance::Revoked(parts) => parts,
            };
            for p in parts {
                stage.seq.forget(p);
                stage.fenced_off.remove(&p);
            }
        }
        if batch.is_empty() {
            continue;
        }
        // A shutdown while the broker is down must not wait for it: nothing of this batch is
        // committed, so the next owner replays it (and recognises what was already logged).
        tokio::select! {
            r = stage.start(&batch, &mut pipe, &acks_tx) => r?,
            _ = shutdown.wait_for(|s| *s) => break,
        }
        stage.release(&mut pipe, &mut *consumer).await;
    }
    // Answer what is acknowledged in time; the rest is replayed by the next owner.
    let drained = stage.drain(&mut pipe, &mut acks, &acks_tx, &mut *consumer);
    if let Err(e) = tokio::time::timeout(FINAL_FLUSH, drained)
        .await
        .unwrap_or_else(|_| Err(format!("{} batches unanswered at shutdown", pipe.len())))
    {
        log::warn!("logic: stopping: {e}");
    }
    stage.log.flush(FINAL_FLUSH);
    stage.down.producer().flush(FINAL_FLUSH);
    Ok(())
}

/// An `im.messages` outcome: batch, record index in it, result.
type Acked = (BatchNo, usize, Result<(), String>);

/// A batch between its produce and its answers.
struct Produced {
    /// When its first record was taken.
    taken: std::time::Instant,
    /// When its last record was handed to the producer.
    produced: std::time::Instant,
    decisions: Vec<(Decision, Admitted)>,
    /// The upstream offsets its answers make committable.
    offsets: Vec<(i32, i64)>,
    /// Beside `decisions`, the `im.sequence` context of each traced send (empty when no
    /// send of the batch is traced).
    traces: Vec<Option<TraceParent>>,
}

/// Adds to a started batch what is already there, or arrives within the batch wait (none by
/// default: with batches pipelined, a small batch costs no round trip of its own).
async fn fill(consumer: &mut dyn Consumer, batch: &mut Vec<Record>, cfg: &StageConfig) {
    let wait = tokio::time::sleep(Duration::from_millis(cfg.batch_wait_ms));
    tokio::pin!(wait);
    while !batch.is_empty() && batch.len() < cfg.batch_max {
        tokio::select! {
            // What is ready is taken before the wait is looked at.
            biased;
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m),
                Err(_) => break,
            },
            _ = std::future::ready(()), if cfg.batch_wait_ms == 0 => break,
            _ = &mut wait => break,
        }
    }
}

/// The next offset to read in each partition of `batch`.
fn next_offsets(batch: &[Record]) -> Vec<(i32, i64)> {
    let mut next: HashMap<i32, i64> = HashMap::new();
    for m in batch {
        let e = next.entry(m.partition).or_insert(0);
        *e = (*e).max(m.offset + 1);
    }
    next.into_iter().collect()
}

impl Stage {
    fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        presence: Arc<dyn Presence>,
        (members, blocks): (Arc<Members>, Arc<blocks::Blocks>),
        cfg: StageConfig,
        lease: Arc<WorkerLease>,
        stats: Arc<StageStats>,
    ) -> Result<Stage, String> {
        let down = Downstream::new(
            bus.producer(LINGER_MS, DOWNSTREAM_TIMEOUT_MS)?,
            stats.clone(),
        );
        let answers = Answers {
            store: store.clone(),
            members: members.clone(),
            blocks: blocks.clone(),
            presence: presence.clone(),
            down: down.clone(),
            stats: stats.clone(),
            slots: Arc::new(Semaphore::new(answers::DB_TASKS_MAX)),
            wait: Duration::from_millis(cfg.sync_wait_ms),
        };
        let typing = Arc::new(typing::TypingRelay::new(
            members.clone(),
            blocks.clone(),
            presence.clone(),
            down.clone(),
            stats.clone(),
        ));
        let online = Arc::new(online::OnlineRelay::new(
            store.clone(),
            blocks.clone(),
            presence.clone(),
            down.clone(),
            stats.clone(),
        ));
        Ok(Stage {
            typing,
            online,
            pusher: None,
            blocks,
            log: bus.producer(LINGER_MS, 0)?,
            bus,
            store,
            presence,
            members,
            down,
            answers,
            seq: Sequencer::new(lease),
            cfg,
            stats,
            uncommitted: Default::default(),
            generation: 0,
            fenced_off: HashSet::new(),
            unconfirmed: false,
        })
    }

    /// Checks and sequences `batch`, produces its new messages to `im.messages` (their
    /// outcomes arrive on `acks`), and queues it in the pipeline to be answered in order.
    async fn start(
        &mut self,
        batch: &[Record],
        pipe: &mut Pipeline<Produced>,
        acks: &mpsc::UnboundedSender<Acked>,
    ) -> Result<(), String> {
        let taken = std::time::Instant::now();
        let unix_ms = im_shared::unix_ms() as i64;
        let mut sends: Vec<Admitted> = Vec::new();
        // Each traced send while it is sequenced, beside `sends`, when the batch has any
        // traced record (trace.rs); else nothing is allocated for it.
        let traced = batch.iter().any(|m| m.trace.is_some());
        let mut spans: Vec<Option<trace::Sequencing>> = Vec::new();
        for m in batch {
            if let Some(ts) = m.timestamp_ms {
                let age = unix_ms.saturating_sub(ts).max(0) as u64;
                self.stats.upstream_age.observe(age);
            }
            let p = m.partition;
            if self.fenced_off.contains(&p) {
                continue;
            }
            if !self.seq.has(p) {
                let (bus, store, log) = (&*self.bus, &*self.store, &*self.log);
                match recover(bus, store, log, p, self.generation).await? {
                    Recovered::Owned(part) => self.seq.recovered(p, part),
                    Recovered::Fenced => {
                        self.stats.fenced_total.fetch_add(1, Ordering::Relaxed);
                        self.fenced_off.insert(p);
                        continue;
                    }
                }
            }
            let up = match records::Upstream::from_bytes(&m.payload) {
                Ok(u) => u,
                Err(e) => {
                    self.stats.bad_records_total.fetch_add(1, Ordering::Relaxed);
                    log::warn!("logic: skipping upstream record {p}/{}: {e}", m.offset);
                    continue;
                }
            };
            match up.body.clone() {
                Some(UpstreamBody::Send(send)) => {
                    let span = m.trace.as_ref().map(trace::Sequencing::start);
                    match self.admit(up.user, &send).await {
                        Ok(conv) => {
                            sends.push(Admitted {
                                up,
                                send,
                                conv,
                                partition: p,
                            });
                            if traced {
                                spans.push(span);
                            }
                        }
                        Err((code, msg)) => {
                            self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                            let t = span.as_ref().map(trace::Sequencing::refused);
                            let cid = Some(send.cid.as_str());
                            self.down
                                .reply_error_traced(&up, code, msg, cid, t.as_ref());
                        }
                    }
                }
                Some(UpstreamBody::Sync(s)) => {
                    let last = self.seq.last_seq(p, &s.conv).unwrap_or(0);
                    self.answers.sync(&up, s, last)
                }
                Some(UpstreamBody::Read(r)) => {
                    let last = self.seq.last_seq(p, &r.conv).unwrap_or(0);
                    self.answers.read(&up, r, last)
                }
                Some(UpstreamBody::Typing(t)) => self.typing.relay(&up, t),
                Some(UpstreamBody::Presence(e)) => self.online.event(&up, e),
                None => {}
            }
        }
        let mut offsets = next_offsets(batch);
        offsets.retain(|(p, _)| !self.fenced_off.contains(p));
        let decisions = if sends.is_empty() {
            Vec::new()
        } else {
            self.sequence(sends).await
        };
        let produced = decisions
            .iter()
            .map(|(d, _)| matches!(d, Decision::Assigned(_)))
            .collect();
        // Registered before producing: an outcome can only name a batch the pipeline knows.
        let now = std::time::Instant::now();
        let traces = trace::contexts(&spans, &decisions);
        let batch = Produced {
            taken,
            produced: now,
            decisions,
            offsets,
            traces,
        };
        let no = pipe.push(batch, produced);
        let Some(Produced {
            decisions, traces, ..
        }) = pipe.get(no)
        else {
            return Ok(());
        };
        for (i, (d, s)) in decisions.iter().enumerate() {
            if let Decision::Assigned(rec) = d {
                let t = traces.get(i).copied().flatten();
                self.produce_log(rec, s.partition, (no, i), t, acks).await?;
            }
        }
        // The sequence spans end here, once their messages are handed to the producer.
        drop(spans);
        let t = taken.elapsed().as_micros() as u64;
        self.stats
            .sequencing_us_total
            .fetch_add(t, Ordering::Relaxed);
        Ok(())
    }

    /// One `im.messages` outcome: noted, or the record produced again, or the stage's end.
    async fn on_ack(
        &self,
        pipe: &mut Pipeline<Produced>,
        (no, i, r): Acked,
        acks: &mpsc::UnboundedSender<Acked>,
    ) -> Result<(), String> {
        let why = match r {
            Ok(()) => {
                pipe.acked(no, i);
                return Ok(());
            }
            Err(why) => why,
        };
        match pipe.failed(no, i, &why) {
            Failure::GiveUp(e) => Err(format!("producing to {}: {e}", topics::MESSAGES)),
            Failure::Abandoned => Ok(()),
            Failure::Retry { attempt } => {
                log::warn!(
                    "logic: producing to {} failed ({why}); attempt {attempt}",
                    topics::MESSAGES
                );
                let Some(b) = pipe.get(no) else {
                    return Ok(());
                };
                let t = b.traces.get(i).copied().flatten();
                match &b.decisions[i] {
                    (Decision::Assigned(rec), s) => {
                        self.produce_log(rec, s.partition, (no, i), t, acks).await
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Waits for everything in flight, answering it in order.
    async fn drain(
        &mut self,
        pipe: &mut Pipeline<Produced>,
        acks: &mut mpsc::UnboundedReceiver<Acked>,
        tx: &mpsc::UnboundedSender<Acked>,
        consumer: &mut dyn Consumer,
    ) -> Result<(), String> {
        self.release(pipe, consumer).await;
        while !pipe.is_empty() {
            let Some(a) = acks.recv().await else {
                return Err("the acknowledgement channel closed".into());
            };
            self.on_ack(pipe, a, tx).await?;
            self.release(pipe, consumer).await;
        }
        Ok(())
    }

    /// The sequencer's check, with the lookups it asks for. The conversation, or why not.
    async fn admit(
        &mut self,
        sender: u64,
        send: &records::Send,
    ) -> Result<Conv, (ErrorCode, &'static str)> {
        const DB_DOWN: (ErrorCode, &str) = (
            ErrorCode::DependencyDown,
            "the database is unavailable: retry with the same cid",
        );
        let mut check = self.seq.check(sender, send);
        loop {
            check = match check {
                Check::Ready(conv @ Conv::Pair(a, b)) => {
                    let to = if a == sender { b } else { a };
                    return match self.blocks.refusal(sender, to).await {
                        Ok(None) => Ok(conv),
                        Ok(Some(why)) => Err((ErrorCode::Forbidden, why)),
                        Err(_) => Err(DB_DOWN),
                    };
                }
                Check::Ready(conv) => return Ok(conv),
                Check::Refused(code, msg) => return Err((code, msg)),
                Check::NeedsUser(to) => match self.store.user_by_id(to).await {
                    Ok(found) => self.seq.user_exists(sender, send, to, found.is_some()),
                    Err(_) => return Err(DB_DOWN),
                },
                Check::NeedsMembers(g) => match self.members.of(g).await {
                    Ok(m) => sequencer::group_access(&m, sender, g),
                    Err(_) => return Err(DB_DOWN),
                },
            }
        }
    }

    /// The sequencer's decisions for `sends`, after the database lookups it asks for (which
    /// are retried until the database answers: nothing of the batch is produced yet).
    async fn sequence(&mut self, sends: Vec<Admitted>) -> Vec<(Decision, Admitted)> {
        let lookups = self.seq.lookups(&sends);
        let store = &self.store;
        let mut stored = HashMap::new();
        if !lookups.cids.is_empty() {
            let rows = with_retry("looking up retries", || store.find_by_cids(&lookups.cids)).await;
            for (user, cid, row) in rows {
                let ack = Ack {
                    id: row.id,
                    conv: row.conv,
                    seq: row.seq,
                    ts: row.ts_ms,
                };
                stored.insert((user, cid), ack);
            }
        }
        let mut db_max = HashMap::new();
        if !lookups.convs.is_empty() {
            db_max = with_retry("reading last seqs", || store.max_seqs(&lookups.convs))
                .await
                .into_iter()
                .collect();
        }
        let decisions = self
            .seq
            .decide(&sends, &stored, &db_max, im_shared::unix_ms());
        decisions.into_iter().zip(sends).collect()
    }

    /// Queues a message for `im.messages`, in the partition its request came from; its
    /// outcome arrives on `acks` tagged with `at` (batch, index).
    /// `trace` is the message's `im.sequence` context when its send is traced: the produce
    /// is then `im.durable`, ended by the acknowledgement.
    async fn produce_log(
        &self,
        rec: &Stored,
        partition: i32,
        at: (BatchNo, usize),
        trace: Option<TraceParent>,
        acks: &mpsc::UnboundedSender<Acked>,
    ) -> Result<(), String> {
        let payload = rec.to_bytes();
        let key = rec.conv.as_str();
        // One span per produce, however long a full queue makes it wait; its
        // acknowledgement ends it (the callback holds the last handle).
        let durable = trace.as_ref().and_then(|t| trace::durable(t, partition));
        let context = durable.as_ref().and_then(im_telemetry::context).or(trace);
        loop {
            let topic = topics::MESSAGES;
            let tx = acks.clone();
            let (sent, stats) = (std::time::Instant::now(), self.stats.clone());
            let span = durable.clone();
            let done: im_bus::Done = Box::new(move |r: Result<(), im_bus::Undelivered<'_>>| {
                if r.is_ok() {
                    stats.ack_time.observe(sent.elapsed().as_millis() as u64);
                } else if let Some(span) = &span {
                    span.record("otel.status_code", "error");
                }
                drop(span);
                let _ = tx.send((at.0, at.1, r.map_err(|(why, _)| why)));
            });
            match self.log.send_traced(
                topic,
                Some(partition),
                key,
                &payload,
                context.as_ref(),
                Some(done),
            ) {
                Ok(()) => return Ok(()),
                // The queue is full: the bus is slow or down; wait for room.
                Err(SendError::QueueFull) => tokio::time::sleep(QUEUE_FULL_PAUSE).await,
                Err(SendError::Failed(e)) => return Err(format!("producing to {topic}: {e}")),
            }
        }
    }
}

/// Retries a database read with capped backoff until it works: nothing of the batch has been
/// produced yet, so waiting loses nothing (the batch's offsets stay uncommitted, lag grows),
/// and a shutdown interrupts the wait (`run`'s select).
async fn with_retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = im_store::Result<T>>,
{
    const FIRST_MS: u64 = 50;
    const MAX_MS: u64 = 2_000;
    let mut backoff_ms = FIRST_MS;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                log::warn!("logic: {what}: {e}; retrying in {backoff_ms} ms");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(MAX_MS);
            }
        }
    }
}

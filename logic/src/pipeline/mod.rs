//! The logic service's pipeline stage (ARCHITECTURE.md, "Processes" and "Delivery
//! guarantees"): consumes `im.upstream` in consumer group `logic`, and for each `send` checks
//! the sender's rights, drops client retries already seen, assigns the Snowflake id and the
//! conversation's next seq, produces the message to `im.messages`, and — once that produce is
//! acknowledged — routes it: one `im.downstream.<gateway>` record per gateway holding any
//! recipient, plus the `sent` ack to the sender's connection. Upstream offsets are committed
//! only after the batch's messages are acknowledged, so a crash replays and the retry check
//! turns the replay into the same acks.
//!
//! `sync` and `read` are answered from the database; they go through the same partition as
//! the conversation's messages, so a `sync` knows the conversation's last seq and waits
//! (bounded) for persist to have written it.
//!
//! Modules: `state` (per-partition seqs and retries, recovery), `presence` (routing lookups
//! and the group member cache), `client` (the REST API's way into the pipeline).

pub mod client;
pub mod presence;
pub mod state;

use crate::store::{MessageRow, Store};
use im_pipeline::bus::{self, Bus, Producer, Rebalance, Record, SendError, Start};
use im_shared::protocol::{self, Message, Target};
use im_shared::records::{self, groups, topics, DownstreamBody, Stored, UpstreamBody, Versioned};
use im_shared::snowflake::Snowflake;
use im_shared::{Conv, ErrorCode};
use presence::{Members, Presence};
use state::{Ack, Partition};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Semaphore};

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Snowflake worker id of this instance (distinct per logic instance).
    pub worker_id: u16,
    /// Records taken per batch, and how long a batch waits to fill.
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    /// How long `sync` waits for persist to catch up with the conversation's last seq.
    pub sync_wait_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            worker_id: 1,
            batch_max: 1000,
            batch_wait_ms: 2,
            sync_wait_ms: 2_000,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct PipelineStats {
    pub messages_total: AtomicU64,
    pub retries_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub deliveries_total: AtomicU64,
    pub bad_records_total: AtomicU64,
    pub syncs_total: AtomicU64,
}

impl PipelineStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, v) in [
            (
                "im_logic_messages_total",
                "messages sequenced and logged to im.messages",
                &self.messages_total,
            ),
            (
                "im_logic_retries_total",
                "sends recognised as retries (answered with the first ack)",
                &self.retries_total,
            ),
            (
                "im_logic_refused_total",
                "sends refused (not a member, unknown user)",
                &self.refused_total,
            ),
            (
                "im_logic_downstream_records_total",
                "records produced to gateways",
                &self.deliveries_total,
            ),
            (
                "im_logic_bad_records_total",
                "upstream records skipped as unreadable",
                &self.bad_records_total,
            ),
            (
                "im_logic_syncs_total",
                "sync requests answered",
                &self.syncs_total,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

struct Stage {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    members: Arc<Members>,
    cfg: PipelineConfig,
    /// Produces im.messages: waits for the bus as long as it takes (nothing is acked to a
    /// sender before its message is durable, and nothing may be skipped).
    log: Arc<dyn Producer>,
    /// Produces downstream records: a live delivery that cannot go out in 10 s is dropped
    /// (the client's sync recovers it).
    down: Arc<dyn Producer>,
    parts: HashMap<i32, Partition>,
    snowflake: Snowflake,
    stats: Arc<PipelineStats>,
    syncs: Arc<Semaphore>,
    /// Users known to exist (accounts are never deleted), so a 1:1 send costs no query.
    known_users: std::collections::HashSet<u64>,
}

const KNOWN_USERS_MAX: usize = 1 << 20;

/// Runs the stage until `shutdown` turns true. Errors are fatal to the stage (the bus
/// refused a message for good); the caller exits and a restart recovers.
pub async fn run(
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    members: Arc<Members>,
    cfg: PipelineConfig,
    stats: Arc<PipelineStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let n = bus.partitions();
    bus.ensure_topics(&[(topics::UPSTREAM, n), (topics::MESSAGES, n)])
        .await?;
    let mut consumer = bus.group_consumer(groups::LOGIC, topics::UPSTREAM)?;
    let log = bus.producer(1, 0)?;
    let down = bus.producer(1, 10_000)?;
    let mut stage = Stage {
        bus: bus.clone(),
        store,
        presence,
        members,
        snowflake: Snowflake::new(cfg.worker_id),
        cfg,
        log,
        down,
        parts: HashMap::new(),
        stats,
        // sync and read requests being answered at once (each holds a database connection).
        syncs: Arc::new(Semaphore::new(256)),
        known_users: Default::default(),
    };
    log::info!(
        "logic pipeline: consuming {} in group logic on the {}",
        topics::UPSTREAM,
        bus.describe()
    );
    let mut batch: Vec<Record> = Vec::new();
    loop {
        batch.clear();
        tokio::select! {
            _ = shutdown.changed() => {}
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m),
                Err(e) => {
                    log::warn!("logic: consume error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
        if *shutdown.borrow() {
            break;
        }
        // Fill the batch with what is already there, or arrives within the batch wait.
        let wait = tokio::time::sleep(Duration::from_millis(stage.cfg.batch_wait_ms));
        tokio::pin!(wait);
        while !batch.is_empty() && batch.len() < stage.cfg.batch_max {
            tokio::select! {
                _ = &mut wait => break,
                m = consumer.recv() => match m {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                },
            }
        }
        // Assigned or revoked, a partition's state is rebuilt before its next record: another
        // instance may have written to it in between.
        for r in consumer.take_rebalances() {
            let (Rebalance::Assigned(parts) | Rebalance::Revoked(parts)) = r;
            for p in parts {
                stage.parts.remove(&p);
            }
        }
        if batch.is_empty() {
            continue;
        }
        // A shutdown while the broker is down must not wait for it: nothing of this batch is
        // committed, so the next owner replays it (and recognises what was already logged).
        tokio::select! {
            r = stage.process(&batch) => r?,
            _ = shutdown.wait_for(|s| *s) => break,
        }
        // Everything in the batch is in im.messages: its upstream records are done.
        let mut next: HashMap<i32, i64> = HashMap::new();
        for m in &batch {
            let e = next.entry(m.partition).or_insert(0);
            *e = (*e).max(m.offset + 1);
        }
        let offsets: Vec<(i32, i64)> = next.into_iter().collect();
        if let Err(e) = consumer.commit(&offsets, false) {
            // Not fatal: a replay is recognised as retries.
            log::warn!("logic: committing upstream offsets: {e}");
        }
    }
    stage.log.flush(Duration::from_secs(5));
    stage.down.flush(Duration::from_secs(5));
    Ok(())
}

/// A send that passed the checks, waiting for its seq.
struct Pending {
    up: records::Upstream,
    send: records::Send,
    conv: Conv,
    partition: i32,
}

impl Stage {
    async fn process(&mut self, batch: &[Record]) -> Result<(), String> {
        let mut sends: Vec<Pending> = Vec::new();
        for m in batch {
            let p = m.partition;
            if !self.parts.contains_key(&p) {
                let part = recover(&*self.bus, p).await?;
                self.parts.insert(p, part);
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
                Some(UpstreamBody::Send(s)) => match self.check(&up, &s).await {
                    Ok(conv) => sends.push(Pending {
                        up,
                        send: s,
                        conv,
                        partition: p,
                    }),
                    Err((code, msg)) => {
                        self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                        self.reply_error(&up, code, msg, Some(&s.cid));
                    }
                },
                Some(UpstreamBody::Sync(s)) => self.sync(&up, s, p),
                Some(UpstreamBody::Read(r)) => self.read(&up, r, p),
                None => {}
            }
        }
        if sends.is_empty() {
            return Ok(());
        }
        // Retries: from memory, else from the database (older than the memory window).
        let mut unknown: Vec<(u64, String)> = Vec::new();
        for s in &sends {
            if self.parts[&s.partition]
                .ack(s.up.user, &s.send.cid)
                .is_none()
            {
                unknown.push((s.up.user, s.send.cid.clone()));
            }
        }
        let stored: HashMap<(u64, String), MessageRow> = if unknown.is_empty() {
            HashMap::new()
        } else {
            let store = &self.store;
            with_retry("looking up retries", || store.find_by_cids(&unknown))
                .await
                .into_iter()
                .map(|(u, c, row)| ((u, c), row))
                .collect()
        };
        // Last seqs of conversations this instance has not seen since recovery.
        let mut convs: Vec<String> = Vec::new();
        for s in &sends {
            let c = s.conv.to_string();
            if self.parts[&s.partition].last_seq(&c).is_none() && !convs.contains(&c) {
                convs.push(c);
            }
        }
        let db_max: HashMap<String, u64> = if convs.is_empty() {
            HashMap::new()
        } else {
            let store = &self.store;
            with_retry("reading last seqs", || store.max_seqs(&convs))
                .await
                .into_iter()
                .collect()
        };

        let mut acks = Vec::with_capacity(sends.len());
        let mut fresh: Vec<(Pending, Stored)> = Vec::new();
        let mut futures = Vec::new();
        for s in sends {
            let part = self.parts.get_mut(&s.partition).expect("recovered above");
            if let Some(ack) = part.ack(s.up.user, &s.send.cid) {
                acks.push((s.up.clone(), s.send.cid.clone(), ack.clone()));
                self.stats.retries_total.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(row) = stored.get(&(s.up.user, s.send.cid.clone())) {
                let ack = Ack {
                    id: row.id,
                    conv: row.conv.clone(),
                    seq: row.seq,
                    ts: row.ts_ms,
                };
                part.remember(s.up.user, s.send.cid.clone(), ack.clone());
                acks.push((s.up.clone(), s.send.cid.clone(), ack));
                self.stats.retries_total.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let conv = s.conv.to_string();
            let seq = part.next_seq(&conv, db_max.get(&conv).copied());
            let ts = im_shared::unix_ms();
            let id = self.snowflake.next(ts);
            let rec = Stored {
                version: records::VERSION,
                id,
                conv: conv.clone(),
                seq,
                from: s.up.user,
                to_user: s.send.to_user,
                to_group: s.send.to_group,
                content: s.send.content.clone(),
                content_type: s.send.content_type.clone(),
                ts,
                cid: s.send.cid.clone(),
            };
            part.remember(
                s.up.user,
                s.send.cid.clone(),
                Ack {
                    id,
                    conv: conv.clone(),
                    seq,
                    ts,
                },
            );
            futures.push(self.produce_log(&rec, s.partition).await?);
            fresh.push((s, rec));
        }
        // The durability point: every new message of the batch is in im.messages.
        for f in futures {
            match f.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("producing to {}: {e}", topics::MESSAGES)),
                Err(_) => return Err("the producer went away".into()),
            }
        }
        self.stats
            .messages_total
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        for (up, cid, ack) in acks {
            self.reply_sent(&up, &cid, &ack);
        }
        self.route(&fresh).await;
        for (p, rec) in &fresh {
            let ack = Ack {
                id: rec.id,
                conv: rec.conv.clone(),
                seq: rec.seq,
                ts: rec.ts,
            };
            self.reply_sent(&p.up, &rec.cid, &ack);
        }
        Ok(())
    }

    /// Queues a message for `im.messages`, in the partition its request came from; the
    /// receiver hears when it is durable.
    async fn produce_log(
        &self,
        rec: &Stored,
        partition: i32,
    ) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let payload = rec.to_bytes();
        let key = rec.conv.as_str();
        loop {
            match bus::send_with_receipt(
                &*self.log,
                topics::MESSAGES,
                Some(partition),
                key,
                &payload,
            ) {
                Ok(rx) => return Ok(rx),
                // The queue is full: the bus is slow or down; wait for room.
                Err(SendError::QueueFull) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(SendError::Failed(e)) => {
                    return Err(format!("producing to {}: {e}", topics::MESSAGES))
                }
            }
        }
    }

    /// May the sender write to the target? The conversation on success.
    async fn check(
        &mut self,
        up: &records::Upstream,
        s: &records::Send,
    ) -> Result<Conv, (ErrorCode, &'static str)> {
        match (s.to_user, s.to_group) {
            (to, 0) if to != 0 => {
                let conv = Conv::pair(up.user, to)
                    .ok_or((ErrorCode::InvalidField, "cannot send a message to yourself"))?;
                if self.known_users.contains(&to) {
                    return Ok(conv);
                }
                match self.store.user_by_id(to).await {
                    Ok(Some(_)) => {
                        if self.known_users.len() >= KNOWN_USERS_MAX {
                            self.known_users.clear();
                        }
                        self.known_users.insert(to);
                        Ok(conv)
                    }
                    Ok(None) => Err((ErrorCode::NotFound, "no such user")),
                    Err(_) => Err((
                        ErrorCode::DependencyDown,
                        "the database is unavailable: retry with the same cid",
                    )),
                }
            }
            (0, g) if g != 0 => match self.members.of(g).await {
                Ok(m) if m.binary_search(&up.user).is_ok() => Ok(Conv::Group(g)),
                Ok(m) if m.is_empty() => Err((ErrorCode::NotFound, "no such group")),
                Ok(_) => Err((ErrorCode::Forbidden, "not a member of this group")),
                Err(_) => Err((
                    ErrorCode::DependencyDown,
                    "the database is unavailable: retry with the same cid",
                )),
            },
            _ => Err((ErrorCode::InvalidField, "give `to` or `group`")),
        }
    }

    /// Live delivery: one downstream record per gateway holding any recipient.
    async fn route(&self, fresh: &[(Pending, Stored)]) {
        let mut recipients: Vec<Vec<u64>> = Vec::with_capacity(fresh.len());
        let mut all: Vec<u64> = Vec::new();
        for (p, rec) in fresh {
            let users: Vec<u64> = match p.conv {
                Conv::Pair(a, b) => vec![a, b],
                Conv::Group(g) => self
                    .members
                    .of(g)
                    .await
                    .map(|m| m.to_vec())
                    .unwrap_or_default(),
            };
            let _ = rec;
            all.extend_from_slice(&users);
            recipients.push(users);
        }
        all.sort_unstable();
        all.dedup();
        let online = match self.presence.gateways(&all).await {
            Ok(o) => o,
            Err(e) => {
                // Not fatal: the messages are durable; clients get them by sync.
                log::warn!("logic: presence lookup failed, no live delivery for this batch: {e}");
                return;
            }
        };
        for ((p, rec), users) in fresh.iter().zip(recipients) {
            let mut by_gw: HashMap<&str, Vec<u64>> = HashMap::new();
            for u in users {
                for gw in online.get(&u).into_iter().flatten() {
                    by_gw.entry(gw.as_str()).or_default().push(u);
                }
            }
            if by_gw.is_empty() {
                continue;
            }
            let mut json = Vec::with_capacity(rec.content.len() + 200);
            protocol::encode_msg(&message_of(rec, p.conv), &mut json);
            for (gw, users) in by_gw {
                let except_conn = if gw == p.up.reply_to { p.up.conn } else { 0 };
                let d = records::Deliver {
                    users,
                    json: json.clone(),
                    except_conn,
                };
                self.send_down(gw, &rec.conv, DownstreamBody::Deliver(d));
            }
        }
    }

    fn send_down(&self, gateway: &str, key: &str, body: DownstreamBody) {
        let rec = records::Downstream {
            version: records::VERSION,
            body: Some(body),
        };
        let payload = rec.to_bytes();
        let topic = topics::downstream(gateway);
        match self.down.send(&topic, None, key, &payload, None) {
            Ok(()) => {
                self.stats.deliveries_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("logic: dropping a record for {topic}: {e}"),
        }
    }

    fn reply(&self, up: &records::Upstream, json: Vec<u8>) {
        if up.reply_to.is_empty() || up.conn == 0 {
            return;
        }
        let key = up.conn.to_string();
        self.send_down(
            &up.reply_to,
            &key,
            DownstreamBody::Reply(records::Reply {
                conn: up.conn,
                json,
            }),
        );
    }

    fn reply_sent(&self, up: &records::Upstream, cid: &str, ack: &Ack) {
        let Some(conv) = Conv::parse(&ack.conv) else {
            return;
        };
        let mut json = Vec::with_capacity(160);
        protocol::encode_sent(cid, ack.id, conv, ack.seq, ack.ts, &mut json);
        self.reply(up, json);
    }

    fn reply_error(&self, up: &records::Upstream, code: ErrorCode, msg: &str, cid: Option<&str>) {
        let mut json = Vec::with_capacity(160);
        protocol::encode_error(code, msg, cid, &mut json);
        self.reply(up, json);
    }

    /// Answers a `sync` from the database, off the batch loop. The partition's last seq for
    /// the conversation tells how far persist must have written for the answer to be whole.
    fn sync(&self, up: &records::Upstream, s: records::Sync, partition: i32) {
        let Some(conv) = Conv::parse(&s.conv) else {
            return self.reply_error(up, ErrorCode::InvalidField, "bad conv", None);
        };
        let last = self
            .parts
            .get(&partition)
            .and_then(|p| p.last_seq(&s.conv))
            .unwrap_or(0);
        let limit = s.limit.clamp(1, protocol::SYNC_LIMIT_MAX);
        let want = last.min(s.after.saturating_add(limit as u64));
        let (store, members, up, stats) = (
            self.store.clone(),
            self.members.clone(),
            up.clone(),
            self.stats.clone(),
        );
        let Some(permit) = self.db_task(&up) else {
            return;
        };
        let (down, wait_ms) = (self.down.clone(), self.cfg.sync_wait_ms);
        tokio::spawn(async move {
            let _permit = permit;
            let answer = sync_answer(
                &*store, &members, up.user, conv, s.after, limit, want, wait_ms,
            )
            .await;
            let json = match answer {
                Ok(j) => j,
                Err((code, msg)) => {
                    let mut j = Vec::new();
                    protocol::encode_error(code, &msg, None, &mut j);
                    j
                }
            };
            stats.syncs_total.fetch_add(1, Ordering::Relaxed);
            reply_to(&down, &up, json);
        });
    }

    /// A slot for a `sync` or `read` answered off the batch loop; none free (the database is
    /// slow): the client gets a retryable 5030 instead of a task waiting without bound.
    fn db_task(&self, up: &records::Upstream) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.syncs.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.reply_error(
                up,
                ErrorCode::Busy,
                "too many sync and read requests in progress: retry",
                None,
            );
        }
        permit
    }

    fn read(&self, up: &records::Upstream, r: records::Read, partition: i32) {
        let Some(conv) = Conv::parse(&r.conv) else {
            return self.reply_error(up, ErrorCode::InvalidField, "bad conv", None);
        };
        // Messages up to the conversation's last seq are logged, maybe not yet stored.
        let last = self
            .parts
            .get(&partition)
            .and_then(|p| p.last_seq(&r.conv))
            .unwrap_or(0);
        let Some(permit) = self.db_task(up) else {
            return;
        };
        let (store, members, up2) = (self.store.clone(), self.members.clone(), up.clone());
        let (down, wait_ms) = (self.down.clone(), self.cfg.sync_wait_ms);
        tokio::spawn(async move {
            let _permit = permit;
            let wait = Duration::from_millis(wait_ms);
            let result = match allowed(&*store, &members, up2.user, conv).await {
                Ok(()) => async {
                    crate::store::wait_stored(&*store, &r.conv, r.seq.min(last), wait).await?;
                    store
                        .update_membership(up2.user, &r.conv, Some(r.seq), None, None)
                        .await
                }
                .await
                .map_err(|_| {
                    (
                        ErrorCode::DependencyDown,
                        "the database is unavailable".to_string(),
                    )
                }),
                Err(e) => Err(e),
            };
            if let Err((code, msg)) = result {
                let mut json = Vec::new();
                protocol::encode_error(code, &msg, None, &mut json);
                reply_to(&down, &up2, json);
            }
        });
    }
}

/// Sends one client frame to the requesting connection (from tasks off the batch loop; a
/// reply that cannot be queued is dropped: the client's request times out and is retried).
fn reply_to(down: &Arc<dyn Producer>, up: &records::Upstream, json: Vec<u8>) {
    let rec = records::Downstream {
        version: records::VERSION,
        body: Some(DownstreamBody::Reply(records::Reply {
            conn: up.conn,
            json,
        })),
    };
    let payload = rec.to_bytes();
    let topic = topics::downstream(&up.reply_to);
    let key = up.conn.to_string();
    let _ = down.send(&topic, None, &key, &payload, None);
}

/// Retries a database read with capped backoff until it works: nothing of the batch has been
/// produced yet, so waiting loses nothing (the batch's offsets stay uncommitted, lag grows),
/// and a shutdown interrupts the wait (`run`'s select).
async fn with_retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::Result<T>>,
{
    let mut backoff_ms = 50;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                log::warn!("logic: {what}: {e}; retrying in {backoff_ms} ms");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(2_000);
            }
        }
    }
}

async fn allowed(
    store: &dyn Store,
    members: &Members,
    user: u64,
    conv: Conv,
) -> Result<(), (ErrorCode, String)> {
    match conv {
        Conv::Pair(..) if conv.has_party(user) => Ok(()),
        Conv::Pair(..) => Err((ErrorCode::NotFound, "no such conversation".into())),
        Conv::Group(g) => {
            let m = members.of(g).await.map_err(|_| {
                (
                    ErrorCode::DependencyDown,
                    "the database is unavailable".to_string(),
                )
            })?;
            if m.binary_search(&user).is_ok() {
                Ok(())
            } else if m.is_empty() && store.group(g).await.ok().flatten().is_none() {
                Err((ErrorCode::NotFound, "no such group".into()))
            } else {
                Err((ErrorCode::Forbidden, "not a member of this group".into()))
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn sync_answer(
    store: &dyn Store,
    members: &Members,
    user: u64,
    conv: Conv,
    after: u64,
    limit: u32,
    want: u64,
    wait_ms: u64,
) -> Result<Vec<u8>, (ErrorCode, String)> {
    allowed(store, members, user, conv).await?;
    let conv_s = conv.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let rows = store
            .messages_after(&conv_s, after, limit + 1)
            .await
            .map_err(|_| {
                (
                    ErrorCode::DependencyDown,
                    "the database is unavailable".to_string(),
                )
            })?;
        let have = rows
            .iter()
            .take(limit as usize)
            .map(|r| r.seq)
            .max()
            .unwrap_or(after);
        if have >= want || tokio::time::Instant::now() >= deadline {
            let more = rows.len() > limit as usize || have < want;
            let msgs: Vec<Message> = rows
                .iter()
                .take(limit as usize)
                .map(|r| message_of_row(r, conv))
                .collect();
            let mut json = Vec::new();
            protocol::encode_sync(conv, &msgs, more, &mut json);
            return Ok(json);
        }
        // Persist has not written the newest messages yet (it flushes every few tens of ms).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn message_of(rec: &Stored, conv: Conv) -> Message {
    Message {
        id: rec.id,
        conv,
        seq: rec.seq,
        from: rec.from,
        to: if rec.to_group != 0 {
            Target::Group(rec.to_group)
        } else {
            Target::User(rec.to_user)
        },
        content: rec.content.clone(),
        content_type: rec.content_type.clone(),
        ts: rec.ts,
    }
}

fn message_of_row(r: &MessageRow, conv: Conv) -> Message {
    Message {
        id: r.id,
        conv,
        seq: r.seq,
        from: r.sender,
        to: match (r.to_group, r.to_user) {
            (Some(g), _) => Target::Group(g),
            (None, u) => Target::User(u.unwrap_or(0)),
        },
        content: r.content.clone(),
        content_type: r.content_type.clone(),
        ts: r.ts_ms,
    }
}

/// Rebuilds a partition's state: the persist group's committed offset in `im.messages` is
/// where the database ends; the records after it are read back.
async fn recover(bus: &dyn Bus, partition: i32) -> Result<Partition, String> {
    let committed = bus
        // Persist's committed offset in im.messages is where the database ends.
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut next = start;
    while next < high {
        match tokio::time::timeout_at(deadline, reader.recv()).await {
            Err(_) => {
                return Err(format!(
                    "recovering partition {partition}: the tail did not arrive in 120 s"
                ))
            }
            Ok(Ok(m)) => {
                part.replay(&m.payload);
                next = m.offset + 1;
            }
            Ok(Err(e)) => {
                log::warn!("logic: reading the tail of {partition}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
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

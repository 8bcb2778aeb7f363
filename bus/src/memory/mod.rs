//! The bus in one process (standalone): the topics, partitions, offsets and consumer groups
//! of the Kafka bus, held in bounded in-memory logs.
//!
//! - **Bounded.** Each partition holds at most `bytes_max` of records. A record is dropped
//!   from a partition once every reader is past it: every group that consumes the topic has
//!   committed it, and every partition consumer has read it. When a partition with readers
//!   is full, `send` answers `QueueFull` at once, like Kafka's producer queue. A partition
//!   nobody reads keeps its records for a reader to come (like a Kafka topic before its
//!   consumer group starts) until it is full; then it drops its oldest, as retention would,
//!   except on a topic acknowledged after commit, which refuses until its group comes.
//! - **Acknowledged after commit.** In memory a record is not durable, so a topic can name
//!   the group whose commit makes it so: standalone acknowledges an `im.messages` record once
//!   persist has written it to SQLite and committed its offset. Other topics are
//!   acknowledged when appended.
//! - **One member per group.** Standalone runs one logic stage and one persist; a group
//!   consumer owns all partitions of its topic, and a second member is refused.
//!
//! One mutex guards the whole bus; it is never held across an await or while calling back.

use crate::{
    BoxFuture, Bus, Consumer, Done, Producer, Rebalance, Record, SendError, Start, TraceParent,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The default bound of one partition.
pub const PARTITION_BYTES_MAX: usize = 64 << 20;

#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    partitions: i32,
    bytes_max: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    /// topic → the group whose commit acknowledges its records.
    ack_after: HashMap<String, String>,
    next_reader: u64,
}

struct Topic {
    parts: Vec<Part>,
    ack_group: Option<String>,
    groups: HashMap<String, Group>,
    /// Woken on every append.
    appended: Arc<Notify>,
}

/// One record as held: when it was appended (Unix ms, as Kafka's CreateTime), its trace
/// context (boxed: most records have none, and this keeps an entry at 32 bytes), its payload.
struct Entry {
    ts: i64,
    trace: Option<Box<TraceParent>>,
    payload: Arc<[u8]>,
}

#[derive(Default)]
struct Part {
    /// Offset of `records[0]`.
    base: i64,
    records: VecDeque<Entry>,
    bytes: usize,
    /// Acknowledgements waiting for the ack group's commit, in offset order.
    acks: VecDeque<(i64, Done)>,
    /// Partition consumers' positions, by reader id.
    readers: HashMap<u64, i64>,
}

impl Part {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }

    fn drop_oldest(&mut self) {
        if let Some(e) = self.records.pop_front() {
            self.bytes -= e.payload.len();
            self.base += 1;
        }
    }

    fn full_for(&self, len: usize, bytes_max: usize) -> bool {
        !self.records.is_empty() && self.bytes + len > bytes_max
    }

    fn get(&self, offset: i64) -> Option<&Entry> {
        if offset < self.base {
            return None;
        }
        self.records.get((offset - self.base) as usize)
    }
}

struct Group {
    committed: Vec<Option<i64>>,
    member: bool,
    /// Bumped each time a member joins, as a Kafka group's generation is.
    generation: i32,
}

impl Topic {
    /// Drops the records of partition `p` that every reader is past. False when the
    /// partition has no reader at all (then nothing is dropped).
    fn trim(&mut self, p: usize) -> bool {
        let part = &self.parts[p];
        let mut keep_from = part.end();
        let mut read_by_anyone = false;
        for g in self.groups.values() {
            read_by_anyone = true;
            keep_from = keep_from.min(g.committed[p].unwrap_or(part.base));
        }
        for &pos in part.readers.values() {
            read_by_anyone = true;
            keep_from = keep_from.min(pos);
        }
        if !read_by_anyone {
            return false;
        }
        let part = &mut self.parts[p];
        while part.base < keep_from {
            part.drop_oldest();
        }
        true
    }
}

impl MemoryBus {
    /// `partitions` of `im.upstream` and `im.messages`; each partition holds at most
    /// `bytes_max` of records.
    pub fn new(partitions: i32, bytes_max: usize) -> MemoryBus {
        MemoryBus {
            inner: Arc::new(Inner {
                partitions: partitions.max(1),
                bytes_max: bytes_max.max(1),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Records of `topic` are acknowledged once `group` has committed them.
    pub fn ack_after_commit(self, topic: &str, group: &str) -> MemoryBus {
        let mut st = self.inner.lock();
        st.ack_after.insert(topic.to_owned(), group.to_owned());
        if let Some(t) = st.topics.get_mut(topic) {
            t.ack_group = Some(group.to_owned());
        }
        drop(st);
        self
    }

    /// Bytes held in all partitions of `topic` (for tests and metrics).
    pub fn held_bytes(&self, topic: &str) -> usize {
        let st = self.inner.lock();
        st.topics
            .get(topic)
            .map(|t| t.parts.iter().map(|p| p.bytes).sum())
            .unwrap_or(0)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unknown(topic: &str) -> String {
    format!("in-process bus: no topic {topic}")
}

/// FNV-1a: a stable key → partition map (records with one key stay in one partition).
fn partition_of(key: &str, partitions: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % partitions as u64) as usize
}

struct MemoryProducer {
    inner: Arc<Inner>,
    /// Records waiting for their acknowledgement.
    waiting: Arc<AtomicUsize>,
}

impl Producer for MemoryProducer {
    fn send_traced(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        trace: Option<&TraceParent>,
        done: Option<Done>,
    ) -> Result<(), SendError> {
        let mut st = self.inner.lock();
        let t = st
            .topics
            .get_mut(topic)
            .ok_or_else(|| SendError::Failed(unknown(topic)))?;
        let n = t.parts.len();
        let p = match partition {
            Some(p) if (0..n as i32).contains(&p) => p as usize,
            Some(p) => {
                return Err(SendError::Failed(format!(
                    "in-process bus: {topic} has no partition {p}"
                )))
            }
            None => partition_of(key, n),
        };
        let read = t.trim(p);
        let evict = !read && t.ack_group.is_none();
        let part = &mut t.parts[p];
        while part.full_for(payload.len(), self.inner.bytes_max) {
            if !evict {
                return Err(SendError::QueueFull);
            }
            part.drop_oldest();
        }
        let offset = part.end();
        part.records.push_back(Entry {
            ts: im_shared::unix_ms() as i64,
            trace: trace.map(|t| Box::new(*t)),
            payload: payload.into(),
        });
        part.bytes += payload.len();
        let ack_now = match (done, t.ack_group.is_some()) {
            (Some(done), true) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let waiting = self.waiting.clone();
                let done: Done = Box::new(move |r: Result<(), crate::Undelivered<'_>>| {
                    waiting.fetch_sub(1, Ordering::Relaxed);
                    done(r)
                });
                t.parts[p].acks.push_back((offset, done));
                None
            }
            (done, _) => done,
        };
        let appended = t.appended.clone();
        drop(st);
        appended.notify_waiters();
        if let Some(done) = ack_now {
            done(Ok(()));
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A group member (`group: Some`) or a partition consumer (`reader: Some`).
struct MemoryConsumer {
    inner: Arc<Inner>,
    topic: String,
    group: Option<String>,
    reader: Option<u64>,
    /// (partition, next offset to read) for the partitions consumed.
    positions: Vec<(usize, i64)>,
    /// Where the round-robin over partitions resumes.
    turn: usize,
    rebalances: Vec<Rebalance>,
    /// The group's generation when this member joined (0 for a partition consumer).
    generation: i32,
    appended: Arc<Notify>,
}

impl MemoryConsumer {
    /// The next record at any consumed partition, if one is there.
    fn try_next(&mut self) -> Result<Option<Record>, String> {
        let mut st = self.inner.lock();
        let t = st
            .topics
            .get_mut(&self.topic)
            .ok_or_else(|| unknown(&self.topic))?;
        for i in 0..self.positions.len() {
            let k = (self.turn + i) % self.positions.len();
            let (p, pos) = self.positions[k];
            let part = &mut t.parts[p];
            // Skipped past by trimming (a partition consumer that started before the base).
            let pos = pos.max(part.base);
            if let Some(e) = part.get(pos) {
                let rec = Record {
                    partition: p as i32,
                    offset: pos,
                    payload: e.payload.to_vec(),
                    timestamp_ms: Some(e.ts),
                    trace: e.trace.as_deref().copied(),
                };
                self.positions[k].1 = pos + 1;
                if let Some(id) = self.reader {
                    part.readers.insert(id, pos + 1);
                }
                self.turn = k + 1;
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }
}

impl Consumer for MemoryConsumer {
    fn recv(&mut self) -> BoxFuture<'_, Result<Record, String>> {
        Box::pin(async move {
            let appended = self.appended.clone();
            loop {
                // Registered before looking, so an append in between still wakes us.
                let wake = appended.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                if let Some(r) = self.try_next()? {
                    return Ok(r);
                }
                wake.await;
            }
        })
    }

    fn take_rebalances(&mut self) -> Vec<Rebalance> {
        std::mem::take(&mut self.rebalances)
    }

    fn generation(&self) -> i32 {
        self.generation
    }

    fn commit(&mut self, offsets: &[(i32, i64)], _wait: bool) -> Result<(), String> {
        let Some(group) = &self.group else {
            return Err("a partition consumer commits nothing".into());
        };
        let mut acked = Vec::new();
        {
            let mut st = self.inner.lock();
            let t = st
                .topics
                .get_mut(&self.topic)
                .ok_or_else(|| unknown(&self.topic))?;
            for &(p, offset) in offsets {
                let p = usize::try_from(p)
                    .ok()
                    .filter(|&p| p < t.parts.len())
                    .ok_or_else(|| format!("{} has no partition {p}", self.topic))?;
                let end = t.parts[p].end();
                let g = t.groups.get_mut(group).expect("a member's group exists");
                let c = &mut g.committed[p];
                let offset = offset.min(end);
                *c = Some(c.unwrap_or(0).max(offset));
                if t.ack_group.as_deref() == Some(group.as_str()) {
                    let acks = &mut t.parts[p].acks;
                    while acks.front().is_some_and(|(o, _)| *o < offset) {
                        acked.push(acks.pop_front().expect("checked").1);
                    }
                }
                t.trim(p);
            }
        }
        for done in acked {
            done(Ok(()));
        }
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        let Some(t) = st.topics.get_mut(&self.topic) else {
            return;
        };
        if let Some(g) = self.group.as_ref().and_then(|g| t.groups.get_mut(g)) {
            g.member = false;
        }
        if let Some(id) = self.reader {
            for &(p, _) in &self.positions {
                t.parts[p].readers.remove(&id);
            }
        }
    }
}

impl Bus for MemoryBus {
    fn describe(&self) -> String {
        "in-process bus".into()
    }

    fn partitions(&self) -> i32 {
        self.inner.partitions
    }

    fn ensure_topics<'a>(
        &'a self,
        topics: &'a [(&'a str, i32)],
    ) -> BoxFuture<'a, Result<(), String>> {
        let mut st = self.inner.lock();
        for &(name, parts) in topics {
            if st.topics.contains_key(name) {
                continue;
            }
            let ack_group = st.ack_after.get(name).cloned();
            st.topics.insert(
                name.to_owned(),
                Topic {
                    parts: (0..parts.max(1)).map(|_| Part::default()).collect(),
                    ack_group,
                    groups: HashMap::new(),
                    appended: Arc::new(Notify::new()),
                },
            );
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn producer(&self, _linger_ms: u32, _timeout_ms: u32) -> Result<Arc<dyn Producer>, String> {
        Ok(Arc::new(MemoryProducer {
            inner: self.inner.clone(),
            waiting: Arc::new(AtomicUsize::new(0)),
        }))
    }

    fn group_consumer(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String> {
        let mut st = self.inner.lock();
        let t = st.topics.get_mut(topic).ok_or_else(|| unknown(topic))?;
        let n = t.parts.len();
        let g = t.groups.entry(group.to_owned()).or_insert_with(|| Group {
            committed: vec![None; n],
            member: false,
            generation: 0,
        });
        if g.member {
            return Err(format!(
                "in-process bus: group {group} on {topic} already has its one member"
            ));
        }
        g.member = true;
        g.generation += 1;
        let generation = g.generation;
        let committed = g.committed.clone();
        let positions = (0..n)
            .map(|p| (p, committed[p].unwrap_or(0).max(t.parts[p].base)))
            .collect();
        Ok(Box::new(MemoryConsumer {
            inner: self.inner.clone(),
            topic: topic.to_owned(),
            group: Some(group.to_owned()),
            reader: None,
            positions,
            turn: 0,
            rebalances: vec![Rebalance::Assigned {
                partitions: (0..n as i32).collect(),
                generation,
            }],
            generation,
            appended: t.appended.clone(),
        }))
    }

    fn partition_consumer(
        &self,
        topic: &str,
        partitions: &[(i32, Start)],
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, String>> {
        let result = (|| {
            let mut st = self.inner.lock();
            let id = st.next_reader;
            st.next_reader += 1;
            let t = st.topics.get_mut(topic).ok_or_else(|| unknown(topic))?;
            let mut positions = Vec::with_capacity(partitions.len());
            for &(p, start) in partitions {
                let part = usize::try_from(p)
                    .ok()
                    .and_then(|p| t.parts.get_mut(p))
                    .ok_or_else(|| format!("{topic} has no partition {p}"))?;
                let pos = match start {
                    Start::End => part.end(),
                    Start::Offset(o) => o.clamp(part.base, part.end()),
                };
                part.readers.insert(id, pos);
                positions.push((p as usize, pos));
            }
            Ok(Box::new(MemoryConsumer {
                inner: self.inner.clone(),
                topic: topic.to_owned(),
                group: None,
                reader: Some(id),
                positions,
                turn: 0,
                rebalances: Vec::new(),
                generation: 0,
                appended: t.appended.clone(),
            }) as Box<dyn Consumer>)
        })();
        Box::pin(std::future::ready(result))
    }

    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: i32,
    ) -> BoxFuture<'a, Result<Option<i64>, String>> {
        let st = self.inner.lock();
        let c = st
            .topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .and_then(|g| g.committed.get(partition as usize).copied().flatten());
        Box::pin(std::future::ready(Ok(c)))
    }

    fn watermarks<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
    ) -> BoxFuture<'a, Result<(i64, i64), String>> {
        let st = self.inner.lock();
        let w = st
            .topics
            .get(topic)
            .ok_or_else(|| unknown(topic))
            .and_then(|t| {
                t.parts
                    .get(partition as usize)
                    .map(|p| (p.base, p.end()))
                    .ok_or_else(|| format!("{topic} has no partition {partition}"))
            });
        Box::pin(std::future::ready(w))
    }
}

#[cfg(test)]
mod tests;

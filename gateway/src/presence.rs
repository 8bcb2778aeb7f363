//! The gateway's presence writer: a thread of its own, so a slow Redis never stalls a shard
//! or the bridge. It takes the shards' changes from a channel and applies them in batches of
//! up to `BATCH_MAX` (one pipelined round trip on Redis). While the store is down it keeps the
//! batch and retries it with capped backoff; the channel holds at most two changes per
//! connection plus refreshes, so nothing grows without bound.
//!
//! A store that `forgets` (Redis: restarted without its data, failed over to a replica that
//! had not caught up, or down for longer than the entries' TTL) would leave open connections
//! without an entry, and so without live messages, until they reconnect. So the writer keeps a
//! `Registry` of what it wrote, one entry per open connection, and a refresh writes each
//! connection's entry again instead of only extending the key's TTL.
//!
//! Presence events (PROTOCOL.md, "Presence"): the store counts a user's connections over
//! every gateway as it applies each change, so the writer knows when a connection was the
//! user's first or last. For each open and close that came from a shard (not the rewrites
//! of a refresh: a Redis that lost its data must not make a million idle connections look
//! like a million arrivals) it sends one `PresenceEvent` record to `im.upstream`, keyed by
//! the user; logic decides whom to tell. An idle connection sends none.

use im_bus::presence::{Change, Presence, BATCH_MAX};
use im_bus::Producer;
use im_shared::records::{self, topics, UpstreamBody, Versioned};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// How long one write may take before it counts as failed (and is retried).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause after a failed write; it doubles up to the cap.
const RETRY_FIRST_MS: u64 = 10;
const RETRY_MAX_MS: u64 = 2_000;

/// This gateway's open connections as it told presence about them: what it needs to write
/// their entries again. About 80 bytes per connection (a B-tree entry of 56 bytes, nodes
/// part full; a test measures it), plus the device id's text where the token names one; only
/// gateways whose store `forgets` keep it.
#[derive(Default)]
pub(crate) struct Registry {
    /// By (user, conn): a refresh names users, and a user's connections are one range.
    conns: BTreeMap<(u64, u64), Token>,
}

/// What an `Online` carried besides the user and the connection.
struct Token {
    jti: Jti,
    device: Option<Box<str>>,
}

/// A token id: the 32 lowercase hex digits logic mints (`im_shared::jwt`), packed into 16
/// bytes; any other text as it came.
enum Jti {
    Hex([u8; 16]),
    Text(Box<str>),
}

impl Jti {
    fn pack(jti: &str) -> Jti {
        let b = jti.as_bytes();
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        if b.len() == 32 {
            let mut out = [0u8; 16];
            let packed = out.iter_mut().enumerate().all(|(i, o)| {
                match (digit(b[2 * i]), digit(b[2 * i + 1])) {
                    (Some(h), Some(l)) => {
                        *o = h << 4 | l;
                        true
                    }
                    _ => false,
                }
            });
            if packed {
                return Jti::Hex(out);
            }
        }
        Jti::Text(jti.into())
    }

    fn unpack(&self) -> Box<str> {
        match self {
            Jti::Hex(b) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut s = String::with_capacity(32);
                for x in b {
                    s.push(HEX[(x >> 4) as usize] as char);
                    s.push(HEX[(x & 15) as usize] as char);
                }
                s.into_boxed_str()
            }
            Jti::Text(t) => t.clone(),
        }
    }
}

impl Registry {
    /// Takes `change` into `pending`: `Online` and `Offline` as they are (noted here), a
    /// `Refresh` as an `Online` for each of its users' connections.
    pub(crate) fn take(&mut self, change: Change, pending: &mut Vec<Change>) {
        match change {
            Change::Online {
                user,
                conn,
                jti,
                device,
            } => {
                let token = Token {
                    jti: Jti::pack(&jti),
                    device: device.clone(),
                };
                self.conns.insert((user, conn), token);
                pending.push(Change::Online {
                    user,
                    conn,
                    jti,
                    device,
                });
            }
            Change::Offline { user, conn } => {
                self.conns.remove(&(user, conn));
                pending.push(Change::Offline { user, conn });
            }
            Change::Refresh(users) => {
                for user in users {
                    for (&(user, conn), t) in self.conns.range((user, 0)..=(user, u64::MAX)) {
                        pending.push(Change::Online {
                            user,
                            conn,
                            jti: t.jti.unpack(),
                            device: t.device.clone(),
                        });
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }
}

/// Where presence events go: `im.upstream`, for logic; and the counters of what went and
/// what was dropped (`/metrics`).
pub(crate) struct Events {
    pub(crate) producer: Arc<dyn Producer>,
    pub(crate) sent: Arc<AtomicU64>,
    pub(crate) dropped: Arc<AtomicU64>,
}

/// Sends one presence event per change that came from a shard (`announce`), with the
/// user's connection count after it. Best effort, like the frames it leads to: a record the
/// broker refuses, at once or in the end, is dropped and counted (contacts then learn of
/// the change only when they next ask).
fn announce(
    events: &Events,
    gateway_id: &str,
    changes: &[Change],
    from_shard: &[bool],
    counts: &[u32],
) {
    for ((change, &announced), &connections) in changes.iter().zip(from_shard).zip(counts) {
        let (user, conn, online) = match change {
            _ if !announced => continue,
            Change::Online { user, conn, .. } => (*user, *conn, true),
            Change::Offline { user, conn } => (*user, *conn, false),
            Change::Refresh(_) => continue,
        };
        let rec = records::Upstream {
            version: records::VERSION,
            reply_to: gateway_id.to_string(),
            conn,
            user,
            ts: im_shared::unix_ms(),
            body: Some(UpstreamBody::Presence(records::PresenceEvent {
                online,
                connections,
            })),
        };
        let key = user.to_string();
        let dropped = events.dropped.clone();
        let done: im_bus::Done = Box::new(move |r: Result<(), im_bus::Undelivered<'_>>| {
            if r.is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
        match (events.producer).send(topics::UPSTREAM, None, &key, &rec.to_bytes(), Some(done)) {
            Ok(()) => events.sent.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                log::debug!("presence: event for user {user} dropped: {e}");
                events.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Writes presence changes until the channel closes (the bridge stopped), and sends the
/// presence events they make to `events`.
pub(crate) fn run_writer(
    presence: Arc<dyn Presence>,
    gateway_id: &str,
    rx: Receiver<Change>,
    events: Option<Events>,
) {
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
    let mut registry = presence.forgets().then(Registry::default);
    // The changes to write, and for each whether it came from a shard (an open or a close
    // to announce) rather than from a refresh.
    let mut pending: Vec<Change> = Vec::new();
    let mut from_shard: Vec<bool> = Vec::new();
    let mut take = |c: Change, pending: &mut Vec<Change>, from_shard: &mut Vec<bool>| {
        let announced = !matches!(c, Change::Refresh(_));
        match &mut registry {
            Some(r) => r.take(c, pending),
            None => pending.push(c),
        }
        from_shard.resize(pending.len(), announced);
    };
    let mut backoff_ms = RETRY_FIRST_MS;
    let mut closed = false;
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(c) => take(c, &mut pending, &mut from_shard),
                Err(_) => return,
            }
        }
        while pending.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(c) => take(c, &mut pending, &mut from_shard),
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
            Ok(Ok(counts)) => {
                if let Some(events) = &events {
                    announce(events, gateway_id, &pending, &from_shard, &counts);
                }
                pending.clear();
                from_shard.clear();
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

#[cfg(test)]
mod tests {
    use super::*;
    use im_bus::presence::{Connection, MemoryPresence};
    use std::collections::HashMap;
    use std::sync::Mutex;

    fn online(user: u64, conn: u64, jti: &str, device: Option<&str>) -> Change {
        Change::Online {
            user,
            conn,
            jti: jti.into(),
            device: device.map(Into::into),
        }
    }

    #[test]
    fn token_ids_pack_into_16_bytes_and_come_back_as_they_were() {
        let minted = im_shared::jwt::random_hex(16);
        let packed = Jti::pack(&minted);
        assert!(matches!(packed, Jti::Hex(_)));
        assert_eq!(&*packed.unpack(), minted.as_str());
        // Anything else is kept as text: upper case would not come back the same.
        for other in [
            "x",
            "0123456789ABCDEF0123456789abcdef",
            "g123456789abcdef0123456789abcdef",
        ] {
            let j = Jti::pack(other);
            assert!(matches!(j, Jti::Text(_)), "{other}");
            assert_eq!(&*j.unpack(), other);
        }
        assert_eq!(std::mem::size_of::<Jti>(), 24);
        assert_eq!(std::mem::size_of::<Token>(), 40);
    }

    #[test]
    fn a_refresh_writes_the_open_connections_of_its_users_again() {
        let mut r = Registry::default();
        let mut out = Vec::new();
        let jti = im_shared::jwt::random_hex(16);
        r.take(online(7, 1, &jti, Some("phone")), &mut out);
        r.take(online(7, 2, "other", None), &mut out);
        r.take(online(8, 3, &jti, None), &mut out);
        r.take(online(9, 4, &jti, None), &mut out);
        r.take(Change::Offline { user: 7, conn: 1 }, &mut out);
        assert_eq!(out.len(), 5, "online and offline pass through as they are");
        assert_eq!(r.len(), 3);
        out.clear();
        r.take(Change::Refresh(vec![7, 8, 10]), &mut out);
        assert_eq!(
            out,
            [online(7, 2, "other", None), online(8, 3, &jti, None)],
            "user 7's closed connection stays closed, 9 is not asked for, 10 has none"
        );
    }

    /// What the registry costs per open connection, measured with the test binary's allocator
    /// (glibc malloc, which `malloc_bytes` reads; `im` uses mimalloc, whose size classes are
    /// close for these 632-byte B-tree nodes).
    #[test]
    fn the_registry_costs_under_100_bytes_per_connection() {
        let Some((before, _)) = im_shared::metrics::malloc_bytes() else {
            return; // not glibc: nothing to measure with
        };
        let n = 200_000u64;
        let mut r = Registry::default();
        let mut out = Vec::with_capacity(1);
        let jti = im_shared::jwt::random_hex(16);
        for i in 0..n {
            // Users scattered (as ids of whoever connects are), connections in order.
            let user = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
            r.take(online(user, i, &jti, None), &mut out);
            out.clear();
        }
        let (after, _) = im_shared::metrics::malloc_bytes().unwrap();
        let per = after.saturating_sub(before) as f64 / n as f64;
        eprintln!("presence registry: {per:.1} bytes per connection");
        assert!(per < 100.0, "{per:.1} bytes per connection");
        assert_eq!(r.len(), n as usize);
    }

    /// A store that forgets (as Redis restarted without its data does), faked in memory.
    #[derive(Default)]
    struct Forgetful {
        inner: MemoryPresence,
        applied: Mutex<Vec<Change>>,
    }

    #[async_trait::async_trait]
    impl Presence for Forgetful {
        async fn apply(&self, gateway_id: &str, changes: &[Change]) -> Result<Vec<u32>, String> {
            self.applied.lock().unwrap().extend(changes.iter().cloned());
            self.inner.apply(gateway_id, changes).await
        }
        async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String> {
            self.inner.gateways(users).await
        }
        async fn connections(&self, user: u64) -> Result<Vec<Connection>, String> {
            self.inner.connections(user).await
        }
        fn forgets(&self) -> bool {
            true
        }
    }

    #[test]
    fn the_writer_restores_entries_a_store_forgot_at_the_next_refresh() {
        let store = Arc::new(Forgetful::default());
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(online(7, 1, "j1", None)).unwrap();
        tx.send(online(7, 2, "j2", Some("laptop"))).unwrap();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || run_writer(store, "gw", rx, None))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let conns = |store: &Forgetful| {
            let mut c = rt.block_on(store.inner.connections(7)).unwrap();
            c.sort();
            c.into_iter().map(|c| (c.conn, c.jti)).collect::<Vec<_>>()
        };
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while conns(&store).len() < 2 {
            assert!(std::time::Instant::now() < end, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The store loses both entries; the next refresh brings them back.
        rt.block_on(store.inner.apply(
            "gw",
            &[
                Change::Offline { user: 7, conn: 1 },
                Change::Offline { user: 7, conn: 2 },
            ],
        ))
        .unwrap();
        assert!(conns(&store).is_empty());
        tx.send(Change::Refresh(vec![7])).unwrap();
        drop(tx);
        writer.join().unwrap();
        assert_eq!(conns(&store), [(1, "j1".into()), (2, "j2".into())]);
        let applied = store.applied.lock().unwrap();
        assert_eq!(applied.last(), Some(&online(7, 2, "j2", Some("laptop"))));
    }
}

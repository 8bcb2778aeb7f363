//! Presence: which gateways hold a user's connections, in Redis.
//!
//! One hash per user, `im:presence:<user>`, with a field per connection,
//! `<gateway-id>#<conn>`, whose value is `<token id> <device id>` (the device empty when the
//! token named none): logout finds the connections its token opened through it. The
//! key's TTL (three presence refresh periods) is refreshed while the user has a connection,
//! so the entries of a gateway that died without saying goodbye age out. Logic reads the
//! fields to learn which gateways to route to; a stale field costs one wasted downstream
//! record, never a wrong delivery (gateways deliver by user).
//!
//! The gateway side writes from its own thread, in pipelined batches, so a slow Redis never
//! stalls a shard or the Kafka bridge.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// The Redis key of a user's presence hash.
pub fn key(user: u64) -> String {
    format!("im:presence:{user}")
}

/// The hash field of one connection.
pub fn field(gateway_id: &str, conn: u64) -> String {
    format!("{gateway_id}#{conn}")
}

/// The gateway of a field (`None` for one this build did not write).
pub fn gateway_of(field: &str) -> Option<&str> {
    field.rsplit_once('#').map(|(gw, _)| gw)
}

/// The value of a connection's field.
pub fn value(jti: &str, device: Option<&str>) -> String {
    format!("{jti} {}", device.unwrap_or(""))
}

/// The token id in a field's value.
pub fn jti_of(value: &str) -> &str {
    value.split(' ').next().unwrap_or("")
}

/// The connection (the records' `conn`) of a field.
pub fn conn_of(field: &str) -> Option<u64> {
    field.rsplit_once('#').and_then(|(_, c)| c.parse().ok())
}

/// A presence change, from the gateway's shards.
#[derive(Debug)]
pub enum Change {
    Online {
        user: u64,
        conn: u64,
        jti: Box<str>,
        device: Option<Box<str>>,
    },
    Offline {
        user: u64,
        conn: u64,
    },
    Refresh(Vec<u64>),
}

/// Changes per pipelined round trip (a refresh arrives in pieces of this many users).
pub const BATCH_MAX: usize = 2_000;

/// Writes presence changes until the channel closes (the bridge stopped), in pipelined batches.
/// While Redis is down, it keeps the batch and retries with capped backoff (the channel holds
/// at most two changes per connection plus refreshes).
pub fn run_writer(redis_url: &str, gateway_id: &str, ttl_s: u64, rx: Receiver<Change>) {
    let client = match redis::Client::open(redis_url) {
        Ok(c) => c,
        Err(e) => {
            log::error!("presence: bad Redis URL {redis_url}: {e}; presence is off");
            // Drain so senders never block on a dead writer.
            for _ in rx {}
            return;
        }
    };
    let mut conn: Option<redis::Connection> = None;
    let mut pending: Vec<Change> = Vec::new();
    let mut backoff_ms = 10u64;
    let mut closed = false;
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(c) => pending.push(c),
                Err(_) => return,
            }
        }
        while pending.len() < BATCH_MAX {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(c) => pending.push(c),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut pipe = redis::pipe();
        for c in &pending {
            match c {
                Change::Online {
                    user,
                    conn,
                    jti,
                    device,
                } => {
                    let k = key(*user);
                    pipe.hset(&k, field(gateway_id, *conn), value(jti, device.as_deref()))
                        .ignore()
                        .expire(&k, ttl_s as i64)
                        .ignore();
                }
                Change::Offline { user, conn } => {
                    pipe.hdel(key(*user), field(gateway_id, *conn)).ignore();
                }
                Change::Refresh(users) => {
                    for u in users {
                        pipe.expire(key(*u), ttl_s as i64).ignore();
                    }
                }
            }
        }
        let result = match conn.as_mut() {
            Some(c) => pipe.query::<()>(c).map_err(|e| e.to_string()),
            None => match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => {
                    let c = conn.insert(c);
                    pipe.query::<()>(c).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            },
        };
        match result {
            Ok(()) => {
                pending.clear();
                backoff_ms = 10;
            }
            Err(e) => {
                log::warn!("presence: Redis write failed ({e}); retrying in {backoff_ms} ms");
                conn = None;
                std::thread::sleep(Duration::from_millis(backoff_ms));
                backoff_ms = (backoff_ms * 2).min(2_000);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_their_gateway() {
        let f = field("host-8090#x", 42);
        assert_eq!(f, "host-8090#x#42");
        assert_eq!(gateway_of(&f), Some("host-8090#x"));
        assert_eq!(gateway_of("nohash"), None);
        assert_eq!(conn_of(&f), Some(42));
        assert_eq!(jti_of(&value("abc", Some("phone"))), "abc");
        assert_eq!(jti_of(&value("abc", None)), "abc");
        assert_eq!(key(7), "im:presence:7");
    }
}

/// Presence in the process's own memory (standalone: the gateway's bridge writes it, logic
/// reads it in the same process). Entries live as long as their connection; there is no
/// other gateway whose entries could go stale.
#[derive(Default)]
pub struct MemoryPresence {
    users: std::sync::Mutex<std::collections::HashMap<u64, Vec<MemoryEntry>>>,
}

struct MemoryEntry {
    gateway: std::sync::Arc<str>,
    conn: u64,
    jti: Box<str>,
}

impl MemoryPresence {
    fn users(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Vec<MemoryEntry>>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one change from gateway `gateway_id`'s shards.
    pub fn apply(&self, gateway_id: &str, change: Change) {
        let mut users = self.users();
        match change {
            Change::Online {
                user, conn, jti, ..
            } => {
                let entries = users.entry(user).or_default();
                entries.retain(|e| !(e.conn == conn && &*e.gateway == gateway_id));
                entries.push(MemoryEntry {
                    gateway: gateway_id.into(),
                    conn,
                    jti,
                });
            }
            Change::Offline { user, conn } => {
                if let Some(entries) = users.get_mut(&user) {
                    entries.retain(|e| !(e.conn == conn && &*e.gateway == gateway_id));
                    if entries.is_empty() {
                        users.remove(&user);
                    }
                }
            }
            // Nothing expires in memory.
            Change::Refresh(_) => {}
        }
    }

    /// For each user with a connection, the gateways holding one (sorted, distinct).
    pub fn gateways(&self, users: &[u64]) -> std::collections::HashMap<u64, Vec<String>> {
        let table = self.users();
        let mut out = std::collections::HashMap::new();
        for u in users {
            if let Some(entries) = table.get(u) {
                let mut gws: Vec<String> = entries.iter().map(|e| e.gateway.to_string()).collect();
                gws.sort_unstable();
                gws.dedup();
                out.insert(*u, gws);
            }
        }
        out
    }

    /// The user's connections: (gateway, conn, token id).
    pub fn connections(&self, user: u64) -> Vec<(String, u64, String)> {
        self.users()
            .get(&user)
            .map(|es| {
                es.iter()
                    .map(|e| (e.gateway.to_string(), e.conn, e.jti.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn memory_presence_follows_connections() {
        let p = MemoryPresence::default();
        let online = |user, conn, jti: &str| Change::Online {
            user,
            conn,
            jti: jti.into(),
            device: None,
        };
        p.apply("gw-a", online(1, 10, "t1"));
        p.apply("gw-a", online(1, 11, "t2"));
        p.apply("gw-b", online(1, 10, "t3"));
        p.apply("gw-a", online(2, 12, "t4"));
        p.apply("gw-a", Change::Refresh(vec![1, 2]));
        let g = p.gateways(&[1, 2, 3]);
        assert_eq!(g[&1], vec!["gw-a", "gw-b"]);
        assert_eq!(g[&2], vec!["gw-a"]);
        assert!(!g.contains_key(&3));
        let mut c = p.connections(1);
        c.sort();
        assert_eq!(
            c,
            vec![
                ("gw-a".into(), 10, "t1".into()),
                ("gw-a".into(), 11, "t2".into()),
                ("gw-b".into(), 10, "t3".into())
            ]
        );
        p.apply("gw-a", Change::Offline { user: 2, conn: 12 });
        p.apply("gw-b", Change::Offline { user: 1, conn: 10 });
        assert!(p.gateways(&[2]).is_empty());
        assert_eq!(p.gateways(&[1])[&1], vec!["gw-a"]);
        assert_eq!(p.connections(1).len(), 2);
    }
}

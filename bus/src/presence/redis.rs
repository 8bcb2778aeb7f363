//! Presence in Redis, in the format of `im_shared::presence`: the gateways write it in
//! pipelined batches (one round trip per `apply`), logic reads it in pipelined batches (one
//! round trip per 2,000 users).
//!
//! The connection is made on first use and re-made by redis-rs's `ConnectionManager` after a
//! failure, so a gateway starts while Redis is down and catches up once it is back.

use super::{Change, Connection, Presence, BATCH_MAX};
use async_trait::async_trait;
use im_shared::presence;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long making the connection may take before the call fails (and is retried later).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a read may take. A Redis that is down must not hold up logic's stage: while the
/// connection manager reconnects, a request waits for it (with its backoff, tens of
/// seconds), and the stage would miss its consumer poll deadline and lose its partitions.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// `f`, or an error once `READ_TIMEOUT` has passed.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(READ_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("presence: no answer in {READ_TIMEOUT:?}")))
}

pub struct RedisPresence {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    /// Entries expire this long after their last refresh (gateways refresh every third).
    ttl_s: u64,
}

impl RedisPresence {
    /// Checks the URL; connects on first use.
    pub fn open(url: &str, ttl_s: u64) -> Result<RedisPresence, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url}: {e}"))?;
        Ok(RedisPresence {
            client,
            conn: Mutex::new(None),
            ttl_s: ttl_s.max(1),
        })
    }

    /// `open`, then connects now: for services that should not start without Redis.
    pub async fn connect(url: &str, ttl_s: u64) -> Result<RedisPresence, String> {
        let p = RedisPresence::open(url, ttl_s)?;
        crate::redis_ping(&p.client).await?;
        p.conn().await.map_err(|e| format!("redis {url}: {e}"))?;
        Ok(p)
    }

    async fn conn(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(CONNECT_TIMEOUT, ConnectionManager::new(self.client.clone()))
            .await
            .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(slot.insert(c).clone())
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn apply(&self, gateway_id: &str, changes: &[Change]) -> Result<Vec<u32>, String> {
        let ttl = self.ttl_s as i64;
        // One transaction: each change's count is taken right after it, with no other
        // gateway's change of the same user in between.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for c in changes {
            match c {
                Change::Online {
                    user,
                    conn,
                    jti,
                    device,
                } => {
                    let k = presence::key(*user);
                    let v = presence::value(jti, device.as_deref());
                    pipe.hset(&k, presence::field(gateway_id, *conn), v)
                        .ignore()
                        .expire(&k, ttl)
                        .ignore()
                        .hlen(&k);
                }
                Change::Offline { user, conn } => {
                    let k = presence::key(*user);
                    pipe.hdel(&k, presence::field(gateway_id, *conn))
                        .ignore()
                        .hlen(&k);
                }
                Change::Refresh(users) => {
                    for u in users {
                        pipe.expire(presence::key(*u), ttl).ignore();
                    }
                }
            }
        }
        let mut conn = self.conn().await?;
        let counts: Vec<u32> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("presence: {e}"))?;
        let mut counts = counts.into_iter();
        Ok(changes
            .iter()
            .map(|c| match c {
                Change::Refresh(_) => 0,
                _ => counts.next().unwrap_or(0),
            })
            .collect())
    }

    async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String> {
        bounded(self.read_gateways(users)).await
    }

    async fn connections(&self, user: u64) -> Result<Vec<Connection>, String> {
        bounded(self.read_connections(user)).await
    }

    fn forgets(&self) -> bool {
        true
    }
}

impl RedisPresence {
    async fn read_gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String> {
        let mut out = HashMap::with_capacity(users.len());
        if users.is_empty() {
            return Ok(out);
        }
        let mut conn = self.conn().await?;
        for chunk in users.chunks(BATCH_MAX) {
            let mut pipe = redis::pipe();
            for u in chunk {
                pipe.hkeys(presence::key(*u));
            }
            let fields: Vec<Vec<String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("presence: {e}"))?;
            for (u, fs) in chunk.iter().zip(fields) {
                let mut gws: Vec<String> = fs
                    .iter()
                    .filter_map(|f| presence::gateway_of(f))
                    .map(str::to_owned)
                    .collect();
                gws.sort_unstable();
                gws.dedup();
                if !gws.is_empty() {
                    out.insert(*u, gws);
                }
            }
        }
        Ok(out)
    }

    async fn read_connections(&self, user: u64) -> Result<Vec<Connection>, String> {
        let mut conn = self.conn().await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(presence::key(user))
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("presence: {e}"))?;
        Ok(all
            .iter()
            .filter_map(|(f, v)| {
                Some(Connection {
                    gateway: presence::gateway_of(f)?.to_owned(),
                    conn: presence::conn_of(f)?,
                    jti: presence::jti_of(v).to_owned(),
                    device: presence::device_of(v).to_owned(),
                })
            })
            .collect())
    }
}

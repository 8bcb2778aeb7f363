//! Presence lookups (which gateways hold a user's connections) and group membership, as the
//! pipeline's router needs them: batched, one round trip per batch of messages.

use crate::store::Store;
use async_trait::async_trait;
use im_pipeline::presence;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// For each user, the gateways holding at least one of their connections.
    async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String>;

    /// The user's connections: (gateway, conn, token id).
    async fn connections(&self, user: u64) -> Result<Vec<(String, u64, String)>, String>;
}

/// Presence in Redis, written by the gateways' bridges (`im_pipeline::presence`).
pub struct RedisPresence {
    conn: redis::aio::ConnectionManager,
}

impl RedisPresence {
    pub async fn connect(url: &str) -> Result<RedisPresence, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url}: {e}"))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| format!("redis {url}: {e}"))?;
        Ok(RedisPresence { conn })
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String> {
        let mut out = HashMap::with_capacity(users.len());
        for chunk in users.chunks(2_000) {
            let mut pipe = redis::pipe();
            for u in chunk {
                pipe.hkeys(presence::key(*u));
            }
            let mut conn = self.conn.clone();
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

    async fn connections(&self, user: u64) -> Result<Vec<(String, u64, String)>, String> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(presence::key(user))
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("presence: {e}"))?;
        Ok(all
            .iter()
            .filter_map(|(f, v)| {
                let gw = presence::gateway_of(f)?;
                let c = presence::conn_of(f)?;
                Some((gw.to_owned(), c, presence::jti_of(v).to_owned()))
            })
            .collect())
    }
}

/// Presence in the process's memory (standalone: the gateway's bridge writes it).
#[async_trait]
impl Presence for presence::MemoryPresence {
    async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String> {
        Ok(presence::MemoryPresence::gateways(self, users))
    }

    async fn connections(&self, user: u64) -> Result<Vec<(String, u64, String)>, String> {
        Ok(presence::MemoryPresence::connections(self, user))
    }
}

/// Group member lists, cached. An entry is trusted for `TTL`; a membership change made
/// through this instance's REST API drops it at once (`invalidate`). Other instances see a
/// change within `TTL`: a member who just left may get up to a second of messages, and one who
/// just joined sees messages from that second through sync.
pub struct Members {
    store: Arc<dyn Store>,
    cache: std::sync::Mutex<HashMap<u64, Cached>>,
}

/// When a member list was read, and the list.
type Cached = (Instant, Arc<Vec<u64>>);

const TTL: Duration = Duration::from_secs(1);
const CACHED_GROUPS_MAX: usize = 100_000;

impl Members {
    pub fn new(store: Arc<dyn Store>) -> Members {
        Members {
            store,
            cache: Default::default(),
        }
    }

    /// Sorted member ids (empty: no such group, or no members).
    pub async fn of(&self, group: u64) -> Result<Arc<Vec<u64>>, String> {
        if let Some((at, m)) = self.cache.lock().expect("not poisoned").get(&group) {
            if at.elapsed() < TTL {
                return Ok(m.clone());
            }
        }
        let mut ids = self
            .store
            .member_ids(group)
            .await
            .map_err(|e| e.to_string())?;
        ids.sort_unstable();
        let ids = Arc::new(ids);
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.len() >= CACHED_GROUPS_MAX {
            cache.clear();
        }
        cache.insert(group, (Instant::now(), ids.clone()));
        Ok(ids)
    }

    pub fn invalidate(&self, group: u64) {
        self.cache.lock().expect("not poisoned").remove(&group);
    }
}

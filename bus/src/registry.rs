//! The gateway registry (docs/PROTOCOL.md, "Gateways and draining"): where clients should
//! connect. Each gateway process announces its public WebSocket URL and its load with a TTL it
//! refreshes; logic picks the least-loaded live gateway for login's `ws_url` and for
//! `GET /api/v1/gateways/pick`. A draining gateway announces that it drains, so nobody is sent
//! to it while it moves its clients away; one that dies drops out when its TTL ends.
//!
//! The processes of one `im gateway --processes N` share one URL (the kernel spreads their
//! accepts), so a URL is a hash with one field per process, and its load is their sum:
//!
//! ```text
//! im:gw:urls              set of URLs
//! im:gw:url:<ws_url>      hash: <process id> → "<connections> <shards> <ms> <draining 0|1>"
//!                         expiring TTL_S after the last announcement of any of its processes
//! ```
//!
//! Times are Redis's (`TIME`, in the scripts), so the hosts' clocks need not agree. A process
//! whose entry is older than `TTL_S` (it died while its siblings live on) no longer counts,
//! and the next announcement to its URL deletes it. A URL whose hash has expired leaves the
//! set in the reader's script, atomically with finding it empty.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;

/// How long an announcement holds; gateways announce every `ANNOUNCE_EVERY_S`.
pub const TTL_S: u64 = 15;
pub const ANNOUNCE_EVERY_S: u64 = 5;
/// URLs read per pick, at most (a deployment has tens of gateways).
pub const URLS_MAX: usize = 1_000;

/// What one gateway process says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub ws_url: String,
    /// Unique among the processes of the URL (the gateway id).
    pub process: String,
    pub connections: u64,
    pub shards: u32,
    /// It is moving its clients away: send nobody new.
    pub draining: bool,
}

/// A URL clients may be sent to: its live processes that do not drain, summed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub ws_url: String,
    pub connections: u64,
    pub shards: u32,
    pub processes: u32,
}

#[async_trait]
pub trait Registry: Send + Sync {
    async fn announce(&self, a: &Announcement) -> Result<(), String>;
    /// The gateways that take clients now, by URL.
    async fn live(&self) -> Result<Vec<Gateway>, String>;
}

/// One process's field value.
fn encode(a: &Announcement, now_ms: u64) -> String {
    format!(
        "{} {} {now_ms} {}",
        a.connections,
        a.shards,
        u8::from(a.draining)
    )
}

/// The processes' fields of one URL, summed over those live (younger than `TTL_S`) and not
/// draining; `None` when none is.
fn summed(ws_url: &str, fields: &HashMap<String, String>, now_ms: u64) -> Option<Gateway> {
    let mut g = Gateway {
        ws_url: ws_url.to_string(),
        connections: 0,
        shards: 0,
        processes: 0,
    };
    for v in fields.values() {
        let parts: Vec<u64> = v.split(' ').filter_map(|p| p.parse().ok()).collect();
        let [connections, shards, at_ms, draining] = parts[..] else {
            continue;
        };
        if draining != 0 || now_ms.saturating_sub(at_ms) > TTL_S * 1000 {
            continue;
        }
        g.connections += connections;
        g.shards += shards as u32;
        g.processes += 1;
    }
    (g.processes > 0).then_some(g)
}

/// The gateway to send the next client to: the fewest connections per shard, counting the
/// clients this reader has sent each way since its last read (`sent`), so that a burst of
/// logins between two announcements spreads instead of piling on one gateway. Ties go to
/// the first URL in order.
pub fn least_loaded<'a>(live: &'a [Gateway], sent: &HashMap<String, u64>) -> Option<&'a Gateway> {
    live.iter().min_by(|a, b| {
        let load = |g: &Gateway| {
            let n = g.connections + sent.get(&g.ws_url).copied().unwrap_or(0);
            // n / shards, compared without division: a·sb vs b·sa.
            (u128::from(n), u128::from(g.shards.max(1)))
        };
        let ((na, sa), (nb, sb)) = (load(a), load(b));
        (na * sb)
            .cmp(&(nb * sa))
            .then_with(|| a.ws_url.cmp(&b.ws_url))
    })
}

/// In one process, for tests of what reads the registry.
#[derive(Default)]
pub struct MemoryRegistry {
    urls: Mutex<HashMap<String, HashMap<String, String>>>,
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn announce(&self, a: &Announcement) -> Result<(), String> {
        let mut urls = self.urls.lock().expect("not poisoned");
        urls.entry(a.ws_url.clone())
            .or_default()
            .insert(a.process.clone(), encode(a, im_shared::unix_ms()));
        Ok(())
    }

    async fn live(&self) -> Result<Vec<Gateway>, String> {
        let now = im_shared::unix_ms();
        let urls = self.urls.lock().expect("not poisoned");
        let mut out: Vec<Gateway> = urls
            .iter()
            .filter_map(|(url, fields)| summed(url, fields, now))
            .collect();
        out.sort_by(|a, b| a.ws_url.cmp(&b.ws_url));
        Ok(out)
    }
}

#[cfg(feature = "redis")]
pub use self::redis_registry::RedisRegistry;

#[cfg(feature = "redis")]
mod redis_registry {
    use super::*;
    use redis::aio::ConnectionManager;
    use std::time::Duration;
    use tokio::sync::Mutex as AsyncMutex;

    const URLS: &str = "im:gw:urls";
    /// One call, at most: a registry that does not answer must not hold up a login (logic
    /// falls back to what it read last, or its configured URL) or a gateway's main loop.
    const CALL_TIMEOUT: Duration = Duration::from_secs(2);

    fn key(ws_url: &str) -> String {
        format!("im:gw:url:{ws_url}")
    }

    pub struct RedisRegistry {
        client: redis::Client,
        conn: AsyncMutex<Option<ConnectionManager>>,
    }

    impl RedisRegistry {
        /// Checks the URL; connects on first use.
        pub fn open(url: &str) -> Result<RedisRegistry, String> {
            let client = redis::Client::open(url).map_err(|e| format!("redis url {url}: {e}"))?;
            Ok(RedisRegistry {
                client,
                conn: AsyncMutex::new(None),
            })
        }

        async fn conn(&self) -> Result<ConnectionManager, String> {
            let mut slot = self.conn.lock().await;
            if let Some(c) = &*slot {
                return Ok(c.clone());
            }
            let c = ConnectionManager::new(self.client.clone())
                .await
                .map_err(|e| e.to_string())?;
            Ok(slot.insert(c).clone())
        }

        async fn bounded<T>(
            &self,
            f: impl std::future::Future<Output = Result<T, String>>,
        ) -> Result<T, String> {
            tokio::time::timeout(CALL_TIMEOUT, f)
                .await
                .unwrap_or_else(|_| Err(format!("registry: no answer in {CALL_TIMEOUT:?}")))
        }
    }

    /// One announcement, stamped with Redis's clock (so hosts' clocks need not agree): the
    /// URL into the set, this process's field written, the hash's TTL renewed, and fields of
    /// processes silent for a TTL (dead) deleted.
    const ANNOUNCE: &str = r"
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local ttl_ms = tonumber(ARGV[4]) * 1000
        redis.call('SADD', KEYS[1], ARGV[5])
        redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. now .. ' ' .. ARGV[3])
        redis.call('EXPIRE', KEYS[2], ARGV[4])
        local all = redis.call('HGETALL', KEYS[2])
        for i = 1, #all, 2 do
            local at = tonumber(string.match(all[i + 1], '^%d+ %d+ (%d+)'))
            if at == nil or now - at > ttl_ms then redis.call('HDEL', KEYS[2], all[i]) end
        end
        return now";

    /// Every URL's fields and Redis's clock; URLs whose hash has expired leave the set, in the
    /// same script, so a gateway announcing meanwhile is not removed after it announced.
    const LIVE: &str = r"
        local t = redis.call('TIME')
        local out = { tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) }
        local urls = redis.call('SRANDMEMBER', KEYS[1], ARGV[1])
        table.sort(urls)
        for _, u in ipairs(urls) do
            local fields = redis.call('HGETALL', ARGV[2] .. u)
            if #fields == 0 then
                redis.call('SREM', KEYS[1], u)
            else
                table.insert(out, u)
                table.insert(out, fields)
            end
        end
        return out";

    #[async_trait]
    impl Registry for RedisRegistry {
        async fn announce(&self, a: &Announcement) -> Result<(), String> {
            self.bounded(async {
                let mut c = self.conn().await?;
                // EVAL as `lease` does (the script is small; no script cache to manage).
                redis::cmd("EVAL")
                    .arg(ANNOUNCE)
                    .arg(2)
                    .arg(URLS)
                    .arg(key(&a.ws_url))
                    .arg(&a.process)
                    .arg(format!("{} {}", a.connections, a.shards))
                    .arg(u8::from(a.draining))
                    .arg(TTL_S)
                    .arg(&a.ws_url)
                    .query_async::<i64>(&mut c)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
        }

        async fn live(&self) -> Result<Vec<Gateway>, String> {
            self.bounded(async {
                let mut c = self.conn().await?;
                let v: redis::Value = redis::cmd("EVAL")
                    .arg(LIVE)
                    .arg(1)
                    .arg(URLS)
                    .arg(URLS_MAX)
                    .arg("im:gw:url:")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                let redis::Value::Array(items) = v else {
                    return Err("registry: an answer that is not a list".into());
                };
                let mut items = items.into_iter();
                let now: u64 = match items.next() {
                    Some(v) => redis::from_redis_value(&v).map_err(|e| e.to_string())?,
                    None => return Err("registry: no time".into()),
                };
                let mut out = Vec::new();
                while let (Some(u), Some(f)) = (items.next(), items.next()) {
                    let url: String = redis::from_redis_value(&u).map_err(|e| e.to_string())?;
                    let flat: Vec<String> =
                        redis::from_redis_value(&f).map_err(|e| e.to_string())?;
                    let fields: HashMap<String, String> = flat
                        .chunks(2)
                        .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
                        .collect();
                    if let Some(g) = summed(&url, &fields, now) {
                        out.push(g);
                    }
                }
                Ok(out)
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(url: &str, process: &str, connections: u64, shards: u32) -> Announcement {
        Announcement {
            ws_url: url.into(),
            process: process.into(),
            connections,
            shards,
            draining: false,
        }
    }

    #[test]
    fn processes_of_a_url_are_summed_and_stale_or_draining_ones_left_out() {
        let now = 1_000_000_000;
        let mut fields = HashMap::new();
        fields.insert("p0".into(), encode(&ann("u", "p0", 10, 2), now));
        fields.insert("p1".into(), encode(&ann("u", "p1", 5, 2), now - 1_000));
        let dead = now - (TTL_S + 1) * 1000;
        fields.insert("p2".into(), encode(&ann("u", "p2", 99, 2), dead));
        let mut draining = ann("u", "p3", 7, 2);
        draining.draining = true;
        fields.insert("p3".into(), encode(&draining, now));
        fields.insert("junk".into(), "not numbers".into());
        let g = summed("u", &fields, now).unwrap();
        assert_eq!((g.connections, g.shards, g.processes), (15, 4, 2));
        fields.retain(|k, _| k == "p2" || k == "p3");
        assert_eq!(summed("u", &fields, now), None, "all dead or draining");
    }

    #[test]
    fn the_least_loaded_per_shard_wins_counting_what_was_sent_since() {
        let g = |url: &str, connections, shards| Gateway {
            ws_url: url.into(),
            connections,
            shards,
            processes: 1,
        };
        let live = [
            g("ws://a/ws", 100, 4),
            g("ws://b/ws", 60, 2),
            g("ws://c/ws", 0, 0),
        ];
        let mut sent = HashMap::new();
        // c has no shards yet: counted as one, 0 connections.
        assert_eq!(least_loaded(&live, &sent).unwrap().ws_url, "ws://c/ws");
        sent.insert("ws://c/ws".to_string(), 1_000);
        // a: 25 per shard, b: 30.
        assert_eq!(least_loaded(&live, &sent).unwrap().ws_url, "ws://a/ws");
        sent.insert("ws://a/ws".to_string(), 30);
        assert_eq!(least_loaded(&live, &sent).unwrap().ws_url, "ws://b/ws");
        assert!(least_loaded(&[], &sent).is_none());
    }

    #[tokio::test]
    async fn the_memory_registry_answers_the_live_ones() {
        let r = MemoryRegistry::default();
        r.announce(&ann("ws://a/ws", "a0", 3, 1)).await.unwrap();
        r.announce(&ann("ws://a/ws", "a1", 4, 1)).await.unwrap();
        r.announce(&ann("ws://b/ws", "b0", 1, 1)).await.unwrap();
        let live = r.live().await.unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!((live[0].connections, live[0].processes), (7, 2));
        let mut d = ann("ws://b/ws", "b0", 1, 1);
        d.draining = true;
        r.announce(&d).await.unwrap();
        let live = r.live().await.unwrap();
        assert_eq!(live.len(), 1, "a draining gateway takes nobody");
    }
}

//! Revocations in Redis: `RedisRevocations` for logic's logout, and the follower thread that
//! keeps a gateway's `RevokedSet` in step with it.

use super::{Revocations, RevokedSet, CHANNEL, KEY_PREFIX};
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `<prefix><jti>` with a TTL that ends when the token would have, published on `CHANNEL`.
pub struct RedisRevocations {
    conn: redis::aio::ConnectionManager,
}

impl RedisRevocations {
    /// Connects (and reconnects on its own later) to `redis://host:port/db`.
    pub async fn connect(url: &str) -> Result<RedisRevocations, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        crate::redis_ping(&client).await?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| e.to_string())?;
        Ok(RedisRevocations { conn })
    }
}

#[async_trait]
impl Revocations for RedisRevocations {
    async fn revoke(&self, jti: &str, exp_s: u64) -> Result<(), String> {
        let ttl = exp_s.saturating_sub(im_shared::unix_ms() / 1000).max(1);
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{KEY_PREFIX}{jti}"))
            .arg(exp_s)
            .arg("EX")
            .arg(ttl)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(format!("{jti} {exp_s}"))
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    async fn is_revoked(&self, jti: &str, _now_s: u64) -> Result<bool, String> {
        // The key's TTL is the expiry rule here: it is gone once the token would be.
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("{KEY_PREFIX}{jti}"))
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(n > 0)
    }
}

/// How often the follower checks that Redis still answers, and how long it waits.
const LIVENESS_EVERY: Duration = Duration::from_secs(2);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest pause between reconnects of the follower.
const FOLLOW_BACKOFF_MAX_MS: u64 = 5_000;

/// Starts the thread that fills `set` from Redis: the keys at start, then the channel,
/// reloading after every reconnect. It stops when `stop` is set (checked every second).
pub fn follow(redis_url: &str, set: Arc<RevokedSet>, stop: Arc<AtomicBool>) -> Result<(), String> {
    let client = redis::Client::open(redis_url).map_err(|e| format!("redis url: {e}"))?;
    std::thread::Builder::new()
        .name("im-revoked".into())
        .spawn(move || {
            let mut backoff_ms = 100;
            // Until the keys are loaded, the set may be missing revocations.
            set.set_stale(true);
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = follow_once(&client, &set, &stop) {
                    set.set_stale(true);
                    log::warn!(
                        "revocations: {e}; refusing upgrades until Redis is back; reconnecting in {backoff_ms} ms"
                    );
                    std::thread::sleep(Duration::from_millis(backoff_ms));
                    backoff_ms = (backoff_ms * 2).min(FOLLOW_BACKOFF_MAX_MS);
                } else {
                    backoff_ms = 100;
                }
            }
        })
        .map_err(|e| format!("spawning the revocation follower: {e}"))?;
    Ok(())
}

fn follow_once(
    client: &redis::Client,
    set: &RevokedSet,
    stop: &AtomicBool,
) -> redis::RedisResult<()> {
    let mut sub = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut pubsub = sub.as_pubsub();
    // Subscribe first, then load: a logout between the two is seen at least once.
    pubsub.subscribe(CHANNEL)?;
    pubsub.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    conn.set_read_timeout(Some(LIVENESS_TIMEOUT))?;
    let keys: Vec<String> = {
        use redis::Commands as _;
        // SCAN, not KEYS: never blocks Redis, whatever the key count.
        conn.scan_match::<_, String>(format!("{KEY_PREFIX}*"))?
            .collect()
    };
    for chunk in keys.chunks(1000) {
        let exps: Vec<Option<u64>> = redis::cmd("MGET").arg(chunk).query(&mut conn)?;
        for (k, exp) in chunk.iter().zip(exps) {
            if let Some(exp) = exp {
                set.insert(k[KEY_PREFIX.len()..].to_owned(), exp);
            }
        }
    }
    set.set_stale(false);
    let mut pinged = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        // A subscription on a Redis that stopped answering (paused, cut off) only times out:
        // a PING now and then tells that from a quiet channel.
        if pinged.elapsed() >= LIVENESS_EVERY {
            redis::cmd("PING").query::<String>(&mut conn)?;
            pinged = std::time::Instant::now();
        }
        match pubsub.get_message() {
            Ok(m) => {
                let payload: String = m.get_payload()?;
                set.apply(&payload);
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

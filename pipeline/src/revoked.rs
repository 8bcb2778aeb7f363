//! Revoked tokens, as the gateway sees them: logic's logout writes `im:revoked:<jti>` (value:
//! the token's expiry, Unix seconds, and a TTL to it) and publishes `<jti> <exp>` on the
//! channel `im:revoked`. A thread here loads the keys at start, then follows the channel,
//! reloading after every reconnect; the shards ask `RevokedSet::contains` at each upgrade —
//! a local lookup, never a round trip on the connect path.
//!
//! A logout also closes the connections the token already opened (logic finds them through
//! presence and sends a `Close` record to their gateways): this set only stops new ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const KEY_PREFIX: &str = "im:revoked:";
pub const CHANNEL: &str = "im:revoked";

#[derive(Default)]
pub struct RevokedSet {
    jtis: Mutex<HashMap<String, u64>>,
}

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 100_000;

impl RevokedSet {
    pub fn contains(&self, jti: &str, now_s: u64) -> bool {
        self.jtis
            .lock()
            .expect("not poisoned")
            .get(jti)
            .is_some_and(|exp| *exp >= now_s)
    }

    pub fn insert(&self, jti: String, exp_s: u64) {
        let mut m = self.jtis.lock().expect("not poisoned");
        if m.len() >= SWEEP_AT {
            let now = im_shared::unix_ms() / 1000;
            m.retain(|_, exp| *exp >= now);
        }
        m.insert(jti, exp_s);
    }

    /// Parses a channel message `<jti> <exp>`.
    pub fn apply(&self, msg: &str) {
        let mut it = msg.split(' ');
        if let (Some(jti), Some(exp)) = (it.next(), it.next().and_then(|e| e.parse().ok())) {
            self.insert(jti.to_owned(), exp);
        }
    }
}

/// Starts the follower thread; it stops when `stop` is set (checked every second).
pub fn follow(redis_url: &str, set: Arc<RevokedSet>, stop: Arc<AtomicBool>) -> Result<(), String> {
    let client = redis::Client::open(redis_url).map_err(|e| format!("redis url: {e}"))?;
    std::thread::Builder::new()
        .name("im-revoked".into())
        .spawn(move || {
            let mut backoff = 100;
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = follow_once(&client, &set, &stop) {
                    log::warn!("revocations: {e}; reconnecting in {backoff} ms");
                    std::thread::sleep(Duration::from_millis(backoff));
                    backoff = (backoff * 2).min(5_000);
                } else {
                    backoff = 100;
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
    while !stop.load(Ordering::Acquire) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_add_entries_that_expire() {
        let s = RevokedSet::default();
        s.apply("abc 2000");
        s.apply("garbage");
        assert!(s.contains("abc", 1999));
        assert!(!s.contains("abc", 2001));
        assert!(!s.contains("garbage", 0));
    }
}

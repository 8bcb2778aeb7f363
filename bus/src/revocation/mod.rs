//! Revoked tokens (logout). Logic's logout calls `Revocations::revoke`; every gateway refuses
//! a revoked token at the upgrade by asking a local `RevokedSet` — a lookup in memory, never a
//! round trip on the connect path. (A logout also closes the connections the token already
//! opened: logic finds them through presence and sends their gateways a `Close` record.)
//!
//! - Standalone: one `RevokedSet` is both logic's `Revocations` and the gateway's set.
//! - Distributed (`redis`): `RedisRevocations` writes `im:revoked:<jti>` (value: the token's
//!   expiry, Unix seconds, with a TTL to it) and publishes `<jti> <exp>` on `im:revoked`;
//!   each gateway's `redis::follow` thread loads the keys at start and follows the channel
//!   into its own `RevokedSet`.
//!
//! An entry matters exactly while its token would still verify: both sides use
//! `im_shared::jwt::unexpired`, the rule the token check itself uses.

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "redis")]
pub use self::redis::RedisRevocations;

use async_trait::async_trait;
use im_shared::jwt::unexpired;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Redis key prefix of a revoked token id.
pub const KEY_PREFIX: &str = "im:revoked:";
/// Redis channel announcing revocations, `<jti> <exp>`.
pub const CHANNEL: &str = "im:revoked";

/// Revoked access-token ids, kept until the token would have expired.
#[async_trait]
pub trait Revocations: Send + Sync + 'static {
    async fn revoke(&self, jti: &str, exp_s: u64) -> Result<(), String>;
    async fn is_revoked(&self, jti: &str, now_s: u64) -> Result<bool, String>;
}

/// Revoked token ids in memory, with their expiry: what a gateway checks at each upgrade,
/// and standalone's `Revocations`.
#[derive(Default)]
pub struct RevokedSet {
    jtis: Mutex<HashMap<String, u64>>,
    /// True while the set may be missing revocations (see `check`).
    stale: AtomicBool,
}

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 100_000;

impl RevokedSet {
    fn jtis(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.jtis.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `jti` is revoked at `now_s`, or `None` while the set may be missing
    /// revocations (its Redis follower is not connected): a gateway then refuses every
    /// upgrade rather than let a logged-out token in (fail closed; open sockets stay).
    pub fn check(&self, jti: &str, now_s: u64) -> Option<bool> {
        (!self.stale.load(Ordering::Acquire)).then(|| self.contains(jti, now_s))
    }

    /// Marks the set as possibly behind (`true`: its source cannot be read) or caught up.
    pub fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Ordering::Release);
    }

    /// Whether `jti` is revoked at `now_s` (cheap: called at every upgrade).
    pub fn contains(&self, jti: &str, now_s: u64) -> bool {
        self.jtis()
            .get(jti)
            .is_some_and(|&exp| unexpired(exp, now_s))
    }

    pub fn insert(&self, jti: String, exp_s: u64) {
        let mut m = self.jtis();
        if m.len() >= SWEEP_AT {
            let now = im_shared::unix_ms() / 1000;
            m.retain(|_, &mut exp| unexpired(exp, now));
        }
        m.insert(jti, exp_s);
    }

    /// Takes a channel message, `<jti> <exp>` (anything else is ignored).
    pub fn apply(&self, msg: &str) {
        let mut it = msg.split(' ');
        if let (Some(jti), Some(exp)) = (it.next(), it.next().and_then(|e| e.parse().ok())) {
            self.insert(jti.to_owned(), exp);
        }
    }
}

#[async_trait]
impl Revocations for RevokedSet {
    async fn revoke(&self, jti: &str, exp_s: u64) -> Result<(), String> {
        self.insert(jti.to_owned(), exp_s);
        Ok(())
    }

    async fn is_revoked(&self, jti: &str, now_s: u64) -> Result<bool, String> {
        Ok(self.contains(jti, now_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_set_answers_nothing() {
        let s = RevokedSet::default();
        s.apply("abc 2000");
        assert_eq!(
            (s.check("abc", 1), s.check("x", 1)),
            (Some(true), Some(false))
        );
        s.set_stale(true);
        assert_eq!((s.check("abc", 1), s.check("x", 1)), (None, None));
        s.set_stale(false);
        assert_eq!(s.check("x", 1), Some(false));
    }

    #[test]
    fn messages_add_entries_that_expire() {
        let s = RevokedSet::default();
        s.apply("abc 2000");
        s.apply("garbage");
        assert!(s.contains("abc", 1999));
        assert!(!s.contains("abc", 2000), "expired at exp, as the token is");
        assert!(!s.contains("abc", 2001));
        assert!(!s.contains("garbage", 0));
    }

    #[tokio::test]
    async fn revocation_lasts_until_expiry() {
        let r = RevokedSet::default();
        r.revoke("j", 100).await.unwrap();
        assert!(r.is_revoked("j", 99).await.unwrap());
        assert!(!r.is_revoked("j", 100).await.unwrap());
        assert!(!r.is_revoked("other", 0).await.unwrap());
    }
}

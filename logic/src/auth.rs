//! Passwords, access tokens and refresh tokens.
//!
//! Passwords: argon2id (OWASP's 19 MiB, t=2, p=1 by default), hashed on the blocking pool so
//! a burst of logins cannot stall the async workers. Access tokens: HS256 JWTs with `jti`
//! (shared::jwt), short-lived. Refresh tokens: 32 random bytes, stored as SHA-256 hashes, good
//! for one use (each refresh returns a new one). Logout revokes the access token's `jti` until
//! it would have expired anyway.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

/// argon2id cost; the defaults are OWASP's recommendation.
#[derive(Clone, Copy, Debug)]
pub struct PasswordCost {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl Default for PasswordCost {
    fn default() -> Self {
        PasswordCost {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

impl PasswordCost {
    /// The cheapest argon2id allows: for tests only.
    pub fn test() -> PasswordCost {
        PasswordCost {
            m_kib: 8,
            t: 1,
            p: 1,
        }
    }

    fn argon2(self) -> Argon2<'static> {
        let params =
            Params::new(self.m_kib, self.t, self.p, None).expect("valid argon2 parameters");
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }
}

/// A PHC string (`$argon2id$v=19$m=…`) for `password`.
pub fn hash_password(password: &str, cost: PasswordCost) -> String {
    let mut salt = [0u8; 16];
    im_shared::jwt::random_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes encode");
    cost.argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing")
        .to_string()
}

/// Checks `password` against a stored PHC string (its own parameters, not today's defaults).
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// A hash that costs as much to check as a real one, so that an unknown username takes as
/// long as a wrong password (no user enumeration by timing).
pub fn dummy_hash(cost: PasswordCost) -> String {
    hash_password("not a password anyone has", cost)
}

/// A new refresh token and the hash to store for it.
pub fn new_refresh_token() -> (String, String) {
    let token = im_shared::jwt::random_hex(32);
    let hash = refresh_hash(&token);
    (token, hash)
}

pub fn refresh_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Revoked access-token ids, kept until the token would have expired. Gateways read the same
/// list (Redis in the distributed setup) to refuse and close revoked sessions.
#[async_trait::async_trait]
pub trait Revocations: Send + Sync + 'static {
    async fn revoke(&self, jti: &str, exp_s: u64) -> Result<(), String>;
    async fn is_revoked(&self, jti: &str, now_s: u64) -> Result<bool, String>;
}

/// In-process revocations (standalone; one logic instance).
#[derive(Default)]
pub struct MemoryRevocations {
    jtis: Mutex<HashMap<String, u64>>,
}

/// Revocations kept in memory before the expired ones are swept.
const REVOCATIONS_SWEEP_AT: usize = 100_000;

impl MemoryRevocations {
    /// The synchronous check an in-process gateway makes at each upgrade.
    pub fn contains(&self, jti: &str, now_s: u64) -> bool {
        self.jtis
            .lock()
            .expect("revocations lock")
            .get(jti)
            .is_some_and(|&exp| exp > now_s)
    }
}

#[async_trait::async_trait]
impl Revocations for MemoryRevocations {
    async fn revoke(&self, jti: &str, exp_s: u64) -> Result<(), String> {
        let mut m = self.jtis.lock().expect("revocations lock");
        if m.len() >= REVOCATIONS_SWEEP_AT {
            let now = im_shared::unix_ms() / 1000;
            m.retain(|_, &mut exp| exp > now);
        }
        m.insert(jti.to_owned(), exp_s);
        Ok(())
    }

    async fn is_revoked(&self, jti: &str, now_s: u64) -> Result<bool, String> {
        Ok(self
            .jtis
            .lock()
            .expect("revocations lock")
            .get(jti)
            .is_some_and(|&exp| exp > now_s))
    }
}

/// Revocations in Redis: `<prefix><jti>` with a TTL that ends when the token would have.
pub struct RedisRevocations {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl RedisRevocations {
    /// Connects (and reconnects on its own later) to `redis://host:port/db`.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisRevocations, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| e.to_string())?;
        Ok(RedisRevocations {
            conn,
            prefix: prefix.to_owned(),
        })
    }
}

#[async_trait::async_trait]
impl Revocations for RedisRevocations {
    async fn revoke(&self, jti: &str, exp_s: u64) -> Result<(), String> {
        let ttl = exp_s.saturating_sub(im_shared::unix_ms() / 1000).max(1);
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}{jti}", self.prefix))
            .arg(exp_s)
            .arg("EX")
            .arg(ttl)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        // Gateways keep a local copy of the revocations and follow this channel.
        redis::cmd("PUBLISH")
            .arg(im_pipeline::revoked::CHANNEL)
            .arg(format!("{jti} {exp_s}"))
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    async fn is_revoked(&self, jti: &str, _now_s: u64) -> Result<bool, String> {
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("{}{jti}", self.prefix))
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_and_wrong_ones_do_not() {
        let h = hash_password("correct horse", PasswordCost::test());
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsE", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_hashed() {
        let (t1, h1) = new_refresh_token();
        let (t2, _) = new_refresh_token();
        assert_ne!(t1, t2);
        assert_eq!(h1, refresh_hash(&t1));
        assert_eq!(h1.len(), 64);
        assert!(!h1.contains(&t1));
    }

    #[tokio::test]
    async fn revocation_lasts_until_expiry() {
        let r = MemoryRevocations::default();
        r.revoke("j", 100).await.unwrap();
        assert!(r.is_revoked("j", 99).await.unwrap());
        assert!(!r.is_revoked("j", 100).await.unwrap());
        assert!(!r.is_revoked("other", 0).await.unwrap());
    }
}

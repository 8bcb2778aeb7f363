//! Passwords, access tokens and refresh tokens.
//!
//! Passwords: argon2id (OWASP's 19 MiB, t=2, p=1 by default), hashed on the blocking pool so
//! a burst of logins cannot stall the async workers. Access tokens: HS256 JWTs with `jti`
//! (shared::jwt), short-lived. Refresh tokens: 32 random bytes, stored as SHA-256 hashes, good
//! for one use (each refresh returns a new one). Logout revokes the access token's `jti` until
//! it would have expired anyway (`im_bus::revocation`, shared with the gateways).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};

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

/// A new group invite token (128 random bits, 32 hex digits: unguessable, and short enough
/// for a link) and the hash to store for it.
pub fn new_invite_token() -> (String, String) {
    let token = im_shared::jwt::random_hex(16);
    let hash = refresh_hash(&token);
    (token, hash)
}

/// The SHA-256 (hex) a refresh or invite token is stored as.
pub fn refresh_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
}

//! HS256 JSON Web Tokens (RFC 7519), the only algorithm we accept.
//!
//! Hand-written on `hmac` + `sha2` rather than a general JWT crate: we need one algorithm, and
//! the gateway verifies a token on every connect, so the check is a fixed header comparison,
//! one HMAC and a small JSON parse — and `alg: none` or any other algorithm is refused before
//! the signature is even looked at.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;

/// Longest token we look at; a longer one is malformed (it would also not fit a URL well).
pub const TOKEN_BYTES_MAX: usize = 4096;
/// The longest lifetime (`exp − iat`) a token may claim by default (`--token-lifetime-max-s`):
/// a day, which `im token`'s default and the benchmark harness's tokens stay within. A token
/// that claims more was not minted by our login (whose tokens live `--access-ttl-s`), or was
/// minted with the secret by hand: it is refused rather than trusted for ever.
pub const LIFETIME_MAX_S: u64 = 24 * 3600;
/// How far in the future `iat` may lie: the issuer's clock and ours differ a little.
pub const IAT_SKEW_S: u64 = 60;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id, a decimal string.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Token id, for revocation.
    pub jti: String,
    /// Device id, optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

impl Claims {
    /// Claims for `user_id` valid for `ttl_s` seconds from `now_s`, with a random `jti`.
    pub fn new(user_id: u64, now_s: u64, ttl_s: u64) -> Claims {
        Claims {
            sub: user_id.to_string(),
            iat: now_s,
            exp: now_s + ttl_s,
            jti: random_hex(16),
            dev: None,
        }
    }

    /// The user id in `sub`; verification guarantees it parses.
    pub fn user_id(&self) -> u64 {
        crate::conv::parse_id(&self.sub).unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts, bad JSON, or too long.
    Malformed,
    /// The header names an algorithm other than HS256 (including `none`).
    Algorithm,
    /// The signature does not match: tampered, or signed with another secret.
    Signature,
    /// `exp` is not in the future.
    Expired,
    /// `sub` is not a user id (a positive integer up to 2^63 − 1).
    Claims,
    /// `exp − iat` is above the largest lifetime allowed, `iat` is in the future, or `exp`
    /// is before `iat`.
    Lifetime,
}

impl JwtError {
    /// A short machine-readable reason, used in metrics labels and logs.
    pub fn reason(self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed",
            JwtError::Algorithm => "algorithm",
            JwtError::Signature => "signature",
            JwtError::Expired => "expired",
            JwtError::Claims => "claims",
            JwtError::Lifetime => "lifetime",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid token: {}", self.reason())
    }
}

impl std::error::Error for JwtError {}

#[derive(Deserialize)]
struct Header<'a> {
    alg: &'a str,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length")
}

pub fn sign(secret: &[u8], claims: &Claims) -> String {
    const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    let mut out = B64.encode(HEADER);
    out.push('.');
    let payload = serde_json::to_vec(claims).expect("claims serialise");
    B64.encode_string(payload, &mut out);
    let mut m = mac(secret);
    m.update(out.as_bytes());
    let sig = m.finalize().into_bytes();
    out.push('.');
    B64.encode_string(sig, &mut out);
    out
}

/// Whether a token expiring at `exp_s` is still good at `now_s`: the one rule for tokens and
/// for revocations alike (a revoked token needs remembering exactly while it would verify).
pub fn unexpired(exp_s: u64, now_s: u64) -> bool {
    exp_s > now_s
}

/// Checks algorithm, signature, expiry, lifetime and subject, in that order, at Unix time
/// `now_s`, allowing lifetimes (`exp − iat`) up to `lifetime_max_s`.
pub fn verify(
    secret: &[u8],
    token: &str,
    now_s: u64,
    lifetime_max_s: u64,
) -> Result<Claims, JwtError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    // Decode into stack buffers: the token is bounded, and connects should not allocate for it.
    let mut buf = [0u8; TOKEN_BYTES_MAX];
    let n = B64
        .decode_slice(h, &mut buf)
        .map_err(|_| JwtError::Malformed)?;
    let header: Header = serde_json::from_slice(&buf[..n]).map_err(|_| JwtError::Malformed)?;
    if header.alg != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let mut sig = [0u8; 64];
    let n = B64
        .decode_slice(s, &mut sig)
        .map_err(|_| JwtError::Signature)?;
    let mut m = mac(secret);
    m.update(&token.as_bytes()[..h.len() + 1 + p.len()]);
    m.verify_slice(&sig[..n]).map_err(|_| JwtError::Signature)?;
    let n = B64
        .decode_slice(p, &mut buf)
        .map_err(|_| JwtError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&buf[..n]).map_err(|_| JwtError::Malformed)?;
    if !unexpired(claims.exp, now_s) {
        return Err(JwtError::Expired);
    }
    let lifetime = claims.exp.checked_sub(claims.iat);
    if claims.iat > now_s.saturating_add(IAT_SKEW_S) || lifetime.is_none_or(|l| l > lifetime_max_s)
    {
        return Err(JwtError::Lifetime);
    }
    if crate::conv::parse_id(&claims.sub).is_none() {
        return Err(JwtError::Claims);
    }
    Ok(claims)
}

/// Fills `buf` from the OS random source.
pub fn random_bytes(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random source is available");
}

/// `n` random bytes from the OS, hex-encoded (secrets, token ids).
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    random_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    fn token(exp_in: i64) -> String {
        let now = 1_000_000u64;
        let mut c = Claims::new(42, now, 10);
        c.exp = (now as i64 + exp_in) as u64;
        sign(SECRET, &c)
    }

    #[test]
    fn round_trip() {
        let t = token(60);
        let c = verify(SECRET, &t, 1_000_000, LIFETIME_MAX_S).unwrap();
        assert_eq!(c.user_id(), 42);
        assert_eq!(c.jti.len(), 32);
    }

    #[test]
    fn expired_is_refused() {
        assert_eq!(
            verify(SECRET, &token(0), 1_000_000, LIFETIME_MAX_S),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify(SECRET, &token(-5), 1_000_000, LIFETIME_MAX_S),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn wrong_secret_and_tampered_payload_are_refused() {
        let t = token(60);
        assert_eq!(
            verify(b"other", &t, 1_000_000, LIFETIME_MAX_S),
            Err(JwtError::Signature)
        );
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let forged = B64.encode(r#"{"sub":"1","iat":0,"exp":99999999999,"jti":"x"}"#);
        parts[1] = forged;
        assert_eq!(
            verify(SECRET, &parts.join("."), 1_000_000, LIFETIME_MAX_S),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let payload = B64.encode(r#"{"sub":"1","iat":0,"exp":99999999999,"jti":"x"}"#);
        for alg in ["none", "None", "HS512", "RS256"] {
            let h = B64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            assert_eq!(
                verify(SECRET, &format!("{h}.{payload}."), 0, LIFETIME_MAX_S),
                Err(JwtError::Algorithm),
                "{alg}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.???.***",
            &"a".repeat(TOKEN_BYTES_MAX + 1),
        ] {
            assert!(verify(SECRET, bad, 0, LIFETIME_MAX_S).is_err(), "{bad}");
        }
    }

    #[test]
    fn subject_must_be_a_user_id() {
        for sub in ["alice", "0", "9223372036854775808", "18446744073709551615"] {
            let c = Claims {
                sub: sub.into(),
                iat: 0,
                exp: 60,
                jti: "j".into(),
                dev: None,
            };
            let t = sign(SECRET, &c);
            assert_eq!(
                verify(SECRET, &t, 0, LIFETIME_MAX_S),
                Err(JwtError::Claims),
                "{sub}"
            );
        }
    }

    #[test]
    fn lifetimes_past_the_maximum_and_future_issue_times_are_refused() {
        let now = 1_000_000u64;
        let claims = |iat: u64, exp: u64| {
            let mut c = Claims::new(42, iat, 0);
            c.exp = exp;
            sign(SECRET, &c)
        };
        let ok = claims(now, now + LIFETIME_MAX_S);
        assert!(verify(SECRET, &ok, now, LIFETIME_MAX_S).is_ok());
        for (t, why) in [
            (claims(now, now + LIFETIME_MAX_S + 1), "a second too long"),
            (claims(now, u64::MAX), "exp = 2^64 - 1"),
            (
                claims(now + IAT_SKEW_S + 1, now + 3600),
                "iat in the future",
            ),
            (claims(now + 50, now + 40), "exp before iat"),
        ] {
            assert_eq!(
                verify(SECRET, &t, now, LIFETIME_MAX_S),
                Err(JwtError::Lifetime),
                "{why}"
            );
        }
        let skewed = claims(now + IAT_SKEW_S, now + 3600);
        assert!(
            verify(SECRET, &skewed, now, LIFETIME_MAX_S).is_ok(),
            "within the skew"
        );
        let long = claims(now, now + 7 * 24 * 3600);
        assert!(
            verify(SECRET, &long, now, 7 * 24 * 3600).is_ok(),
            "configured longer"
        );
    }
}

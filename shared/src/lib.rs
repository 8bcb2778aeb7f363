//! What every IM process agrees on: the client protocol (docs/PROTOCOL.md), HS256 tokens and
//! the one rule for how long a token (or its revocation) lasts, Snowflake ids, conversation
//! ids, error codes, the Kafka record schema, the presence key format, the W3C trace context
//! records carry, and the Prometheus text writer every `/metrics` uses.
//!
//! This crate does no I/O. Dependencies point inward to it, never sideways between services.

pub mod conv;
pub mod error;
pub mod jwt;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod records;
pub mod snowflake;
pub mod trace;

pub use conv::Conv;
pub use error::ErrorCode;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A URL without its password, for messages and logs: `mysql://root:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_only() {
        assert_eq!(
            super::redact_url("mysql://root:pw@127.0.0.1:3306/im"),
            "mysql://root:***@127.0.0.1:3306/im"
        );
        assert_eq!(super::redact_url("mysql://root@h/im"), "mysql://root@h/im");
        assert_eq!(super::redact_url("redis://h:6379"), "redis://h:6379");
    }
}

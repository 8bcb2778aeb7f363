//! What every IM process agrees on: the client protocol (docs/PROTOCOL.md), HS256 tokens and
//! the one rule for how long a token (or its revocation) lasts, Snowflake ids, conversation
//! ids, error codes, the Kafka record schema, the presence key format, and the Prometheus
//! text writer every `/metrics` uses.
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

pub use conv::Conv;
pub use error::ErrorCode;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

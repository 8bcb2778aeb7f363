//! What every IM process agrees on: the client protocol (PROTOCOL.md), HS256 tokens, Snowflake
//! ids, conversation ids, configuration, error codes, and the Kafka record schema.
//!
//! This crate does no I/O. Dependencies point inward to it, never sideways between services.

pub mod config;
pub mod conv;
pub mod error;
pub mod jwt;
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

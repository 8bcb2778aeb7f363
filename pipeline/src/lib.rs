//! Kafka plumbing shared by the IM processes (ARCHITECTURE.md, "Processes"): client settings
//! and topics (`kafka`), the gateway's bridge thread (`bridge`) and presence (`presence`).

pub mod bridge;
pub mod kafka;
pub mod presence;
pub mod revoked;

pub use kafka::KafkaConfig;

//! The bus the IM processes talk over, and what rides on it (ARCHITECTURE.md, "Processes"):
//! the `bus` trait with its Kafka and in-process implementations, Kafka client settings and
//! topics (`kafka`), the gateway's bridge threads (`bridge`), presence (`presence`) and the
//! revoked-token set (`revoked`).

pub mod bridge;
pub mod bus;
pub mod kafka;
pub mod presence;
pub mod revoked;

pub use bus::{Bus, KafkaBus, MemoryBus};
pub use kafka::KafkaConfig;

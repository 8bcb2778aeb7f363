//! The WebSocket gateway: thread-per-core shards that share nothing.
//!
//! Where to look:
//! - `shard` — the sans-I/O core of one shard: connection state machine, routing, timers.
//! - `codec`, `handshake` — RFC 6455 framing and the HTTP upgrade, on borrowed bytes.
//! - `wheel` — the hashed timing wheel (heartbeats, handshake and close deadlines).
//! - `arena` — where a connection's bytes live while a frame is partial or a write pending.
//! - `mesh` — SPSC rings between shards, and the eventfd that wakes a sleeping shard.
//! - `bridge` — the rings between the shards and the pipeline bridge (Kafka, presence).
//! - `driver` — the thin I/O loops: io_uring (multishot accept and receive into a
//!   provided-buffer ring) and the epoll fallback.
//! - `gateway` — starts the shards, binds `SO_REUSEPORT` listeners, pins threads, shuts down.

pub mod arena;
pub mod bridge;
pub mod codec;
pub mod conn;
pub mod driver;
pub mod gateway;
pub mod handshake;
pub mod idmap;
pub mod mesh;
pub mod metrics;
pub mod shard;
pub mod wheel;

pub use gateway::{Gateway, GatewayHandle};

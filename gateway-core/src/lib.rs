//! The WebSocket gateway's core: thread-per-core shards that share nothing, as a sans-I/O
//! state machine (`shard`) with thin drivers around it. No Kafka, Redis or database here: the
//! `im-gateway` crate attaches the pipeline bridge to the rings this crate exposes.
//!
//! Where to look:
//! - `shard` — the sans-I/O core of one shard, one file per concern (see its header).
//! - `codec`, `handshake` — RFC 6455 framing and the HTTP upgrade, on borrowed bytes.
//! - `wheel` — the hashed timing wheel (heartbeats, handshake and close deadlines).
//! - `arena` — where a connection's bytes live while a frame is partial or a write pending.
//! - `conn` — the 40-byte per-connection state; `idmap` — the user directory's maps.
//! - `msg` — what travels on the rings, and the addressing (`ConnRef`, home shard, limits).
//! - `mesh` — SPSC rings between shards; `bridge` — the rings to and from the pipeline bridge;
//!   `ring` — draining them; `waker` — the eventfd that wakes a sleeping thread.
//! - `driver` — the thin I/O loops: io_uring (multishot accept and receive into a
//!   provided-buffer ring) and the epoll fallback.
//! - `gateway` — starts the shards, binds `SO_REUSEPORT` listeners, pins threads, shuts down.
//! - `config`, `metrics` — the settings, and the per-shard counters behind `/metrics`.

pub mod arena;
pub mod bridge;
pub mod codec;
pub mod config;
pub mod conn;
pub mod driver;
pub mod gateway;
pub mod handshake;
pub mod idmap;
pub mod mesh;
pub mod metrics;
pub mod metrics_listener;
pub mod msg;
pub mod ring;
pub mod shard;
pub mod waker;
pub mod wheel;

#[cfg(test)]
mod alloc_count;

pub use config::GatewayConfig;
pub use gateway::{Gateway, GatewayHandle, Options};

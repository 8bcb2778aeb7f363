//! Presence: which gateways hold a user's connections. The gateways write it (each shard's
//! connection opens and closes, in batches from the gateway's presence thread); logic reads
//! it to route a message to the gateways of its recipients, and to find the connections a
//! logged-out token opened.
//!
//! Two implementations of one trait: `RedisPresence` (the distributed mode; the key format is
//! `im_shared::presence`) and `MemoryPresence` (standalone: gateway and logic share the
//! process).

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

pub use memory::MemoryPresence;
#[cfg(feature = "redis")]
pub use redis::RedisPresence;

use async_trait::async_trait;
use std::collections::HashMap;

/// A presence change, from a gateway's shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Connection `conn` (the records' `conn` token) of `user` opened, with the token's id
    /// (logout finds its connections by it) and device.
    Online {
        user: u64,
        conn: u64,
        jti: Box<str>,
        device: Option<Box<str>>,
    },
    Offline {
        user: u64,
        conn: u64,
    },
    /// These users still have connections: keep their entries alive. (A gateway whose store
    /// `forgets` turns it into an `Online` per connection, which also restores lost entries.)
    Refresh(Vec<u64>),
}

/// One connection of a user, as presence knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Connection {
    pub gateway: String,
    /// The records' `conn` token (gateway-local).
    pub conn: u64,
    /// The id of the token that opened it.
    pub jti: String,
    /// The device the token names ("" for none).
    pub device: String,
}

/// Changes per write (one pipelined round trip on Redis); a refresh is cut into pieces of
/// this many users.
pub const BATCH_MAX: usize = 2_000;

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Applies `changes` made by gateway `gateway_id`, in order. On `Err` none or some may
    /// have been applied; applying them again is harmless (every change is idempotent).
    /// Returns, for each change, how many connections its user has after it, counted over
    /// every gateway at the moment of the change (0 for a `Refresh`): the writer turns a
    /// first connection and a last one into presence events. Two gateways' changes of one
    /// user are counted one after the other, never both against the same state, so exactly
    /// one of them sees the first (or the last) connection.
    async fn apply(&self, gateway_id: &str, changes: &[Change]) -> Result<Vec<u32>, String>;

    /// For each user with a connection, the gateways holding one (sorted, distinct); users
    /// with none are absent.
    async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String>;

    /// The user's connections.
    async fn connections(&self, user: u64) -> Result<Vec<Connection>, String>;

    /// Whether entries can vanish while their connections stay open: a store restarted
    /// without its data (a Redis without persistence, a failover to a replica that had not
    /// caught up) or an outage longer than the entries' TTL. A gateway then keeps what it wrote
    /// and writes it again at each refresh (`gateway/src/presence.rs`).
    fn forgets(&self) -> bool {
        false
    }
}

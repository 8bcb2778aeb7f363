//! The shards' side of the pipeline bridge (ARCHITECTURE.md, "Processes"): the rings between
//! each shard and the bridge threads that own the bus clients and presence (the `im-gateway`
//! crate drives `BridgeEnd`; this crate knows nothing of Kafka or Redis).
//!
//! Shard → bridge: one SPSC ring per shard carrying `UpMsg` (an encoded `im.upstream` record,
//! or a presence change). Bridge → shard: one SPSC ring per shard carrying the same
//! `ShardMsg`s shards send each other (`Fanout` to a user's home shard, `Reply` to one
//! connection), so a delivery from Kafka takes the path a local one does.

use crate::msg::{ShardMsg, UpMsg};
use crate::ring;
use crate::waker::{WakeSet, Waker};
use rtrb::{Consumer, Producer, RingBuffer};
use std::sync::Arc;

/// One shard's ends of its bridge rings.
pub struct BridgeLink {
    pub(crate) up: Producer<UpMsg>,
    pub(crate) down: Consumer<ShardMsg>,
    pub(crate) bridge_waker: Arc<Waker>,
}

/// The bridge's ends: what shards sent up, and the way down to each shard.
pub struct BridgeEnd {
    pub up: UpEnd,
    pub down: DownEnd,
}

/// Records and presence changes from the shards.
pub struct UpEnd {
    from_shards: Vec<Consumer<UpMsg>>,
    waker: Arc<Waker>,
}

/// The rings into the shards.
pub struct DownEnd {
    to_shards: Vec<Producer<ShardMsg>>,
    shard_wakers: Arc<[Waker]>,
    to_wake: WakeSet,
}

/// Builds the rings for `n` shards: the links go to the shards, the end to the bridge.
pub fn build(
    n: usize,
    capacity: usize,
    shard_wakers: Arc<[Waker]>,
) -> std::io::Result<(Vec<BridgeLink>, BridgeEnd)> {
    let waker = Arc::new(Waker::new()?);
    let mut links = Vec::with_capacity(n);
    let mut from_shards = Vec::with_capacity(n);
    let mut to_shards = Vec::with_capacity(n);
    for _ in 0..n {
        let (up_p, up_c) = RingBuffer::new(capacity);
        let (down_p, down_c) = RingBuffer::new(capacity);
        links.push(BridgeLink {
            up: up_p,
            down: down_c,
            bridge_waker: waker.clone(),
        });
        from_shards.push(up_c);
        to_shards.push(down_p);
    }
    Ok((
        links,
        BridgeEnd {
            up: UpEnd { from_shards, waker },
            down: DownEnd {
                to_shards,
                shard_wakers,
                to_wake: WakeSet::default(),
            },
        },
    ))
}

impl UpEnd {
    /// The eventfd the shards write when they hand something over while the bridge sleeps.
    pub fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Takes up to `budget` messages, round-robin over shards, into `out`.
    pub fn drain(&mut self, budget: usize, out: &mut Vec<UpMsg>) -> usize {
        ring::drain(&mut self.from_shards, budget, out)
    }

    pub fn is_empty(&self) -> bool {
        self.from_shards.iter().all(|c| c.slots() == 0)
    }
}

impl DownEnd {
    pub fn shards(&self) -> usize {
        self.to_shards.len()
    }

    /// Queues `msg` for `shard`; gives it back when that ring is full (the caller decides
    /// whether to wait or drop: a dropped delivery is recovered by the client's sync).
    pub fn send(&mut self, shard: u16, msg: ShardMsg) -> Result<(), ShardMsg> {
        let ring = &mut self.to_shards[shard as usize];
        ring.push(msg).map_err(|rtrb::PushError::Full(m)| m)?;
        self.to_wake.add(shard as usize);
        Ok(())
    }

    /// Wakes the shards sent to since the last call.
    pub fn flush(&mut self) {
        self.to_wake.wake(&self.shard_wakers);
    }
}

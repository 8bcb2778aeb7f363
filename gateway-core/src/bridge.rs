//! The shards' side of the pipeline bridge (ARCHITECTURE.md, "Processes"): the rings between
//! each shard and the bridge threads that own the Kafka clients and presence.
//!
//! Shard → bridge: one SPSC ring per shard carrying `UpMsg` (an encoded `im.upstream` record,
//! or a presence change). Bridge → shard: one SPSC ring per shard carrying the same
//! `ShardMsg`s shards send each other (`Fanout` to a user's home shard, `Reply` to one
//! connection), so a delivery from Kafka takes the path a local one does.
//!
//! This module knows nothing of Kafka or Redis: the `im-pipeline` crate drives `BridgeEnd`.

use crate::mesh::{ConnRef, ShardMsg, Waker};
use im_shared::conv::{mix64, Conv};
use rtrb::{Consumer, Producer, RingBuffer};
use std::sync::Arc;

/// Shard → bridge.
#[derive(Debug)]
pub enum UpMsg {
    /// An encoded `im.upstream` record (prost), keyed by its conversation. `conn` is the
    /// requesting connection, so a record the broker refuses can be answered with `error`.
    Record {
        conv: Conv,
        conn: ConnRef,
        payload: Box<[u8]>,
    },
    /// A connection of `user` opened (presence: user → this gateway, per device).
    Online {
        user: u64,
        conn: ConnRef,
        /// The token's id (so a logout can find the connections its token opened) and the
        /// device id when the token names one.
        jti: Box<str>,
        device: Option<Box<str>>,
    },
    /// That connection closed.
    Offline { user: u64, conn: ConnRef },
    /// Users with connections on the shard: refresh their presence TTL.
    Refresh(Vec<u64>),
}

/// Packs a connection reference into the `conn` field of the records (0 means none):
/// 6 bits of shard, 25 of slab key (32M connections per shard), 32 of generation, plus one.
pub fn conn_token(c: ConnRef) -> u64 {
    if c == ConnRef::NONE {
        return 0;
    }
    let packed =
        ((c.gen as u64) << 31) | (((c.key as u64) & KEY_MASK) << 6) | (c.shard as u64 & 63);
    packed + 1
}

const KEY_MASK: u64 = (1 << 25) - 1;

/// The inverse of `conn_token`; `NONE` for 0.
pub fn conn_ref(token: u64) -> ConnRef {
    if token == 0 {
        return ConnRef::NONE;
    }
    let t = token.wrapping_sub(1);
    ConnRef {
        shard: (t & 63) as u16,
        key: ((t >> 6) & KEY_MASK) as u32,
        gen: (t >> 31) as u32,
    }
}

/// The shard a user's directory entry lives on (the shard that knows which shards hold the
/// user's connections). Shards and bridge must agree on it.
pub fn home_shard(user: u64, shards: usize) -> u16 {
    (mix64(user) % shards as u64) as u16
}

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
    to_wake: u64,
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
                to_wake: 0,
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
        let mut n = 0;
        for c in &mut self.from_shards {
            let take = c.slots().min(budget - n);
            if take == 0 {
                continue;
            }
            if let Ok(chunk) = c.read_chunk(take) {
                out.extend(chunk);
                n += take;
            }
            if n >= budget {
                break;
            }
        }
        n
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
        self.to_wake |= 1 << shard;
        Ok(())
    }

    /// Wakes the shards sent to since the last call.
    pub fn flush(&mut self) {
        let mut w = std::mem::take(&mut self.to_wake);
        while w != 0 {
            let d = w.trailing_zeros() as usize;
            w &= w - 1;
            self.shard_wakers[d].wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_tokens_round_trip_and_zero_is_none() {
        for c in [
            ConnRef {
                shard: 0,
                key: 0,
                gen: 0,
            },
            ConnRef {
                shard: 63,
                key: (1 << 25) - 1,
                gen: u32::MAX,
            },
            ConnRef {
                shard: 5,
                key: 123_456,
                gen: 42,
            },
        ] {
            let t = conn_token(c);
            assert_ne!(t, 0);
            assert_eq!(conn_ref(t), c);
        }
        assert_eq!(conn_token(ConnRef::NONE), 0);
        assert_eq!(conn_ref(0), ConnRef::NONE);
    }
}

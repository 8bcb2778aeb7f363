//! What shards, and the bridge, say to each other — the messages on the SPSC rings — and the
//! addressing they share: a connection anywhere in the process (`ConnRef`, and its packed
//! form in the pipeline's records), and a user's home shard.
//!
//! The limits the addressing rests on are named and asserted here, once: at most
//! `SHARDS_MAX` shards per process (a user's shards are a `u64` bit mask in the directory, and
//! a connection token keeps 6 bits of shard), and `CONN_KEY_BITS` bits of slab key.

use crate::arena::Frame;
use im_shared::conv::{mix64, Conv};

/// Shards per process: the directory's shard mask is a `u64`.
pub const SHARDS_MAX: usize = 64;
/// Bits of shard id in a connection token.
const SHARD_BITS: u32 = 6;
/// Bits of slab key in a connection token: connections per shard are capped at `1 << 25`.
pub const CONN_KEY_BITS: u32 = 25;
/// Connections one shard may hold, as the token format allows.
pub const CONNS_PER_SHARD_MAX: usize = 1 << CONN_KEY_BITS;

const KEY_MASK: u64 = (1 << CONN_KEY_BITS) - 1;
const SHARD_MASK: u64 = (1 << SHARD_BITS) - 1;
const GEN_SHIFT: u32 = SHARD_BITS + CONN_KEY_BITS;

const _: () = assert!(SHARDS_MAX == 1 << SHARD_BITS);
const _: () = assert!(SHARDS_MAX <= u64::BITS as usize, "the shard mask is a u64");
// Shard, key and a 32-bit generation fit a u64 with room for the `+ 1` that keeps 0 free.
const _: () = assert!(GEN_SHIFT + 32 < 64);

/// Names one connection anywhere in this gateway process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub shard: u16,
    pub key: u32,
    pub gen: u32,
}

impl ConnRef {
    pub const NONE: ConnRef = ConnRef {
        shard: u16::MAX,
        key: u32::MAX,
        gen: 0,
    };
}

/// Packs a connection reference into the `conn` field of the records (0 means none):
/// shard, slab key and generation, plus one.
pub fn conn_token(c: ConnRef) -> u64 {
    if c == ConnRef::NONE {
        return 0;
    }
    let packed = ((c.gen as u64) << GEN_SHIFT)
        | (((c.key as u64) & KEY_MASK) << SHARD_BITS)
        | (c.shard as u64 & SHARD_MASK);
    packed + 1
}

/// The inverse of `conn_token`; `NONE` for 0.
pub fn conn_ref(token: u64) -> ConnRef {
    if token == 0 {
        return ConnRef::NONE;
    }
    let t = token.wrapping_sub(1);
    ConnRef {
        shard: (t & SHARD_MASK) as u16,
        key: ((t >> SHARD_BITS) & KEY_MASK) as u32,
        gen: (t >> GEN_SHIFT) as u32,
    }
}

/// The shard a user's directory entry lives on (the shard that knows which shards hold the
/// user's connections). The shards and the bridge both route by it: if they disagreed, a
/// `Fanout` would find no devices.
pub fn home_shard(user: u64, shards: usize) -> u16 {
    (mix64(user) % shards as u64) as u16
}

/// Shard → shard, and bridge → shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// `shard` now holds connections of `user` (sent to the user's home shard).
    Attach { user: u64, shard: u16 },
    /// `shard` holds no more connections of `user`.
    Detach { user: u64, shard: u16 },
    /// Local router only: to the conversation's owner, to assign id and seq, then route.
    Submit(Box<Submit>),
    /// To the user's home shard: forward `frame` to every shard holding the user.
    Fanout {
        user: u64,
        frame: Frame,
        except: ConnRef,
    },
    /// To a shard holding the user: write `frame` to each of the user's connections.
    Deliver {
        user: u64,
        frame: Frame,
        except: ConnRef,
    },
    /// `Fanout` for many users whose home is the receiving shard (the bridge splits a group
    /// message's members by home shard): one ring entry per group message and shard, not one
    /// per member, so a shard takes many group messages in one turn and a member's frames
    /// leave in one send.
    FanoutMany {
        users: Box<[u64]>,
        frame: Frame,
        except: ConnRef,
    },
    /// `Deliver` for many users, each holding connections on the receiving shard.
    DeliverMany {
        users: Box<[u64]>,
        frame: Frame,
        except: ConnRef,
    },
    /// To the origin shard: write `frame` (a `sent` or `error`) to one connection.
    Reply { to: ConnRef, frame: Frame },
    /// Close one connection with 1008 (its token was revoked).
    Kick { to: ConnRef },
}

impl ShardMsg {
    /// What handling this costs, in deliveries: how much of a turn's budget it takes.
    pub fn weight(&self) -> usize {
        match self {
            ShardMsg::FanoutMany { users, .. } | ShardMsg::DeliverMany { users, .. } => {
                users.len().max(1)
            }
            _ => 1,
        }
    }
}

/// A message to be sequenced by the shard that owns its conversation (local router only).
#[derive(Debug)]
pub struct Submit {
    pub conv: Conv,
    pub from: u64,
    pub to: u64,
    pub cid: Box<str>,
    pub content: Box<str>,
    pub content_type: Box<str>,
    pub origin: ConnRef,
}

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
                shard: SHARDS_MAX as u16 - 1,
                key: CONNS_PER_SHARD_MAX as u32 - 1,
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

    #[test]
    fn home_shards_spread_and_stay_in_range() {
        let mut seen = [0u32; 4];
        for user in 1..=4_000u64 {
            let h = home_shard(user, 4);
            seen[h as usize] += 1;
            assert_eq!(h, home_shard(user, 4), "deterministic");
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}

//! The local router: routing and sequencing inside one gateway process, with no logic
//! service, bus or database (`im gateway --local-router`). It exists for benchmarking the
//! gateway alone — `im-bench hold`, `heartbeat`, `p2p` against a bare gateway, and
//! `benches/million.sh` use it — and is not a deployment mode: nothing it sequences is stored,
//! and only 1:1 messages are routed (groups, sync and read need logic).
//!
//! A conversation's *owner* shard (hash of the conversation id) assigns its seq and message id
//! from its own Snowflake and seq map. A `send` travels origin → owner (sequenced; `sent` goes
//! back to the origin) → home shard of each party → every shard holding that party → its
//! connections. Each hop is a FIFO ring, and one owner sequences a conversation, so every
//! device sees a conversation in seq order.

use super::Shard;
use crate::idmap::IdMap;
use crate::metrics::ShardStats;
use crate::msg::{ConnRef, ShardMsg, Submit};
use im_shared::conv::Conv;
use im_shared::protocol::{self, Message, Target};
use im_shared::snowflake::{Snowflake, WORKER_MAX};
use im_shared::ErrorCode;

/// Conversations whose seq one shard keeps in memory.
const SEQ_CONVS_MAX: usize = 4_000_000;

/// One shard's sequencing state.
pub(super) struct LocalRouter {
    /// conversation (owned by this shard) → last seq.
    seqs: IdMap<Conv, u64>,
    snowflake: Snowflake,
}

impl LocalRouter {
    pub(super) fn new(worker_id: u16) -> LocalRouter {
        LocalRouter {
            seqs: IdMap::default(),
            snowflake: Snowflake::new(worker_id & WORKER_MAX),
        }
    }

    /// The next seq of `conv` and a new message id; `None` when the seq map is full.
    pub(super) fn assign(&mut self, conv: Conv, ts: u64) -> Option<(u64, u64)> {
        let full = self.seqs.len() >= SEQ_CONVS_MAX;
        let seq = match self.seqs.get_mut(&conv) {
            Some(seq) => {
                *seq += 1;
                *seq
            }
            None if full => return None,
            None => {
                self.seqs.insert(conv, 1);
                1
            }
        };
        Some((seq, self.snowflake.next(ts)))
    }
}

/// The shard that sequences `conv`.
fn owner_of(conv: Conv, shards: u16) -> u16 {
    (conv.hash64() % shards as u64) as u16
}

impl Shard {
    /// A 1:1 `send`, to the conversation's owner shard for sequencing.
    pub(super) fn submit_local(
        &mut self,
        key: u32,
        cid: &str,
        to: u64,
        content: Box<str>,
        content_type: Box<str>,
    ) {
        let c = &self.conns[key as usize];
        let from = c.user;
        let Some(conv) = Conv::pair(from, to) else {
            return self.reply_error(
                key,
                ErrorCode::InvalidField,
                "cannot send a message to yourself",
                Some(cid),
            );
        };
        let origin = ConnRef {
            shard: self.id,
            key,
            gen: c.gen,
        };
        let msg = ShardMsg::Submit(Box::new(Submit {
            conv,
            from,
            to,
            cid: cid.into(),
            content,
            content_type,
            origin,
        }));
        if self.route(owner_of(conv, self.shards), msg).is_err() {
            ShardStats::add(&self.st().ring_dropped_total, 1);
            self.reply_error(
                key,
                ErrorCode::Busy,
                "the gateway is overloaded: retry with the same cid",
                Some(cid),
            );
        }
    }

    /// As the conversation's owner: assign seq and id, acknowledge, and route to both parties.
    pub(super) fn sequence(&mut self, s: Submit) {
        let ts = self.now.unix_ms;
        // Submits come only from shards of this process, which all run the local router.
        let Some(router) = self.router.as_mut() else {
            return;
        };
        let Some((seq, id)) = router.assign(s.conv, ts) else {
            let frame = self.error_frame(
                ErrorCode::Busy,
                "too many conversations in memory",
                Some(&s.cid),
            );
            return self.route_or_count(
                s.origin.shard,
                ShardMsg::Reply {
                    to: s.origin,
                    frame,
                },
            );
        };
        let m = Message {
            id,
            conv: s.conv,
            seq,
            from: s.from,
            to: Target::User(s.to),
            content: s.content.into_string(),
            content_type: s.content_type.into_string(),
            ts,
        };
        // Encoded once; every device of both parties gets the same bytes.
        let frame = self.text_frame(|out| protocol::encode_msg(&m, out));
        let sent = self.text_frame(|out| protocol::encode_sent(&s.cid, id, s.conv, seq, ts, out));
        ShardStats::add(&self.st().messages_routed_total, 1);
        self.route_or_count(
            s.origin.shard,
            ShardMsg::Reply {
                to: s.origin,
                frame: sent,
            },
        );
        self.route_or_count(
            self.home_of(s.to),
            ShardMsg::Fanout {
                user: s.to,
                frame: frame.clone(),
                except: ConnRef::NONE,
            },
        );
        self.route_or_count(
            self.home_of(s.from),
            ShardMsg::Fanout {
                user: s.from,
                frame,
                except: s.origin,
            },
        );
    }
}

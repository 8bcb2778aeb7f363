//! Pipeline mode: a client request becomes an `im.upstream` record, handed to the bridge
//! over the shard's ring (the bridge produces it to the bus; logic answers through this
//! gateway's downstream topic). A full ring and backlog answer `error` 5030 with the `cid`.

use super::Shard;
use crate::metrics::ShardStats;
use crate::msg::{self, ConnRef, UpMsg};
use im_shared::conv::Conv;
use im_shared::protocol::{Request, Target};
use im_shared::records::{self, UpstreamBody, Versioned};
use im_shared::ErrorCode;

impl Shard {
    /// Pipeline mode: turns a request into an `im.upstream` record for the bridge.
    pub(super) fn submit_upstream(&mut self, key: u32, req: Request<'_>) {
        let c = &self.conns[key as usize];
        let (user, conn) = (
            c.user,
            ConnRef {
                shard: self.id,
                key,
                gen: c.gen,
            },
        );
        let (conv, cid, body) = match req {
            Request::Send {
                cid,
                target,
                content,
                content_type,
            } => {
                let (conv, to_user, to_group) = match target {
                    Target::User(to) => match Conv::pair(user, to) {
                        Some(conv) => (conv, to, 0),
                        None => {
                            return self.reply_error(
                                key,
                                ErrorCode::InvalidField,
                                "cannot send a message to yourself",
                                Some(&cid),
                            )
                        }
                    },
                    Target::Group(g) => (Conv::Group(g), 0, g),
                };
                let body = UpstreamBody::Send(records::Send {
                    cid: cid.to_string(),
                    to_user,
                    to_group,
                    content: content.into_owned(),
                    content_type: content_type.into_owned(),
                });
                (conv, Some(cid), body)
            }
            Request::Sync { conv, after, limit } => {
                let body = UpstreamBody::Sync(records::Sync {
                    conv: conv.to_string(),
                    after,
                    limit,
                });
                (conv, None, body)
            }
            Request::Read { conv, seq } => {
                let body = UpstreamBody::Read(records::Read {
                    conv: conv.to_string(),
                    seq,
                });
                (conv, None, body)
            }
            Request::Ping => return,
        };
        let record = records::Upstream {
            version: records::VERSION,
            reply_to: self.gateway_id.to_string(),
            conn: msg::conn_token(conn),
            user,
            ts: self.now.unix_ms,
            body: Some(body),
        };
        let msg = UpMsg::Record {
            conv,
            conn,
            payload: record.to_bytes().into(),
        };
        if self.mesh.send_up(msg).is_err() {
            ShardStats::add(&self.st().ring_dropped_total, 1);
            self.reply_error(
                key,
                ErrorCode::Busy,
                "the gateway is overloaded: retry (with the same cid)",
                cid.as_deref(),
            );
        }
    }
}

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
use std::borrow::Cow;

impl Shard {
    /// Pipeline mode: turns a request into an `im.upstream` record for the bridge.
    pub(super) fn submit_upstream(&mut self, key: u32, req: Request<'_>) {
        let c = &self.conns[key as usize];
        let user = c.user;
        let conn = ConnRef {
            shard: self.id,
            key,
            gen: c.gen,
        };
        let (conv, cid, body) = match upstream_body(user, req) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err((code, msg, cid)) => return self.reply_error(key, code, msg, Some(&cid)),
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

/// A record body with its conversation (the record's key) and the `cid` of a send.
type Body<'a> = (Conv, Option<Cow<'a, str>>, UpstreamBody);
/// A send refused here, and its `cid`.
type Refused<'a> = (ErrorCode, &'static str, Cow<'a, str>);

/// The record body for `sender`'s request; `None` for a request that has none (ping).
fn upstream_body(sender: u64, req: Request<'_>) -> Result<Option<Body<'_>>, Refused<'_>> {
    Ok(Some(match req {
        Request::Send {
            cid,
            target,
            content,
            content_type,
        } => {
            let (conv, to_user, to_group) = match target {
                Target::User(to) => match Conv::pair(sender, to) {
                    Some(conv) => (conv, to, 0),
                    None => {
                        let msg = "cannot send a message to yourself";
                        return Err((ErrorCode::InvalidField, msg, cid));
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
            let conv_s = conv.to_string();
            let body = UpstreamBody::Sync(records::Sync {
                conv: conv_s,
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
        Request::Typing { conv } => {
            let body = UpstreamBody::Typing(records::Typing {
                conv: conv.to_string(),
            });
            (conv, None, body)
        }
        Request::Ping => return Ok(None),
    }))
}

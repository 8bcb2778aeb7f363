//! Bytes → frames → messages: the WebSocket framing of one connection (RFC 6455 on borrowed
//! bytes, fragments reassembled in the arena), the per-connection rate limit, and what each
//! complete message becomes (a pong, an upstream record, a local-router submit, an error).

use super::Shard;
use crate::arena::RxState;
use crate::codec::{self, close, opcode, FrameError};
use crate::conn::State;
use crate::handshake::{self, Refusal};
use crate::metrics::ShardStats;
use im_shared::protocol::{self, Request, Target};
use im_shared::ErrorCode;

/// Rate-limit credit units per message (credit is kept in sixteenths, so slow rates refill
/// within a tick).
pub(super) const CREDIT_UNIT: u32 = 16;

/// Whether a connection may send one more message now.
pub(super) enum Spend {
    Ok,
    /// Over the rate: refuse this message.
    Refuse,
    /// Refused a whole burst's worth and still sending: close with 1008.
    Close,
}

impl Shard {
    pub(super) fn reading(&self, key: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| matches!(c.state, State::Handshake | State::Open))
    }

    /// Consumes complete requests/frames from `buf`; returns the bytes used.
    pub(super) fn process(&mut self, key: u32, rx: &mut RxState, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(c) = self.conns.get(key as usize) else {
                return buf.len();
            };
            match c.state {
                State::Handshake => match handshake::parse(&buf[pos..]) {
                    Ok(None) => return pos,
                    Ok(Some((req, n))) => {
                        self.on_http(key, req);
                        pos += n;
                    }
                    Err(Refusal::Status(status, reason)) => {
                        ShardStats::add(&self.st().refused_http_total, 1);
                        self.http_answer(
                            key,
                            handshake::json_error(status, ErrorCode::BadRequest.code(), reason),
                        );
                        return buf.len();
                    }
                },
                State::Open => {
                    match codec::parse_header(&buf[pos..], self.limits.frame_bytes_max) {
                        Ok(None) => return pos,
                        Err(e) => {
                            self.fail(key, e);
                            return buf.len();
                        }
                        Ok(Some(h)) => {
                            if buf.len() - pos < h.frame_len() {
                                return pos;
                            }
                            let (start, end) = (pos + h.header_len, pos + h.frame_len());
                            codec::unmask(&mut buf[start..end], h.mask);
                            self.on_frame(key, rx, h, &buf[start..end]);
                            pos = end;
                        }
                    }
                }
                _ => return buf.len(),
            }
        }
    }

    pub(super) fn on_frame(
        &mut self,
        key: u32,
        rx: &mut RxState,
        h: codec::Header,
        payload: &[u8],
    ) {
        ShardStats::add(&self.st().frames_in_total, 1);
        match h.opcode {
            opcode::PING => match self.spend(key) {
                Spend::Ok => {
                    let pong = if payload.is_empty() {
                        self.empty_pong.clone()
                    } else {
                        codec::server_frame(opcode::PONG, payload).into()
                    };
                    self.enqueue(key, pong)
                }
                Spend::Refuse => {}
                Spend::Close => self.begin_close(key, close::POLICY, "rate limit"),
            },
            opcode::PONG => {}
            opcode::CLOSE => match codec::check_close_payload(payload) {
                Ok(code) => self.begin_close(key, code, ""),
                Err(e) => self.fail(key, e),
            },
            opcode::TEXT | opcode::BINARY => {
                if rx.frag_opcode != 0 {
                    return self.fail(
                        key,
                        FrameError::Protocol("new message inside a fragmented one"),
                    );
                }
                if h.fin {
                    self.on_message(key, h.opcode, payload);
                } else {
                    rx.frag_opcode = h.opcode;
                    rx.frag.extend_from_slice(payload);
                }
            }
            _ => {
                // Continuation.
                if rx.frag_opcode == 0 {
                    return self.fail(key, FrameError::Protocol("continuation without a message"));
                }
                if rx.frag.len() + payload.len() > self.limits.frame_bytes_max {
                    return self.fail(key, FrameError::TooLarge);
                }
                rx.frag.extend_from_slice(payload);
                if h.fin {
                    let msg = std::mem::take(&mut rx.frag);
                    let op = std::mem::take(&mut rx.frag_opcode);
                    self.on_message(key, op, &msg);
                }
            }
        }
    }

    pub(super) fn on_message(&mut self, key: u32, op: u8, payload: &[u8]) {
        if op == opcode::BINARY {
            return self.reply_error(
                key,
                ErrorCode::BadRequest,
                "binary frames are not supported: send JSON text frames",
                None,
            );
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.fail(key, FrameError::InvalidUtf8);
        };
        match self.spend(key) {
            Spend::Ok => {}
            Spend::Refuse => {
                let cid = protocol::parse_request(text).ok().and_then(|r| match r {
                    Request::Send { cid, .. } => Some(cid),
                    _ => None,
                });
                let msg = "rate limit: slow down and retry with the same cid";
                return self.reply_error(key, ErrorCode::RateLimited, msg, cid.as_deref());
            }
            Spend::Close => return self.begin_close(key, close::POLICY, "rate limit"),
        }
        match protocol::parse_request(text) {
            Ok(Request::Ping) => {
                let pong = self.pong.clone();
                self.enqueue(key, pong);
            }
            Ok(req) if self.router.is_none() => self.submit_upstream(key, req),
            Ok(Request::Send { cid, target: Target::User(to), content, content_type }) => {
                self.submit_local(key, &cid, to, content.into(), content_type.into())
            }
            Ok(Request::Send { cid, target: Target::Group(_), .. }) => self.reply_error(
                key,
                ErrorCode::Unavailable,
                "group messages need the logic service (`im logic`); this gateway runs its local router",
                Some(&cid),
            ),
            // Nobody to tell without logic's member lists: dropped.
            Ok(Request::Typing { .. }) => {}
            Ok(Request::Sync { .. } | Request::Read { .. }) => self.reply_error(
                key,
                ErrorCode::Unavailable,
                "history and read positions need the logic service (`im logic`)",
                None,
            ),
            Err(e) => self.reply_error(key, e.code, &e.message, e.cid.as_deref()),
        }
    }

    /// Takes one message's worth of rate-limit credit.
    pub(super) fn spend(&mut self, key: u32) -> Spend {
        let max = self.limits.credit_max;
        let c = &mut self.conns[key as usize];
        c.credit = c.credit.saturating_sub(CREDIT_UNIT as i16);
        if c.credit >= 0 {
            Spend::Ok
        } else if c.credit > -max {
            Spend::Refuse
        } else {
            Spend::Close
        }
    }
}

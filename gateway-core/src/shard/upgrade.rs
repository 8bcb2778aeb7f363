//! The HTTP side of a connection: the upgrade request (its token checked here, HS256 and not
//! revoked, before any WebSocket byte), and the two plain GETs a gateway serves on its
//! WebSocket port, `/healthz` and `/metrics`.

use super::Shard;
use crate::conn::{flags, State};
use crate::handshake;
use crate::metrics::{self, ShardStats};
use im_shared::metrics::CONTENT_TYPE;
use im_shared::{jwt, ErrorCode};

impl Shard {
    pub(super) fn on_http(&mut self, key: u32, req: handshake::Request<'_>) {
        match req {
            handshake::Request::Upgrade { .. } if self.shutting_down => {
                let busy = handshake::json_error(503, ErrorCode::Busy.code(), "shutting down");
                self.http_answer(key, busy)
            }
            handshake::Request::Upgrade {
                accept,
                token,
                protocol,
            } => match self.verify(token.as_deref()) {
                Err((status, code, why)) => {
                    ShardStats::add(&self.st().refused_token_total, 1);
                    let refusal = handshake::json_error(status, code.code(), &why);
                    self.http_answer(key, refusal);
                }
                Ok(claims) => self.open(key, claims, &accept, protocol),
            },
            handshake::Request::Get { path } => {
                let answer = self.get(path);
                self.http_answer(key, answer);
            }
        }
    }

    /// The token's claims, if it verifies and was not revoked; the refusal otherwise.
    fn verify(&self, token: Option<&str>) -> Result<jwt::Claims, (u16, ErrorCode, String)> {
        let unauthorized = |why: String| (401, ErrorCode::Unauthorized, why);
        let Some(t) = token else {
            return Err(unauthorized(
                "missing token: pass ?token=<JWT> or Sec-WebSocket-Protocol: bearer.<JWT>".into(),
            ));
        };
        let now_s = self.now.unix_ms / 1000;
        let claims = jwt::verify(&self.secret, t, now_s, self.token_lifetime_max_s)
            .map_err(|e| unauthorized(e.to_string()))?;
        match self.revoked.as_ref().map(|r| r(&claims.jti, now_s)) {
            None | Some(Some(false)) => Ok(claims),
            Some(Some(true)) => Err(unauthorized("invalid token: revoked".into())),
            // Fail closed: a logged-out token must not get in while the list is unreadable.
            Some(None) => Err((
                503,
                ErrorCode::DependencyDown,
                "the revocation list cannot be read (Redis is down): retry".into(),
            )),
        }
    }

    /// The upgrade succeeded: answer 101, and the connection is the user's from now on.
    fn open(&mut self, key: u32, claims: jwt::Claims, accept: &str, protocol: Option<&str>) {
        let user = claims.user_id();
        let response = handshake::switching_protocols(accept, protocol, self.id);
        let due = self.tick() + self.limits.heartbeat_ticks;
        let c = &mut self.conns[key as usize];
        c.user = user;
        c.state = State::Open;
        c.credit = self.limits.credit_max;
        c.io |= flags::UPGRADE_UNSENT;
        self.arena.push_tx(&mut c.tx, response.into());
        self.wheel.insert(key, due);
        ShardStats::add(&self.st().handshakes_total, 1);
        let token = (claims.jti.into(), claims.dev.map(Into::into));
        self.join(key, user, token);
        self.mark_ready(key);
    }

    /// The answer to a plain GET.
    fn get(&mut self, path: &str) -> Vec<u8> {
        match path {
            "/healthz" if self.shutting_down => {
                handshake::response(503, "text/plain", b"shutting down\n")
            }
            "/healthz" => handshake::response(200, "text/plain", b"ok\n"),
            "/metrics" if self.metrics_here => {
                let mut text = metrics::render(&self.gateway_id, &self.stats, self.driver);
                if let Some(hook) = &self.extra_metrics {
                    hook(&mut text);
                }
                handshake::response(200, CONTENT_TYPE, text.as_bytes())
            }
            _ => {
                ShardStats::add(&self.st().refused_http_total, 1);
                let msg = "not found: the WebSocket endpoint is /ws";
                handshake::json_error(404, ErrorCode::NotFound.code(), msg)
            }
        }
    }
}

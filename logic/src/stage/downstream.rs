//! What the stage sends to gateways (and to logic instances' reply topics): one
//! `im.downstream.<id>` record per gateway and message, and the answers to one connection.
//! The batch loop and the tasks answering `sync` and `read` share it.

use super::state::Ack;
use super::StageStats;
use im_bus::Producer;
use im_shared::protocol;
use im_shared::records::{self, topics, DownstreamBody, Versioned};
use im_shared::{Conv, ErrorCode};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct Downstream {
    /// A live delivery that cannot go out in its timeout is dropped (the client's sync
    /// recovers it).
    producer: Arc<dyn Producer>,
    stats: Arc<StageStats>,
}

impl Downstream {
    pub(crate) fn new(producer: Arc<dyn Producer>, stats: Arc<StageStats>) -> Downstream {
        Downstream { producer, stats }
    }

    pub(crate) fn producer(&self) -> &Arc<dyn Producer> {
        &self.producer
    }

    /// Queues one record for `gateway`'s topic, keyed by `key`.
    pub(crate) fn send(&self, gateway: &str, key: &str, body: DownstreamBody) {
        let rec = records::Downstream {
            version: records::VERSION,
            body: Some(body),
        };
        let topic = topics::downstream(gateway);
        match self.producer.send(&topic, None, key, &rec.to_bytes(), None) {
            Ok(()) => {
                self.stats.deliveries_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("logic: dropping a record for {topic}: {e}"),
        }
    }

    /// Sends one client frame (JSON) to the connection that made `up`.
    pub(crate) fn reply(&self, up: &records::Upstream, json: Vec<u8>) {
        if up.reply_to.is_empty() || up.conn == 0 {
            return;
        }
        let key = up.conn.to_string();
        let body = DownstreamBody::Reply(records::Reply {
            conn: up.conn,
            json,
        });
        self.send(&up.reply_to, &key, body);
    }

    pub(crate) fn reply_sent(&self, up: &records::Upstream, cid: &str, ack: &Ack) {
        let Some(conv) = Conv::parse(&ack.conv) else {
            return;
        };
        let mut json = Vec::with_capacity(160);
        protocol::encode_sent(cid, ack.id, conv, ack.seq, ack.ts, &mut json);
        self.reply(up, json);
    }

    pub(crate) fn reply_error(
        &self,
        up: &records::Upstream,
        code: ErrorCode,
        msg: &str,
        cid: Option<&str>,
    ) {
        let mut json = Vec::with_capacity(160);
        protocol::encode_error(code, msg, cid, &mut json);
        self.reply(up, json);
    }
}

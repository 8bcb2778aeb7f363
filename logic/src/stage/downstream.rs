//! What the stage sends to gateways (and to logic instances' reply topics): one
//! `im.downstream.<id>` record per gateway and message, and the answers to one connection.
//! The batch loop and the tasks answering `sync` and `read` share it.

use super::state::Ack;
use super::StageStats;
use im_bus::{Producer, TraceParent};
use im_shared::metrics::count_rarely;
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
        self.send_traced(gateway, key, body, None)
    }

    /// `send`, the record carrying `trace` (a traced message's route or answer).
    pub(crate) fn send_traced(
        &self,
        gateway: &str,
        key: &str,
        body: DownstreamBody,
        trace: Option<&TraceParent>,
    ) {
        let rec = records::Downstream {
            version: records::VERSION,
            body: Some(body),
        };
        let topic = topics::downstream(gateway);
        // The outcome is only counted: a live delivery the broker never takes is dropped (the
        // client's sync recovers it), but an operator must see that it happened, and how long
        // the broker takes to acknowledge the ones it does take.
        let (sent, stats) = (std::time::Instant::now(), self.stats.clone());
        let done: im_bus::Done = Box::new(move |r: Result<(), im_bus::Undelivered<'_>>| match r {
            Ok(()) => stats
                .downstream_ack_time
                .observe(sent.elapsed().as_millis() as u64),
            Err((why, _)) => {
                // A broker outage fails them all: counted each, logged now and then.
                if let Some(n) = count_rarely(&stats.downstream_failed_total) {
                    log::warn!("logic: a downstream record was not delivered ({why}); {n} so far");
                }
            }
        });
        match self
            .producer
            .send_traced(&topic, None, key, &rec.to_bytes(), trace, Some(done))
        {
            Ok(()) => {
                self.stats.deliveries_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("logic: dropping a record for {topic}: {e}"),
        }
    }

    /// Sends one client frame (JSON) to the connection that made `up`.
    pub(crate) fn reply(&self, up: &records::Upstream, json: Vec<u8>) {
        self.reply_traced(up, json, None)
    }

    fn reply_traced(&self, up: &records::Upstream, json: Vec<u8>, trace: Option<&TraceParent>) {
        if up.reply_to.is_empty() || up.conn == 0 {
            return;
        }
        let key = up.conn.to_string();
        let body = DownstreamBody::Reply(records::Reply {
            conn: up.conn,
            json,
        });
        self.send_traced(&up.reply_to, &key, body, trace);
    }

    /// `sent` for a message; `trace` when its send was traced.
    pub(crate) fn reply_sent(
        &self,
        up: &records::Upstream,
        cid: &str,
        ack: &Ack,
        trace: Option<&TraceParent>,
    ) {
        let Some(conv) = Conv::parse(&ack.conv) else {
            return;
        };
        let mut json = Vec::with_capacity(160);
        protocol::encode_sent(cid, ack.id, conv, ack.seq, ack.ts, &mut json);
        self.reply_traced(up, json, trace);
    }

    pub(crate) fn reply_error(
        &self,
        up: &records::Upstream,
        code: ErrorCode,
        msg: &str,
        cid: Option<&str>,
    ) {
        self.reply_error_traced(up, code, msg, cid, None)
    }

    /// `error` for a send whose trace is `trace`.
    pub(crate) fn reply_error_traced(
        &self,
        up: &records::Upstream,
        code: ErrorCode,
        msg: &str,
        cid: Option<&str>,
        trace: Option<&TraceParent>,
    ) {
        let mut json = Vec::with_capacity(160);
        protocol::encode_error(code, msg, cid, &mut json);
        self.reply_traced(up, json, trace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_bus::{Done, SendError};
    use std::time::Duration;

    /// A producer whose broker takes records while `take` says so, and refuses them after.
    struct Broker {
        take: bool,
    }

    impl Producer for Broker {
        fn send_traced(
            &self,
            _topic: &str,
            _partition: Option<i32>,
            _key: &str,
            payload: &[u8],
            _trace: Option<&TraceParent>,
            done: Option<Done>,
        ) -> Result<(), SendError> {
            let done = done.expect("downstream records are followed");
            done(if self.take {
                Ok(())
            } else {
                Err(("Local: Message timed out".into(), payload))
            });
            Ok(())
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn flush(&self, _timeout: Duration) {}
    }

    fn body() -> DownstreamBody {
        DownstreamBody::Reply(records::Reply {
            conn: 7,
            json: b"{}".to_vec(),
        })
    }

    #[test]
    fn undelivered_records_are_counted_and_acks_timed() {
        let stats = Arc::new(StageStats::default());
        let ok = Downstream::new(Arc::new(Broker { take: true }), stats.clone());
        ok.send("gw", "k", body());
        ok.send("gw", "k", body());
        let down = Downstream::new(Arc::new(Broker { take: false }), stats.clone());
        down.send("gw", "k", body());
        assert_eq!(
            stats.deliveries_total.load(Ordering::Relaxed),
            3,
            "all queued"
        );
        assert_eq!(stats.downstream_ack_time.count(), 2);
        assert_eq!(stats.downstream_failed_total.load(Ordering::Relaxed), 1);
    }
}

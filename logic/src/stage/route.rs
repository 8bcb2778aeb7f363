//! Live delivery: the stage's `route` (one downstream record per gateway holding any
//! recipient of a message), and the grouping by gateway that typing shares.

use super::sequencer::Admitted;
use super::{message_of, Stage};
use im_shared::metrics::count_rarely;
use im_shared::protocol;
use im_shared::records::{self, DownstreamBody, Stored};
use im_shared::Conv;
use std::collections::HashMap;

/// `users` by the gateways holding them, as presence answered (`online`); users offline are
/// left out.
pub(crate) fn by_gateway(
    online: &HashMap<u64, Vec<String>>,
    users: impl IntoIterator<Item = u64>,
) -> HashMap<&str, Vec<u64>> {
    let mut by_gw: HashMap<&str, Vec<u64>> = HashMap::new();
    for u in users {
        for gw in online.get(&u).into_iter().flatten() {
            by_gw.entry(gw.as_str()).or_default().push(u);
        }
    }
    by_gw
}

impl Stage {
    /// Live delivery: one downstream record per gateway holding any recipient.
    pub(super) async fn route(&self, fresh: &[(&Stored, &Admitted)]) {
        let mut recipients: Vec<Vec<u64>> = Vec::with_capacity(fresh.len());
        let mut all: Vec<u64> = Vec::new();
        for (_, s) in fresh {
            let users: Vec<u64> = match s.conv {
                Conv::Pair(a, b) => vec![a, b],
                Conv::Group(g) => self
                    .members
                    .of(g)
                    .await
                    .map(|r| r.members.clone())
                    .unwrap_or_default(),
            };
            all.extend_from_slice(&users);
            recipients.push(users);
        }
        all.sort_unstable();
        all.dedup();
        let online = match self.presence.gateways(&all).await {
            Ok(o) => o,
            Err(e) => {
                // Not fatal: the messages are durable; clients get them by sync.
                if let Some(n) = count_rarely(&self.stats.presence_failed_total) {
                    log::warn!(
                        "logic: presence lookup failed ({n} times so far), no live delivery for this batch: {e}"
                    );
                }
                return;
            }
        };
        for ((rec, s), users) in fresh.iter().zip(recipients) {
            let by_gw = by_gateway(&online, users);
            if by_gw.is_empty() {
                continue;
            }
            let mut json = Vec::with_capacity(rec.content.len() + 200);
            protocol::encode_msg(&message_of(rec, s.conv), &mut json);
            for (gw, users) in by_gw {
                // The sender's own connection already has the message: it gets `sent`.
                let except_conn = if gw == s.up.reply_to { s.up.conn } else { 0 };
                let d = records::Deliver {
                    users,
                    json: json.clone(),
                    except_conn,
                };
                self.down.send(gw, &rec.conv, DownstreamBody::Deliver(d));
            }
        }
    }
}

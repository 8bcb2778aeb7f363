//! Live delivery (README.md, "Distributed mode"): once a batch is durable and its ownership
//! confirmed, each new message goes to the gateways holding any recipient, one downstream
//! record per gateway (the JSON encoded once), and — offline push — a notification for each
//! recipient with no device online.

use super::{Admitted, Stage};
use crate::push::{Notification, Pusher};
use im_shared::metrics::count_rarely;
use im_shared::protocol::{self, Message, Target};
use im_shared::records::{self, DownstreamBody, Stored};
use im_shared::trace::TraceParent;
use im_shared::Conv;
use std::collections::HashMap;

impl Stage {
    /// Live delivery: one downstream record per gateway holding any recipient. `traces`,
    /// beside `fresh`, is what each message's records carry (its `im.route` span).
    pub(super) async fn route(
        &self,
        fresh: &[(&Stored, &Admitted)],
        traces: &[Option<TraceParent>],
    ) {
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
        for (i, ((rec, s), users)) in fresh.iter().zip(recipients).enumerate() {
            let trace = traces.get(i).and_then(Option::as_ref);
            if let Some(p) = &self.pusher {
                offer_push(p, rec, &users, &online);
            }
            let mut by_gw: HashMap<&str, Vec<u64>> = HashMap::new();
            for u in users {
                for gw in online.get(&u).into_iter().flatten() {
                    by_gw.entry(gw.as_str()).or_default().push(u);
                }
            }
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
                    conv: rec.conv.clone(),
                    seq: rec.seq,
                };
                self.down
                    .send_traced(gw, &rec.conv, DownstreamBody::Deliver(d), trace);
            }
        }
    }
}

/// Groups larger than this push to no one offline (a message to 10,000 would be 10,000
/// notifications; such groups are read, not rung).
pub const PUSH_GROUP_MEMBERS_MAX: usize = 500;

/// Offline push: a notification for each recipient of `rec` (not its sender) with no device
/// online.
fn offer_push(pusher: &Pusher, rec: &Stored, users: &[u64], online: &HashMap<u64, Vec<String>>) {
    if users.len() > PUSH_GROUP_MEMBERS_MAX {
        return;
    }
    let mut preview = None;
    for &u in users {
        if u == rec.from || online.contains_key(&u) {
            continue;
        }
        let preview = preview
            .get_or_insert_with(|| Notification::preview_of(&rec.content, &rec.content_type));
        pusher.offer(Notification {
            user: u,
            conv: rec.conv.clone(),
            from: rec.from,
            id: rec.id,
            seq: rec.seq,
            ts: rec.ts,
            preview: preview.clone(),
        });
    }
}

fn message_of(rec: &Stored, conv: Conv) -> Message {
    Message {
        id: rec.id,
        conv,
        seq: rec.seq,
        from: rec.from,
        to: if rec.to_group != 0 {
            Target::Group(rec.to_group)
        } else {
            Target::User(rec.to_user)
        },
        content: rec.content.clone(),
        content_type: rec.content_type.clone(),
        ts: rec.ts,
    }
}

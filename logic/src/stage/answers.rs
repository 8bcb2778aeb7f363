//! `sync` and `read`, answered from the database off the batch loop: each takes one of a
//! bounded number of slots first (a slow database gets `error` 5030, not an unbounded pile of
//! waiting tasks). Both go through the conversation's partition, so the stage knows the
//! conversation's last seq and waits (bounded) for persist to have stored it. A stored read
//! position is told to the reader's other devices (`read`) and, in a two-person
//! conversation, to the peer (`receipt`).

use super::downstream::Downstream;
use super::members::Members;
use super::sequencer::{self, Check};
use super::StageStats;
use im_bus::presence::Presence;
use im_shared::protocol::{self, Message, Target};
use im_shared::records;
use im_shared::{Conv, ErrorCode};
use im_store::{MessageRow, Store, View};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `sync` and `read` requests being answered at once (each holds a database connection).
pub(crate) const DB_TASKS_MAX: usize = 256;
/// How often a `sync` looks again for what persist has not written yet (it flushes every few
/// tens of milliseconds).
const STORED_POLL: Duration = Duration::from_millis(20);

/// What the answering tasks share.
#[derive(Clone)]
pub(crate) struct Answers {
    pub store: Arc<dyn Store>,
    pub members: Arc<Members>,
    pub blocks: Arc<super::blocks::Blocks>,
    pub presence: Arc<dyn Presence>,
    pub down: Downstream,
    pub stats: Arc<StageStats>,
    pub slots: Arc<Semaphore>,
    /// How long an answer waits for persist to catch up.
    pub wait: Duration,
}

type Refusal = (ErrorCode, String);

fn db_down() -> Refusal {
    (
        ErrorCode::DependencyDown,
        "the database is unavailable".into(),
    )
}

impl Answers {
    /// A slot for an answer; none free: the client gets a retryable 5030.
    fn slot(&self, up: &records::Upstream) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            let msg = "too many sync and read requests in progress: retry";
            self.down.reply_error(up, ErrorCode::Busy, msg, None);
        }
        permit
    }

    /// Answers a `sync`; `last` is the conversation's last seq as the stage knows it.
    pub(crate) fn sync(&self, up: &records::Upstream, s: records::Sync, last: u64) {
        let Some(conv) = Conv::parse(&s.conv) else {
            return self
                .down
                .reply_error(up, ErrorCode::InvalidField, "bad conv", None);
        };
        let limit = s.limit.clamp(1, protocol::SYNC_LIMIT_MAX);
        let want = last.min(s.after.saturating_add(limit as u64));
        let Some(permit) = self.slot(up) else {
            return;
        };
        let (a, up) = (self.clone(), up.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let json = match a.sync_answer(up.user, conv, s.after, limit, want).await {
                Ok(j) => j,
                Err((code, msg)) => {
                    let mut j = Vec::new();
                    protocol::encode_error(code, &msg, None, &mut j);
                    j
                }
            };
            a.stats.syncs_total.fetch_add(1, Ordering::Relaxed);
            a.down.reply(&up, json);
        });
    }

    /// Marks `conv` read up to `r.seq`, capped at what is stored once persist caught up with
    /// `last` (a client may mark a message read before persist has written it).
    pub(crate) fn read(&self, up: &records::Upstream, r: records::Read, last: u64) {
        let Some(conv) = Conv::parse(&r.conv) else {
            return self
                .down
                .reply_error(up, ErrorCode::InvalidField, "bad conv", None);
        };
        let Some(permit) = self.slot(up) else {
            return;
        };
        let (a, up) = (self.clone(), up.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // `last` is 0 for a conversation this instance has not seen since it took the
            // partition: then there is nothing in flight to wait for.
            let seq = r.seq.min(last);
            let result = match a.allowed(up.user, conv).await {
                Ok(()) => async {
                    im_store::wait_stored(&*a.store, &r.conv, seq, a.wait).await?;
                    let store = &a.store;
                    store
                        .update_membership(up.user, &r.conv, Some(r.seq), None, None)
                        .await
                }
                .await
                .map_err(|_| db_down()),
                Err(e) => Err(e),
            };
            match result {
                // The position as stored: what the other devices and the peer should show.
                Ok(stored) => a.tell_read(&up, conv, stored).await,
                Err((code, msg)) => a.down.reply_error(&up, code, &msg, None),
            }
        });
    }

    /// Tells the reader's other devices and the peer (`receipts`).
    async fn tell_read(&self, up: &records::Upstream, conv: Conv, seq: u64) {
        let reader = super::receipts::Reader {
            gateway: &up.reply_to,
            conn: up.conn,
        };
        let send = |gw: &str, key: &str, body| self.down.send(gw, key, body);
        let peer_told = !self.blocked_pair(up.user, conv).await;
        let r = super::receipts::Reading {
            user: up.user,
            reader: Some(reader),
            conv,
            seq,
            peer_told,
        };
        super::receipts::tell_read(&*self.presence, send, r).await;
    }

    /// A two-person conversation where either blocks the other (no receipts then); a
    /// database error counts as blocked (receipts are best effort).
    async fn blocked_pair(&self, user: u64, conv: Conv) -> bool {
        let Conv::Pair(a, b) = conv else {
            return false;
        };
        let peer = if a == user { b } else { a };
        !matches!(self.blocks.refusal(user, peer).await, Ok(None))
    }

    /// May `user` read `conv`?
    async fn allowed(&self, user: u64, conv: Conv) -> Result<(), Refusal> {
        match conv {
            Conv::Pair(..) if conv.has_party(user) => Ok(()),
            Conv::Pair(..) => Err((ErrorCode::NotFound, "no such conversation".into())),
            Conv::Group(g) => {
                let roster = self.members.of(g).await.map_err(|_| db_down())?;
                match sequencer::group_access(&roster, user, g) {
                    Check::Refused(code, msg) => Err((code, msg.into())),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The `sync` frame: up to `limit` messages after `after`, once the database holds them
    /// up to `want` (or the wait is over: then `more` says there is more to fetch).
    async fn sync_answer(
        &self,
        user: u64,
        conv: Conv,
        after: u64,
        limit: u32,
        want: u64,
    ) -> Result<Vec<u8>, Refusal> {
        self.allowed(user, conv).await?;
        // A member sees a group's messages from their join unless the group shows all.
        let view = match conv {
            Conv::Group(g) => match self.store.member_view(g, user).await {
                Ok(Some(view)) => view,
                Ok(None) => {
                    // Left since the (cached) member list was read: as for any non-member.
                    let roster = self.members.of(g).await.map_err(|_| db_down())?;
                    return Err(if roster.public {
                        (ErrorCode::Forbidden, "not a member of this group".into())
                    } else {
                        (ErrorCode::NotFound, "no such group".into())
                    });
                }
                Err(_) => return Err(db_down()),
            },
            Conv::Pair(..) => View::ALL,
        };
        let after = after.max(view.after_seq);
        let conv_s = conv.to_string();
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let rows = self
                .store
                .messages_after(&conv_s, after, limit + 1)
                .await
                .map_err(|_| db_down())?;
            let page = &rows[..rows.len().min(limit as usize)];
            let have = page.iter().map(|r| r.seq).max().unwrap_or(after);
            if have >= want || tokio::time::Instant::now() >= deadline {
                let more = rows.len() > limit as usize || have < want;
                // Filtered after `have` is taken: a hidden message still counts as stored.
                let msgs: Vec<Message> = page
                    .iter()
                    .filter(|r| view.shows(r))
                    .map(|r| message_of_row(r, conv))
                    .collect();
                let mut json = Vec::new();
                protocol::encode_sync(conv, &msgs, more, &mut json);
                return Ok(json);
            }
            tokio::time::sleep(STORED_POLL).await;
        }
    }
}

fn message_of_row(r: &MessageRow, conv: Conv) -> Message {
    Message {
        id: r.id,
        conv,
        seq: r.seq,
        from: r.sender,
        to: match (r.to_group, r.to_user) {
            (Some(g), _) => Target::Group(g),
            (None, u) => Target::User(u.unwrap_or(0)),
        },
        content: r.content.clone(),
        content_type: r.content_type.clone(),
        ts: r.ts_ms,
    }
}

//! Typing indicators: a `typing` frame is relayed to the conversation's other online
//! members as `{"type":"typing","conv","from"}`, never stored. A client sends one every few
//! seconds while its user types; a receiver shows the indicator for 5 s after the last one
//! (or until a message from that user arrives: docs/PROTOCOL.md).
//!
//! Bounded four ways: one relay per (user, conversation) per `INTERVAL_MS` (the rest are
//! dropped here, after the gateway's per-connection message budget has already charged for
//! them); groups of more than `GROUP_MEMBERS_MAX` members get none (a typing frame to 10,000
//! people is traffic nobody reads); at most `RELAYS_MAX` relays in progress at once; and the
//! table of last relays is cleared when it is full.

use super::blocks::Blocks;
use super::downstream::Downstream;
use super::members::Members;
use super::StageStats;
use im_bus::presence::Presence;
use im_shared::records;
use im_shared::{protocol, Conv};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// At most one relay per user and conversation in this long.
pub const INTERVAL_MS: u64 = 2_000;
/// Groups larger than this relay no typing.
pub const GROUP_MEMBERS_MAX: usize = 500;
/// (user, conversation) pairs remembered; past it the table starts over (a few extra relays).
const REMEMBERED_MAX: usize = 100_000;

pub(crate) struct TypingRelay {
    members: Arc<Members>,
    blocks: Arc<Blocks>,
    presence: Arc<dyn Presence>,
    down: Downstream,
    stats: Arc<StageStats>,
    recent: Mutex<Recent>,
    /// Relays in progress at once (each may wait on the database or presence); past it,
    /// typing is dropped.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Relays in progress at once, at most.
const RELAYS_MAX: usize = 256;

/// When each (user, conversation) was last relayed, in Unix ms.
#[derive(Default)]
struct Recent {
    last: HashMap<(u64, Conv), u64>,
}

impl Recent {
    /// Whether `user`'s typing in `conv` at `now_ms` is relayed (one per `INTERVAL_MS`).
    fn admit(&mut self, user: u64, conv: Conv, now_ms: u64) -> bool {
        let last = &mut self.last;
        if last.len() >= REMEMBERED_MAX {
            last.retain(|_, at| now_ms.saturating_sub(*at) < INTERVAL_MS);
            if last.len() >= REMEMBERED_MAX {
                last.clear();
            }
        }
        match last.get(&(user, conv)) {
            Some(&at) if now_ms.saturating_sub(at) < INTERVAL_MS => false,
            _ => {
                last.insert((user, conv), now_ms);
                true
            }
        }
    }
}

impl TypingRelay {
    pub(crate) fn new(
        members: Arc<Members>,
        blocks: Arc<Blocks>,
        presence: Arc<dyn Presence>,
        down: Downstream,
        stats: Arc<StageStats>,
    ) -> TypingRelay {
        TypingRelay {
            members,
            blocks,
            presence,
            down,
            stats,
            recent: Mutex::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(RELAYS_MAX)),
        }
    }

    /// Relays one `typing` (off the batch loop: the member list and presence may need a
    /// round trip).
    pub(crate) fn relay(self: &Arc<Self>, up: &records::Upstream, t: records::Typing) {
        let dropped = || {
            self.stats
                .typing_dropped_total
                .fetch_add(1, Ordering::Relaxed)
        };
        let Some(conv) = Conv::parse(&t.conv) else {
            dropped();
            return;
        };
        let admitted = (self.recent.lock())
            .unwrap_or_else(|p| p.into_inner())
            .admit(up.user, conv, im_shared::unix_ms());
        if !admitted {
            dropped();
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            dropped();
            return;
        };
        let (relay, user) = (self.clone(), up.user);
        tokio::spawn(async move {
            let _slot = slot;
            relay.tell(user, conv).await
        });
    }

    async fn tell(&self, user: u64, conv: Conv) {
        let mut recipients: Vec<u64> = match conv {
            Conv::Pair(a, b) if conv.has_party(user) => vec![if a == user { b } else { a }],
            Conv::Pair(..) => Vec::new(),
            Conv::Group(g) => match self.members.of(g).await {
                Ok(r)
                    if r.members.binary_search(&user).is_ok()
                        && r.members.len() <= GROUP_MEMBERS_MAX =>
                {
                    r.members.iter().copied().filter(|&m| m != user).collect()
                }
                _ => Vec::new(),
            },
        };
        // Nobody hears typing from someone they block (nor, in a pair, the other way).
        match (conv, recipients.first()) {
            (_, None) => {}
            (Conv::Pair(..), Some(&peer)) => {
                if !matches!(self.blocks.refusal(user, peer).await, Ok(None)) {
                    recipients.clear();
                }
            }
            (Conv::Group(_), Some(_)) => match self.blocks.blockers_of(user).await {
                Ok(b) => recipients.retain(|r| b.binary_search(r).is_err()),
                Err(_) => recipients.clear(),
            },
        }
        if recipients.is_empty() {
            self.stats
                .typing_dropped_total
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut json = Vec::with_capacity(64);
        protocol::encode_typing(conv, user, &mut json);
        let send = |gw: &str, key: &str, body| self.down.send(gw, key, body);
        let key = conv.to_string();
        if let Err(e) =
            super::online::tell_users(&*self.presence, send, &recipients, &key, &json).await
        {
            return log::debug!("logic: typing not relayed: {e}");
        }
        self.stats
            .typing_relayed_total
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_relay_per_user_and_conversation_per_interval() {
        let mut relay = Recent::default();
        let (p, g) = (Conv::Pair(1, 2), Conv::Group(9));
        assert!(relay.admit(1, p, 10_000));
        assert!(!relay.admit(1, p, 11_999), "within the interval");
        assert!(relay.admit(1, g, 11_999), "another conversation");
        assert!(relay.admit(2, p, 11_999), "another user");
        assert!(relay.admit(1, p, 12_000), "the interval is over");
    }
}

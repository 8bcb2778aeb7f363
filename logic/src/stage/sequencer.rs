//! The sequencer: the stage's decisions, without I/O (the quinn-proto treatment, STYLE.md).
//! Records and lookup results go in; decisions come out. The async `Stage` (`mod.rs`) does the
//! I/O each decision asks for: database lookups, producing to `im.messages`, answering.
//!
//! For one batch of `send`s (in partition order):
//! 1. `check` — may the sender write to the target? `Ready(conv)`, `Refused`, or a lookup it
//!    needs first (`NeedsUser`: does the sender, then the recipient, exist — a token can
//!    name a user that does not; `NeedsMembers`: the group's members), answered with
//!    `user_exists` or `group_access`.
//! 2. `lookups` — what the database must tell before sequencing: the retries older than the
//!    in-memory window, and the last seq of conversations not seen since recovery.
//! 3. `decide` — for each admitted send, `RetryOf(ack)` (seen before: the same ack again) or
//!    `Assigned(record)` (a new Snowflake id and the conversation's next seq), remembering the
//!    ack so a replay of the batch decides the same.
//!
//! One writer per partition (state.rs says why), so seqs are handed out from memory.

use super::state::{Ack, Partition};
use im_shared::records::{self, Stored};
use im_shared::snowflake::{Leased, WorkerLease};
use im_shared::{Conv, ErrorCode};
use im_store::Roster;
use std::collections::{HashMap, HashSet};

/// Users known to exist (accounts are never deleted), so a 1:1 send costs no query; cleared
/// when full.
const KNOWN_USERS_MAX: usize = 1 << 20;

/// Whether a send may go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Ready(Conv),
    Refused(ErrorCode, &'static str),
    /// Ask the database whether this user exists, then `user_exists`.
    NeedsUser(u64),
    /// Read this group's members, then `group_access`.
    NeedsMembers(u64),
}

/// A send that passed its check, waiting for its seq.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub up: records::Upstream,
    pub send: records::Send,
    pub conv: Conv,
    pub partition: i32,
}

/// What the database must answer before `decide`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lookups {
    /// (sender, cid) not in the in-memory retry window: maybe stored long ago.
    pub cids: Vec<(u64, String)>,
    /// Conversations whose last seq this instance does not know.
    pub convs: Vec<String>,
}

impl Lookups {
    pub fn is_empty(&self) -> bool {
        self.cids.is_empty() && self.convs.is_empty()
    }
}

/// What to do with one admitted send.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Seen before: answer `sent` with this ack again; nothing is produced.
    RetryOf(Ack),
    /// New: produce this record to `im.messages`; once durable, answer and route it.
    Assigned(Stored),
    /// Not sequenced, nothing remembered: this instance holds no valid Snowflake lease (its
    /// Redis is down past the lease's TTL, or it lost the id). The sender retries with the
    /// same cid.
    Refused(ErrorCode, &'static str),
}

pub struct Sequencer {
    parts: HashMap<i32, Partition>,
    snowflake: Leased,
    known_users: HashSet<u64>,
}

impl Sequencer {
    pub fn new(lease: std::sync::Arc<WorkerLease>) -> Sequencer {
        Sequencer {
            parts: HashMap::new(),
            snowflake: Leased::new(lease),
            known_users: HashSet::new(),
        }
    }

    /// Whether `partition`'s state is here (else the stage recovers it first).
    pub fn has(&self, partition: i32) -> bool {
        self.parts.contains_key(&partition)
    }

    /// A partition's state, recovered by the stage.
    pub fn recovered(&mut self, partition: i32, state: Partition) {
        self.parts.insert(partition, state);
    }

    /// A partition was assigned or revoked: its state is rebuilt before its next record
    /// (another instance may have written to it in between).
    pub fn forget(&mut self, partition: i32) {
        self.parts.remove(&partition);
    }

    /// Every partition's state is rebuilt before its next record.
    pub fn forget_all(&mut self) {
        self.parts.clear();
    }

    /// The last seq handed out in `conv`, if this instance knows it.
    pub fn last_seq(&self, partition: i32, conv: &str) -> Option<u64> {
        self.parts.get(&partition)?.last_seq(conv)
    }

    /// May `sender` send `s`?
    pub fn check(&self, sender: u64, s: &records::Send) -> Check {
        if !self.known_users.contains(&sender) {
            return Check::NeedsUser(sender);
        }
        match (s.to_user, s.to_group) {
            (to, 0) if to != 0 => match Conv::pair(sender, to) {
                None => {
                    Check::Refused(ErrorCode::InvalidField, "cannot send a message to yourself")
                }
                Some(conv) if self.known_users.contains(&to) => Check::Ready(conv),
                Some(_) => Check::NeedsUser(to),
            },
            (0, g) if g != 0 => Check::NeedsMembers(g),
            _ => Check::Refused(ErrorCode::InvalidField, "give `to` or `group`"),
        }
    }

    /// The answer to `NeedsUser(user)` for `sender`'s `s`: the next step of its check.
    pub fn user_exists(
        &mut self,
        sender: u64,
        s: &records::Send,
        user: u64,
        exists: bool,
    ) -> Check {
        match (exists, user == sender) {
            (false, true) => {
                return Check::Refused(
                    ErrorCode::Unauthorized,
                    "the token's user does not exist: log in again",
                )
            }
            (false, false) => return Check::Refused(ErrorCode::NotFound, "no such user"),
            (true, _) => {}
        }
        if self.known_users.len() >= KNOWN_USERS_MAX {
            self.known_users.clear();
        }
        self.known_users.insert(user);
        self.check(sender, s)
    }

    /// What the database must answer for `sends`.
    pub fn lookups(&self, sends: &[Admitted]) -> Lookups {
        let mut l = Lookups::default();
        for s in sends {
            let part = &self.parts[&s.partition];
            if part.ack(s.up.user, &s.send.cid).is_none() {
                l.cids.push((s.up.user, s.send.cid.clone()));
            }
            let c = s.conv.to_string();
            if part.last_seq(&c).is_none() && !l.convs.contains(&c) {
                l.convs.push(c);
            }
        }
        l
    }

    /// Decides each of `sends`, in order. `stored`: acks of (sender, cid) the database holds;
    /// `db_max`: the database's last seq of conversations; `now_ms`: the messages' time.
    pub fn decide(
        &mut self,
        sends: &[Admitted],
        stored: &HashMap<(u64, String), Ack>,
        db_max: &HashMap<String, u64>,
        now_ms: u64,
    ) -> Vec<Decision> {
        let mut out = Vec::with_capacity(sends.len());
        for s in sends {
            let part = self
                .parts
                .get_mut(&s.partition)
                .expect("the stage recovers a partition before its first send");
            let (sender, cid) = (s.up.user, &s.send.cid);
            if let Some(ack) = part.ack(sender, cid) {
                out.push(Decision::RetryOf(ack));
                continue;
            }
            if let Some(ack) = stored.get(&(sender, cid.clone())) {
                part.remember(sender, cid, ack.clone());
                out.push(Decision::RetryOf(ack.clone()));
                continue;
            }
            // The id first: without one, no seq is taken (no gap) and nothing remembered.
            let Some(id) = self.snowflake.next(now_ms) else {
                out.push(Decision::Refused(
                    ErrorCode::DependencyDown,
                    "no message ids: this logic instance has no Snowflake worker lease (Redis); retry with the same cid",
                ));
                continue;
            };
            let conv = s.conv.to_string();
            let seq = part.next_seq(&conv, db_max.get(&conv).copied());
            let ack = Ack {
                id,
                conv: conv.clone(),
                seq,
                ts: now_ms,
            };
            part.remember(sender, cid, ack);
            out.push(Decision::Assigned(Stored {
                version: records::VERSION,
                id,
                conv,
                seq,
                from: sender,
                to_user: s.send.to_user,
                to_group: s.send.to_group,
                content: s.send.content.clone(),
                content_type: s.send.content_type.clone(),
                ts: now_ms,
                cid: cid.clone(),
                epoch: part.epoch,
                fence: false,
            }));
        }
        out
    }
}

/// The answer to `NeedsMembers(group)`, given its roster (members sorted). A non-member is
/// told a private group does not exist, as if there were none: its id reveals nothing.
pub fn group_access(roster: &Roster, sender: u64, group: u64) -> Check {
    if roster.members.binary_search(&sender).is_ok() {
        Check::Ready(Conv::Group(group))
    } else if roster.public {
        Check::Refused(ErrorCode::Forbidden, "not a member of this group")
    } else {
        Check::Refused(ErrorCode::NotFound, "no such group")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::stage) fn send(
        from: u64,
        cid: &str,
        to_user: u64,
        to_group: u64,
        partition: i32,
    ) -> Admitted {
        let conv = if to_group != 0 {
            Conv::Group(to_group)
        } else {
            Conv::pair(from, to_user).unwrap()
        };
        Admitted {
            up: records::Upstream {
                user: from,
                ..Default::default()
            },
            send: records::Send {
                cid: cid.into(),
                to_user,
                to_group,
                content: "hi".into(),
                ..Default::default()
            },
            conv,
            partition,
        }
    }

    fn assigned(d: &Decision) -> &Stored {
        match d {
            Decision::Assigned(s) => s,
            other => panic!("expected Assigned, got {other:?}"),
        }
    }

    #[test]
    fn checks_ask_for_what_they_cannot_know() {
        let mut s = Sequencer::new(std::sync::Arc::new(WorkerLease::fixed(1)));
        let to = |u, g| records::Send {
            to_user: u,
            to_group: g,
            ..Default::default()
        };
        // The sender first: a token may name a user that does not exist.
        assert_eq!(s.check(1, &to(2, 0)), Check::NeedsUser(1));
        assert!(matches!(
            s.user_exists(1, &to(2, 0), 1, false),
            Check::Refused(ErrorCode::Unauthorized, _)
        ));
        assert_eq!(s.user_exists(1, &to(2, 0), 1, true), Check::NeedsUser(2));
        assert_eq!(
            s.user_exists(1, &to(2, 0), 2, true),
            Check::Ready(Conv::pair(1, 2).unwrap())
        );
        assert_eq!(
            s.check(1, &to(2, 0)),
            Check::Ready(Conv::pair(1, 2).unwrap())
        );
        assert!(matches!(
            s.user_exists(1, &to(3, 0), 3, false),
            Check::Refused(ErrorCode::NotFound, _)
        ));
        assert!(matches!(
            s.check(1, &to(1, 0)),
            Check::Refused(ErrorCode::InvalidField, _)
        ));
        assert!(matches!(
            s.check(1, &to(0, 0)),
            Check::Refused(ErrorCode::InvalidField, _)
        ));
        assert_eq!(s.check(1, &to(0, 9)), Check::NeedsMembers(9));
        let roster = |public, members: &[u64]| Roster {
            public,
            members: members.to_vec(),
        };
        for public in [false, true] {
            assert_eq!(
                group_access(&roster(public, &[1, 5]), 1, 9),
                Check::Ready(Conv::Group(9))
            );
        }
        assert!(matches!(
            group_access(&roster(true, &[2, 5]), 1, 9),
            Check::Refused(ErrorCode::Forbidden, _)
        ));
        assert!(
            matches!(
                group_access(&roster(false, &[2, 5]), 1, 9),
                Check::Refused(ErrorCode::NotFound, _)
            ),
            "a private group does not exist for a non-member"
        );
        assert!(matches!(
            group_access(&Roster::default(), 1, 9),
            Check::Refused(ErrorCode::NotFound, _)
        ));
    }

    /// Without a valid worker lease nothing is minted: the send is refused with a retryable
    /// code, takes no seq (no gap) and is not remembered (its retry is sequenced afresh).
    #[test]
    fn without_a_worker_lease_sends_are_refused_without_a_gap() {
        use im_shared::snowflake::{SEQ_BITS, WORKER_MAX};
        use std::time::{Duration, Instant};
        let lease = std::sync::Arc::new(WorkerLease::none());
        lease.grant(3, Instant::now() + Duration::from_secs(60));
        let mut s = Sequencer::new(lease.clone());
        s.recovered(0, Partition::default());
        let (none, no_max) = (HashMap::new(), HashMap::new());
        let worker = |d: &Decision| match d {
            Decision::Assigned(r) => ((r.id >> SEQ_BITS) & WORKER_MAX as u64, r.seq),
            other => panic!("{other:?}"),
        };
        let d = s.decide(&[send(1, "a", 2, 0, 0)], &none, &no_max, 1_000);
        assert_eq!(worker(&d[0]), (3, 1));
        // The lease runs out (Redis down past its TTL) or is lost.
        lease.revoke();
        let d = s.decide(&[send(1, "b", 2, 0, 0)], &none, &no_max, 1_001);
        assert!(matches!(
            d[0],
            Decision::Refused(ErrorCode::DependencyDown, _)
        ));
        // Leased again, under another id: the retry of "b" gets the next seq, no gap.
        lease.grant(8, Instant::now() + Duration::from_secs(60));
        let d = s.decide(&[send(1, "b", 2, 0, 0)], &none, &no_max, 1_002);
        assert_eq!(worker(&d[0]), (8, 2));
    }

    #[test]
    fn seqs_continue_from_the_database_and_per_conversation() {
        let mut s = Sequencer::new(std::sync::Arc::new(WorkerLease::fixed(1)));
        s.recovered(0, Partition::default());
        let batch = [
            send(1, "a", 2, 0, 0),
            send(2, "b", 1, 0, 0),
            send(1, "c", 0, 7, 0),
        ];
        let l = s.lookups(&batch);
        assert_eq!(l.cids.len(), 3);
        assert_eq!(l.convs, vec!["p:1:2".to_string(), "g:7".to_string()]);
        let db_max = HashMap::from([("p:1:2".to_string(), 41)]);
        let d = s.decide(&batch, &HashMap::new(), &db_max, 1_000);
        let seqs: Vec<(String, u64)> = d
            .iter()
            .map(|d| (assigned(d).conv.clone(), assigned(d).seq))
            .collect();
        assert_eq!(
            seqs,
            vec![
                ("p:1:2".into(), 42),
                ("p:1:2".into(), 43),
                ("g:7".into(), 1)
            ]
        );
        assert!(assigned(&d[0]).id < assigned(&d[1]).id, "ids grow");
        assert_eq!(s.last_seq(0, "p:1:2"), Some(43));
        assert!(
            s.lookups(&[send(1, "z", 2, 0, 0)]).convs.is_empty(),
            "known now"
        );
    }

    #[test]
    fn retries_get_the_first_ack_from_memory_or_the_database() {
        let mut s = Sequencer::new(std::sync::Arc::new(WorkerLease::fixed(1)));
        s.recovered(0, Partition::default());
        let first = s.decide(
            &[send(1, "a", 2, 0, 0)],
            &HashMap::new(),
            &HashMap::new(),
            5,
        );
        let ack = match &first[0] {
            Decision::Assigned(r) => Ack {
                id: r.id,
                conv: r.conv.clone(),
                seq: r.seq,
                ts: r.ts,
            },
            d => panic!("{d:?}"),
        };
        // A retry in a later batch, and twice in one batch: the same ack, nothing new.
        let again = [send(1, "a", 2, 0, 0), send(1, "a", 2, 0, 0)];
        assert!(s.lookups(&again).cids.is_empty());
        let d = s.decide(&again, &HashMap::new(), &HashMap::new(), 6);
        assert_eq!(
            d,
            vec![Decision::RetryOf(ack.clone()), Decision::RetryOf(ack)]
        );
        // After a rebalance only the database knows it.
        s.forget(0);
        s.recovered(0, Partition::default());
        let old = Ack {
            id: 77,
            conv: "p:1:2".into(),
            seq: 3,
            ts: 1,
        };
        let stored = HashMap::from([((1, "a".to_string()), old.clone())]);
        let d = s.decide(&[send(1, "a", 2, 0, 0)], &stored, &HashMap::new(), 7);
        assert_eq!(d, vec![Decision::RetryOf(old)]);
        // Same cid, other sender: a new message.
        let d = s.decide(
            &[send(2, "a", 1, 0, 0)],
            &HashMap::new(),
            &HashMap::from([("p:1:2".to_string(), 3)]),
            8,
        );
        assert_eq!(assigned(&d[0]).seq, 4);
    }
}

//! Directory routing: which shards hold a user's connections. Each shard links its own
//! connections of a user (`local`, an intrusive list through `Conn`); the user's *home* shard
//! (`msg::home_shard`) keeps a bit mask of the shards holding any (`home`). A delivery goes to
//! the home shard as `Fanout`, which forwards a `Deliver` to each shard in the mask; that
//! shard writes the shared frame to each of the user's connections. A group message comes as
//! `FanoutMany` (the users of one home shard): the home shard delivers to its own connections
//! at once and sends each other shard holding members one `DeliverMany`. The mesh budget of a
//! turn counts deliveries, so a shard takes many group messages a turn and a member's frames
//! leave in one send.
//!
//! Directory updates (`Attach`, `Detach`) are never dropped; a delivery that meets a full ring
//! and backlog is counted and dropped (the client's sync recovers it).

use super::Shard;
use crate::arena::{Frame, NONE};
use crate::codec::close;
use crate::metrics::ShardStats;
use crate::msg::{self, ConnRef, ShardMsg, UpMsg};

impl Shard {
    pub(super) fn home_of(&self, user: u64) -> u16 {
        msg::home_shard(user, self.shards as usize)
    }

    pub(super) fn route(&mut self, dst: u16, msg: ShardMsg) -> Result<(), ShardMsg> {
        if dst == self.id {
            self.inbox.push_back(msg);
            Ok(())
        } else {
            self.mesh.send(dst, msg)
        }
    }

    /// Routes a message whose loss only costs a live delivery (the receiver syncs later).
    pub(super) fn route_or_count(&mut self, dst: u16, msg: ShardMsg) {
        if self.route(dst, msg).is_err() {
            ShardStats::add(&self.st().ring_dropped_total, 1);
        }
    }

    /// Directory updates are never dropped: a lost Attach would hide a user's devices from
    /// live delivery until they all reconnect. At most two per connection, so still bounded.
    pub(super) fn route_directory(&mut self, dst: u16, msg: ShardMsg) {
        if dst == self.id {
            self.inbox.push_back(msg);
        } else {
            self.mesh.send_unbounded(dst, msg);
        }
    }

    pub(super) fn run_inbox(&mut self) {
        // Handling a message can queue more for ourselves (at most three hops); the loop ends.
        while let Some(msg) = self.inbox.pop_front() {
            self.on_shard_msg(msg);
        }
    }

    pub(super) fn on_shard_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Attach { user, shard } => *self.home.entry(user).or_insert(0) |= 1 << shard,
            ShardMsg::Detach { user, shard } => {
                if let Some(mask) = self.home.get_mut(&user) {
                    *mask &= !(1 << shard);
                    if *mask == 0 {
                        self.home.remove(&user);
                    }
                }
            }
            ShardMsg::Submit(s) => self.sequence(*s),
            ShardMsg::Fanout {
                user,
                frame,
                except,
            } => self.fanout(&[user], frame, except),
            ShardMsg::FanoutMany {
                users,
                frame,
                except,
            } => self.fanout(&users, frame, except),
            ShardMsg::Deliver {
                user,
                frame,
                except,
            } => self.deliver(user, &frame, except),
            ShardMsg::DeliverMany {
                users,
                frame,
                except,
            } => {
                for &user in users.iter() {
                    self.deliver(user, &frame, except);
                }
            }
            ShardMsg::Kick { to } => {
                if self.is_live(to) {
                    self.begin_close(to.key, close::POLICY, "token revoked");
                }
            }
            ShardMsg::Reply { to, frame } => {
                if self.is_live(to) {
                    self.enqueue(to.key, frame);
                }
            }
        }
    }

    /// Whether `to` still names a connection of this shard (not a later one in its slot).
    fn is_live(&self, to: ConnRef) -> bool {
        self.conns
            .get(to.key as usize)
            .is_some_and(|c| c.gen == to.gen)
    }

    /// As the home shard of every user in `users`: their connections here get the frame at
    /// once (never from the back of the inbox, so a later fan-out cannot overtake it), and
    /// each other shard holding any of them one `Deliver` (one user) or `DeliverMany`.
    fn fanout(&mut self, users: &[u64], frame: Frame, except: ConnRef) {
        // With one shard `local` is the whole directory.
        if self.shards == 1 {
            for &user in users {
                self.deliver(user, &frame, except);
            }
            return;
        }
        let mut lists = std::mem::take(&mut self.fan_lists);
        lists.resize_with(self.shards as usize, Vec::new);
        for &user in users {
            let mut mask = self.home.get(&user).copied().unwrap_or(0);
            while mask != 0 {
                let shard = mask.trailing_zeros() as u16;
                mask &= mask - 1;
                if shard == self.id {
                    self.deliver(user, &frame, except);
                } else {
                    lists[shard as usize].push(user);
                }
            }
        }
        for (shard, list) in lists.iter_mut().enumerate() {
            let msg = match list[..] {
                [] => continue,
                // A 1:1 message's party: no list to allocate.
                [user] => ShardMsg::Deliver {
                    user,
                    frame: frame.clone(),
                    except,
                },
                _ => ShardMsg::DeliverMany {
                    users: list.as_slice().into(),
                    frame: frame.clone(),
                    except,
                },
            };
            list.clear();
            if let Err(m) = self.mesh.send(shard as u16, msg) {
                ShardStats::add(&self.st().ring_dropped_total, m.weight() as u64);
            }
        }
        self.fan_lists = lists;
    }

    /// The frame to each of the user's connections here, but `except` (the sender's own).
    fn deliver(&mut self, user: u64, frame: &Frame, except: ConnRef) {
        let mut key = self.local.get(&user).copied().unwrap_or(NONE);
        while key != NONE {
            let c = &self.conns[key as usize];
            let next = c.dev_next;
            let is_origin = except.shard == self.id && except.key == key && except.gen == c.gen;
            if !is_origin {
                ShardStats::add(&self.st().deliveries_total, 1);
                self.enqueue_delivery(key, frame.clone());
            }
            key = next;
        }
    }

    /// Adds `key` to this shard's directory (and tells the user's home shard on the first).
    /// `token`: the token's id and device, for presence (pipeline mode).
    pub(super) fn join(&mut self, key: u32, user: u64, token: (Box<str>, Option<Box<str>>)) {
        if self.mesh.has_bridge() {
            let conn = ConnRef {
                shard: self.id,
                key,
                gen: self.conns[key as usize].gen,
            };
            let (jti, device) = token;
            let online = UpMsg::Online {
                user,
                conn,
                jti,
                device,
            };
            self.mesh.send_up_always(online);
        }
        match self.local.get(&user).copied() {
            Some(head) => {
                self.conns[key as usize].dev_next = head;
                self.conns[head as usize].dev_prev = key;
                self.local.insert(user, key);
            }
            None => {
                self.local.insert(user, key);
                // With one shard `local` is the whole directory; a home map would repeat it.
                if self.shards > 1 {
                    let home = self.home_of(user);
                    self.route_directory(
                        home,
                        ShardMsg::Attach {
                            user,
                            shard: self.id,
                        },
                    );
                }
            }
        }
    }

    pub(super) fn leave(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let (user, prev, next) = (c.user, c.dev_prev, c.dev_next);
        c.dev_prev = NONE;
        c.dev_next = NONE;
        if self.mesh.has_bridge() {
            let conn = ConnRef {
                shard: self.id,
                key,
                gen: c.gen,
            };
            self.mesh.send_up_always(UpMsg::Offline { user, conn });
        }
        if next != NONE {
            self.conns[next as usize].dev_prev = prev;
        }
        if prev != NONE {
            self.conns[prev as usize].dev_next = next;
        } else if next != NONE {
            self.local.insert(user, next);
        } else {
            self.local.remove(&user);
            if self.shards > 1 {
                let home = self.home_of(user);
                self.route_directory(
                    home,
                    ShardMsg::Detach {
                        user,
                        shard: self.id,
                    },
                );
            }
        }
    }
}

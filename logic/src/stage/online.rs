//! Presence (docs/PROTOCOL.md, "Presence"): who is online, told to those who care.
//!
//! A gateway's presence writer sends one `PresenceEvent` per connection it opens or closes,
//! with the user's connection count over every gateway right after it (the store counts it
//! in the same step that records the change, so of two gateways exactly one sees a user's
//! first or last connection). Here, keyed by user, so one instance sees a user's events in
//! order:
//!
//! - **A first connection** (count 1): the user's contacts who are online get
//!   `{"type":"presence","user","online":true}` at once — unless the user's last
//!   connection closed less than `OFFLINE_DEBOUNCE` ago, when nobody was told it left.
//! - **A last connection** (count 0): after `OFFLINE_DEBOUNCE` (a page reload, a network
//!   switch, a phone moving between cells do not flicker), if no connection came back, the
//!   contacts get `online: false`. A device that vanishes without a close counts from its
//!   heartbeat timeout, when its gateway closes it.
//! - **Any other change** (a second device, one of several closing): the user's other
//!   devices get the same frame with `devices`, the device ids of their open connections.
//!
//! Contacts are the other users of the user's two-person conversations, less anyone either
//! blocks; a user who hides their presence has none. Nothing is kept per connection or per
//! watcher: contacts are read when a change happens (one indexed query), so an idle
//! connection costs nothing here and causes no traffic.
//!
//! Bounded: `RELAYS_MAX` relays in progress at once and `PENDING_MAX` debounces waiting;
//! past either, the event is dropped and counted (contacts then see the change late: at
//! their next look, `GET /users/{id}/presence`).

use super::blocks::Blocks;
use super::downstream::Downstream;
use super::StageStats;
use im_bus::presence::Presence;
use im_shared::protocol;
use im_shared::records::{self, Deliver, DownstreamBody};
use im_store::Store;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long after a user's last connection closes their contacts are told, if none came
/// back meanwhile.
pub const OFFLINE_DEBOUNCE: Duration = Duration::from_secs(2);
/// Two-person conversations read per user for their contacts.
pub const CONTACTS_MAX: u32 = 5_000;
/// Relays in progress at once, and users waiting out their debounce, at most.
const RELAYS_MAX: usize = 256;
const PENDING_MAX: usize = 100_000;

/// Who is told of `user`'s presence: the other users of their two-person conversations,
/// less anyone either of them blocks; nobody when they hide it (or do not exist).
pub(crate) async fn audience(
    store: &dyn Store,
    blocks: &Blocks,
    user: u64,
) -> Result<Vec<u64>, String> {
    let hidden = store
        .user_by_id(user)
        .await
        .map_err(|e| e.to_string())?
        .is_none_or(|u| u.presence_hidden);
    if hidden {
        return Ok(Vec::new());
    }
    let mut contacts = store
        .contacts(user, CONTACTS_MAX)
        .await
        .map_err(|e| e.to_string())?;
    let (blocked, blockers) = (blocks.of(user).await?, blocks.blockers_of(user).await?);
    contacts.retain(|c| blocked.binary_search(c).is_err() && blockers.binary_search(c).is_err());
    Ok(contacts)
}

/// Sends the frame `json` to every open connection of `users`: one `Deliver` record per
/// gateway holding any of them, keyed by `key`; `send` queues one record (gateway, key,
/// body). Returns how many records went out.
pub(crate) async fn tell_users(
    presence: &dyn Presence,
    send: impl Fn(&str, &str, DownstreamBody),
    users: &[u64],
    key: &str,
    json: &[u8],
) -> Result<usize, String> {
    if users.is_empty() {
        return Ok(0);
    }
    let online = presence.gateways(users).await?;
    let mut by_gateway: HashMap<&str, Vec<u64>> = HashMap::new();
    for u in users {
        for gw in online.get(u).into_iter().flatten() {
            by_gateway.entry(gw.as_str()).or_default().push(*u);
        }
    }
    let n = by_gateway.len();
    for (gw, users) in by_gateway {
        let body = DownstreamBody::Deliver(Deliver {
            users,
            json: json.to_vec(),
            ..Default::default()
        });
        send(gw, key, body);
    }
    Ok(n)
}

/// Tells `user`'s devices, except connection `except` (gateway, conn), which devices they
/// have open now.
pub(crate) async fn tell_own_devices(
    presence: &dyn Presence,
    send: impl Fn(&str, &str, DownstreamBody),
    user: u64,
    except: Option<(&str, u64)>,
) -> Result<(), String> {
    let conns = presence.connections(user).await?;
    let mut devices: Vec<&str> = conns.iter().map(|c| c.device.as_str()).collect();
    devices.sort_unstable();
    let mut json = Vec::with_capacity(80);
    protocol::encode_presence(user, !conns.is_empty(), Some(&devices), &mut json);
    let mut gateways: Vec<&str> = conns.iter().map(|c| c.gateway.as_str()).collect();
    gateways.sort_unstable();
    gateways.dedup();
    let key = user.to_string();
    for gw in gateways {
        let except_conn = match except {
            Some((g, conn)) if g == gw => conn,
            _ => 0,
        };
        // The connection that changed is the only one there: nobody else to tell.
        let mut here = conns.iter().filter(|c| c.gateway == gw);
        if here.all(|c| c.conn == except_conn) {
            continue;
        }
        let body = DownstreamBody::Deliver(Deliver {
            users: vec![user],
            json: json.clone(),
            except_conn,
            ..Default::default()
        });
        send(gw, &key, body);
    }
    Ok(())
}

pub(crate) struct OnlineRelay {
    store: Arc<dyn Store>,
    blocks: Arc<Blocks>,
    presence: Arc<dyn Presence>,
    down: Downstream,
    stats: Arc<StageStats>,
    /// Users whose last connection closed and whose contacts are not told yet, with the
    /// ticket of that close (a later close supersedes it).
    pending: Mutex<HashMap<u64, u64>>,
    tickets: AtomicU64,
    slots: Arc<tokio::sync::Semaphore>,
}

/// What one event asks for (`OnlineRelay::decide`, without I/O).
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Tell the contacts the user came online.
    Arrived,
    /// A connection came back within the debounce: the contacts never heard it left.
    Resumed,
    /// Wait out the debounce, then tell the contacts the user left (ticket).
    Leaving(u64),
    /// Tell the user's other devices their device list.
    Devices,
}

impl OnlineRelay {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        blocks: Arc<Blocks>,
        presence: Arc<dyn Presence>,
        down: Downstream,
        stats: Arc<StageStats>,
    ) -> OnlineRelay {
        OnlineRelay {
            store,
            blocks,
            presence,
            down,
            stats,
            pending: Mutex::default(),
            tickets: AtomicU64::new(1),
            slots: Arc::new(tokio::sync::Semaphore::new(RELAYS_MAX)),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped(&self) {
        self.stats
            .presence_dropped_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The step for `user`'s event (`None`: dropped, the debounce table is full).
    fn decide(&self, user: u64, e: &records::PresenceEvent) -> Option<Step> {
        let mut pending = self.pending();
        Some(match (e.online, e.connections) {
            (true, n) => {
                let resumed = pending.remove(&user).is_some();
                match (n, resumed) {
                    (0 | 1, false) => Step::Arrived,
                    (0 | 1, true) => Step::Resumed,
                    _ => Step::Devices,
                }
            }
            (false, 0) => {
                if pending.len() >= PENDING_MAX && !pending.contains_key(&user) {
                    return None;
                }
                let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
                pending.insert(user, ticket);
                Step::Leaving(ticket)
            }
            (false, _) => Step::Devices,
        })
    }

    /// One presence event from a gateway (off the batch loop: it needs the database and
    /// presence).
    pub(crate) fn event(self: &Arc<Self>, up: &records::Upstream, e: records::PresenceEvent) {
        self.stats
            .presence_events_total
            .fetch_add(1, Ordering::Relaxed);
        let user = up.user;
        let Some(step) = self.decide(user, &e) else {
            return self.dropped();
        };
        if step == Step::Resumed {
            return;
        }
        let relay = self.clone();
        let (gateway, conn) = (up.reply_to.clone(), up.conn);
        if let Step::Leaving(ticket) = step {
            // The debounce holds no slot: thousands may wait at once.
            tokio::spawn(async move {
                tokio::time::sleep(OFFLINE_DEBOUNCE).await;
                let still = relay.pending().get(&user) == Some(&ticket);
                if !still {
                    return;
                }
                let Ok(_slot) = relay.slots.clone().try_acquire_owned() else {
                    relay.pending().remove(&user);
                    return relay.dropped();
                };
                relay.left(user, ticket).await
            });
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return self.dropped();
        };
        tokio::spawn(async move {
            let _slot = slot;
            let send = |gw: &str, key: &str, body| relay.down.send(gw, key, body);
            let told = match step {
                Step::Arrived => relay.tell_contacts(user, true).await,
                _ => {
                    tell_own_devices(&*relay.presence, send, user, Some((gateway.as_str(), conn)))
                        .await
                }
            };
            if let Err(e) = told {
                log::debug!("logic: presence of user {user} not told: {e}");
            }
        });
    }

    /// The debounce of `user`'s last connection is over: their contacts are told, unless a
    /// connection came back (here, or through another instance during a rebalance).
    async fn left(&self, user: u64, ticket: u64) {
        {
            let mut pending = self.pending();
            if pending.get(&user) != Some(&ticket) {
                return;
            }
            pending.remove(&user);
        }
        match self.presence.gateways(&[user]).await {
            Ok(g) if g.contains_key(&user) => {}
            Ok(_) => {
                if let Err(e) = self.tell_contacts(user, false).await {
                    log::debug!("logic: presence of user {user} not told: {e}");
                }
            }
            Err(e) => log::debug!("logic: presence of user {user} not told: {e}"),
        }
    }

    async fn tell_contacts(&self, user: u64, online: bool) -> Result<(), String> {
        let audience = audience(&*self.store, &self.blocks, user).await?;
        // An arrival told late (the lookups took a while) must not follow a departure that
        // was told meanwhile: still online, or nothing.
        if online && !self.presence.gateways(&[user]).await?.contains_key(&user) {
            return Ok(());
        }
        let mut json = Vec::with_capacity(64);
        protocol::encode_presence(user, online, None, &mut json);
        let send = |gw: &str, key: &str, body| self.down.send(gw, key, body);
        tell_users(&*self.presence, send, &audience, &user.to_string(), &json).await?;
        self.stats
            .presence_told_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_bus::presence::{Change, MemoryPresence};
    use im_bus::{Done, Producer, SendError};

    fn event(online: bool, connections: u32) -> records::PresenceEvent {
        records::PresenceEvent {
            online,
            connections,
        }
    }

    /// A producer that takes everything and delivers nothing.
    struct Sink;
    impl Producer for Sink {
        fn send_traced(
            &self,
            _topic: &str,
            _partition: Option<i32>,
            _key: &str,
            _payload: &[u8],
            _trace: Option<&im_bus::TraceParent>,
            _done: Option<Done>,
        ) -> Result<(), SendError> {
            Ok(())
        }
        fn flush(&self, _: Duration) {}
        fn in_flight(&self) -> usize {
            0
        }
    }

    /// A relay on a real (SQLite) store and presence in memory.
    async fn relay() -> OnlineRelay {
        let store: Arc<dyn Store> =
            Arc::new(im_store::testing::fresh_sqlite(&im_store::testing::tempdir()).await);
        let blocks = Arc::new(Blocks::new(store.clone()));
        let stats = Arc::new(StageStats::default());
        let down = Downstream::new(Arc::new(Sink), stats.clone());
        let presence = Arc::new(MemoryPresence::default());
        OnlineRelay::new(store, blocks, presence, down, stats)
    }

    #[tokio::test]
    async fn a_close_and_a_reopen_within_the_debounce_tell_nobody() {
        let r = relay().await;
        assert_eq!(r.decide(7, &event(true, 1)), Some(Step::Arrived));
        assert_eq!(r.decide(7, &event(true, 2)), Some(Step::Devices));
        assert_eq!(r.decide(7, &event(false, 1)), Some(Step::Devices));
        let Some(Step::Leaving(first)) = r.decide(7, &event(false, 0)) else {
            panic!("the last close waits out the debounce");
        };
        assert_eq!(r.decide(7, &event(true, 1)), Some(Step::Resumed));
        assert!(r.pending().is_empty(), "the reopen cancels the debounce");
        // A later close supersedes an earlier one's ticket.
        let Some(Step::Leaving(second)) = r.decide(7, &event(false, 0)) else {
            panic!();
        };
        assert_ne!(first, second);
        assert_eq!(r.pending().get(&7), Some(&second));
    }

    #[tokio::test]
    async fn the_debounce_tells_contacts_only_if_nobody_came_back() {
        let r = relay().await;
        let Some(Step::Leaving(t)) = r.decide(7, &event(false, 0)) else {
            panic!();
        };
        // User 7 is connected again (through another instance, say): nobody is told.
        let change = Change::Online {
            user: 7,
            conn: 1,
            jti: "j".into(),
            device: None,
        };
        r.presence.apply("gw", &[change]).await.unwrap();
        r.left(7, t).await;
        assert_eq!(r.stats.presence_told_total.load(Ordering::Relaxed), 0);
        assert!(r.pending().is_empty());
        // Gone for good: told (to nobody here: user 7 has no contacts, and does not exist).
        let Some(Step::Leaving(t)) = r.decide(7, &event(false, 0)) else {
            panic!();
        };
        let change = Change::Offline { user: 7, conn: 1 };
        r.presence.apply("gw", &[change]).await.unwrap();
        r.left(7, t).await;
        assert_eq!(r.stats.presence_told_total.load(Ordering::Relaxed), 1);
    }
}

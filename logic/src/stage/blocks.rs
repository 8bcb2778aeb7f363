//! Who blocks whom, as sends, receipts and typing check it (docs/PROTOCOL.md, "Blocking"):
//! per user, the ids they block (for most users none), cached. An entry is trusted for `TTL`;
//! a change made through this instance's REST API drops it at once (`invalidate`), other
//! instances see it within `TTL`.

use im_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Blocks {
    store: Arc<dyn Store>,
    /// By user: whom they block.
    cache: Mutex<HashMap<u64, Cached>>,
    /// By user: who blocks them (for group typing).
    blockers: Mutex<HashMap<u64, Cached>>,
}

/// When a user's list was read, and the list.
type Cached = (Instant, Arc<[u64]>);

const TTL: Duration = Duration::from_secs(5);
const CACHED_USERS_MAX: usize = 200_000;

/// Why a two-person message (or receipt, or typing) does not go through.
pub const BLOCKED_BY_THEM: &str = "this user does not accept your messages";
pub const BLOCKED_BY_YOU: &str = "you have blocked this user: unblock them to write";

impl Blocks {
    pub fn new(store: Arc<dyn Store>) -> Blocks {
        Blocks {
            store,
            cache: Mutex::default(),
            blockers: Mutex::default(),
        }
    }

    /// The ids `user` blocks, ascending.
    pub async fn of(&self, user: u64) -> Result<Arc<[u64]>, String> {
        cached(&self.cache, user, || self.store.blocked_by(user)).await
    }

    /// The ids of those who block `user`, ascending.
    pub async fn blockers_of(&self, user: u64) -> Result<Arc<[u64]>, String> {
        cached(&self.blockers, user, || self.store.blockers_of(user)).await
    }

    /// Why `sender` may not write to `to` (either blocks the other), if so.
    pub async fn refusal(&self, sender: u64, to: u64) -> Result<Option<&'static str>, String> {
        if self.of(to).await?.binary_search(&sender).is_ok() {
            return Ok(Some(BLOCKED_BY_THEM));
        }
        if self.of(sender).await?.binary_search(&to).is_ok() {
            return Ok(Some(BLOCKED_BY_YOU));
        }
        Ok(None)
    }

    /// `user` blocked or unblocked `other`.
    pub fn invalidate(&self, user: u64, other: u64) {
        lock(&self.cache).remove(&user);
        lock(&self.blockers).remove(&other);
    }
}

fn lock(m: &Mutex<HashMap<u64, Cached>>) -> std::sync::MutexGuard<'_, HashMap<u64, Cached>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `user`'s entry of `map`, read again by `load` once older than `TTL`. While the database
/// fails, an older entry is served rather than nothing (a block is not lifted by an outage,
/// and sends do not stop for one).
async fn cached<F>(
    map: &Mutex<HashMap<u64, Cached>>,
    user: u64,
    load: impl FnOnce() -> F,
) -> Result<Arc<[u64]>, String>
where
    F: std::future::Future<Output = im_store::Result<Vec<u64>>>,
{
    let held = lock(map).get(&user).cloned();
    if let Some((at, ids)) = &held {
        if at.elapsed() < TTL {
            return Ok(ids.clone());
        }
    }
    let ids: Arc<[u64]> = match load().await {
        Ok(ids) => ids.into(),
        Err(e) => return held.map(|(_, ids)| ids).ok_or_else(|| e.to_string()),
    };
    let mut m = lock(map);
    if m.len() >= CACHED_USERS_MAX {
        m.retain(|_, (at, _)| at.elapsed() < TTL);
        if m.len() >= CACHED_USERS_MAX {
            m.clear();
        }
    }
    m.insert(user, (Instant::now(), ids.clone()));
    Ok(ids)
}

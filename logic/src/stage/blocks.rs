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
    cache: Mutex<HashMap<u64, Cached>>,
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
        }
    }

    /// The ids `user` blocks, ascending.
    pub async fn of(&self, user: u64) -> Result<Arc<[u64]>, String> {
        let cached = self.lock().get(&user).cloned();
        if let Some((at, ids)) = cached {
            if at.elapsed() < TTL {
                return Ok(ids);
            }
        }
        let ids: Arc<[u64]> = self
            .store
            .blocked_by(user)
            .await
            .map_err(|e| e.to_string())?
            .into();
        let mut cache = self.lock();
        if cache.len() >= CACHED_USERS_MAX {
            cache.clear();
        }
        cache.insert(user, (Instant::now(), ids.clone()));
        Ok(ids)
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

    pub fn invalidate(&self, user: u64) {
        self.lock().remove(&user);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

//! Group member lists as the stage needs them (checks and routing), cached.

use im_store::{Roster, Store};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Group member lists, cached. An entry is trusted for `TTL`; a membership change made
/// through this instance's REST API drops it at once (`invalidate`). Other instances see a
/// change within `TTL`: a member who just left may get up to a second of messages, and one who
/// just joined sees messages from that second through sync.
pub struct Members {
    store: Arc<dyn Store>,
    cache: std::sync::Mutex<HashMap<u64, Cached>>,
}

/// When a member list was read, and the list.
type Cached = (Instant, Arc<Roster>);

const TTL: Duration = Duration::from_secs(1);
const CACHED_GROUPS_MAX: usize = 100_000;

impl Members {
    pub fn new(store: Arc<dyn Store>) -> Members {
        Members {
            store,
            cache: Default::default(),
        }
    }

    /// Sorted member ids and whether the group is public (no such group: a private group
    /// with no members, which is what a non-member is told of a private group too).
    pub async fn of(&self, group: u64) -> Result<Arc<Roster>, String> {
        if let Some((at, m)) = self.cache.lock().expect("not poisoned").get(&group) {
            if at.elapsed() < TTL {
                return Ok(m.clone());
            }
        }
        let mut roster = self
            .store
            .roster(group)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        roster.members.sort_unstable();
        let ids = Arc::new(roster);
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.len() >= CACHED_GROUPS_MAX {
            cache.clear();
        }
        cache.insert(group, (Instant::now(), ids.clone()));
        Ok(ids)
    }

    pub fn invalidate(&self, group: u64) {
        self.cache.lock().expect("not poisoned").remove(&group);
    }
}

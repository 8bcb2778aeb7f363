//! Which gateway a client should connect to (docs/PROTOCOL.md, "Gateways and draining"):
//! login's `ws_url`, and `GET /gateways/pick` for a client whose gateway is draining (close
//! 1012). With a registry (`im_bus::registry`, in Redis), the least-loaded live gateway; a
//! burst of logins between two announcements is spread by counting where this instance sent
//! clients since the announced figures last changed. One request at a time refreshes the read
//! (once a second); the others never wait on the registry. Without one (standalone), or while the registry is empty or
//! unreachable, the configured `--ws-url`.

use super::{Caller, State};
use axum::extract::State as S;
use axum::Json;
use im_bus::registry::{least_loaded, Gateway, Registry, TTL_S};
use im_shared::metrics::count_rarely;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one read of the registry serves picks.
const REFRESH: Duration = Duration::from_secs(1);

/// The registry, for `ApiConfig` (which is `Debug`).
#[derive(Clone)]
pub struct GatewayRegistry(pub Arc<dyn Registry>);

impl std::fmt::Debug for GatewayRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayRegistry")
    }
}

#[derive(Default)]
struct Read {
    /// When the registry was last asked, and last answered.
    asked: Option<Instant>,
    answered: Option<Instant>,
    live: Vec<Gateway>,
    /// Clients sent to each URL since the announced figures last changed.
    sent: HashMap<String, u64>,
}

pub struct Picker {
    registry: Option<Arc<dyn Registry>>,
    fallback: String,
    /// Held for moments, never across a call to the registry.
    read: Mutex<Read>,
    /// One request at a time refreshes the read; the others pick from the one there is.
    refreshing: Arc<AtomicBool>,
    failures: AtomicU64,
}

/// Lets the next request refresh, however this one ends (done, or dropped mid-call).
struct Refreshing(Arc<AtomicBool>);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Picker {
    pub fn new(registry: Option<GatewayRegistry>, fallback: String) -> Picker {
        Picker {
            registry: registry.map(|r| r.0),
            fallback,
            read: Mutex::default(),
            refreshing: Arc::default(),
            failures: AtomicU64::new(0),
        }
    }

    /// The URL to send the next client to.
    pub async fn pick(&self) -> String {
        let Some(registry) = &self.registry else {
            return self.fallback.clone();
        };
        let stale = {
            let read = self.read.lock().expect("not poisoned");
            read.asked.is_none_or(|t| t.elapsed() >= REFRESH)
        };
        if stale && !self.refreshing.swap(true, Ordering::AcqRel) {
            let _turn = Refreshing(self.refreshing.clone());
            let got = registry.live().await;
            let mut read = self.read.lock().expect("not poisoned");
            read.asked = Some(Instant::now());
            match got {
                Ok(live) => {
                    // New figures count what was sent before them.
                    if live != read.live {
                        read.sent.clear();
                        read.live = live;
                    }
                    read.answered = read.asked;
                }
                Err(e) => {
                    if let Some(k) = count_rarely(&self.failures) {
                        log::warn!(
                            "gateway registry: {e} ({k} failed reads); picking from the last read"
                        );
                    }
                }
            }
        }
        let mut read = self.read.lock().expect("not poisoned");
        // A read older than an announcement's life may name gateways long gone.
        let fresh = read
            .answered
            .is_some_and(|t| t.elapsed() < Duration::from_secs(TTL_S));
        let url = match least_loaded(&read.live, &read.sent) {
            Some(g) if fresh => g.ws_url.clone(),
            _ => return self.fallback.clone(),
        };
        *read.sent.entry(url.clone()).or_default() += 1;
        url
    }
}

/// `GET /gateways/pick`: `{"ws_url"}`, where to (re)connect.
pub async fn pick(S(st): S<State>, _caller: Caller) -> Json<Value> {
    Json(json!({ "ws_url": st.gateways.pick().await }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_bus::registry::{Announcement, MemoryRegistry};

    #[tokio::test]
    async fn picks_spread_over_live_gateways_and_fall_back_without_any() {
        let reg = Arc::new(MemoryRegistry::default());
        let p = Picker::new(
            Some(GatewayRegistry(reg.clone())),
            "ws://fallback/ws".into(),
        );
        assert_eq!(p.pick().await, "ws://fallback/ws", "an empty registry");
        for (url, connections) in [("ws://a/ws", 10), ("ws://b/ws", 0)] {
            let a = Announcement {
                ws_url: url.into(),
                process: "p0".into(),
                connections,
                shards: 1,
                draining: false,
            };
            reg.announce(&a).await.unwrap();
        }
        p.read.lock().unwrap().asked = None;
        let mut got = HashMap::<String, u32>::new();
        for _ in 0..30 {
            *got.entry(p.pick().await).or_default() += 1;
        }
        // b takes the first ten (it was ten behind), then they alternate.
        assert_eq!((got["ws://a/ws"], got["ws://b/ws"]), (10, 20), "{got:?}");
        let none = Picker::new(None, "ws://only/ws".into());
        assert_eq!(none.pick().await, "ws://only/ws");
    }
}

//! Which gateway a client should connect to (docs/PROTOCOL.md, "Gateways and draining"):
//! login's `ws_url`, and `GET /gateways/pick` for a client whose gateway is draining (close
//! 1012). With a registry (`im_bus::registry`, in Redis), the least-loaded live gateway; a
//! burst of logins between two announcements is spread by counting where this instance sent
//! clients since its last read. Without one (standalone), or while the registry is empty or
//! unreachable, the configured `--ws-url`.

use super::{Caller, State};
use axum::extract::State as S;
use axum::Json;
use im_bus::registry::{least_loaded, Gateway, Registry};
use im_shared::metrics::count_rarely;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

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
    at: Option<Instant>,
    live: Vec<Gateway>,
    /// Clients sent to each URL since `at`.
    sent: HashMap<String, u64>,
}

pub struct Picker {
    registry: Option<Arc<dyn Registry>>,
    fallback: String,
    read: Mutex<Read>,
    failures: AtomicU64,
}

impl Picker {
    pub fn new(registry: Option<GatewayRegistry>, fallback: String) -> Picker {
        Picker {
            registry: registry.map(|r| r.0),
            fallback,
            read: Mutex::default(),
            failures: AtomicU64::new(0),
        }
    }

    /// The URL to send the next client to.
    pub async fn pick(&self) -> String {
        let Some(registry) = &self.registry else {
            return self.fallback.clone();
        };
        let mut read = self.read.lock().await;
        if read.at.is_none_or(|t| t.elapsed() >= REFRESH) {
            match registry.live().await {
                Ok(live) => {
                    read.live = live;
                    read.sent.clear();
                }
                Err(e) => {
                    // Keep what was read last; try again after REFRESH, not per login.
                    if let Some(k) = count_rarely(&self.failures) {
                        log::warn!(
                            "gateway registry: {e} ({k} failed reads); picking from the last read"
                        );
                    }
                }
            }
            read.at = Some(Instant::now());
        }
        let Some(url) = least_loaded(&read.live, &read.sent).map(|g| g.ws_url.clone()) else {
            return self.fallback.clone();
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
        p.read.lock().await.at = None;
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

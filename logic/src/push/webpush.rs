//! The Web Push provider (RFC 8030, RFC 8291, RFC 8292): a notification for a user goes to
//! each browser they subscribed (`POST /api/v1/push/subscriptions`), encrypted for that
//! browser, through the browser's push service (Google's for Chrome, Mozilla's for Firefox,
//! Apple's for Safari, Microsoft's for Edge), which wakes the page's service worker
//! (`logic/web/sw.js`) to show it.
//!
//! Each POST carries `TTL` (how long the push service may hold it for a browser that is off),
//! `Urgency: high`, `Topic` (one per conversation, so a phone that was off gets the latest
//! of a conversation, not a pile), and the VAPID claim. 201 (any 2xx) is delivery; 404 and
//! 410 say the subscription is gone (forgotten here); 408, 429 and 5xx may pass; the rest is
//! a refusal.
//!
//! Endpoints are where the server POSTs what users give it, so only the push services'
//! (`--web-push-endpoints`; the browsers' by default) are taken: a subscription elsewhere is
//! refused when it is made and skipped if the list has shrunk since.

use super::ece::{self, UaKeys, Vapid, CLAIM_TTL_S};
use super::http::{Client, Url};
use super::{Endpoint, Notification, PushError, PushProvider, PushStats};
use async_trait::async_trait;
use im_store::Store;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// How long a push service may hold a notification for a browser that is off (`TTL`).
pub const TTL_S: u32 = 24 * 3600;
/// Subscriptions per user, at most: past it, the oldest goes (a user on many browsers).
pub const SUBSCRIPTIONS_MAX: u32 = 10;
/// An endpoint URL, at most (browsers' are under 500 bytes).
pub const ENDPOINT_BYTES_MAX: usize = 1024;
/// Claims kept, one per push service; past it, the cache starts over.
const CLAIMS_MAX: usize = 64;

/// The push services of the browsers people use, the default `--web-push-endpoints`.
pub const BROWSER_PUSH_SERVICES: &[&str] = &[
    "https://fcm.googleapis.com/",
    "https://android.googleapis.com/",
    "https://updates.push.services.mozilla.com/",
    "https://web.push.apple.com/",
    "https://*.notify.windows.com/",
];

/// The endpoints a subscription may have: URL prefixes, a host of `*.name` taking any
/// subdomain of `name`.
#[derive(Clone, Debug)]
pub struct Allowed(Vec<Url>);

impl Allowed {
    pub fn new<S: AsRef<str>>(prefixes: &[S]) -> Result<Allowed, String> {
        let mut out = Vec::new();
        for p in prefixes {
            let p = p.as_ref();
            // `*.` is not a host Url takes: parse with a stand-in label, then put it back.
            let (wild, url) = match p.split_once("://*.") {
                Some((scheme, rest)) => (true, format!("{scheme}://x.{rest}")),
                None => (false, p.to_string()),
            };
            let mut u = Url::parse(&url).map_err(|e| format!("--web-push-endpoints {e}"))?;
            if !u.path.ends_with('/') {
                return Err(format!(
                    "--web-push-endpoints {p}: a prefix ends with / (a directory of the service)"
                ));
            }
            if wild {
                u.host = format!("*{}", &u.host[1..]);
            }
            out.push(u);
        }
        Ok(Allowed(out))
    }

    /// `endpoint` parsed, when one of the prefixes takes it.
    pub fn admits(&self, endpoint: &str) -> Result<Url, String> {
        if endpoint.len() > ENDPOINT_BYTES_MAX {
            return Err(format!("endpoint: over {ENDPOINT_BYTES_MAX} bytes"));
        }
        let u = Url::parse(endpoint).map_err(|e| format!("endpoint {e}"))?;
        // A prefix is a directory: no `.` or `..` segment (written plainly or escaped) may
        // climb out of it.
        let path = u
            .path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if path
            .split('/')
            .any(|seg| matches!(seg.replace("%2e", "."), ref d if d == "." || d == ".."))
        {
            return Err(format!("endpoint {}: a dot segment in its path", u.shown()));
        }
        let port = |x: &Url| x.addr.rsplit(':').next().map(str::to_string);
        let name = |x: &Url| match x.host.rsplit_once(':') {
            Some((n, _)) if !x.host.ends_with(']') => n.to_ascii_lowercase(),
            _ => x.host.to_ascii_lowercase(),
        };
        let taken = self.0.iter().any(|p| {
            let host_ok = match name(p).strip_prefix('*') {
                Some(suffix) => name(&u).ends_with(suffix),
                None => name(&u) == name(p),
            };
            p.tls == u.tls && host_ok && port(p) == port(&u) && u.path.starts_with(&p.path)
        });
        if taken {
            Ok(u)
        } else {
            Err(format!(
                "endpoint {}: not at a push service this server posts to",
                u.shown()
            ))
        }
    }
}

/// What the service worker gets: the notification, and the sender's name to show.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    n: &'a Notification,
    from_name: &'a str,
}

pub struct WebPush {
    vapid: Vapid,
    store: Arc<dyn Store>,
    client: Client,
    allowed: Allowed,
    stats: Arc<PushStats>,
    /// `Authorization` per push service origin, and when it stops being used (Unix s).
    claims: Mutex<HashMap<String, (Arc<str>, u64)>>,
}

impl WebPush {
    pub fn new(
        vapid: Vapid,
        store: Arc<dyn Store>,
        client: Client,
        allowed: Allowed,
        stats: Arc<PushStats>,
    ) -> WebPush {
        WebPush {
            vapid,
            store,
            client,
            allowed,
            stats,
            claims: Mutex::default(),
        }
    }

    /// The key browsers subscribe with (`applicationServerKey`), base64url.
    pub fn public_key(&self) -> &str {
        self.vapid.public_key()
    }

    pub fn allowed(&self) -> &Allowed {
        &self.allowed
    }

    /// The VAPID `Authorization` for `origin`, signed once per `CLAIM_TTL_S` less 10 min.
    fn authorization(&self, origin: &str) -> Result<Arc<str>, PushError> {
        let now = im_shared::unix_ms() / 1000;
        let mut claims = self.claims.lock().expect("not poisoned");
        if let Some((auth, until)) = claims.get(origin) {
            if now < *until {
                return Ok(auth.clone());
            }
        }
        let exp = now + CLAIM_TTL_S;
        let auth: Arc<str> = self
            .vapid
            .authorization(origin, exp)
            .map_err(PushError::Permanent)?
            .into();
        if claims.len() >= CLAIMS_MAX {
            claims.clear();
        }
        claims.insert(origin.to_string(), (auth.clone(), exp - 600));
        Ok(auth)
    }
}

/// One conversation's `Topic` (RFC 8030 §5.4: at most 32 base64url characters): a later
/// push of the conversation replaces one the push service still holds.
fn topic(conv: &str) -> String {
    ece::encode(&Sha256::digest(conv.as_bytes())[..24])
}

#[async_trait]
impl PushProvider for WebPush {
    fn name(&self) -> &'static str {
        "web push"
    }

    async fn endpoints(&self, n: &Notification) -> Result<Vec<Endpoint>, PushError> {
        let subs = self
            .store
            .push_subscriptions(n.user)
            .await
            .map_err(|e| PushError::Retry(format!("subscriptions of {}: {e}", n.user)))?;
        Ok(subs
            .into_iter()
            .filter_map(|s| {
                // Checked when made; the allowed list may have shrunk since.
                self.allowed.admits(&s.endpoint).ok()?;
                // Checked on the curve when subscribed; ring checks again when it is used.
                let keys = UaKeys::decode(&s.p256dh, &s.auth).ok()?;
                Some(Endpoint {
                    id: s.id,
                    url: s.endpoint,
                    keys: Some(keys),
                })
            })
            .collect())
    }

    async fn push(&self, n: &Notification, to: &Endpoint) -> Result<(), PushError> {
        let url = Url::parse(&to.url).map_err(PushError::Permanent)?;
        let keys = to
            .keys
            .as_ref()
            .ok_or_else(|| PushError::Permanent("a subscription without keys".into()))?;
        let from_name = match self.store.user_by_id(n.from).await {
            Ok(Some(u)) if !u.nickname.is_empty() => u.nickname,
            Ok(Some(u)) => u.username,
            Ok(None) => String::new(),
            Err(e) => return Err(PushError::Retry(format!("user {}: {e}", n.from))),
        };
        let payload = serde_json::to_vec(&Payload {
            kind: "message",
            n,
            from_name: &from_name,
        })
        .expect("a payload serialises");
        let body = ece::encrypt(&payload, keys).map_err(PushError::Permanent)?;
        let auth = self.authorization(&url.origin())?;
        let (ttl, topic) = (TTL_S.to_string(), topic(&n.conv));
        let headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "aes128gcm"),
            ("TTL", ttl.as_str()),
            ("Urgency", "high"),
            ("Topic", topic.as_str()),
            ("Authorization", &*auth),
        ];
        match self.client.post(&url, &headers, &body).await {
            Err(e) => Err(PushError::Retry(e)),
            Ok(code @ (404 | 410)) => {
                // The browser unsubscribed, or the subscription expired: forget it.
                if let Err(e) = self.store.drop_push_subscription(to.id).await {
                    log::warn!("web push: forgetting subscription {}: {e}", to.id);
                }
                self.stats.gone_total.fetch_add(1, Ordering::Relaxed);
                Err(PushError::Permanent(format!("HTTP {code}: gone")))
            }
            Ok(code) => super::webhook::classify(code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ece::receiver::{check_vapid, Browser};
    use super::super::http::tests::receiver;
    use super::*;
    use im_store::testing::{fresh_sqlite, tempdir};
    use im_store::PushSubscription;

    /// Against a real store and a push service of the test's own: the body opens with the
    /// browser's key only, the claim verifies, a 410 forgets the subscription.
    #[tokio::test]
    async fn a_notification_reaches_each_browser_encrypted_and_a_gone_one_is_forgotten() {
        let dir = tempdir();
        let store: Arc<dyn Store> = Arc::new(fresh_sqlite(&dir).await);
        let alice = store.create_user("alice", "h", "Alice", 1).await.unwrap();
        let bob = store.create_user("bob", "h", "", 1).await.unwrap();
        let (url, task) = receiver(vec![201, 410], false).await;
        let browsers = [Browser::new(), Browser::new()];
        for (i, b) in browsers.iter().enumerate() {
            let sub = PushSubscription {
                id: 0,
                user_id: bob,
                endpoint: format!("{url}/{i}"),
                p256dh: ece::encode(&b.keys.p256dh),
                auth: ece::encode(&b.keys.auth),
                created_ms: 0,
            };
            let now = 1_000 + i as u64;
            store.add_push_subscription(&sub, 10, now).await.unwrap();
        }
        let (public, private) = Vapid::generate().unwrap();
        let vapid = Vapid::new(&public, &private, "mailto:ops@example.com").unwrap();
        let stats = Arc::new(PushStats::default());
        let allowed = Allowed::new(&[format!("{url}/")]).unwrap();
        let wp = WebPush::new(vapid, store.clone(), Client::new(), allowed, stats.clone());
        let n = Notification {
            user: bob,
            conv: format!("p:{}:{}", alice.min(bob), alice.max(bob)),
            from: alice,
            id: 77,
            seq: 5,
            ts: im_shared::unix_ms(),
            preview: "wake up".into(),
        };
        let to = wp.endpoints(&n).await.unwrap();
        assert_eq!(to.len(), 2);
        // Newest first: browser 1, which the service answers 201; browser 0's is gone (410).
        assert_eq!(wp.push(&n, &to[0]).await, Ok(()));
        assert!(matches!(
            wp.push(&n, &to[1]).await,
            Err(PushError::Permanent(_))
        ));
        let got = task.await.unwrap();
        let origin = url.trim_end_matches("/hook");
        let req = &got[0];
        assert_eq!(req.header("Content-Encoding"), Some("aes128gcm"));
        assert_eq!(req.header("TTL"), Some(TTL_S.to_string().as_str()));
        assert_eq!(req.header("Topic"), Some(topic(&n.conv).as_str()));
        let (claims, k) = check_vapid(req.header("Authorization").unwrap(), origin).unwrap();
        assert_eq!(
            (claims["sub"].as_str(), k.as_str()),
            (Some("mailto:ops@example.com"), wp.public_key())
        );
        let [b0, b1] = browsers;
        assert!(b0.open(&req.body).is_err(), "another browser's key");
        let payload: serde_json::Value =
            serde_json::from_slice(&b1.open(&req.body).unwrap()).unwrap();
        assert_eq!(payload["type"], "message");
        assert_eq!(payload["from_name"], "Alice");
        assert_eq!(payload["preview"], "wake up");
        assert_eq!(
            (payload["user"].as_str(), payload["seq"].as_u64()),
            (Some(bob.to_string().as_str()), Some(5))
        );
        let left = store.push_subscriptions(bob).await.unwrap();
        assert_eq!(left.len(), 1, "the gone one is forgotten");
        assert_eq!(left[0].endpoint, format!("{url}/1"));
        assert_eq!(stats.gone_total.load(Ordering::Relaxed), 1);
        // The claim is signed once per push service.
        let a1 = wp.authorization(origin).unwrap();
        assert!(Arc::ptr_eq(&a1, &wp.authorization(origin).unwrap()));
        // A subscription outside the allowed list (it shrank) is skipped.
        let narrower = WebPush::new(
            Vapid::new(&public, &private, "mailto:ops@example.com").unwrap(),
            store.clone(),
            Client::new(),
            Allowed::new(&["https://fcm.googleapis.com/"]).unwrap(),
            stats,
        );
        assert!(narrower.endpoints(&n).await.unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn only_the_push_services_endpoints_are_taken() {
        let a = Allowed::new(BROWSER_PUSH_SERVICES).unwrap();
        for ok in [
            "https://fcm.googleapis.com/fcm/send/dXz:APA91b",
            "https://updates.push.services.mozilla.com/wpush/v2/gAAAA",
            "https://web.push.apple.com/QGuQyavXutnMH",
            "https://wns2-by3p.notify.windows.com/w/?token=BQYAAA",
            "https://FCM.googleapis.com/fcm/send/x",
        ] {
            assert!(a.admits(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://fcm.googleapis.com/fcm/send/x",
            "https://fcm.googleapis.com:8443/fcm/send/x",
            "https://fcm.googleapis.com.evil.example/x",
            "https://notify.windows.com.evil/x",
            "https://127.0.0.1/admin",
            "https://evilnotify.windows.com/x",
            "not a url",
        ] {
            assert!(a.admits(bad).is_err(), "{bad}");
        }
        assert!(a
            .admits(&format!("https://fcm.googleapis.com/{}", "x".repeat(1100)))
            .is_err());
        let local = Allowed::new(&["http://127.0.0.1:8099/push/"]).unwrap();
        assert!(local.admits("http://127.0.0.1:8099/push/abc").is_ok());
        for climbing in [
            "http://127.0.0.1:8099/push/../admin",
            "http://127.0.0.1:8099/push/%2e%2e/admin",
            "http://127.0.0.1:8099/push/%2E%2E/admin",
            "http://127.0.0.1:8099/push/./x",
        ] {
            assert!(local.admits(climbing).is_err(), "{climbing}");
        }
        assert!(
            Allowed::new(&["http://127.0.0.1:8099/push"]).is_err(),
            "not a directory"
        );
        assert!(local.admits("http://127.0.0.1:8099/other").is_err());
        assert!(local.admits("http://127.0.0.1:8098/push/abc").is_err());
        assert!(Allowed::new(&["ftp://x/"]).is_err());
    }

    #[test]
    fn a_topic_is_per_conversation_and_short() {
        assert_eq!(topic("p:1:2").len(), 32);
        assert_eq!(topic("p:1:2"), topic("p:1:2"));
        assert_ne!(topic("p:1:2"), topic("p:1:3"));
    }
}

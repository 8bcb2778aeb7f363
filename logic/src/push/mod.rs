//! Offline push (docs/PROTOCOL.md, "Offline push"): a message for a user none of whose
//! devices is online goes to a push provider, which wakes a device (a phone's push service, a
//! browser's). The stage offers notifications as it routes (`offer`: never waits, drops and
//! counts when the queue is full); workers hand them to the provider and retry what failed
//! for a reason that may pass, with capped backoff, a bounded number of times.
//!
//! One trait, `PushProvider`, and two providers: the webhook (`webhook.rs`), an HTTP POST of
//! a signed JSON body to a URL of the operator's, which forwards to APNs or FCM; and Web Push
//! (`webpush.rs`), which wakes the browsers a user subscribed through their push services,
//! the payload encrypted for each (`ece.rs`). Both post with `http.rs`.

pub mod ece;
pub mod http;
pub mod webhook;
pub mod webpush;

use async_trait::async_trait;
use im_shared::metrics::count_rarely;
use im_store::Store;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex, Semaphore};

/// Notifications waiting for a provider's workers, at most; past it, new ones are dropped and
/// counted.
pub const QUEUE_MAX: usize = 10_000;
/// Workers per provider: notifications whose endpoints are looked up at once.
const WORKERS: usize = 8;
/// Deliveries in flight per provider (each to one endpoint, with its retries), at most.
const IN_FLIGHT_MAX: usize = 256;
/// Tries per notification, and the pause before the second (doubling after).
pub const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The message preview a notification carries, at most (characters).
pub const PREVIEW_CHARS: usize = 100;
/// A notification older than this when a worker takes it is dropped (behind a receiver that
/// was down, the queue holds messages the user has long seen, or need not be woken for).
pub const STALE_AFTER: Duration = Duration::from_secs(300);
/// One call of a provider, at most (the webhook has its own, shorter timeout).
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// A message for a user with no device online.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// The recipient (a decimal string, as ids are in the protocol).
    #[serde(serialize_with = "decimal")]
    pub user: u64,
    pub conv: String,
    #[serde(serialize_with = "decimal")]
    pub from: u64,
    #[serde(serialize_with = "decimal")]
    pub id: u64,
    pub seq: u64,
    pub ts: u64,
    /// The start of the content (`PREVIEW_CHARS`), or `[type]` for non-text content.
    pub preview: String,
}

fn decimal<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Notification {
    /// The preview of a message's content.
    pub fn preview_of(content: &str, content_type: &str) -> String {
        if content_type != "text" && !content_type.is_empty() {
            return format!("[{content_type}]");
        }
        content.chars().take(PREVIEW_CHARS).collect()
    }
}

/// Why a push failed.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// It may work later (the provider is down, slow, or asks to slow down): retried.
    Retry(String),
    /// It will not (the provider refused this notification): dropped.
    Permanent(String),
}

/// One place a provider delivers a notification, as the provider names it (`endpoints`):
/// the webhook has one; Web Push one per browser the recipient subscribed. Each is tried, and
/// retried, on its own, so one browser's push service being down delays no other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The provider's id for it (a Web Push subscription's); 0 for the webhook's one.
    pub id: u64,
    pub url: String,
    /// Web Push: the browser's keys the payload is encrypted for.
    pub keys: Option<ece::UaKeys>,
}

#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    /// Names the provider in logs and metrics.
    fn name(&self) -> &'static str;
    /// Where `n` goes; none: nowhere (the recipient subscribed nothing). The default is one
    /// endpoint, the provider's own.
    async fn endpoints(&self, _n: &Notification) -> Result<Vec<Endpoint>, PushError> {
        Ok(vec![Endpoint::default()])
    }
    /// `n` to one of its endpoints.
    async fn push(&self, n: &Notification, to: &Endpoint) -> Result<(), PushError>;
}

/// Counters, rendered with the stage's. `offered` counts notifications; the others count
/// deliveries (one per provider, and for Web Push one per browser), so `delivered` can pass
/// `offered` when users have several browsers.
#[derive(Default, Debug)]
pub struct PushStats {
    pub offered_total: AtomicU64,
    pub delivered_total: AtomicU64,
    pub retried_total: AtomicU64,
    /// Dropped: the queue was full, the provider refused, or every attempt failed.
    pub dropped_total: AtomicU64,
    /// Web Push subscriptions forgotten because their push service said they are gone.
    pub gone_total: AtomicU64,
    /// Notifications not pushed because their recipient muted the conversation.
    pub muted_total: AtomicU64,
}

/// The queues and their workers: one queue per provider, so a provider that is slow or
/// down (its deliveries waiting out timeouts and retries) holds up no other.
pub struct Pusher {
    queues: Vec<mpsc::Sender<Notification>>,
    stats: Arc<PushStats>,
}

impl Pusher {
    /// Starts the workers on the current runtime; they end when the `Pusher` is dropped and
    /// the queues are empty. Each notification goes to each provider. With `store`, a
    /// conversation its recipient muted is not pushed.
    pub fn start(
        providers: Vec<Arc<dyn PushProvider>>,
        store: Option<Arc<dyn Store>>,
        stats: Arc<PushStats>,
    ) -> Pusher {
        Pusher::start_with(providers, store, stats, FIRST_BACKOFF)
    }

    fn start_with(
        providers: Vec<Arc<dyn PushProvider>>,
        store: Option<Arc<dyn Store>>,
        stats: Arc<PushStats>,
        first_backoff: Duration,
    ) -> Pusher {
        let mut queues = Vec::with_capacity(providers.len());
        for provider in providers {
            let (tx, rx) = mpsc::channel::<Notification>(QUEUE_MAX);
            let rx = Arc::new(Mutex::new(rx));
            let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
            for _ in 0..WORKERS {
                let (rx, provider, stats) = (rx.clone(), provider.clone(), stats.clone());
                let (store, in_flight) = (store.clone(), in_flight.clone());
                tokio::spawn(async move {
                    loop {
                        let next = rx.lock().await.recv().await;
                        let Some(n) = next else { return };
                        if let Some(store) = &store {
                            // Muted: nobody is woken for it. A store that cannot say: pushed.
                            if store.muted(n.user, &n.conv).await.unwrap_or(false) {
                                stats.muted_total.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                        let (provider, stats) = (provider.clone(), stats.clone());
                        deliver(provider, n, stats, &in_flight, first_backoff).await;
                    }
                });
            }
            queues.push(tx);
        }
        Pusher { queues, stats }
    }

    /// Queues `n` for each provider; never waits (a full queue drops it, counted).
    pub fn offer(&self, n: Notification) {
        self.stats.offered_total.fetch_add(1, Ordering::Relaxed);
        for q in &self.queues {
            if q.try_send(n.clone()).is_err() {
                self.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One notification through one provider: its endpoints looked up (retried on this worker),
/// then each delivered by a task of its own holding one of the provider's `IN_FLIGHT_MAX`
/// permits, tried up to `ATTEMPTS` times while it fails for a reason that may pass, with
/// doubling pauses. The worker goes on to the next notification at once: an endpoint that
/// waits out its timeouts holds a permit, not a worker.
async fn deliver(
    provider: Arc<dyn PushProvider>,
    n: Notification,
    stats: Arc<PushStats>,
    in_flight: &Arc<Semaphore>,
    first: Duration,
) {
    let age_ms = im_shared::unix_ms().saturating_sub(n.ts);
    if age_ms > STALE_AFTER.as_millis() as u64 {
        if let Some(k) = count_rarely(&stats.dropped_total) {
            log::warn!("push: dropped a notification {age_ms} ms old ({k} dropped so far)");
        }
        return;
    }
    let name = provider.name();
    let endpoints = match with_retries(name, &stats, first, || provider.endpoints(&n)).await {
        Ok(e) => e,
        Err(why) => return dropped(name, &why, &stats),
    };
    let n = Arc::new(n);
    for to in endpoints {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let (provider, n, stats) = (provider.clone(), n.clone(), stats.clone());
        tokio::spawn(async move {
            match with_retries(name, &stats, first, || provider.push(&n, &to)).await {
                Ok(()) => {
                    stats.delivered_total.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => dropped(name, &why, &stats),
            }
            drop(permit);
        });
    }
}

/// `step` until it succeeds, fails for good, or has failed `ATTEMPTS` times.
async fn with_retries<T, F, Fut>(
    name: &str,
    stats: &PushStats,
    first: Duration,
    mut step: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PushError>>,
{
    let (mut pause, mut attempt) = (first, 1);
    loop {
        let outcome = tokio::time::timeout(PUSH_TIMEOUT, step())
            .await
            .unwrap_or_else(|_| Err(PushError::Retry(format!("no answer in {PUSH_TIMEOUT:?}"))));
        match outcome {
            Ok(v) => return Ok(v),
            Err(PushError::Retry(why)) if attempt < ATTEMPTS => {
                log::debug!("push: {name} failed ({why}); attempt {attempt} of {ATTEMPTS}");
                stats.retried_total.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            Err(PushError::Retry(why) | PushError::Permanent(why)) => return Err(why),
        }
    }
}

fn dropped(name: &str, why: &str, stats: &PushStats) {
    // A receiver that refuses everything would log every message: now and then.
    if let Some(k) = count_rarely(&stats.dropped_total) {
        log::warn!("push: {name} dropped a notification ({why}); {k} dropped so far");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// A provider that fails as scripted, then succeeds; it records what it was given.
    struct Scripted {
        fails: StdMutex<Vec<PushError>>,
        got: StdMutex<Vec<Notification>>,
    }

    #[async_trait]
    impl PushProvider for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        async fn push(&self, n: &Notification, _to: &Endpoint) -> Result<(), PushError> {
            self.got.lock().unwrap().push(n.clone());
            match self.fails.lock().unwrap().pop() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    fn note(user: u64) -> Notification {
        Notification {
            user,
            conv: "p:1:2".into(),
            from: 1,
            id: 7,
            seq: 3,
            ts: im_shared::unix_ms(),
            preview: "hi".into(),
        }
    }

    async fn settle(stats: &PushStats, want: u64) {
        for _ in 0..500 {
            let done = stats.delivered_total.load(Ordering::Relaxed)
                + stats.dropped_total.load(Ordering::Relaxed);
            if done >= want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the workers did not finish: {stats:?}");
    }

    #[tokio::test]
    async fn what_may_pass_is_retried_and_what_will_not_is_dropped() {
        let p = Arc::new(Scripted {
            fails: StdMutex::new(vec![
                PushError::Retry("503".into()),
                PushError::Retry("timeout".into()),
            ]),
            got: StdMutex::default(),
        });
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::start_with(
            vec![p.clone()],
            None,
            stats.clone(),
            Duration::from_millis(1),
        );
        pusher.offer(note(2));
        settle(&stats, 1).await;
        assert_eq!(p.got.lock().unwrap().len(), 3, "two failures, then through");
        assert_eq!(stats.retried_total.load(Ordering::Relaxed), 2);
        assert_eq!(stats.delivered_total.load(Ordering::Relaxed), 1);
        // A refusal is not retried; endless failures stop after ATTEMPTS.
        p.fails
            .lock()
            .unwrap()
            .push(PushError::Permanent("400".into()));
        pusher.offer(note(3));
        settle(&stats, 2).await;
        *p.fails.lock().unwrap() = (0..ATTEMPTS)
            .map(|_| PushError::Retry("down".into()))
            .collect();
        let before = p.got.lock().unwrap().len();
        pusher.offer(note(4));
        settle(&stats, 3).await;
        assert_eq!(p.got.lock().unwrap().len() - before, ATTEMPTS as usize);
        assert_eq!(stats.dropped_total.load(Ordering::Relaxed), 2);
        // One that waited too long is not sent at all.
        let before = p.got.lock().unwrap().len();
        let mut old = note(5);
        old.ts -= STALE_AFTER.as_millis() as u64 + 1_000;
        pusher.offer(old);
        settle(&stats, 4).await;
        assert_eq!(p.got.lock().unwrap().len(), before);
    }

    #[test]
    fn previews_are_short_and_say_what_is_not_text() {
        assert_eq!(Notification::preview_of("hé", "text"), "hé");
        let long = "x".repeat(500);
        assert_eq!(
            Notification::preview_of(&long, "text").chars().count(),
            PREVIEW_CHARS
        );
        assert_eq!(Notification::preview_of("{…}", "image"), "[image]");
        let json = serde_json::to_value(note(2)).unwrap();
        assert_eq!(json["user"], "2");
        assert_eq!(json["id"], "7");
    }
}

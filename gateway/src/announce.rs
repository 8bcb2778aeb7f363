//! The gateway's entry in the gateway registry (`im_bus::registry`; docs/PROTOCOL.md,
//! "Gateways and draining"): announced from the process's main thread, which otherwise only
//! waits for a signal, every `ANNOUNCE_EVERY_S` with the connections held, and once more with
//! `draining` when the process is told to stop, before its shards start closing connections.
//! A Redis that is down delays little: each call is bounded (500 ms), a failure is logged now
//! and then, and the next tick tries again.

use im_bus::registry::{Announcement, RedisRegistry, Registry, ANNOUNCE_EVERY_S};
use im_shared::metrics::count_rarely;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// One announcement, at most.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

pub(crate) struct Announcer {
    rt: tokio::runtime::Runtime,
    registry: RedisRegistry,
    entry: Announcement,
    next: Instant,
    failures: AtomicU64,
}

impl Announcer {
    pub(crate) fn new(
        redis_url: &str,
        ws_url: String,
        process: String,
        shards: u32,
    ) -> Result<Announcer, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("the registry's runtime: {e}"))?;
        Ok(Announcer {
            rt,
            registry: RedisRegistry::open(redis_url)?,
            entry: Announcement {
                ws_url,
                process,
                connections: 0,
                shards,
                draining: false,
            },
            next: Instant::now(),
            failures: AtomicU64::new(0),
        })
    }

    /// Announces when it is time (at once the first time).
    pub(crate) fn tick(&mut self, connections: u64) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + Duration::from_secs(ANNOUNCE_EVERY_S);
        self.entry.connections = connections;
        self.send();
    }

    /// Tells the registry this process takes nobody new (it is about to drain).
    pub(crate) fn withdraw(&mut self, connections: u64) {
        self.entry.connections = connections;
        self.entry.draining = true;
        self.send();
    }

    fn send(&self) {
        // Short: this thread also waits for SIGTERM, and a drain must not wait on Redis.
        let call = async {
            tokio::time::timeout(CALL_TIMEOUT, self.registry.announce(&self.entry))
                .await
                .unwrap_or_else(|_| Err(format!("no answer in {CALL_TIMEOUT:?}")))
        };
        let result = self.rt.block_on(call);
        if let Err(e) = result {
            if let Some(k) = count_rarely(&self.failures) {
                log::warn!(
                    "gateway registry: announcing {}: {e} ({k} failures)",
                    self.entry.ws_url
                );
            }
        }
    }
}

//! The gateway role (ARCHITECTURE.md, "Processes"): the shards of `gateway-core` plus what
//! connects them to the rest of the system — the bridge threads on the bus (`bridge`), the
//! presence writer (`presence`), the revoked-token set that follows Redis, and the
//! supervisor of a multi-process gateway (`supervisor`).
//!
//! `run(config, shutdown)` is `im gateway` (one process); `start` is the same assembly for a
//! caller that owns the backends (standalone hands it the in-process bus and presence).

mod announce;
pub mod bridge;
mod presence;
pub mod supervisor;

use bridge::{BridgeConfig, BridgeHandle, BridgeStats};
use gateway_core::shard::{MetricsHook, RevokedCheck};
use gateway_core::{Gateway, GatewayConfig, GatewayHandle, Options};
use im_bus::presence::{Presence, RedisPresence};
use im_bus::revocation::{self, RevokedSet};
use im_bus::{Bus, KafkaBus, KafkaConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the shards are connected to.
pub enum Routing {
    /// Nothing: the shards route between this process's connections (`--local-router`,
    /// for gateway benchmarks).
    LocalRouter,
    /// The pipeline: every deployment.
    Pipeline(Pipeline),
}

/// The backends of a gateway in pipeline mode.
pub struct Pipeline {
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    /// Revoked tokens, refused at the upgrade.
    pub revoked: Arc<RevokedSet>,
    /// How long an upstream record may wait for the bus before its sender gets `error`.
    pub produce_timeout_ms: u32,
    /// How long the producer may hold a record to batch it.
    pub linger_ms: u32,
}

/// A started gateway: its shards and, in pipeline mode, its bridge.
pub struct Running {
    handle: GatewayHandle,
    bridge: Option<BridgeHandle>,
}

/// Starts the shards and, in pipeline mode, the bridge (returning once it is ready).
/// `extra_metrics` adds to `/metrics` after the shards' and the bridge's counters.
pub fn start(
    cfg: GatewayConfig,
    routing: Routing,
    extra_metrics: Option<MetricsHook>,
) -> Result<Running, String> {
    let listen = cfg.ws_listen;
    let p = match routing {
        Routing::LocalRouter => {
            let opts = Options {
                revoked: None,
                metrics: extra_metrics,
            };
            let handle = Gateway::start_local(cfg, opts)
                .map_err(|e| format!("starting the gateway on {listen}: {e}"))?;
            return Ok(Running {
                handle,
                bridge: None,
            });
        }
        Routing::Pipeline(p) => p,
    };
    let gateway_id = cfg.gateway_id.clone();
    let stats = Arc::new(BridgeStats::default());
    let (s, gw) = (stats.clone(), gateway_id.clone());
    let metrics: MetricsHook = Arc::new(move |out: &mut String| {
        s.render(&gw, out);
        if let Some(more) = &extra_metrics {
            more(out);
        }
    });
    let set = p.revoked.clone();
    let revoked: RevokedCheck = Arc::new(move |jti: &str, now_s: u64| set.check(jti, now_s));
    let opts = Options {
        revoked: Some(revoked),
        metrics: Some(metrics),
    };
    let (handle, end) = Gateway::start_bridged(cfg, opts)
        .map_err(|e| format!("starting the gateway on {listen}: {e}"))?;
    let bcfg = BridgeConfig {
        gateway_id,
        produce_timeout_ms: p.produce_timeout_ms.max(1),
        linger_ms: p.linger_ms,
    };
    let describe = p.bus.describe();
    match bridge::start(bcfg, p.bus, p.presence, end, stats) {
        Ok(b) => Ok(Running {
            handle,
            bridge: Some(b),
        }),
        Err(e) => {
            handle.shutdown();
            let _ = handle.join();
            Err(format!("starting the bridge on the {describe}: {e}"))
        }
    }
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// Connections held across the shards right now.
    pub fn connections(&self) -> u64 {
        self.handle.connections()
    }

    /// Drains (every connection closed with 1012, spread over the drain window), waits for
    /// the shards, then stops the bridge (which still produces what the shards handed over).
    pub fn stop(self) -> Result<(), String> {
        self.handle.shutdown();
        let shards = self
            .handle
            .join()
            .map_err(|e| format!("a shard failed: {e}"));
        if let Some(b) = self.bridge {
            b.stop();
        }
        shards
    }
}

/// `im gateway`: one process.
pub struct Config {
    pub core: GatewayConfig,
    /// `None`: the local router (`--local-router`).
    pub distributed: Option<Distributed>,
}

/// Where a distributed gateway's backends are.
pub struct Distributed {
    pub kafka: KafkaConfig,
    pub redis_url: String,
    /// Where clients reach this gateway, announced in the gateway registry in Redis; `None`:
    /// not announced (logic answers its configured URL).
    pub public_ws_url: Option<String>,
    /// Presence entries expire this long after their last refresh; shards refresh every third.
    pub presence_ttl_s: u64,
    pub produce_timeout_ms: u32,
}

/// The shortest presence TTL: the shards refresh every third of it, once a second at most.
const PRESENCE_TTL_MIN_S: u64 = 3;
/// How long a distributed gateway's producer holds a record to batch it.
const KAFKA_LINGER_MS: u32 = 1;

/// How long one wait for `shutdown` lasts.
const SHUTDOWN_POLL: Duration = Duration::from_millis(500);

/// Runs one gateway process until `shutdown` says stop.
pub fn run(mut cfg: Config, mut shutdown: impl Shutdown) -> Result<(), String> {
    let follow_stop = Arc::new(AtomicBool::new(false));
    let routing = match &cfg.distributed {
        None => Routing::LocalRouter,
        Some(d) => {
            let ttl_s = d.presence_ttl_s.max(PRESENCE_TTL_MIN_S);
            cfg.core.presence_refresh_ms = ttl_s * 1000 / 3;
            // Logged-out tokens are refused at the upgrade (their open connections are
            // closed by logic through this gateway's downstream topic).
            let revoked = Arc::new(RevokedSet::default());
            revocation::redis::follow(&d.redis_url, revoked.clone(), follow_stop.clone())?;
            Routing::Pipeline(Pipeline {
                bus: Arc::new(KafkaBus::new(d.kafka.clone())),
                presence: Arc::new(RedisPresence::open(&d.redis_url, ttl_s)?),
                revoked,
                produce_timeout_ms: d.produce_timeout_ms,
                linger_ms: KAFKA_LINGER_MS,
            })
        }
    };
    let mut announcer = match &cfg.distributed {
        Some(Distributed {
            redis_url,
            public_ws_url: Some(url),
            ..
        }) => Some(announce::Announcer::new(
            redis_url,
            url.clone(),
            cfg.core.gateway_id.clone(),
            cfg.core.shards as u32,
        )?),
        _ => None,
    };
    let window_s = cfg.core.drain_window_ms as f64 / 1000.0;
    // The exporter's counters (the `im gateway` process's own; standalone's logic serves
    // them).
    let tracing: MetricsHook = Arc::new(im_telemetry::render);
    let running = start(cfg.core, routing, Some(tracing));
    if let Ok(running) = &running {
        log::info!("gateway on ws://{}/ws", running.local_addr());
    }
    let result = running.and_then(|running| {
        loop {
            if let Some(a) = &mut announcer {
                a.tick(running.connections());
            }
            if shutdown.wait(SHUTDOWN_POLL) {
                break;
            }
        }
        // Out of the registry first, so logins stop sending clients here, then the drain.
        if let Some(a) = &mut announcer {
            a.withdraw(running.connections());
        }
        log::info!(
            "stopping: draining {} connections over {window_s} s (close 1012)",
            running.connections()
        );
        running.stop()
    });
    follow_stop.store(true, Ordering::Release);
    result
}

/// What tells a gateway (or the supervisor) to stop. The `im` binary waits for SIGTERM on its
/// main thread (no thread of its own: a gateway's fixed memory is paid once per process, and
/// a host runs dozens); a test or an embedding program can use a `watch`.
pub trait Shutdown {
    /// Waits up to `timeout`; `true` once a stop was asked for.
    fn wait(&mut self, timeout: Duration) -> bool;
}

/// How often a watch is looked at.
const WATCH_POLL: Duration = Duration::from_millis(100);

impl Shutdown for watch::Receiver<bool> {
    fn wait(&mut self, timeout: Duration) -> bool {
        // A sender that is gone can never ask: treat it as asking.
        if *self.borrow() || self.has_changed().is_err() {
            return true;
        }
        std::thread::sleep(timeout.min(WATCH_POLL));
        *self.borrow()
    }
}

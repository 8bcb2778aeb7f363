//! The logic service (ARCHITECTURE.md, "Processes"): the REST API (accounts, tokens, groups,
//! conversations, history; docs/PROTOCOL.md) and the pipeline stage that sequences messages.
//!
//! Where to look: `api` (the axum routes and their JSON errors), `auth` (argon2id passwords,
//! access and refresh tokens), `stage` (the pipeline stage: a sans-I/O `Sequencer` driven by
//! a thin async loop). Storage is `im_store`; the bus, presence and revocations are `im_bus`.
//!
//! `run(config, shutdown)` is `im logic`: it connects MySQL, Redis and Kafka, then serves with
//! `serve_on` — the same function standalone calls with its in-process backends.

pub mod api;
pub mod auth;
pub mod push;
pub mod stage;

use im_bus::presence::{Presence, RedisPresence};
use im_bus::revocation::{RedisRevocations, Revocations};
use im_bus::{Bus, KafkaBus, KafkaConfig};
use im_shared::redact_url;
use im_shared::snowflake::WorkerLease;
use im_store::{MySqlStore, Store};
use stage::client::PipelineClient;
use stage::members::Members;
use stage::{StageConfig, StageStats};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long the stage and the REST API may take to stop after `shutdown`: a broker or
/// database that is down must not keep a stopping process alive (uncommitted records replay).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the service serves, whatever its backends.
#[derive(Clone, Debug)]
pub struct LogicConfig {
    pub api: api::ApiConfig,
    pub api_listen: SocketAddr,
    /// The pipeline stage; `None` serves REST only (`--no-pipeline`: `messages/send` then
    /// stores directly and delivers nothing live).
    pub stage: Option<StageSettings>,
}

#[derive(Clone, Debug)]
pub struct StageSettings {
    /// Topic-safe, unique among logic instances: the REST API's reply topic is named after it.
    pub logic_id: String,
    pub stage: StageConfig,
    /// Offline push (`push`): where notifications for users with no device online go.
    pub push: Option<PushSettings>,
    /// The stage's counters: the caller's, so that a process serving its metrics elsewhere
    /// (standalone's `--metrics-listen`) can render them.
    pub stats: Arc<StageStats>,
}

/// Offline push (`push`): the providers notifications go to, one or both.
#[derive(Clone, Debug, Default)]
pub struct PushSettings {
    pub webhook: Option<WebhookSettings>,
    pub web_push: Option<WebPushSettings>,
}

/// The push webhook (`push::webhook`): its URL and signing secret.
#[derive(Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url.split('?').next())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Web Push (`push::webpush`): the VAPID key pair (base64url, as web-push tools print it),
/// who runs the server (`mailto:` or `https:`), and the endpoint prefixes subscriptions may
/// have (`push::webpush::BROWSER_PUSH_SERVICES` when empty).
#[derive(Clone)]
pub struct WebPushSettings {
    pub public_key: String,
    pub private_key: String,
    pub subject: String,
    pub endpoints: Vec<String>,
}

impl std::fmt::Debug for WebPushSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPushSettings")
            .field("public_key", &self.public_key)
            .field("private_key", &"<redacted>")
            .field("subject", &self.subject)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// The pusher `s` asks for (none when it names no provider), and Web Push, which the REST
/// API's subscription routes use.
#[allow(clippy::type_complexity)]
fn start_push(
    s: &PushSettings,
    store: &Arc<dyn Store>,
    stats: &Arc<push::PushStats>,
) -> Result<
    (
        Option<Arc<push::Pusher>>,
        Option<Arc<push::webpush::WebPush>>,
    ),
    String,
> {
    let client = push::http::Client::new();
    let mut providers: Vec<Arc<dyn push::PushProvider>> = Vec::new();
    if let Some(w) = &s.webhook {
        let hook = push::webhook::Webhook::new(&w.url, w.secret.as_bytes(), client.clone())?;
        log::info!("logic: offline push to the webhook {}", hook.shown());
        providers.push(Arc::new(hook));
    }
    let mut web_push = None;
    if let Some(w) = &s.web_push {
        let vapid = push::ece::Vapid::new(&w.public_key, &w.private_key, &w.subject)?;
        let allowed = if w.endpoints.is_empty() {
            push::webpush::Allowed::new(push::webpush::BROWSER_PUSH_SERVICES)?
        } else {
            push::webpush::Allowed::new(&w.endpoints)?
        };
        let wp = Arc::new(push::webpush::WebPush::new(
            vapid,
            store.clone(),
            client,
            allowed,
            stats.clone(),
        ));
        log::info!(
            "logic: offline push to browsers by Web Push (VAPID key {})",
            wp.public_key()
        );
        providers.push(wp.clone());
        web_push = Some(wp);
    }
    if providers.is_empty() {
        return Ok((None, None));
    }
    let pusher = push::Pusher::start(providers, Some(store.clone()), stats.clone());
    Ok((Some(Arc::new(pusher)), web_push))
}

/// What the service runs on: MySQL, Redis and Kafka (`run`), or SQLite, memory and the
/// in-process bus (standalone).
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub revocations: Arc<dyn Revocations>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    /// The Snowflake worker id this process mints message ids with, under its lease: one
    /// minter per lease (the stage, or the REST API when there is no stage).
    pub snowflake: Arc<WorkerLease>,
}

/// `im logic`: where its backends are.
#[derive(Clone, Debug)]
pub struct Config {
    pub logic: LogicConfig,
    pub mysql_url: String,
    pub redis_url: String,
    pub kafka: KafkaConfig,
    /// The Snowflake worker id to lease: exactly this one (`--worker-id`; refuse to start if
    /// another instance holds it), or the first free one from `worker_hint` on.
    pub worker_id: Option<u16>,
    pub worker_hint: u16,
    /// Names this instance in its lease (operators see who holds an id).
    pub holder: String,
    pub lease: im_bus::lease::LeaseSettings,
}

/// Presence TTL given to the Redis client; logic only reads presence, so it is not used.
const PRESENCE_TTL_UNUSED_S: u64 = 180;

/// `im logic`: connects MySQL (creating the database and migrating it), Redis and Kafka,
/// then serves until `shutdown` turns true.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let store = MySqlStore::connect_or_create(&cfg.mysql_url)
        .await
        .map_err(|e| format!("connecting to {}: {e}", redact_url(&cfg.mysql_url)))?;
    let revocations = RedisRevocations::connect(&cfg.redis_url)
        .await
        .map_err(|e| format!("connecting to {}: {e}", redact_url(&cfg.redis_url)))?;
    // The stage routes by presence: it should not start without Redis (REST alone need not).
    let presence = match cfg.logic.stage {
        Some(_) => RedisPresence::connect(&cfg.redis_url, PRESENCE_TTL_UNUSED_S).await?,
        None => RedisPresence::open(&cfg.redis_url, PRESENCE_TTL_UNUSED_S)?,
    };
    // A worker id of our own before anything is minted; the keeper renews it until the
    // service has stopped, then frees it.
    let (stop_lease, lease_stop) = watch::channel(false);
    let held = im_bus::lease::acquire(
        &cfg.redis_url,
        &cfg.holder,
        cfg.worker_id,
        cfg.worker_hint,
        cfg.lease.clone(),
        lease_stop,
    )
    .await
    .map_err(|e| {
        format!(
            "leasing a Snowflake worker id in {}: {e}",
            redact_url(&cfg.redis_url)
        )
    })?;
    let backends = Backends {
        store: Arc::new(store),
        revocations: Arc::new(revocations),
        bus: Arc::new(KafkaBus::new(cfg.kafka)),
        presence: Arc::new(presence),
        snowflake: held.lease,
    };
    // Login sends clients to the least-loaded gateway that announces itself in Redis.
    let mut logic_cfg = cfg.logic;
    let registry = im_bus::registry::RedisRegistry::open(&cfg.redis_url)?;
    logic_cfg.api.gateways = Some(api::gateways::GatewayRegistry(Arc::new(registry)));
    let served = serve_on(logic_cfg, backends, shutdown).await;
    let _ = stop_lease.send(true);
    if tokio::time::timeout(STOP_GRACE, held.keeper).await.is_err() {
        log::warn!(
            "releasing the Snowflake lease took over {STOP_GRACE:?}; it frees itself after its TTL"
        );
    }
    served
}

/// Serves the REST API and runs the stage on `b` until `shutdown` turns true; an `Err` when
/// either stops by itself or cannot start.
pub async fn serve_on(
    cfg: LogicConfig,
    b: Backends,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    b.store
        .migrate()
        .await
        .map_err(|e| format!("migrating the {} store: {e}", b.store.backend()))?;
    // The parts stop on their own watch: on `shutdown`, and also when one of them fails, so
    // the others always get their graceful stop (the stage its final flush).
    let (stop_parts, parts_stop) = watch::channel(false);
    let (pipeline, mut stage_task) = match cfg.stage {
        Some(s) => {
            let (p, t) = start_stage(s, &b, parts_stop.clone()).await?;
            (Some(p), Some(t))
        }
        None => (None, None),
    };
    let mut api_stop = parts_stop;
    let listen = cfg.api_listen;
    let mut server = tokio::spawn(serve(
        b.store,
        b.revocations,
        b.snowflake,
        cfg.api,
        listen,
        pipeline,
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));
    let stage_done = async {
        match &mut stage_task {
            Some(t) => t.await,
            None => std::future::pending().await,
        }
    };
    let failure = tokio::select! {
        _ = shutdown.wait_for(|s| *s) => None,
        r = &mut server => Some(match r {
            Ok(Ok(())) => format!("REST API on {listen} stopped"),
            Ok(Err(e)) => format!("REST API on {listen}: {e}"),
            Err(e) => format!("REST API on {listen}: {e}"),
        }),
        r = stage_done => Some(match r {
            Ok(Ok(())) => "the pipeline stage stopped".to_string(),
            Ok(Err(e)) => format!("pipeline stage: {e}"),
            Err(e) => format!("pipeline stage: {e}"),
        }),
    };
    let _ = stop_parts.send(true);
    // A part that already ended is not waited for again.
    let stage_task = stage_task.filter(|t| !t.is_finished());
    let server = (!server.is_finished()).then_some(server);
    stop(stage_task, server, listen).await;
    match failure {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Once told to stop: waits for the stage, then the API, each at most `STOP_GRACE`.
async fn stop(
    stage: Option<StageTask>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    listen: SocketAddr,
) {
    if let Some(t) = stage {
        match tokio::time::timeout(STOP_GRACE, t).await {
            Ok(Ok(Err(e))) => log::error!("pipeline stage: {e}"),
            Err(_) => log::warn!(
                "the pipeline stage did not stop in {STOP_GRACE:?}; stopping anyway (uncommitted records replay)"
            ),
            _ => {}
        }
    }
    let Some(server) = server else { return };
    match tokio::time::timeout(STOP_GRACE, server).await {
        Ok(Ok(Err(e))) => log::error!("REST API on {listen}: {e}"),
        Err(_) => log::warn!("the REST API did not stop in {STOP_GRACE:?}"),
        _ => {}
    }
}

type StageTask = tokio::task::JoinHandle<Result<(), String>>;

/// Starts the stage on `b`, and the REST API's way into it.
async fn start_stage(
    s: StageSettings,
    b: &Backends,
    shutdown: watch::Receiver<bool>,
) -> Result<(api::Pipeline, StageTask), String> {
    let members = Arc::new(Members::new(b.store.clone()));
    let blocks = Arc::new(stage::blocks::Blocks::new(b.store.clone()));
    let client = PipelineClient::start(b.bus.clone(), &s.logic_id)
        .await
        .map_err(|e| format!("the {}: {e}", b.bus.describe()))?;
    let stats = s.stats.clone();
    let (pusher, web_push) = match &s.push {
        Some(p) => start_push(p, &b.store, &stats.push)?,
        None => (None, None),
    };
    let task = tokio::spawn(stage::run(
        b.bus.clone(),
        b.store.clone(),
        b.presence.clone(),
        (members.clone(), blocks.clone(), pusher),
        s.stage.clone(),
        b.snowflake.clone(),
        stats.clone(),
        shutdown,
    ));
    log::info!(
        "logic {}: pipeline stage on, Snowflake worker {:?}",
        s.logic_id,
        b.snowflake.current()
    );
    let pipeline = api::Pipeline {
        client,
        members,
        blocks,
        stats,
        presence: b.presence.clone(),
        web_push,
    };
    Ok((pipeline, task))
}

/// The REST API alone on `store`, until `shutdown` resolves; with `pipeline`, `POST
/// /messages/send` goes through it.
pub async fn serve(
    store: Arc<dyn Store>,
    revocations: Arc<dyn Revocations>,
    lease: Arc<WorkerLease>,
    cfg: api::ApiConfig,
    listen: SocketAddr,
    pipeline: Option<api::Pipeline>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    store.migrate().await.map_err(std::io::Error::other)?;
    let cost = cfg.password_cost;
    let dummy_hash = tokio::task::spawn_blocking(move || auth::dummy_hash(cost))
        .await
        .map_err(std::io::Error::other)?;
    let state = Arc::new(api::AppState::new(
        store,
        revocations,
        cfg,
        dummy_hash,
        lease,
        pipeline,
    ));
    let metrics = match state.cfg.metrics {
        api::MetricsAt::Own(at) => {
            let l = tokio::net::TcpListener::bind(at).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("--metrics-listen {at}: {e}"))
            })?;
            log::info!("logic metrics on http://{}/metrics", l.local_addr()?);
            let app = api::metrics_router(state.clone());
            Some(tokio::spawn(async move { axum::serve(l, app).await }))
        }
        api::MetricsAt::Api | api::MetricsAt::Elsewhere => None,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    log::info!("logic REST API on http://{}/api/v1", listener.local_addr()?);
    // With each connection's peer address: login throttling keys on it (api::ClientAddr).
    let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(m) = metrics {
        m.abort();
    }
    served
}

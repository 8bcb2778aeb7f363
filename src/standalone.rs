//! Standalone: the gateway, logic (its stage and REST API) and persist in one process, on the
//! in-process bus, SQLite and in-memory presence (ARCHITECTURE.md, "standalone"). The same
//! role code as the distributed mode: `im_gateway::start`, `logic::serve_on` and
//! `persist::Persist` get in-process backends instead of Kafka, MySQL and Redis. A send is
//! acknowledged once persist has written it to SQLite (the in-process bus acknowledges
//! `im.messages` after persist's commit), so an acknowledged message survives a crash.

use crate::cli::{StandaloneArgs, STANDALONE_WORKER_ID};
use crate::signals::Signals;
use im_bus::memory::PARTITION_BYTES_MAX;
use im_bus::presence::MemoryPresence;
use im_bus::revocation::RevokedSet;
use im_bus::{Bus, MemoryBus};
use im_shared::records::topics;
use im_shared::snowflake::WorkerLease;
use im_store::{SqliteStore, Store};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Partitions of the in-process bus's topics.
const PARTITIONS: i32 = 4;
/// Nothing expires in in-memory presence: shards need not refresh it (once an hour).
const PRESENCE_REFRESH_MS: u64 = 3_600_000;
/// How long a send may wait for the in-process bus before its sender gets `error`.
const PRODUCE_TIMEOUT_MS: u32 = 5_000;
/// How long each part may take to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the main thread looks for a signal or a part that stopped by itself.
const POLL: Duration = Duration::from_millis(500);

type Task = JoinHandle<Result<(), String>>;

/// A part running on the runtime, and the way to stop it.
struct Part {
    stop: watch::Sender<bool>,
    task: Task,
}

pub(crate) fn run(a: StandaloneArgs) -> Result<(), String> {
    let signals = Signals::block();
    let nofile = gateway_core::gateway::raise_nofile();
    crate::refuse_if_served(a.gateway.ws_listen)?;
    crate::refuse_if_served(a.api.api_listen)?;
    let secret = match &a.gateway.jwt_secret {
        Some(s) => s.clone(),
        None => secret(&a.data_dir)?,
    };
    let mut gw = a.gateway.config(secret.clone().into_bytes(), None, 1);
    a.trace.install("im", &gw.gateway_id)?;
    gw.presence_refresh_ms = PRESENCE_REFRESH_MS;
    gw.token_lifetime_max_s = a.tokens.token_lifetime_max_s;
    // One address for the whole process's metrics: the gateway's listener renders logic's
    // and persist's counters too (the hook below), and the REST port serves none.
    gw.metrics_listen = a.metrics.metrics_listen;
    let elsewhere = gw.metrics_listen.is_some();
    let stage_stats: Arc<logic::stage::StageStats> = Default::default();
    let (ws, api) = (gw.ws_listen, a.api.api_listen);
    let logic_cfg = logic_config(&a, &secret, ws, stage_stats.clone())?;

    // Logic and persist run on a small tokio runtime beside the gateway's pinned shards.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("im-logic")
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime: {e}"))?;
    let store = open_store(&rt, &a.data_dir)?;
    let bus: Arc<dyn Bus> = Arc::new(
        MemoryBus::new(PARTITIONS, PARTITION_BYTES_MAX)
            .ack_after_commit(topics::MESSAGES, persist::GROUP),
    );
    let presence = Arc::new(MemoryPresence::default());
    // One revocation set for both: a logged-out token no longer opens a WebSocket.
    let revoked = Arc::new(RevokedSet::default());

    // Persist first, then logic: each consumer is in its group before anything is produced.
    let persist_cfg = persist::PersistConfig {
        batch_rows: a.batch_rows.max(1),
        batch_ms: a.batch_ms.max(1),
        linger_ms: a.linger_ms,
        ..Default::default()
    };
    let persist = persist::Persist::new(bus.clone(), store.clone(), persist_cfg);
    let persist_stats = persist.stats();
    let persist = spawn(&rt, |stop| persist.run(stop));
    let backends = logic::Backends {
        store,
        revocations: revoked.clone(),
        bus: bus.clone(),
        presence: presence.clone(),
        // One process owns its SQLite file, and mints with one id.
        snowflake: Arc::new(WorkerLease::fixed(STANDALONE_WORKER_ID)),
    };
    let logic = spawn(&rt, |stop| logic::serve_on(logic_cfg, backends, stop));

    let routing = im_gateway::Routing::Pipeline(im_gateway::Pipeline {
        bus,
        presence,
        revoked,
        produce_timeout_ms: PRODUCE_TIMEOUT_MS,
        linger_ms: 0,
    });
    let metrics: gateway_core::shard::MetricsHook = Arc::new(move |out: &mut String| {
        out.push_str(&persist::render_metrics(&persist_stats));
        if elsewhere {
            stage_stats.render(out);
            logic::api::render_api_errors(out);
            im_telemetry::render(out);
        }
    });
    let gateway = match im_gateway::start(gw, routing, Some(metrics)) {
        Ok(g) => g,
        Err(e) => {
            let _ = (logic.stop.send(true), persist.stop.send(true));
            rt.shutdown_timeout(STOP_GRACE);
            return Err(e);
        }
    };
    banner(&a.data_dir, api, ws, nofile);
    let crashed = wait(&signals, &[&logic, &persist]);

    // In the order data flows: no new sends, then logic finishes its batch, then persist
    // writes and commits what it holds (which acknowledges nothing new: the senders are gone,
    // and an unacknowledged send is retried by its client with the same cid).
    let mut errors: Vec<String> = Vec::new();
    errors.extend(gateway.stop().err());
    errors.extend(stopped(&rt, "logic", logic));
    errors.extend(stopped(&rt, "persist", persist));
    rt.shutdown_timeout(Duration::from_secs(2));
    match (crashed, errors.is_empty()) {
        (_, false) => Err(errors.join("; ")),
        (true, true) => Err("a part of the standalone server stopped unexpectedly".into()),
        (false, true) => Ok(()),
    }
}

/// Logic with its stage; login answers with this process's WebSocket address.
fn logic_config(
    a: &StandaloneArgs,
    secret: &str,
    ws: std::net::SocketAddr,
    stats: Arc<logic::stage::StageStats>,
) -> Result<logic::LogicConfig, String> {
    let mut api = a.api.config(secret, format!("ws://{ws}/ws"), &a.tokens)?;
    if a.metrics.metrics_listen.is_some() {
        api.metrics = logic::api::MetricsAt::Elsewhere;
    }
    Ok(logic::LogicConfig {
        api,
        api_listen: a.api.api_listen,
        stage: Some(logic::StageSettings {
            push: push_settings(a)?,
            logic_id: "standalone-logic".into(),
            stage: logic::stage::StageConfig {
                batch_wait_ms: a.stage_wait_ms,
                ..Default::default()
            },
            stats,
        }),
    })
}

/// What the flags give, and Web Push with the data directory's key unless told otherwise.
fn push_settings(a: &StandaloneArgs) -> Result<Option<logic::PushSettings>, String> {
    let mut push = a.api.push()?.unwrap_or_default();
    if a.no_web_push {
        push.web_push = None;
    } else if push.web_push.is_none() {
        let (public_key, private_key) = vapid_keys(&a.data_dir)?;
        let subject = a.api.web_push_subject.clone().unwrap_or_else(|| {
            log::warn!(
                "web push: no --web-push-subject; using mailto:im@localhost, which Apple's push \
                 service refuses (Safari gets no notifications): set it to a mailto: or \
                 https:// URL of yours"
            );
            "mailto:im@localhost".into()
        });
        push.web_push = Some(logic::WebPushSettings {
            public_key,
            private_key,
            subject,
            endpoints: a.api.web_push_endpoints.clone(),
        });
    }
    Ok((push.webhook.is_some() || push.web_push.is_some()).then_some(push))
}

/// The VAPID key pair kept in `dir` (generated on first use): browsers' subscriptions are
/// bound to it, so it must outlive restarts.
fn vapid_keys(dir: &Path) -> Result<(String, String), String> {
    let path = dir.join("web_push_vapid");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
            return match (lines.next(), lines.next()) {
                (Some(public), Some(private)) => Ok((public.into(), private.into())),
                _ => Err(format!(
                    "{}: not a key pair (public, then private, one a line): delete it to generate one",
                    path.display()
                )),
            };
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    private_dir(dir)?;
    let (public, private) = logic::push::ece::Vapid::generate()?;
    create_private(&path, &format!("{public}\n{private}"))?;
    log::info!(
        "generated a Web Push (VAPID) key pair in {}",
        path.display()
    );
    Ok((public, private))
}

/// A new file of ours (never one that is there), for this user only, holding `text` and a
/// line end.
fn create_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    writeln!(f, "{text}").map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Our files in the data directory.
const OUR_FILES: [&str; 5] = [
    "im.db",
    "im.db-wal",
    "im.db-shm",
    "jwt_secret",
    "web_push_vapid",
];

/// The data directory, for this user only: it holds password and refresh-token hashes,
/// every message and the JWT secret. Created 0700; an existing one that holds nothing but
/// our files is made 0700 (when we own it), and our files 0600. A directory that holds other
/// things too (`--data-dir /tmp`, or `.`) keeps its mode, with a warning: our files are still
/// made 0600.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let err = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err("creating", dir, e))?;
    let mut only_ours = true;
    for entry in std::fs::read_dir(dir).map_err(|e| err("reading", dir, e))? {
        let name = entry.map_err(|e| err("reading", dir, e))?.file_name();
        only_ours &= OUR_FILES.iter().any(|f| name == *f);
    }
    let meta = std::fs::metadata(dir).map_err(|e| err("reading", dir, e))?;
    let mode = meta.permissions().mode();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let mine = meta.uid() == unsafe { libc::geteuid() };
    if mode & 0o077 != 0 {
        if only_ours && mine {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err("making private", dir, e))?;
            log::info!("{}: mode {:o} → 700", dir.display(), mode & 0o777);
        } else {
            log::warn!(
                "{} is open to other users ({:o}) and is not only ours: its mode is left as it is (our files in it are 0600)",
                dir.display(),
                mode & 0o777
            );
        }
    }
    // SQLite gives its log and shared-memory files the database file's mode: so the database
    // is created 0600 here, before SQLite opens it, and existing files are made so.
    let db = dir.join("im.db");
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&db)
    {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(err("creating", &db, e));
        }
    }
    for f in OUR_FILES {
        let p = dir.join(f);
        match std::fs::metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| err("making private", &p, e))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("reading", &p, e)),
        }
    }
    Ok(())
}

/// Opens (and migrates) the SQLite database in `dir`.
fn open_store(rt: &tokio::runtime::Runtime, dir: &Path) -> Result<Arc<dyn Store>, String> {
    private_dir(dir)?;
    let db = dir.join("im.db");
    let store = rt
        .block_on(SqliteStore::open(&db))
        .map_err(|e| format!("opening {}: {e}", db.display()))?;
    rt.block_on(store.migrate())
        .map_err(|e| format!("migrating {}: {e}", db.display()))?;
    Ok(Arc::new(store))
}

/// Spawns a part that runs until its stop watch turns true.
fn spawn<F, Fut>(rt: &tokio::runtime::Runtime, part: F) -> Part
where
    F: FnOnce(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let (stop, rx) = watch::channel(false);
    Part {
        stop,
        task: rt.spawn(part(rx)),
    }
}

/// Waits for a signal (`false`) or for a part that stopped by itself (`true`).
fn wait(signals: &Signals, parts: &[&Part]) -> bool {
    loop {
        if parts.iter().any(|p| p.task.is_finished()) {
            return true;
        }
        if let Some(sig) = signals.take(POLL) {
            log::info!("signal {sig}: closing connections with 1012 and stopping");
            return false;
        }
    }
}

/// Stops a part and waits for it (at most `STOP_GRACE`); its error, if it had one.
fn stopped(rt: &tokio::runtime::Runtime, what: &str, part: Part) -> Option<String> {
    let _ = part.stop.send(true);
    let task = part.task;
    // The timer must be made inside the runtime, hence the `async` block.
    match rt.block_on(async { tokio::time::timeout(STOP_GRACE, task).await }) {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(format!("{what}: {e}")),
        Ok(Err(e)) => Some(format!("{what}: {e}")),
        Err(_) => {
            log::warn!("{what} did not stop in {STOP_GRACE:?}");
            None
        }
    }
}

fn banner(data_dir: &Path, api: std::net::SocketAddr, ws: std::net::SocketAddr, nofile: usize) {
    println!(
        "im standalone: gateway, logic and persist in one process (SQLite in {}, in-process bus)",
        data_dir.display()
    );
    println!("  open       http://{api}/          the browser client");
    println!("  REST       http://{api}/api/v1    WebSocket ws://{ws}/ws?token=<JWT from login>");
    println!(
        "  health     http://{ws}/healthz   metrics http://{ws}/metrics and http://{api}/metrics"
    );
    println!("  open files {nofile}; stop with Ctrl-C (connections get close 1012)");
}

/// The standalone secret: generated on first start, kept with mode 0600.
fn secret(dir: &Path) -> Result<String, String> {
    let path = dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(format!(
                "{} is empty: delete it to generate a new secret",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    private_dir(dir)?;
    let secret = im_shared::jwt::random_hex(32);
    create_private(&path, &secret)?;
    log::info!("generated a JWT secret in {}", path.display());
    Ok(secret)
}

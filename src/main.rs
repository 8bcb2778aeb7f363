//! `im`: one binary for every role (PROTOCOL.md, "Command line"). This file only parses the
//! command line and wires the crates together; the work lives in `gateway-core` and friends.

use clap::{Args, Parser, Subcommand};
use gateway_core::Gateway;
use im_shared::config::GatewayConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "im",
    version,
    about = "A distributed instant-messaging server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// With no subcommand, `im` runs standalone.
    #[command(flatten)]
    standalone: StandaloneArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything in one process with embedded defaults (the default command).
    Standalone(StandaloneArgs),
    /// The WebSocket gateway alone.
    Gateway(GatewayCmdArgs),
    /// The logic service: the REST API on MySQL, and the pipeline stage on Kafka.
    Logic(LogicArgs),
    /// The persist service: im.messages → MySQL in batches.
    Persist(PersistArgs),
    /// Print a signed access token for a user (for trying the server with any WebSocket client).
    Token(TokenArgs),
}

#[derive(Args, Clone)]
struct ApiArgs {
    /// REST API listen address.
    #[arg(long, env = "IM_API_LISTEN", default_value = "127.0.0.1:8080")]
    api_listen: SocketAddr,
    /// Lifetime of access tokens.
    #[arg(long, env = "IM_ACCESS_TTL_S", default_value_t = 3600)]
    access_ttl_s: u64,
    /// Lifetime of refresh tokens.
    #[arg(long, env = "IM_REFRESH_TTL_S", default_value_t = 30 * 24 * 3600)]
    refresh_ttl_s: u64,
    /// argon2id memory cost in KiB (time cost 2, one lane).
    #[arg(long, env = "IM_ARGON2_M_KIB", default_value_t = 19 * 1024)]
    argon2_m_kib: u32,
}

impl ApiArgs {
    fn config(&self, secret: &str, ws_url: String) -> logic::api::ApiConfig {
        logic::api::ApiConfig {
            jwt_secret: secret.as_bytes().to_vec(),
            access_ttl_s: self.access_ttl_s,
            refresh_ttl_s: self.refresh_ttl_s,
            password_cost: logic::auth::PasswordCost {
                m_kib: self.argon2_m_kib.max(8),
                ..Default::default()
            },
            ws_url,
            // Distinct from the gateway shards' workers (0..64 per process) in standalone.
            worker_id: 1000,
        }
    }
}

#[derive(Args, Clone)]
struct KafkaArgs {
    /// Kafka bootstrap brokers, host:port[,host:port...].
    #[arg(long, env = "IM_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Partitions of im.upstream and im.messages when this process creates them.
    #[arg(long, env = "IM_KAFKA_PARTITIONS", default_value_t = 4)]
    kafka_partitions: i32,
    /// Replication factor of the topics this process creates.
    #[arg(long, env = "IM_KAFKA_REPLICATION", default_value_t = 1)]
    kafka_replication: i32,
    /// Static consumer-group membership id, unique per logic or persist process: a restart
    /// with the same id resumes its partitions at once, without waiting out the session of
    /// the process that died [default: logic: its --logic-id; persist: persist-<host name>].
    #[arg(long, env = "IM_KAFKA_INSTANCE_ID")]
    kafka_instance_id: Option<String>,
}

impl KafkaArgs {
    fn config(&self) -> im_pipeline::KafkaConfig {
        im_pipeline::KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            partitions: self.kafka_partitions.max(1),
            replication: self.kafka_replication.max(1),
            instance_id: self.kafka_instance_id.clone(),
        }
    }
}

#[derive(Args)]
struct PersistArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// MySQL (or MariaDB) to write messages to.
    #[arg(
        long,
        env = "IM_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/im"
    )]
    mysql_url: String,
    /// Flush a batch at this many rows...
    #[arg(long, env = "IM_PERSIST_BATCH_ROWS", default_value_t = 500)]
    batch_rows: usize,
    /// ...or when its oldest row has waited this long.
    #[arg(long, env = "IM_PERSIST_BATCH_MS", default_value_t = 50)]
    batch_ms: u64,
}

#[derive(Args)]
struct LogicArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Serve the REST API only, without the Kafka pipeline stage (messages/send then stores
    /// directly and delivers nothing live).
    #[arg(long, env = "IM_NO_PIPELINE")]
    no_pipeline: bool,
    /// This instance's id, unique among logic instances (its reply topic's name)
    /// [default: logic-<host name>-<API port>].
    #[arg(long, env = "IM_LOGIC_ID")]
    logic_id: Option<String>,
    /// Snowflake worker id, unique among logic instances (0..1023) [default: from --logic-id].
    #[arg(long, env = "IM_WORKER_ID")]
    worker_id: Option<u16>,
    /// MySQL (or MariaDB) holding users, groups and messages.
    #[arg(
        long,
        env = "IM_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/im"
    )]
    mysql_url: String,
    #[arg(long, env = "IM_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The WebSocket URL login answers with.
    #[arg(long, env = "IM_WS_URL", default_value = "ws://127.0.0.1:8090/ws")]
    ws_url: String,
    /// Redis for revoked tokens (shared with the gateways).
    #[arg(long, env = "IM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

#[derive(Args, Clone)]
struct GatewayArgs {
    /// WebSocket listen address (also serves /healthz and /metrics).
    #[arg(long, env = "IM_WS_LISTEN", default_value = "127.0.0.1:8090")]
    ws_listen: SocketAddr,
    /// Shards (threads pinned to cores); 0 = one per available core.
    #[arg(long, env = "IM_SHARDS", default_value_t = 0)]
    shards: usize,
    /// HS256 secret for access tokens (standalone keeps a generated one in --data-dir).
    #[arg(long, env = "IM_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// This gateway's id [default: <host name>-<ws port>].
    #[arg(long, env = "IM_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Close connections that show no life for this long.
    #[arg(long, env = "IM_HEARTBEAT_TIMEOUT_MS", default_value_t = 90_000)]
    heartbeat_timeout_ms: u64,
    /// Time allowed from TCP accept to a complete upgrade request.
    #[arg(long, env = "IM_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Largest WebSocket message; larger ones are closed with 1009.
    #[arg(long, env = "IM_FRAME_BYTES_MAX", default_value_t = 64 * 1024)]
    frame_bytes_max: usize,
    /// Per-connection outbound queue bound; past it the connection is closed with 1013.
    #[arg(long, env = "IM_OUTBOUND_BYTES_MAX", default_value_t = 256 * 1024)]
    outbound_bytes_max: usize,
    /// Messages (and pings) per second a connection may send, bursts of twice that; past it
    /// `error` 4290, then close 1008.
    #[arg(long, env = "IM_MSGS_PER_SEC_MAX", default_value_t = 100)]
    msgs_per_sec_max: u32,
    /// Connections per shard [default: what the open-file limit allows].
    #[arg(long, env = "IM_CONNS_PER_SHARD_MAX")]
    conns_per_shard_max: Option<usize>,
    /// Receive buffers in each shard's io_uring buffer ring.
    #[arg(long, env = "IM_RECV_BUFFERS", default_value_t = 256)]
    recv_buffers: usize,
    /// Size of each receive buffer.
    #[arg(long, env = "IM_RECV_BUFFER_BYTES", default_value_t = 1024)]
    recv_buffer_bytes: usize,
    /// Use the epoll driver even where io_uring works.
    #[arg(long, env = "IM_EPOLL")]
    epoll: bool,
    /// Do not pin shard threads to cores.
    #[arg(long, env = "IM_NO_PIN")]
    no_pin: bool,
}

#[derive(Args, Clone)]
struct PipelineArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Redis for presence (user → gateway).
    #[arg(long, env = "IM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Without Kafka: route messages between this process's connections only, unsequenced by
    /// logic and unstored (for benchmarking the gateway alone).
    #[arg(long, env = "IM_LOCAL_ROUTER")]
    local_router: bool,
    /// Presence entries expire this long after their last refresh.
    #[arg(long, env = "IM_PRESENCE_TTL_S", default_value_t = 180)]
    presence_ttl_s: u64,
    /// How long a send may wait for the broker before the client gets a retryable error.
    #[arg(long, env = "IM_PRODUCE_TIMEOUT_MS", default_value_t = 5_000)]
    produce_timeout_ms: u32,
}

#[derive(Args, Clone)]
struct StandaloneArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    api: ApiArgs,
    /// Where standalone keeps its state: the generated JWT secret and the SQLite database.
    #[arg(long, env = "IM_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Messages are written to SQLite (and only then acknowledged) in batches of this many
    /// rows...
    #[arg(long, env = "IM_PERSIST_BATCH_ROWS", default_value_t = 500)]
    batch_rows: usize,
    /// ...or after this long: the added latency of a send.
    #[arg(long, env = "IM_PERSIST_BATCH_MS", default_value_t = 5)]
    batch_ms: u64,
}

#[derive(Args)]
struct GatewayCmdArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Run this many gateway processes sharing the port with SO_REUSEPORT, each with its own
    /// gateway id: how one host holds more connections than one process's open-file limit.
    #[arg(long, env = "IM_GATEWAY_PROCESSES", default_value_t = 1)]
    processes: usize,
    /// Set by the parent of a multi-process gateway.
    #[arg(long, hide = true)]
    process_index: Option<usize>,
}

#[derive(Args)]
struct TokenArgs {
    /// User id to put in `sub`.
    #[arg(long)]
    user: u64,
    /// Validity in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    ttl_s: u64,
    #[arg(long, env = "IM_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Read the secret standalone generated here when --jwt-secret is not given.
    #[arg(long, env = "IM_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
}

fn main() -> ExitCode {
    // Transparent huge pages make every touched 2 MiB region cost a whole huge page: at a
    // million mostly idle connections, the difference between ~100 and ~1,000 bytes each.
    // mimalloc is built without its THP advice (feature `no_thp`); this also covers hosts
    // where THP is `always`. IM_ALLOW_THP=1 keeps them, for throughput experiments.
    if std::env::var_os("IM_ALLOW_THP").is_none_or(|v| v != "1") {
        // SAFETY: prctl with constant arguments; affects only this process and its children.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        None => standalone(cli.standalone),
        Some(Cmd::Standalone(a)) => standalone(a),
        Some(Cmd::Gateway(a)) => gateway(a),
        Some(Cmd::Logic(a)) => logic_service(a),
        Some(Cmd::Persist(a)) => persist_service(a),
        Some(Cmd::Token(a)) => token(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("im: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn gateway_config(
    a: &GatewayArgs,
    secret: Vec<u8>,
    index: Option<usize>,
    processes: usize,
) -> GatewayConfig {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let shards = if a.shards == 0 {
        (cores / processes.max(1)).max(1)
    } else {
        a.shards
    };
    let base_id = a
        .gateway_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), a.ws_listen.port()));
    let gateway_id = im_shared::records::topic_safe_id(&match index {
        Some(i) => format!("{base_id}-p{i}"),
        None => base_id,
    });
    let mut cfg = GatewayConfig {
        ws_listen: a.ws_listen,
        shards,
        pin_first_core: (!a.no_pin).then_some(index.unwrap_or(0) * shards),
        jwt_secret: secret,
        gateway_id,
        worker_id: ((index.unwrap_or(0) * 64) % 1024) as u16,
        frame_bytes_max: a.frame_bytes_max,
        heartbeat_timeout_ms: a.heartbeat_timeout_ms,
        handshake_timeout_ms: a.handshake_timeout_ms,
        outbound_bytes_max: a.outbound_bytes_max,
        msgs_per_sec_max: a.msgs_per_sec_max,
        recv_buffers: a.recv_buffers,
        recv_buffer_bytes: a.recv_buffer_bytes,
        force_epoll: a.epoll,
        ..GatewayConfig::default()
    };
    if let Some(m) = a.conns_per_shard_max {
        cfg.conns_per_shard_max = m;
    }
    cfg
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The standalone secret: generated on first start, kept with mode 0600.
fn standalone_secret(dir: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(format!(
                "{} is empty: delete it to generate a new secret",
                path.display()
            )
            .into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display()).into()),
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let secret = im_shared::jwt::random_hex(32);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    writeln!(f, "{secret}")?;
    log::info!("generated a JWT secret in {}", path.display());
    Ok(secret)
}

/// Blocks SIGINT and SIGTERM in this thread (and every thread it spawns later), so that
/// `wait_for_signal` can take them synchronously instead of in a handler.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout_ms` for SIGINT/SIGTERM; the signal number, or None on timeout.
fn wait_for_signal(set: &libc::sigset_t, timeout_ms: u64) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as i64,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as i64,
    };
    // SAFETY: set is initialised; info may be null.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// SO_REUSEPORT lets any process of ours bind a port we already serve, and the kernel would
/// then split clients between two gateways that know nothing of each other. Several gateways
/// share a port only as one `--processes` group; anyone else finds the port taken.
fn refuse_if_served(addr: SocketAddr) -> Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = match addr.ip() {
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    if std::net::TcpStream::connect_timeout(&probe, std::time::Duration::from_millis(200)).is_ok() {
        return Err(format!(
            "{addr} is already served by another process; to run several gateways on one port use `im gateway --processes N`"
        )
        .into());
    }
    Ok(())
}

fn run_gateway_until_signal(
    mut cfg: GatewayConfig,
    p: &PipelineArgs,
    set: &libc::sigset_t,
) -> Result<()> {
    cfg.presence_refresh_ms = (p.presence_ttl_s.max(3) * 1000) / 3;
    let gateway_id = cfg.gateway_id.clone();
    let stats = Arc::new(im_pipeline::bridge::BridgeStats::default());
    let (s, gw) = (stats.clone(), gateway_id.clone());
    let hook: gateway_core::shard::MetricsHook =
        Arc::new(move |out: &mut String| s.render(&gw, out));
    // Logged-out tokens are refused at the upgrade (their open connections are closed by
    // logic through this gateway's downstream topic).
    let follow_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let revoked: Option<gateway_core::shard::RevokedCheck> = if p.local_router {
        None
    } else {
        let set = Arc::new(im_pipeline::revoked::RevokedSet::default());
        im_pipeline::revoked::follow(&p.redis_url, set.clone(), follow_stop.clone())?;
        Some(Arc::new(move |jti: &str, now_s: u64| {
            set.contains(jti, now_s)
        }))
    };
    let (handle, end) = Gateway::start_with(
        cfg,
        revoked,
        !p.local_router,
        (!p.local_router).then_some(hook),
    )?;
    let bridge = match end {
        None => None,
        Some(end) => {
            let bcfg = im_pipeline::bridge::BridgeConfig {
                gateway_id,
                presence: im_pipeline::bridge::PresenceSink::Redis {
                    url: p.redis_url.clone(),
                    ttl_s: p.presence_ttl_s.max(3),
                },
                produce_timeout_ms: p.produce_timeout_ms.max(1),
                linger_ms: 1,
            };
            let bus: Arc<dyn im_pipeline::Bus> =
                Arc::new(im_pipeline::KafkaBus::new(p.kafka.config()));
            match im_pipeline::bridge::start(bcfg, bus, end, stats) {
                Ok(b) => Some(b),
                Err(e) => {
                    handle.shutdown();
                    let _ = handle.join();
                    return Err(format!(
                        "starting the Kafka bridge ({}): {e}",
                        p.kafka.kafka_brokers
                    )
                    .into());
                }
            }
        }
    };
    loop {
        if let Some(sig) = wait_for_signal(set, 1000) {
            log::info!("signal {sig}: closing connections with 1001 and stopping");
            handle.shutdown();
            break;
        }
    }
    handle.join()?;
    if let Some(b) = bridge {
        b.stop();
    }
    follow_stop.store(true, std::sync::atomic::Ordering::Release);
    Ok(())
}

/// Standalone: the gateway, logic's pipeline stage and REST API, and persist in one process,
/// on the in-process bus, SQLite and in-memory presence (ARCHITECTURE.md, "standalone").
/// The same code paths as the distributed mode; a send is acknowledged once persist has
/// written it to SQLite (the in-process bus acknowledges `im.messages` after persist's
/// commit), so an acknowledged message survives a crash.
fn standalone(a: StandaloneArgs) -> Result<()> {
    use im_pipeline::bus::memory::PARTITION_BYTES_MAX;
    use im_shared::records::topics;
    let set = block_signals();
    let nofile = gateway_core::gateway::raise_nofile();
    refuse_if_served(a.gateway.ws_listen)?;
    refuse_if_served(a.api.api_listen)?;
    let secret = match &a.gateway.jwt_secret {
        Some(s) => s.clone(),
        None => standalone_secret(&a.data_dir)?,
    };
    let mut cfg = gateway_config(&a.gateway, secret.clone().into_bytes(), None, 1);
    let ws = cfg.ws_listen;
    let api = a.api.api_listen;
    let gateway_id = cfg.gateway_id.clone();

    // Logic and persist run on a small tokio runtime beside the gateway's pinned shards.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("im-logic")
        .enable_all()
        .build()?;
    std::fs::create_dir_all(&a.data_dir)
        .map_err(|e| format!("creating {}: {e}", a.data_dir.display()))?;
    let db = a.data_dir.join("im.db");
    let store: Arc<dyn logic::store::Store> = Arc::new(
        rt.block_on(logic::store::SqliteStore::open(&db))
            .map_err(|e| format!("opening {}: {e}", db.display()))?,
    );
    rt.block_on(store.migrate())
        .map_err(|e| format!("migrating {}: {e}", db.display()))?;

    let memory_bus = im_pipeline::MemoryBus::new(4, PARTITION_BYTES_MAX)
        .ack_after_commit(topics::MESSAGES, persist::GROUP);
    let bus: Arc<dyn im_pipeline::Bus> = Arc::new(memory_bus);
    let presence = Arc::new(im_pipeline::presence::MemoryPresence::default());

    // Persist first, then logic: each consumer is in its group before anything is produced.
    let (stop_persist, persist_rx) = tokio::sync::watch::channel(false);
    let persist_cfg = persist::PersistConfig {
        batch_rows: a.batch_rows.max(1),
        batch_ms: a.batch_ms.max(1),
        ..Default::default()
    };
    let persist = persist::Persist::new(bus.clone(), store.clone(), persist_cfg);
    let persist_stats = persist.stats();
    let persist_task = rt.spawn(persist.run(persist_rx));

    let (stop_logic, logic_rx) = tokio::sync::watch::channel(false);
    let members = Arc::new(logic::pipeline::presence::Members::new(store.clone()));
    let client = rt
        .block_on(logic::pipeline::client::PipelineClient::start(
            bus.clone(),
            "standalone-logic",
        ))
        .map_err(|e| format!("the in-process bus: {e}"))?;
    let stage_stats = Arc::new(logic::pipeline::PipelineStats::default());
    let presence_dyn: Arc<dyn logic::pipeline::presence::Presence> = presence.clone();
    let stage_task = rt.spawn(logic::pipeline::run(
        bus.clone(),
        store.clone(),
        presence_dyn.clone(),
        members.clone(),
        logic::pipeline::PipelineConfig {
            // The REST API's own ids use 1000, the gateway's shards 0..64.
            worker_id: 1001,
            ..Default::default()
        },
        stage_stats.clone(),
        logic_rx.clone(),
    ));

    // One revocation list for both: a logged-out token no longer opens a WebSocket.
    let revocations = Arc::new(logic::auth::MemoryRevocations::default());
    let seen_by_gateway = revocations.clone();
    let revoked: gateway_core::shard::RevokedCheck =
        Arc::new(move |jti: &str, now_s: u64| seen_by_gateway.contains(jti, now_s));
    let mut api_stop = logic_rx.clone();
    let server = rt.spawn(logic::serve_with(
        store,
        revocations,
        a.api.config(&secret, format!("ws://{ws}/ws")),
        api,
        Some(logic::api::Pipeline {
            client,
            members,
            stats: stage_stats,
            presence: presence_dyn,
        }),
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));

    // Nothing expires in in-memory presence: no refreshes needed.
    cfg.presence_refresh_ms = 3_600_000;
    let bridge_stats = Arc::new(im_pipeline::bridge::BridgeStats::default());
    let (bs, pst, gw) = (
        bridge_stats.clone(),
        persist_stats.clone(),
        gateway_id.clone(),
    );
    let hook: gateway_core::shard::MetricsHook = Arc::new(move |out: &mut String| {
        bs.render(&gw, out);
        out.push_str(&persist::render_metrics(&pst));
    });
    let (gateway, end) = Gateway::start_with(cfg, Some(revoked), true, Some(hook))?;
    let bridge = im_pipeline::bridge::start(
        im_pipeline::bridge::BridgeConfig {
            gateway_id,
            presence: im_pipeline::bridge::PresenceSink::Memory(presence),
            produce_timeout_ms: 5_000,
            linger_ms: 0,
        },
        bus,
        end.ok_or("the gateway returned no bridge end")?,
        bridge_stats,
    );
    let bridge = match bridge {
        Ok(b) => b,
        Err(e) => {
            gateway.shutdown();
            let _ = gateway.join();
            return Err(format!("starting the bridge: {e}").into());
        }
    };

    println!(
        "im standalone: gateway, logic and persist in one process (SQLite in {}, in-process bus)",
        a.data_dir.display()
    );
    println!("  open       http://{api}/          the browser client");
    println!("  REST       http://{api}/api/v1    WebSocket ws://{ws}/ws?token=<JWT from login>");
    println!(
        "  health     http://{ws}/healthz   metrics http://{ws}/metrics and http://{api}/metrics"
    );
    println!("  open files {nofile}; stop with Ctrl-C (connections get close 1001)");
    let mut crashed = false;
    loop {
        if server.is_finished() || stage_task.is_finished() || persist_task.is_finished() {
            crashed = true;
            break;
        }
        if let Some(sig) = wait_for_signal(&set, 500) {
            log::info!("signal {sig}: closing connections with 1001 and stopping");
            break;
        }
    }
    // In the order data flows: no new sends, then logic finishes its batch, then persist
    // writes and commits what it holds (which acknowledges nothing new: the senders are gone,
    // and an unacknowledged send is retried by its client with the same cid).
    gateway.shutdown();
    gateway.join()?;
    bridge.stop();
    let _ = stop_logic.send(true);
    let mut errors: Vec<String> = Vec::new();
    match within_grace(&rt, stage_task) {
        Ok(Ok(Err(e))) => errors.push(format!("pipeline stage: {e}")),
        Err(_) => log::warn!("the pipeline stage did not stop in {STOP_GRACE:?}"),
        _ => {}
    }
    match within_grace(&rt, server) {
        Ok(Ok(Err(e))) => errors.push(format!("REST API on {api}: {e}")),
        Err(_) => log::warn!("the REST API did not stop in {STOP_GRACE:?}"),
        _ => {}
    }
    let _ = stop_persist.send(true);
    match within_grace(&rt, persist_task) {
        Ok(Ok(Err(e))) => errors.push(format!("persist: {e}")),
        Err(_) => log::warn!("persist did not stop in {STOP_GRACE:?}"),
        _ => {}
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match (crashed, errors.is_empty()) {
        (_, false) => Err(errors.join("; ").into()),
        (true, true) => Err("a part of the standalone server stopped unexpectedly".into()),
        (false, true) => Ok(()),
    }
}

fn logic_service(a: LogicArgs) -> Result<()> {
    let set = block_signals();
    let secret = a
        .jwt_secret
        .clone()
        .ok_or("--jwt-secret (or IM_JWT_SECRET) is required for `im logic`")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("im-logic")
        .enable_all()
        .build()?;
    let store = rt
        .block_on(logic::store::MySqlStore::connect_or_create(&a.mysql_url))
        .map_err(|e| format!("connecting to {}: {e}", redact(&a.mysql_url)))?;
    let revocations = rt
        .block_on(logic::auth::RedisRevocations::connect(
            &a.redis_url,
            im_pipeline::revoked::KEY_PREFIX,
        ))
        .map_err(|e| format!("connecting to {}: {e}", redact(&a.redis_url)))?;
    let store: Arc<dyn logic::store::Store> = Arc::new(store);
    rt.block_on(store.migrate())
        .map_err(|e| format!("migrating {}: {e}", redact(&a.mysql_url)))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut pipeline_task = None;
    let mut pipeline = None;
    if !a.no_pipeline {
        let logic_id = im_shared::records::topic_safe_id(
            &a.logic_id
                .clone()
                .unwrap_or_else(|| format!("logic-{}-{}", hostname(), a.api.api_listen.port())),
        );
        let worker_id = a.worker_id.unwrap_or_else(|| {
            (im_shared::conv::mix64(logic_id.bytes().fold(0u64, |h, b| h * 31 + b as u64)) % 1024)
                as u16
        });
        let mut kafka = a.kafka.config();
        kafka.instance_id.get_or_insert_with(|| logic_id.clone());
        let brokers = kafka.brokers.clone();
        let bus: Arc<dyn im_pipeline::Bus> = Arc::new(im_pipeline::KafkaBus::new(kafka));
        let presence: Arc<dyn logic::pipeline::presence::Presence> = Arc::new(
            rt.block_on(logic::pipeline::presence::RedisPresence::connect(
                &a.redis_url,
            ))
            .map_err(|e| format!("connecting to {}: {e}", redact(&a.redis_url)))?,
        );
        let members = Arc::new(logic::pipeline::presence::Members::new(store.clone()));
        let client = rt
            .block_on(logic::pipeline::client::PipelineClient::start(
                bus.clone(),
                &logic_id,
            ))
            .map_err(|e| format!("Kafka at {brokers}: {e}"))?;
        let cfg = logic::pipeline::PipelineConfig {
            worker_id: worker_id & im_shared::snowflake::WORKER_MAX,
            ..Default::default()
        };
        let stats = Arc::new(logic::pipeline::PipelineStats::default());
        pipeline_task = Some(rt.spawn(logic::pipeline::run(
            bus,
            store.clone(),
            presence.clone(),
            members.clone(),
            cfg,
            stats.clone(),
            stop_rx.clone(),
        )));
        pipeline = Some(logic::api::Pipeline {
            client,
            members,
            stats,
            presence: presence.clone(),
        });
        log::info!("logic {logic_id}: pipeline stage on, Snowflake worker {worker_id}");
    }
    let mut api_stop = stop_rx.clone();
    let server = rt.spawn(logic::serve_with(
        store,
        Arc::new(revocations),
        a.api.config(&secret, a.ws_url.clone()),
        a.api.api_listen,
        pipeline,
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));
    let mut result: Result<()> = Ok(());
    loop {
        if server.is_finished() {
            result = match rt.block_on(server) {
                Ok(r) => r.map_err(|e| format!("REST API on {}: {e}", a.api.api_listen).into()),
                Err(e) => Err(e.into()),
            };
            break;
        }
        if pipeline_task.as_ref().is_some_and(|t| t.is_finished()) {
            let t = pipeline_task.take().expect("checked");
            result = match rt.block_on(t) {
                Ok(Ok(())) => Err("the pipeline stage stopped".into()),
                Ok(Err(e)) => Err(format!("pipeline stage: {e}").into()),
                Err(e) => Err(e.into()),
            };
            break;
        }
        if wait_for_signal(&set, 500).is_some() {
            break;
        }
    }
    let _ = stop_tx.send(true);
    if let Some(t) = pipeline_task {
        match within_grace(&rt, t) {
            Ok(Ok(Err(e))) => log::error!("pipeline stage: {e}"),
            Err(_) => log::warn!("the pipeline stage did not stop in {STOP_GRACE:?}; exiting anyway (uncommitted records replay)"),
            _ => {}
        }
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// Waits for `task` at most `STOP_GRACE`: `Err` when it did not finish in time. (The timer
/// must be made inside the runtime, hence the `async` block.)
fn within_grace<T>(
    rt: &tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<T>,
) -> std::result::Result<std::result::Result<T, tokio::task::JoinError>, tokio::time::error::Elapsed>
{
    rt.block_on(async { tokio::time::timeout(STOP_GRACE, task).await })
}

/// How long logic and persist wait for their Kafka loops to finish after a signal; a broker
/// or database that is down must not keep a stopping process alive.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

fn persist_service(a: PersistArgs) -> Result<()> {
    let set = block_signals();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("im-persist")
        .enable_all()
        .build()?;
    let store = rt
        .block_on(logic::store::MySqlStore::connect_or_create(&a.mysql_url))
        .map_err(|e| format!("connecting to {}: {e}", redact(&a.mysql_url)))?;
    let store: Arc<dyn logic::store::Store> = Arc::new(store);
    rt.block_on(store.migrate())
        .map_err(|e| format!("migrating {}: {e}", redact(&a.mysql_url)))?;
    let mut kafka = a.kafka.config();
    kafka.instance_id.get_or_insert_with(|| {
        im_shared::records::topic_safe_id(&format!("persist-{}", hostname()))
    });
    let cfg = persist::PersistConfig {
        batch_rows: a.batch_rows.max(1),
        batch_ms: a.batch_ms.max(1),
        ..Default::default()
    };
    let bus: Arc<dyn im_pipeline::Bus> = Arc::new(im_pipeline::KafkaBus::new(kafka));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = rt.spawn(persist::run(bus, store, cfg, stop_rx));
    while !task.is_finished() {
        if wait_for_signal(&set, 500).is_some() {
            let _ = stop_tx.send(true);
            break;
        }
    }
    let result = match within_grace(&rt, task) {
        Ok(Ok(r)) => r.map_err(|e| format!("persist: {e}").into()),
        Ok(Err(e)) => Err(e.into()),
        // Uncommitted batches are replayed by the next owner, and inserts are idempotent.
        Err(_) => Err(format!("persist did not stop in {STOP_GRACE:?}; exiting anyway").into()),
    };
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn gateway(a: GatewayCmdArgs) -> Result<()> {
    let set = block_signals();
    gateway_core::gateway::raise_nofile();
    let secret = a
        .gateway
        .jwt_secret
        .clone()
        .ok_or("--jwt-secret (or IM_JWT_SECRET) is required for `im gateway`")?;
    if a.process_index.is_none() {
        refuse_if_served(a.gateway.ws_listen)?;
    }
    if a.processes <= 1 || a.process_index.is_some() {
        let cfg = gateway_config(
            &a.gateway,
            secret.into_bytes(),
            a.process_index,
            a.processes,
        );
        return run_gateway_until_signal(cfg, &a.pipeline, &set);
    }
    supervise(a.processes, &set)
}

/// Runs `n` gateway processes (this binary again, with --process-index) and stops them on a
/// signal. If one dies, the others are stopped too: a half-up gateway is worse than none.
fn supervise(n: usize, set: &libc::sigset_t) -> Result<()> {
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .arg("--process-index")
            .arg(i.to_string())
            .spawn()?;
        children.push(child);
    }
    log::info!(
        "supervising {n} gateway processes: {:?}",
        children.iter().map(|c| c.id()).collect::<Vec<_>>()
    );
    let mut failed = false;
    loop {
        if wait_for_signal(set, 500).is_some() {
            break;
        }
        if children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            log::error!("a gateway process exited; stopping the others");
            failed = true;
            break;
        }
    }
    for c in &children {
        // SAFETY: signalling our own child processes by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for mut c in children {
        let _ = c.wait();
    }
    if failed {
        Err("a gateway process exited unexpectedly".into())
    } else {
        Ok(())
    }
}

fn token(a: TokenArgs) -> Result<()> {
    let secret = match a.jwt_secret {
        Some(s) => s,
        None => std::fs::read_to_string(a.data_dir.join("jwt_secret"))
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                format!(
                    "no --jwt-secret and no {}/jwt_secret ({e}): start `im` once first",
                    a.data_dir.display()
                )
            })?,
    };
    if a.user == 0 {
        return Err("--user must be a positive user id".into());
    }
    let claims = im_shared::jwt::Claims::new(a.user, im_shared::unix_ms() / 1000, a.ttl_s);
    println!("{}", im_shared::jwt::sign(secret.as_bytes(), &claims));
    Ok(())
}

//! The command line: every flag with its `IM_` environment variable and default
//! (README.md, "Commands"), and how the flags become each role's configuration.

use clap::{Args, Parser, Subcommand};
use gateway_core::GatewayConfig;
use im_bus::KafkaConfig;
use im_shared::records::topic_safe_id;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Standalone's Snowflake worker id: the one process that writes its SQLite file mints every
/// message id (its stage; its gateway has no local router). The distributed mode leases ids
/// from Redis instead (`im_bus::lease`).
pub(crate) const STANDALONE_WORKER_ID: u16 = 1000;

#[derive(Parser)]
#[command(
    name = "im",
    version,
    about = "A distributed instant-messaging server",
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Option<Cmd>,
    /// With no subcommand, `im` runs standalone.
    #[command(flatten)]
    pub(crate) standalone: StandaloneArgs,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
    /// Print a new VAPID key pair for Web Push, as the environment variables that take it.
    WebPushKeys,
}

#[derive(Args, Clone)]
pub(crate) struct ApiArgs {
    /// REST API listen address.
    #[arg(long, env = "IM_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) api_listen: SocketAddr,
    /// Lifetime of access tokens.
    #[arg(long, env = "IM_ACCESS_TTL_S", default_value_t = 3600)]
    pub(crate) access_ttl_s: u64,
    /// Lifetime of refresh tokens.
    #[arg(long, env = "IM_REFRESH_TTL_S", default_value_t = 30 * 24 * 3600)]
    pub(crate) refresh_ttl_s: u64,
    /// argon2id memory cost in KiB (time cost 2, one lane).
    #[arg(long, env = "IM_ARGON2_M_KIB", default_value_t = 19 * 1024)]
    pub(crate) argon2_m_kib: u32,
    /// A reverse proxy in front of the REST API whose `X-Forwarded-For` is believed (login
    /// throttling keys on the client's address); repeat for several, or comma-separate.
    /// Without one, the socket's peer is the client and the header is ignored.
    #[arg(
        long = "trusted-proxy",
        env = "IM_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub(crate) trusted_proxies: Vec<std::net::IpAddr>,
    /// `POST /messages/send` per user and second, bursts of twice that; past it 429 with
    /// Retry-After (the WebSocket's budget is --msgs-per-sec-max per connection).
    #[arg(long, env = "IM_REST_SENDS_PER_SEC_MAX", default_value_t = 100)]
    pub(crate) rest_sends_per_sec_max: u32,
    /// Offline push: POST a signed notification here for each message to a user with no
    /// device online (an http:// or https:// URL; docs/PROTOCOL.md, "Offline push").
    #[arg(long, env = "IM_PUSH_WEBHOOK_URL")]
    pub(crate) push_webhook_url: Option<String>,
    /// The HMAC-SHA256 key the webhook's requests are signed with (at least 16 bytes).
    #[arg(long, env = "IM_PUSH_WEBHOOK_SECRET", hide_env_values = true)]
    pub(crate) push_webhook_secret: Option<String>,
    /// Web Push: the VAPID public key browsers subscribe with (base64url, 65 bytes; `im
    /// web-push-keys` makes a pair). With the private key, browsers that subscribed are woken
    /// for messages that arrive while their user has no device online.
    #[arg(long, env = "IM_WEB_PUSH_VAPID_PUBLIC_KEY")]
    pub(crate) web_push_vapid_public_key: Option<String>,
    /// Web Push: the VAPID private key (base64url, 32 bytes).
    #[arg(long, env = "IM_WEB_PUSH_VAPID_PRIVATE_KEY", hide_env_values = true)]
    pub(crate) web_push_vapid_private_key: Option<String>,
    /// Web Push: who runs this server, for the push services (a mailto: or https:// URL).
    #[arg(long, env = "IM_WEB_PUSH_SUBJECT")]
    pub(crate) web_push_subject: Option<String>,
    /// Web Push: the endpoint URL prefixes a subscription may have (`*.` takes any subdomain);
    /// by default the push services of Chrome, Firefox, Safari and Edge.
    #[arg(long, env = "IM_WEB_PUSH_ENDPOINTS", value_delimiter = ',')]
    pub(crate) web_push_endpoints: Vec<String>,
}

impl ApiArgs {
    /// The push settings the flags give, if any.
    pub(crate) fn push(&self) -> Result<Option<logic::PushSettings>, String> {
        let webhook = match (&self.push_webhook_url, &self.push_webhook_secret) {
            (None, None) => None,
            (Some(url), Some(secret)) => Some(logic::WebhookSettings {
                url: url.clone(),
                secret: secret.clone(),
            }),
            (Some(_), None) => return Err("--push-webhook-url needs --push-webhook-secret".into()),
            (None, Some(_)) => {
                return Err("--push-webhook-secret without --push-webhook-url".into())
            }
        };
        let web_push = match (
            &self.web_push_vapid_public_key,
            &self.web_push_vapid_private_key,
        ) {
            (None, None) => None,
            (Some(public), Some(private)) => Some(logic::WebPushSettings {
                public_key: public.clone(),
                private_key: private.clone(),
                subject: self.web_push_subject.clone().ok_or(
                    "web push needs --web-push-subject (a mailto: or https:// URL the push \
                     services may write to)",
                )?,
                endpoints: self.web_push_endpoints.clone(),
            }),
            _ => {
                return Err("web push needs both --web-push-vapid-public-key and \
                            --web-push-vapid-private-key (`im web-push-keys` makes a pair)"
                    .into())
            }
        };
        if webhook.is_none() && web_push.is_none() {
            return Ok(None);
        }
        Ok(Some(logic::PushSettings { webhook, web_push }))
    }
}

/// Where a process serves `/metrics`.
#[derive(Args, Clone)]
pub(crate) struct MetricsArgs {
    /// Serve /metrics (and /healthz) on this address instead of the public ports (the
    /// WebSocket port, the REST port), which then answer 404 for it. With --processes N,
    /// gateway process i takes this port + i.
    #[arg(long, env = "IM_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

/// How tokens are judged: one setting for gateways and logic, which must agree.
#[derive(Args, Clone)]
pub(crate) struct TokenPolicyArgs {
    /// The longest lifetime (exp − iat) an access token may claim; a token claiming more, or
    /// issued more than a minute in the future, is refused. Must be at least --access-ttl-s.
    #[arg(long, env = "IM_TOKEN_LIFETIME_MAX_S", default_value_t = im_shared::jwt::LIFETIME_MAX_S)]
    pub(crate) token_lifetime_max_s: u64,
}

#[derive(Args, Clone)]
pub(crate) struct KafkaArgs {
    /// Kafka bootstrap brokers, host:port[,host:port...].
    #[arg(long, env = "IM_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub(crate) kafka_brokers: String,
    /// Partitions of im.upstream and im.messages when this process creates them.
    #[arg(long, env = "IM_KAFKA_PARTITIONS", default_value_t = 4)]
    pub(crate) kafka_partitions: i32,
    /// Replication factor of the topics this process creates.
    #[arg(long, env = "IM_KAFKA_REPLICATION", default_value_t = 1)]
    pub(crate) kafka_replication: i32,
    /// Static consumer-group membership id, unique per logic or persist process: a restart
    /// with the same id resumes its partitions at once, without waiting out the session of
    /// the process that died [default: logic: its --logic-id; persist: persist-<host name>].
    /// An empty value turns static membership off: a process that stops answering is then
    /// expelled after its session timeout on every broker (some brokers, nisshi 0.6 among
    /// them, never expire a silent static member), at the price of a restart waiting out
    /// its predecessor's session.
    #[arg(long, env = "IM_KAFKA_INSTANCE_ID")]
    pub(crate) kafka_instance_id: Option<String>,
}

/// Tracing (README.md, "Tracing"): off unless an endpoint is given.
#[derive(Args, Clone)]
pub(crate) struct TraceArgs {
    /// Export the spans of sampled sends (send, upstream, sequence, durable, route, deliver)
    /// over OTLP/HTTP with JSON to this collector, http://host[:4318][/prefix]: the host's
    /// OpenTelemetry Collector, which forwards them with TLS.
    #[arg(long, env = "IM_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
    /// The share of sends traced, 0 to 1. Decided by the gateway that takes the send; logic
    /// follows the record's flag, so only the gateways' setting matters.
    #[arg(long, env = "IM_OTLP_SAMPLE_RATIO", default_value_t = 0.01)]
    pub(crate) otlp_sample_ratio: f64,
}

impl TraceArgs {
    /// Installs the exporter when an endpoint is given.
    pub(crate) fn install(&self, service: &str, instance: &str) -> Result<(), String> {
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(());
        };
        im_telemetry::install(im_telemetry::Config {
            endpoint: endpoint.clone(),
            service: service.into(),
            instance: instance.into(),
            sample_ratio: self.otlp_sample_ratio,
        })
    }
}

#[derive(Args)]
pub(crate) struct PersistArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    /// MySQL (or MariaDB) to write messages to.
    #[arg(
        long,
        env = "IM_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/im"
    )]
    pub(crate) mysql_url: String,
    /// Flush a batch at this many rows...
    #[arg(long, env = "IM_PERSIST_BATCH_ROWS", default_value_t = 500)]
    pub(crate) batch_rows: usize,
    /// ...or when its oldest row has waited this long.
    #[arg(long, env = "IM_PERSIST_BATCH_MS", default_value_t = 50)]
    pub(crate) batch_ms: u64,
}

#[derive(Args)]
pub(crate) struct LogicArgs {
    #[command(flatten)]
    pub(crate) trace: TraceArgs,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(flatten)]
    pub(crate) tokens: TokenPolicyArgs,
    #[command(flatten)]
    pub(crate) metrics: MetricsArgs,
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    /// Serve the REST API only, without the Kafka pipeline stage (messages/send then stores
    /// directly and delivers nothing live).
    #[arg(long, env = "IM_NO_PIPELINE")]
    pub(crate) no_pipeline: bool,
    /// This instance's id, unique among logic instances (its reply topic's name)
    /// [default: logic-<host name>-<API port>].
    #[arg(long, env = "IM_LOGIC_ID")]
    pub(crate) logic_id: Option<String>,
    /// Lease exactly this Snowflake worker id (0..1023) from Redis, and refuse to start if
    /// another instance holds it [default: the first free id, from a hash of --logic-id on].
    #[arg(long, env = "IM_WORKER_ID", value_parser = clap::value_parser!(u16).range(0..=1023))]
    pub(crate) worker_id: Option<u16>,
    /// MySQL (or MariaDB) holding users, groups and messages.
    #[arg(
        long,
        env = "IM_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/im"
    )]
    pub(crate) mysql_url: String,
    #[arg(long, env = "IM_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
    /// The WebSocket URL login answers with while no gateway announces itself in the gateway
    /// registry (Redis); otherwise login picks the least-loaded one there.
    #[arg(long, env = "IM_WS_URL", default_value = "ws://127.0.0.1:8090/ws")]
    pub(crate) ws_url: String,
    /// Redis for revoked tokens (shared with the gateways).
    #[arg(long, env = "IM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
}

#[derive(Args, Clone)]
pub(crate) struct GatewayArgs {
    /// WebSocket listen address (also serves /healthz and /metrics).
    #[arg(long, env = "IM_WS_LISTEN", default_value = "127.0.0.1:8090")]
    pub(crate) ws_listen: SocketAddr,
    /// Shards (threads pinned to cores); 0 = one per available core.
    #[arg(long, env = "IM_SHARDS", default_value_t = 0)]
    pub(crate) shards: usize,
    /// HS256 secret for access tokens (standalone keeps a generated one in --data-dir).
    #[arg(long, env = "IM_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
    /// This gateway's id [default: <host name>-<ws port>].
    #[arg(long, env = "IM_GATEWAY_ID")]
    pub(crate) gateway_id: Option<String>,
    /// Close connections that show no life for this long.
    #[arg(long, env = "IM_HEARTBEAT_TIMEOUT_MS", default_value_t = 90_000)]
    pub(crate) heartbeat_timeout_ms: u64,
    /// Time allowed from TCP accept to a complete upgrade request.
    #[arg(long, env = "IM_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub(crate) handshake_timeout_ms: u64,
    /// Largest WebSocket message; larger ones are closed with 1009.
    #[arg(long, env = "IM_FRAME_BYTES_MAX", default_value_t = 64 * 1024)]
    pub(crate) frame_bytes_max: usize,
    /// Per-connection outbound queue bound; past it the connection is closed with 1013.
    #[arg(long, env = "IM_OUTBOUND_BYTES_MAX", default_value_t = 256 * 1024)]
    pub(crate) outbound_bytes_max: usize,
    /// Messages (and pings) per second a connection may send, bursts of twice that; past it
    /// `error` 4290, then close 1008.
    #[arg(long, env = "IM_MSGS_PER_SEC_MAX", default_value_t = 100)]
    pub(crate) msgs_per_sec_max: u32,
    /// Connections per shard [default: what the open-file limit allows].
    #[arg(long, env = "IM_CONNS_PER_SHARD_MAX")]
    pub(crate) conns_per_shard_max: Option<usize>,
    /// Receive buffers in each shard's io_uring buffer ring.
    #[arg(long, env = "IM_RECV_BUFFERS", default_value_t = 256)]
    pub(crate) recv_buffers: usize,
    /// Size of each receive buffer.
    #[arg(long, env = "IM_RECV_BUFFER_BYTES", default_value_t = 1024)]
    pub(crate) recv_buffer_bytes: usize,
    /// Use the epoll driver even where io_uring works.
    #[arg(long, env = "IM_EPOLL")]
    pub(crate) epoll: bool,
    /// Do not pin shard threads to cores.
    #[arg(long, env = "IM_NO_PIN")]
    pub(crate) no_pin: bool,
    /// Fan-out merge window: `msg` deliveries to one connection within this many ms leave in
    /// one write (each still its own frame). 0: each goes at once.
    #[arg(long, env = "IM_FANOUT_MERGE_MS", default_value_t = 0)]
    pub(crate) fanout_merge_ms: u64,
}

#[derive(Args, Clone)]
pub(crate) struct PipelineArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    /// Redis for presence (user → gateway).
    #[arg(long, env = "IM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    /// Without Kafka: route messages between this process's connections only, unsequenced by
    /// logic and unstored (for benchmarking the gateway alone).
    #[arg(long, env = "IM_LOCAL_ROUTER")]
    pub(crate) local_router: bool,
    /// Presence entries expire this long after their last refresh.
    #[arg(long, env = "IM_PRESENCE_TTL_S", default_value_t = 180)]
    pub(crate) presence_ttl_s: u64,
    /// How long a send may wait for the broker before the client gets a retryable error (its
    /// record stays queued and may still be delivered; a resend with its cid gets one `sent`).
    #[arg(long, env = "IM_PRODUCE_TIMEOUT_MS", default_value_t = 5_000)]
    pub(crate) produce_timeout_ms: u32,
}

#[derive(Args, Clone)]
pub(crate) struct StandaloneArgs {
    #[command(flatten)]
    pub(crate) trace: TraceArgs,
    #[command(flatten)]
    pub(crate) gateway: GatewayArgs,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(flatten)]
    pub(crate) tokens: TokenPolicyArgs,
    #[command(flatten)]
    pub(crate) metrics: MetricsArgs,
    /// Where standalone keeps its state: the generated JWT secret and the SQLite database.
    #[arg(long, env = "IM_DATA_DIR", default_value = "./data")]
    pub(crate) data_dir: PathBuf,
    /// Messages are written to SQLite (and only then acknowledged) in batches of this many
    /// rows...
    #[arg(long, env = "IM_PERSIST_BATCH_ROWS", default_value_t = 500)]
    pub(crate) batch_rows: usize,
    /// ...or once the oldest row has waited this long while more kept arriving...
    #[arg(long, env = "IM_PERSIST_BATCH_MS", default_value_t = 5)]
    pub(crate) batch_ms: u64,
    /// ...or as soon as nothing more is waiting, once the oldest row has waited this long
    /// (0: at once, the lowest latency; 1-2 ms: fewer, larger commits under load).
    #[arg(long, env = "IM_PERSIST_LINGER_MS", default_value_t = 2)]
    pub(crate) linger_ms: u64,
    /// How long the logic stage waits to fill a batch after its first record (0: takes what
    /// is there; batches are pipelined, so a small one costs no extra round trip).
    #[arg(long, env = "IM_STAGE_WAIT_MS", default_value_t = 0)]
    pub(crate) stage_wait_ms: u64,
    /// No Web Push. Without this and without --web-push-vapid-*-key, standalone generates a
    /// VAPID key pair in --data-dir and offers browsers notifications.
    #[arg(long, env = "IM_NO_WEB_PUSH")]
    pub(crate) no_web_push: bool,
}

#[derive(Args)]
pub(crate) struct GatewayCmdArgs {
    #[command(flatten)]
    pub(crate) trace: TraceArgs,
    #[command(flatten)]
    pub(crate) gateway: GatewayArgs,
    #[command(flatten)]
    pub(crate) tokens: TokenPolicyArgs,
    #[command(flatten)]
    pub(crate) metrics: MetricsArgs,
    #[command(flatten)]
    pub(crate) pipeline: PipelineArgs,
    /// Run this many gateway processes sharing the port with SO_REUSEPORT, each with its own
    /// gateway id: how one host holds more connections than one process's open-file limit.
    #[arg(long, env = "IM_GATEWAY_PROCESSES", default_value_t = 1)]
    pub(crate) processes: usize,
    /// Set by the parent of a multi-process gateway.
    #[arg(long, hide = true)]
    pub(crate) process_index: Option<usize>,
    /// The URL clients reach this gateway at (`wss://chat.example.com/ws` behind a TLS
    /// balancer): announced in the gateway registry (Redis) for login to hand out; the
    /// processes of --processes N share it. Without it the gateway announces nothing, and
    /// logic answers its --ws-url.
    #[arg(long, env = "IM_PUBLIC_WS_URL")]
    pub(crate) public_ws_url: Option<String>,
    /// On SIGTERM: leave the registry, stop accepting, and close the connections with 1012
    /// spread evenly over this many seconds, so their clients reconnect elsewhere a few at a
    /// time (then 2 s for close handshakes).
    #[arg(long, env = "IM_DRAIN_WINDOW_S", default_value_t = 10)]
    pub(crate) drain_window_s: u64,
}

#[derive(Args)]
pub(crate) struct TokenArgs {
    /// User id to put in `sub`.
    #[arg(long)]
    pub(crate) user: u64,
    /// Validity in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub(crate) ttl_s: u64,
    #[arg(long, env = "IM_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
    /// Read the secret standalone generated here when --jwt-secret is not given.
    #[arg(long, env = "IM_DATA_DIR", default_value = "./data")]
    pub(crate) data_dir: PathBuf,
}

impl ApiArgs {
    /// The API's settings; refused if its own tokens would outlive what verifiers accept.
    pub(crate) fn config(
        &self,
        secret: &str,
        ws_url: String,
        tokens: &TokenPolicyArgs,
    ) -> Result<logic::api::ApiConfig, String> {
        if self.access_ttl_s > tokens.token_lifetime_max_s {
            return Err(format!(
                "--access-ttl-s {} is above --token-lifetime-max-s {}: every token login issues would be refused",
                self.access_ttl_s, tokens.token_lifetime_max_s
            ));
        }
        Ok(logic::api::ApiConfig {
            jwt_secret: secret.as_bytes().to_vec(),
            access_ttl_s: self.access_ttl_s,
            refresh_ttl_s: self.refresh_ttl_s,
            password_cost: logic::auth::PasswordCost {
                m_kib: self.argon2_m_kib.max(8),
                ..Default::default()
            },
            ws_url,
            gateways: None,
            trusted_proxies: self.trusted_proxies.clone(),
            token_lifetime_max_s: tokens.token_lifetime_max_s,
            sends_per_s_max: self.rest_sends_per_sec_max.max(1),
            metrics: Default::default(),
            // A client retrying a refresh whose answer it lost does so within seconds (OAuth
            // 2.0 Security BCP allows such a grace period).
            refresh_reuse_grace_ms: 10_000,
        })
    }
}

impl KafkaArgs {
    pub(crate) fn config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            partitions: self.kafka_partitions.max(1),
            replication: self.kafka_replication.max(1),
            instance_id: self.kafka_instance_id.clone(),
        }
    }
}

impl GatewayArgs {
    /// The core configuration of gateway process `index` of `processes` (shards split the
    /// cores between processes unless `--shards` says otherwise).
    pub(crate) fn config(
        &self,
        secret: Vec<u8>,
        index: Option<usize>,
        processes: usize,
    ) -> GatewayConfig {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let shards = match self.shards {
            0 => (cores / processes.max(1)).max(1),
            n => n,
        };
        let base_id = self
            .gateway_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", hostname(), self.ws_listen.port()));
        let gateway_id = topic_safe_id(&match index {
            Some(i) => format!("{base_id}-p{i}"),
            None => base_id,
        });
        let mut cfg = GatewayConfig {
            ws_listen: self.ws_listen,
            shards,
            pin_first_core: (!self.no_pin).then_some(index.unwrap_or(0) * shards),
            jwt_secret: secret,
            gateway_id,
            // Each process's shards take 64 worker ids (the local router's Snowflakes).
            worker_id: ((index.unwrap_or(0) * 64) % 1024) as u16,
            frame_bytes_max: self.frame_bytes_max,
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            handshake_timeout_ms: self.handshake_timeout_ms,
            outbound_bytes_max: self.outbound_bytes_max,
            msgs_per_sec_max: self.msgs_per_sec_max,
            recv_buffers: self.recv_buffers,
            recv_buffer_bytes: self.recv_buffer_bytes,
            force_epoll: self.epoll,
            fanout_merge_ms: self.fanout_merge_ms,
            ..GatewayConfig::default()
        };
        if let Some(m) = self.conns_per_shard_max {
            cfg.conns_per_shard_max = m;
        }
        cfg
    }
}

impl PipelineArgs {
    /// Where a distributed gateway's backends are; `None` with `--local-router`.
    pub(crate) fn distributed(
        &self,
        public_ws_url: Option<String>,
    ) -> Option<im_gateway::Distributed> {
        (!self.local_router).then(|| im_gateway::Distributed {
            kafka: self.kafka.config(),
            redis_url: self.redis_url.clone(),
            public_ws_url,
            presence_ttl_s: self.presence_ttl_s,
            produce_timeout_ms: self.produce_timeout_ms,
        })
    }
}

impl LogicArgs {
    pub(crate) fn config(&self) -> Result<logic::Config, String> {
        let secret = self
            .jwt_secret
            .clone()
            .ok_or("--jwt-secret (or IM_JWT_SECRET) is required for `im logic`")?;
        let mut kafka = self.kafka.config();
        let logic_id = topic_safe_id(
            &self
                .logic_id
                .clone()
                .unwrap_or_else(|| format!("logic-{}-{}", hostname(), self.api.api_listen.port())),
        );
        // Where the search for a free worker id starts: spreads instances over the ids, so
        // each usually gets its first choice.
        let h = logic_id
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let worker_hint = (im_shared::conv::mix64(h) % 1024) as u16;
        let stage = (!self.no_pipeline).then(|| {
            kafka.instance_id.get_or_insert_with(|| logic_id.clone());
            logic::StageSettings {
                logic_id: logic_id.clone(),
                stage: logic::stage::StageConfig::default(),
                push: None,
                stats: Default::default(),
            }
        });
        let push = self.api.push()?;
        if push.is_some() && self.no_pipeline {
            return Err(
                "offline push (--push-webhook-url, --web-push-*) needs the pipeline: drop --no-pipeline".into(),
            );
        }
        let stage = stage.map(|mut s| {
            s.push = push;
            s
        });
        Ok(logic::Config {
            logic: logic::LogicConfig {
                api: logic::api::ApiConfig {
                    metrics: match self.metrics.metrics_listen {
                        Some(at) => logic::api::MetricsAt::Own(at),
                        None => logic::api::MetricsAt::Api,
                    },
                    ..self
                        .api
                        .config(&secret, self.ws_url.clone(), &self.tokens)?
                },
                api_listen: self.api.api_listen,
                stage,
            },
            mysql_url: self.mysql_url.clone(),
            redis_url: self.redis_url.clone(),
            kafka,
            worker_id: self.worker_id,
            worker_hint,
            holder: logic_id,
            lease: Default::default(),
        })
    }
}

impl PersistArgs {
    pub(crate) fn config(&self) -> persist::Config {
        let mut kafka = self.kafka.config();
        kafka
            .instance_id
            .get_or_insert_with(|| topic_safe_id(&format!("persist-{}", hostname())));
        persist::Config {
            persist: persist::PersistConfig {
                batch_rows: self.batch_rows.max(1),
                batch_ms: self.batch_ms.max(1),
                ..Default::default()
            },
            mysql_url: self.mysql_url.clone(),
            kafka,
        }
    }
}

/// This host's name (the default gateway, logic and persist ids start with it).
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

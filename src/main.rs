//! `im`: one binary for every role (README.md, "Commands"). This file parses the
//! command line and hands each role to its crate's `run(config, shutdown)`: the flags are in
//! `cli.rs`, signal handling in `signals.rs`, the one-process assembly in `standalone.rs`.

mod cli;
mod signals;
mod standalone;

use clap::Parser;
use cli::{Cli, Cmd, GatewayCmdArgs, LogicArgs, PersistArgs, TokenArgs};
use signals::Signals;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // mimalloc's own report (linked in with it; `mi_decl_export` in its stats.c).
    fn mi_process_info(
        elapsed_msecs: *mut usize,
        user_msecs: *mut usize,
        system_msecs: *mut usize,
        current_rss: *mut usize,
        peak_rss: *mut usize,
        current_commit: *mut usize,
        peak_commit: *mut usize,
        page_faults: *mut usize,
    );
}

/// What mimalloc has committed from the OS: its always-kept OS-level count (in use, or cached
/// in its pages until purged), for `/metrics`.
fn mimalloc_committed() -> u64 {
    let mut v = [0usize; 8];
    let [a, b, c, d, e, f, g, h] = &mut v;
    // SAFETY: every pointer is to a live local; mimalloc only writes through them.
    unsafe { mi_process_info(a, b, c, d, e, f, g, h) };
    v[5] as u64
}

/// How long a stopped service's runtime may take to finish its remaining tasks.
const RUNTIME_STOP: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    // Transparent huge pages make every touched 2 MiB region cost a whole huge page: at a
    // million mostly idle connections, the difference between ~100 and ~1,000 bytes each.
    // mimalloc is built without its THP advice (feature `no_thp`); this also covers hosts
    // where THP is `always`. IM_ALLOW_THP=1 keeps them, for throughput experiments.
    if std::env::var_os("IM_ALLOW_THP").is_none_or(|v| v != "1") {
        // SAFETY: prctl with constant arguments; affects only this process and its children.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    im_shared::metrics::set_allocator_probe("mimalloc", mimalloc_committed);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        None => standalone::run(cli.standalone),
        Some(Cmd::Standalone(a)) => standalone::run(a),
        Some(Cmd::Gateway(a)) => gateway(a),
        Some(Cmd::Logic(a)) => logic(a),
        Some(Cmd::Persist(a)) => persist(a),
        Some(Cmd::Token(a)) => token(a),
        Some(Cmd::WebPushKeys) => logic::push::ece::Vapid::generate().map(|(public, private)| {
            println!("IM_WEB_PUSH_VAPID_PUBLIC_KEY={public}");
            println!("IM_WEB_PUSH_VAPID_PRIVATE_KEY={private}");
        }),
    };
    // The spans of the last moments (a no-op when tracing is off).
    im_telemetry::flush(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("im: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `im gateway`: one process, or the supervisor of `--processes N`.
fn gateway(a: GatewayCmdArgs) -> Result<(), String> {
    let signals = Signals::block();
    gateway_core::gateway::raise_nofile();
    let secret = a
        .gateway
        .jwt_secret
        .clone()
        .ok_or("--jwt-secret (or IM_JWT_SECRET) is required for `im gateway`")?;
    if a.process_index.is_none() {
        refuse_if_served(a.gateway.ws_listen)?;
    }
    if a.processes > 1 && a.process_index.is_none() {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let n = a.processes;
        return im_gateway::supervisor::supervise(n, &exe, &args, signals);
    }
    let mut core = a
        .gateway
        .config(secret.into_bytes(), a.process_index, a.processes);
    core.token_lifetime_max_s = a.tokens.token_lifetime_max_s;
    core.drain_window_ms = a.drain_window_s.saturating_mul(1000);
    // Each process of a multi-process gateway on its own port: this one + its index.
    core.metrics_listen = a.metrics.metrics_listen.map(|mut at| {
        // Port 0 (any free port) stays 0 for every process.
        if at.port() != 0 {
            at.set_port(
                at.port()
                    .saturating_add(a.process_index.unwrap_or(0) as u16),
            );
        }
        at
    });
    a.trace.install("im-gateway", &core.gateway_id)?;
    let cfg = im_gateway::Config {
        core,
        distributed: a.pipeline.distributed(a.public_ws_url.clone()),
    };
    im_gateway::run(cfg, signals)
}

/// `im logic`: the REST API on MySQL and the pipeline stage on Kafka.
fn logic(a: LogicArgs) -> Result<(), String> {
    let signals = Signals::block();
    let cfg = a.config()?;
    a.trace.install("im-logic", &cfg.holder)?;
    let rt = runtime("im-logic", None)?;
    let result = signals.run_until_signal(|shutdown| rt.block_on(logic::run(cfg, shutdown)));
    rt.shutdown_timeout(RUNTIME_STOP);
    result
}

/// `im persist`: im.messages → MySQL in batches.
fn persist(a: PersistArgs) -> Result<(), String> {
    let signals = Signals::block();
    let cfg = a.config();
    let rt = runtime("im-persist", Some(2))?;
    let result = signals.run_until_signal(|shutdown| rt.block_on(persist::run(cfg, shutdown)));
    rt.shutdown_timeout(RUNTIME_STOP);
    result
}

/// A multi-threaded tokio runtime (`workers` threads, or one per core).
fn runtime(name: &str, workers: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for {name}: {e}"))
}

/// `im token`: an access token for trying the server with any WebSocket client.
fn token(a: TokenArgs) -> Result<(), String> {
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

/// SO_REUSEPORT lets any process of ours bind a port we already serve, and the kernel would
/// then split clients between two gateways that know nothing of each other. Several gateways
/// share a port only as one `--processes` group; anyone else finds the port taken.
fn refuse_if_served(addr: SocketAddr) -> Result<(), String> {
    const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = match addr.ip() {
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    if std::net::TcpStream::connect_timeout(&probe, PROBE_TIMEOUT).is_ok() {
        return Err(format!(
            "{addr} is already served by another process; to run several gateways on one port use `im gateway --processes N`"
        ));
    }
    Ok(())
}

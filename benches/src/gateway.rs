//! Gateways under test: already running (`--gateway-pid`, for memory and CPU figures), or
//! started by the harness itself (`--spawn-gateway path/to/im`), which makes a run one command.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct GatewayArgs {
    /// PIDs of gateway processes already running (for memory and CPU figures).
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    /// Start the gateway ourselves: path to the `im` binary.
    #[arg(long)]
    pub spawn_gateway: Option<String>,
    /// Gateway processes to start with --spawn-gateway (they share the port: SO_REUSEPORT).
    #[arg(long, default_value_t = 1)]
    pub gateway_processes: u32,
    /// Shards per spawned gateway process.
    #[arg(long, default_value_t = 1)]
    pub gateway_shards: u32,
    /// Extra arguments for spawned gateways (e.g. "--epoll").
    #[arg(long, allow_hyphen_values = true)]
    pub gateway_arg: Vec<String>,
    /// Spawned gateways use the Kafka pipeline (give --gateway-arg=--kafka-brokers=... as
    /// needed); without it they run their in-process router and need no services.
    #[arg(long)]
    pub gateway_kafka: bool,
}

pub struct Gateways {
    given: Vec<u32>,
    children: Vec<Child>,
}

/// Starts the gateways asked for and waits until the port accepts connections.
pub fn spawn(a: &GatewayArgs, addr: SocketAddr, secret: &str) -> Gateways {
    let Some(im) = &a.spawn_gateway else {
        return Gateways {
            given: a.gateway_pids.clone(),
            children: Vec::new(),
        };
    };
    let children: Vec<Child> = (0..a.gateway_processes)
        .map(|i| {
            Command::new(im)
                .arg("gateway")
                .args(["--ws-listen", &addr.to_string(), "--jwt-secret", secret])
                .args([
                    "--shards",
                    &a.gateway_shards.to_string(),
                    "--process-index",
                    &i.to_string(),
                ])
                .args(["--processes", &a.gateway_processes.to_string()])
                .args(&a.gateway_arg)
                .args((!a.gateway_kafka).then_some("--local-router"))
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("spawn the gateway")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "gateway did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The first listener answering does not mean all have bound; give the rest a moment.
    std::thread::sleep(Duration::from_millis(500));
    Gateways {
        given: a.gateway_pids.clone(),
        children,
    }
}

impl Gateways {
    pub fn pids(&self) -> Vec<u32> {
        self.given
            .iter()
            .copied()
            .chain(self.children.iter().map(|c| c.id()))
            .collect()
    }

    /// Stops the gateways this harness started (SIGTERM: graceful close), and waits for them.
    pub fn stop(mut self) {
        for c in &self.children {
            // SAFETY: signalling processes this harness started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

//! Starting and stopping a gateway process: bind one `SO_REUSEPORT` listener per shard (the
//! kernel spreads connections across them, and across processes sharing the port), build the
//! shard mesh, pin one thread per shard, pick the driver.

use crate::bridge::{self, BridgeEnd};
use crate::config::GatewayConfig;
use crate::driver::Driver;
use crate::mesh;
use crate::metrics::ShardStats;
use crate::msg::{CONNS_PER_SHARD_MAX, SHARDS_MAX};
use crate::shard::{MetricsHook, RevokedCheck, Shard};
use crate::waker::Waker;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Gateway;

/// What a gateway process adds to its shards.
#[derive(Clone, Default)]
pub struct Options {
    /// Refuses upgrades whose token was revoked (logout).
    pub revoked: Option<RevokedCheck>,
    /// Adds to `/metrics` (the bridge's counters).
    pub metrics: Option<MetricsHook>,
}

/// How the shards route what clients send.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Routing {
    /// Through the pipeline bridge (logic sequences): every deployment.
    Bridge,
    /// Between this process's own connections (gateway benchmarks).
    LocalRouter,
}

/// Backlog of the listening sockets.
const LISTEN_BACKLOG: i32 = 65535;

pub struct GatewayHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    wakers: Arc<[Waker]>,
    stats: Arc<[ShardStats]>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    driver: Driver,
}

/// Creates a listening TCP socket with SO_REUSEPORT (so shards and processes share the port).
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<(i32, SocketAddr)> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on a socket we own; closed on every error path.
    unsafe {
        let fd = libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fail = |fd: i32| {
            let e = io::Error::last_os_error();
            libc::close(fd);
            Err(e)
        };
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                4,
            ) < 0
            {
                return fail(fd);
            }
        }
        let (storage, len) = sockaddr(addr);
        if libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) < 0 {
            return fail(fd);
        }
        if libc::listen(fd, backlog) < 0 {
            return fail(fd);
        }
        let mut out: libc::sockaddr_storage = std::mem::zeroed();
        let mut out_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut out as *mut libc::sockaddr_storage).cast(),
            &mut out_len,
        ) < 0
        {
            return fail(fd);
        }
        Ok((fd, from_sockaddr(&out).unwrap_or(addr)))
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we write the variant matching the family.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin) };
            (s, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin6) };
            (s, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: family says it is a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: family says it is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

/// Connections one process can hold: the open-file limit, less a reserve for everything else.
pub fn fd_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (lim.rlim_cur as usize).saturating_sub(256).max(64)
}

/// Raises the soft open-file limit to the hard one (always allowed without privileges).
pub fn raise_nofile() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur as usize
}

impl Gateway {
    /// Binds, spawns the shards with the local router and returns at once; the gateway runs
    /// until `shutdown`. For tests and gateway benchmarks.
    pub fn start(cfg: GatewayConfig) -> io::Result<GatewayHandle> {
        Gateway::start_local(cfg, Options::default())
    }

    /// The shards route between this process's own connections (`im gateway --local-router`).
    pub fn start_local(cfg: GatewayConfig, opts: Options) -> io::Result<GatewayHandle> {
        start(cfg, opts, Routing::LocalRouter).map(|(h, _)| h)
    }

    /// The shards hand requests to a pipeline bridge: the returned end of their rings is for
    /// the caller's bridge to drive.
    pub fn start_bridged(
        cfg: GatewayConfig,
        opts: Options,
    ) -> io::Result<(GatewayHandle, BridgeEnd)> {
        let (handle, end) = start(cfg, opts, Routing::Bridge)?;
        Ok((handle, end.expect("a bridged gateway has a bridge end")))
    }
}

fn start(
    mut cfg: GatewayConfig,
    opts: Options,
    routing: Routing,
) -> io::Result<(GatewayHandle, Option<BridgeEnd>)> {
    if cfg.jwt_secret.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the JWT secret is empty",
        ));
    }
    let n = cfg.shards.clamp(1, SHARDS_MAX);
    cfg.shards = n;
    // What the open-file limit allows, and what a connection token can address.
    let per_shard = fd_budget() / n;
    cfg.conns_per_shard_max = cfg
        .conns_per_shard_max
        .min(CONNS_PER_SHARD_MAX)
        .min(per_shard);
    let driver = Driver::choose(cfg.force_epoll);

    let (first, addr) = reuseport_listener(cfg.ws_listen, LISTEN_BACKLOG)?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(reuseport_listener(addr, LISTEN_BACKLOG)?.0);
    }
    let wakers: Arc<[Waker]> = (0..n)
        .map(|_| Waker::new())
        .collect::<io::Result<Vec<_>>>()?
        .into();
    let stats: Arc<[ShardStats]> = (0..n)
        .map(|_| ShardStats::default())
        .collect::<Vec<_>>()
        .into();
    let mut ports = mesh::build(n, cfg.ring_capacity, cfg.ring_backlog_max, wakers.clone());
    let bridge_end = match routing {
        Routing::Bridge => {
            let (links, end) = bridge::build(n, cfg.ring_capacity, wakers.clone())?;
            for (port, link) in ports.iter_mut().zip(links) {
                port.attach_bridge(link);
            }
            Some(end)
        }
        Routing::LocalRouter => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let metrics_addr = match cfg.metrics_listen {
        None => None,
        Some(at) => Some(
            crate::metrics_listener::start(
                at,
                crate::metrics_listener::Source {
                    gateway_id: cfg.gateway_id.clone(),
                    stats: stats.clone(),
                    driver: driver.name(),
                    hook: opts.metrics.clone(),
                    stop: stop.clone(),
                },
            )
            .map_err(|e| io::Error::new(e.kind(), format!("--metrics-listen {at}: {e}")))?,
        ),
    };
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let cfg = Arc::new(cfg);
    let mut threads = Vec::with_capacity(n);
    for (i, (port, listener)) in ports.into_iter().zip(listeners).enumerate() {
        let core = cfg
            .pin_first_core
            .filter(|_| !cores.is_empty())
            .map(|f| cores[(f + i) % cores.len()]);
        let shard = ShardThread {
            cfg: cfg.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            opts: opts.clone(),
            driver,
            core,
        };
        threads.push(shard.spawn(i, port, listener)?);
    }
    log::info!(
        "gateway {} listening on ws://{addr}/ws with {n} shard(s), driver {}, up to {} connections per shard",
        cfg.gateway_id,
        driver.name(),
        cfg.conns_per_shard_max
    );
    let handle = GatewayHandle {
        addr,
        metrics_addr,
        stop,
        wakers,
        stats,
        threads,
        driver,
    };
    Ok((handle, bridge_end))
}

/// What one shard thread is started with.
struct ShardThread {
    cfg: Arc<GatewayConfig>,
    stats: Arc<[ShardStats]>,
    stop: Arc<AtomicBool>,
    opts: Options,
    driver: Driver,
    core: Option<core_affinity::CoreId>,
}

impl ShardThread {
    /// Shard `i` on its own thread, pinned to its core, until `stop`.
    fn spawn(
        self,
        i: usize,
        port: mesh::MeshPort,
        listener: i32,
    ) -> io::Result<JoinHandle<io::Result<()>>> {
        std::thread::Builder::new()
            .name(format!("im-shard-{i}"))
            .spawn(move || {
                if let Some(core) = self.core {
                    core_affinity::set_for_current(core);
                }
                let (cfg, driver) = (&self.cfg, self.driver);
                let revoked = self.opts.revoked;
                let mut shard =
                    Shard::with_revocations(cfg, port, self.stats, driver.name(), revoked);
                shard.set_metrics_hook(self.opts.metrics);
                let r = driver.run(shard, listener, &self.stop, cfg);
                if let Err(e) = &r {
                    log::error!("shard {i} stopped: {e}");
                }
                r
            })
    }
}

impl GatewayHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served when not on the WebSocket port (`--metrics-listen`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    pub fn stats(&self) -> &[ShardStats] {
        &self.stats
    }

    /// Connections held across shards right now.
    pub fn connections(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// Asks every shard to stop listening, close its connections with 1012 over the drain
    /// window (`GatewayConfig::drain_window_ms`), and stop.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for w in self.wakers.iter() {
            w.force();
        }
    }

    /// Waits for the shards to finish; the first shard error, if any.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a shard thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

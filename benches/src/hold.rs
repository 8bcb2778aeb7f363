//! `im-bench hold`: open N WebSocket connections, hold them with heartbeats, and measure what
//! they cost the gateway. Connections are spread over worker processes (this binary again,
//! `im-bench worker`), each under the per-process open-file limit and each with its own
//! source address (127.0.0.2, 127.0.0.3, …), so neither fds nor ephemeral ports run out.

use crate::gateway::{self, GatewayArgs};
use crate::proc;
use crate::ws::{self, Failure};
use gateway_core::codec::opcode;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct HoldArgs {
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    /// Connections to open.
    #[arg(long)]
    pub conns: u64,
    /// The gateway's JWT secret (the harness mints its own tokens).
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// Connections per worker process (keep under the open-file limit).
    #[arg(long, default_value_t = 18_000)]
    pub per_worker: u64,
    /// Connects in flight per worker.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long to hold once everything is connected.
    #[arg(long, default_value_t = 30)]
    pub hold_secs: u64,
    /// WebSocket ping interval per connection.
    #[arg(long, default_value_t = 30)]
    pub ping_interval_s: u64,
    /// Raw TCP connects to time first, for the connect-rate baseline (0 to skip; at most 20,000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=20_000))]
    pub raw_tcp: u64,
    /// First user id.
    #[arg(long, default_value_t = 1)]
    pub user_base: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Draw connections vs gateway and kernel memory here (SVG).
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

/// Memory as connections grow (sampled every second while connecting, every 10 s holding).
#[derive(Serialize, Clone, Copy)]
pub struct Sample {
    secs: f64,
    conns: u64,
    gateway_pss_bytes: u64,
    /// Pages charged to TCP socket buffers (/proc/net/sockstat).
    kernel_tcp_bytes: u64,
    /// All kernel slab memory (socket structs, inodes, files), from /proc/meminfo.
    kernel_slab_bytes: u64,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub src: IpAddr,
    #[arg(long)]
    pub conns: u64,
    #[arg(long)]
    pub user_start: u64,
    #[arg(long)]
    pub secret: String,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub ping_interval_s: u64,
    /// First source port (connection i uses port_base + i). Below the kernel's ephemeral range
    /// (32768 by default), so these never collide with ports the kernel hands out.
    #[arg(long, default_value_t = 10_000)]
    pub port_base: u16,
}

/// A line a worker prints on stdout.
#[derive(Serialize, serde::Deserialize, Default, Clone)]
struct Progress {
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Established connections the server closed later.
    dropped: u64,
    connect_secs: Option<f64>,
    /// WebSocket pings sent and pongs read back (the last line counts every pong that came).
    #[serde(default)]
    pings: u64,
    #[serde(default)]
    pongs: u64,
}

/// The hold phase of a worker, without epoll or a task per connection: once upgraded, a
/// socket leaves tokio's reactor and sits in one of `interval / TICK` slots. Every tick the
/// worker visits one slot: it reads whatever pongs arrived (non-blocking) and sends the next
/// ping, and reads the pongs of the slot before it. No socket is watched, so a pong's
/// arrival wakes nobody: the harness costs three syscalls per ping, and the gateway is not
/// charged for waking it (on loopback the sender runs the receiver's wake-up).
struct Held {
    slots: Vec<Vec<std::net::TcpStream>>,
    next: usize,
    pings: u64,
    pongs: u64,
    dropped: u64,
}

const HOLD_TICK: Duration = Duration::from_millis(100);

impl Held {
    fn new(interval: Duration) -> Held {
        let n = (interval.as_millis() / HOLD_TICK.as_millis()).max(1) as usize;
        Held {
            slots: (0..n).map(|_| Vec::new()).collect(),
            next: 0,
            pings: 0,
            pongs: 0,
            dropped: 0,
        }
    }

    /// Connection `i` of `n` pings in slot `i * slots / n`: evenly spread over the interval.
    fn add(&mut self, i: u64, n: u64, s: std::net::TcpStream) {
        let len = self.slots.len();
        let slot = (i as u128 * len as u128 / n.max(1) as u128) as usize;
        self.slots[slot.min(len - 1)].push(s);
    }

    /// Reads the pongs waiting on `s`; false when the server closed it.
    fn drain(s: &std::net::TcpStream, pongs: &mut u64) -> bool {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reads into our stack buffer from a socket we own.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return false,
                n if n < 0 => {
                    return std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
                }
                n => {
                    // An idle connection gets pongs only: 2-byte frames (0x8A, length 0).
                    *pongs += buf[..n as usize]
                        .chunks(2)
                        .filter(|f| f == &[0x80 | opcode::PONG, 0])
                        .count() as u64;
                }
            }
        }
    }

    /// One tick: the next slot's connections read their pongs and ping again.
    fn tick(&mut self, ping: &[u8]) {
        use std::os::fd::AsRawFd;
        let slot = self.next;
        self.next = (self.next + 1) % self.slots.len();
        let (mut pings, mut pongs, mut dropped) = (0, 0, 0);
        self.slots[slot].retain(|s| {
            let alive = Self::drain(s, &mut pongs) && {
                // SAFETY: sends our ping bytes on a socket we own.
                let n = unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        ping.as_ptr().cast(),
                        ping.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                n == ping.len() as isize
            };
            if alive {
                pings += 1;
            } else {
                dropped += 1;
            }
            alive
        });
        // The previous slot's pongs have had a tick to come back: read them now, so that an
        // unread pong (a 4 KiB page of kernel memory) is not left on every socket for 30 s.
        let prev = (slot + self.slots.len() - 1) % self.slots.len();
        if prev != slot {
            for s in &self.slots[prev] {
                Self::drain(s, &mut pongs);
            }
        }
        self.pings += pings;
        self.pongs += pongs;
        self.dropped += dropped;
    }

    /// Reads every pong still waiting (at the end, so the counts are complete).
    fn drain_all(&mut self) {
        let mut pongs = 0;
        for slot in &self.slots {
            for s in slot {
                Self::drain(s, &mut pongs);
            }
        }
        self.pongs += pongs;
    }
}

#[derive(Serialize)]
pub struct HoldResult {
    conns_requested: u64,
    conns_established: u64,
    errors: BTreeMap<String, u64>,
    dropped_while_holding: u64,
    workers: u64,
    gateway_processes: usize,
    raw_tcp_connects_per_s: Option<f64>,
    ws_connects_per_s: f64,
    connect_secs: f64,
    gateway_pss_idle_bytes: u64,
    gateway_pss_bytes: u64,
    gateway_bytes_per_conn: f64,
    gateway_bytes_per_conn_over_idle: f64,
    kernel_tcp_bytes: Option<u64>,
    hold_secs: u64,
    ping_interval_s: u64,
    gateway_cpu_percent_while_holding: f64,
    /// The same, apart: the gateways' own code (user) and the kernel's work for them (system).
    gateway_user_cpu_percent: f64,
    gateway_sys_cpu_percent: f64,
    /// Pings the clients sent while holding, and gateway CPU per ping over the hold.
    pings_while_holding: u64,
    gateway_cpu_us_per_ping: f64,
    /// Every ping sent (connect phase included) and every pong read back: equal when the
    /// gateway answered them all.
    pings_sent: u64,
    pongs_received: u64,
    /// Gateway CPU spent in the connect phase, per connection established.
    gateway_cpu_us_per_connect: f64,
    /// Harness CPU (parent and workers), to show it was not the bottleneck.
    harness_cpu_secs: f64,
    /// Kernel slab growth from before the first connection to the end of the hold, per
    /// connection (both sockets: the client's and the gateway's).
    kernel_slab_bytes_per_conn: f64,
    samples: Vec<Sample>,
}

pub(crate) fn user_token(secret: &str, user: u64) -> String {
    im_shared::jwt::sign(
        secret.as_bytes(),
        &im_shared::jwt::Claims::new(user, im_shared::unix_ms() / 1000, 24 * 3600),
    )
}

/// A worker: connect `conns` users from `src`, ping, report, exit when stdin closes.
pub fn worker(a: WorkerArgs) {
    gateway_core::gateway::raise_nofile();
    crate::run_local(async move {
        let ok = Rc::new(Cell::new(0u64));
        let errors: Rc<std::cell::RefCell<BTreeMap<String, u64>>> = Rc::default();
        let sem = Rc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
        let interval = Duration::from_secs(a.ping_interval_s.max(1));
        let held = Rc::new(std::cell::RefCell::new(Held::new(interval)));
        let started = Instant::now();
        for i in 0..a.conns {
            let (ok, errors, sem, held) = (ok.clone(), errors.clone(), sem.clone(), held.clone());
            let token = user_token(&a.secret, a.user_start + i);
            let (src, dst) = (
                SocketAddr::new(a.src, a.port_base.wrapping_add(i as u16)),
                a.addr,
            );
            let n = a.conns;
            tokio::task::spawn_local(async move {
                let permit = sem.acquire().await.expect("semaphore open");
                let fail = |k: Failure| {
                    let key = serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default();
                    *errors.borrow_mut().entry(key).or_default() += 1;
                };
                let mut s = match ws::tcp_connect(src, dst).await {
                    Ok(s) => s,
                    Err(e) => {
                        if std::env::var_os("IM_BENCH_DEBUG").is_some() {
                            eprintln!("connect from {src}: {e}");
                        }
                        return fail(Failure::Connect);
                    }
                };
                match tokio::time::timeout(
                    Duration::from_secs(15),
                    ws::upgrade(&mut s, dst, &token),
                )
                .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(k)) => return fail(k),
                    Err(_) => return fail(Failure::HandshakeTimeout),
                }
                drop(permit);
                // Out of the reactor (into_std deregisters it) and into its ping slot.
                match s.into_std() {
                    Ok(s) => {
                        held.borrow_mut().add(i, n, s);
                        ok.set(ok.get() + 1);
                    }
                    Err(_) => fail(Failure::Io),
                }
            });
        }
        // Report progress until stdin closes (the parent's signal to stop).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                line.clear();
            }
            let _ = tx.blocking_send(());
        });
        let ping = ws::ping();
        let mut connect_secs = None;
        let mut ticks = tokio::time::interval(HOLD_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut reports = 0u32;
        loop {
            let stop = tokio::select! {
                _ = ticks.tick() => false,
                _ = rx.recv() => true,
            };
            if stop {
                // The last tick's pings are a moment old: let their pongs arrive.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut h = held.borrow_mut();
            if stop {
                h.drain_all();
            } else {
                h.tick(&ping);
            }
            let done = ok.get() + errors.borrow().values().sum::<u64>();
            if connect_secs.is_none() && done >= a.conns {
                connect_secs = Some(started.elapsed().as_secs_f64());
            }
            // A line every 300 ms, and a last one with every pong counted.
            reports += 1;
            if stop || reports % 3 == 0 {
                let p = Progress {
                    ok: ok.get(),
                    errors: errors.borrow().clone(),
                    dropped: h.dropped,
                    connect_secs,
                    pings: h.pings,
                    pongs: h.pongs,
                };
                println!("{}", serde_json::to_string(&p).expect("serialise"));
            }
            if stop {
                break;
            }
        }
    });
    // Exiting closes every socket at once; the kernel does it faster than we could.
    std::process::exit(0);
}

fn pss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| proc::pss_bytes(p)).sum()
}

fn cpu_sum(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| proc::cpu_time(p)).sum()
}

fn cpu_split_sum(pids: &[u32]) -> (Duration, Duration) {
    pids.iter()
        .filter_map(|&p| proc::cpu_split(p))
        .fold((Duration::ZERO, Duration::ZERO), |a, b| {
            (a.0 + b.0, a.1 + b.1)
        })
}

/// Times `n` raw TCP connects (no WebSocket) to the gateway port, then closes them.
fn raw_tcp_rate(addr: SocketAddr, n: u64, concurrency: usize) -> f64 {
    crate::run_local(async move {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1));
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let sem = sem.clone();
            let src = SocketAddr::new(src, 10_000 + (i % 20_000) as u16);
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("open");
                ws::tcp_connect(src, addr).await.ok()
            }));
        }
        let mut held = Vec::with_capacity(n as usize);
        for t in tasks {
            held.push(t.await.ok().flatten());
        }
        let rate = held.iter().filter(|s| s.is_some()).count() as f64 / t0.elapsed().as_secs_f64();
        drop(held);
        rate
    })
}

pub fn hold(a: HoldArgs) -> HoldResult {
    gateway_core::gateway::raise_nofile();
    let gateways = gateway::spawn(&a.gateway, a.addr, &a.secret);
    let pids = gateways.pids();
    let pss_idle = pss_sum(&pids);
    let slab0 = proc::kernel_slab_bytes().unwrap_or(0);
    let mut samples: Vec<Sample> = Vec::new();
    let sample = |t: Instant, conns: u64| Sample {
        secs: t.elapsed().as_secs_f64(),
        conns,
        gateway_pss_bytes: pss_sum(&pids),
        kernel_tcp_bytes: proc::tcp_kernel_bytes().unwrap_or(0),
        kernel_slab_bytes: proc::kernel_slab_bytes().unwrap_or(0),
    };

    let raw_rate = (a.raw_tcp > 0).then(|| raw_tcp_rate(a.addr, a.raw_tcp, a.concurrency));
    if raw_rate.is_some() {
        std::thread::sleep(Duration::from_secs(1)); // let the gateway reap the raw sockets
    }

    let exe = std::env::current_exe().expect("own path");
    let workers = a.conns.div_ceil(a.per_worker.max(1));
    let (tx, rx) = mpsc::channel::<(usize, Progress)>();
    let mut children = Vec::new();
    for w in 0..workers {
        let conns = a.per_worker.min(a.conns - w * a.per_worker);
        // One source address per worker: 127.0.0.2, 127.0.0.3, … (all of 127/8 is loopback).
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + w as u32);
        let mut child = Command::new(&exe)
            .arg("worker")
            .args(["--addr", &a.addr.to_string(), "--src", &src.to_string()])
            .args([
                "--conns",
                &conns.to_string(),
                "--user-start",
                &(a.user_base + w * a.per_worker).to_string(),
            ])
            .args([
                "--secret",
                &a.secret,
                "--concurrency",
                &a.concurrency.to_string(),
            ])
            .args(["--ping-interval-s", &a.ping_interval_s.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a worker");
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(p) = serde_json::from_str::<Progress>(&line) {
                    if tx.send((w as usize, p)).is_err() {
                        break;
                    }
                }
            }
        });
        children.push(child);
    }
    drop(tx);

    let worker_pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let connect_cpu0 = cpu_sum(&pids);
    let bar = ProgressBar::new(a.conns);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} conns  {per_sec}  {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let mut latest: Vec<Progress> = vec![Progress::default(); workers as usize];
    let t0 = Instant::now();
    let total = |l: &[Progress]| -> (u64, u64, u64) {
        let ok = l.iter().map(|p| p.ok).sum();
        let err = l.iter().map(|p| p.errors.values().sum::<u64>()).sum();
        (ok, err, l.iter().map(|p| p.dropped).sum())
    };
    // Connect phase: bounded by time as well as count.
    let connect_deadline = t0 + Duration::from_secs(60 + a.conns / 1000);
    samples.push(sample(t0, 0));
    let mut next_sample = t0 + Duration::from_secs(1);
    loop {
        if let Ok((w, p)) = rx.recv_timeout(Duration::from_millis(250)) {
            latest[w] = p;
        }
        // Take every line that queued up: under load one sample of 90 gateways' smaps can
        // take longer than the workers take to report, and the counts would fall behind.
        while let Ok((w, p)) = rx.try_recv() {
            latest[w] = p;
        }
        let (ok, err, _) = total(&latest);
        if Instant::now() >= next_sample {
            samples.push(sample(t0, ok));
            next_sample += Duration::from_secs(1);
        }
        bar.set_position(ok);
        bar.set_message(format!("errors {err}"));
        if ok + err >= a.conns || Instant::now() > connect_deadline {
            break;
        }
    }
    // Each worker times its own connect phase; they run in parallel, so the slowest is the run's.
    let connect_secs = if latest.iter().all(|p| p.connect_secs.is_some()) {
        latest
            .iter()
            .filter_map(|p| p.connect_secs)
            .fold(0.0, f64::max)
    } else {
        t0.elapsed().as_secs_f64()
    };
    bar.finish();
    let connect_cpu = cpu_sum(&pids) - connect_cpu0;

    // Hold: let timers and heartbeats run, then measure.
    let cpu0 = cpu_sum(&pids);
    let split0 = cpu_split_sum(&pids);
    let pings0: u64 = latest.iter().map(|p| p.pings).sum();
    let h0 = Instant::now();
    let hold_end = h0 + Duration::from_secs(a.hold_secs);
    let mut next_sample = h0;
    while Instant::now() < hold_end {
        if let Ok((w, p)) = rx.recv_timeout(Duration::from_millis(500)) {
            latest[w] = p;
        }
        while let Ok((w, p)) = rx.try_recv() {
            latest[w] = p;
        }
        if Instant::now() >= next_sample {
            let (ok, _, dropped) = total(&latest);
            let s = sample(t0, ok);
            // One line per 10 s, so a long hold shows it is alive and what it holds.
            println!(
                "holding {:>9} connections  dropped {dropped}  gateway {:.0} MiB  kernel slab {:.0} MiB  {:.0}/{} s",
                ok,
                s.gateway_pss_bytes as f64 / 1048576.0,
                s.kernel_slab_bytes as f64 / 1048576.0,
                h0.elapsed().as_secs_f64(),
                a.hold_secs
            );
            samples.push(s);
            next_sample += Duration::from_secs(10);
        }
    }
    let held_secs = h0.elapsed().as_secs_f64();
    let gateway_cpu = (cpu_sum(&pids) - cpu0).as_secs_f64() / held_secs * 100.0;
    let split1 = cpu_split_sum(&pids);
    let (user_cpu, sys_cpu) = (
        (split1.0 - split0.0).as_secs_f64() / held_secs * 100.0,
        (split1.1 - split0.1).as_secs_f64() / held_secs * 100.0,
    );
    let pings_held = latest.iter().map(|p| p.pings).sum::<u64>() - pings0;
    while let Ok((w, p)) = rx.try_recv() {
        latest[w] = p;
    }
    let (ok, _, dropped) = total(&latest);
    let pss = pss_sum(&pids);
    let kernel = proc::tcp_kernel_bytes();
    let slab = proc::kernel_slab_bytes().unwrap_or(0);
    samples.push(sample(t0, ok));
    if let Some(path) = &a.plot {
        match plot(path, &samples) {
            Ok(()) => println!("plot: {}", path.display()),
            Err(e) => eprintln!("im-bench: plotting to {}: {e}", path.display()),
        }
    }
    let mut errors = BTreeMap::new();
    for p in &latest {
        for (k, v) in &p.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
    }
    let harness_cpu = proc::own_cpu_time() + cpu_sum(&worker_pids);
    for c in &mut children {
        drop(c.stdin.take());
    }
    for mut c in children {
        let _ = c.wait();
    }
    // Each worker's last line counts every pong (the readers end with their workers).
    while let Ok((w, p)) = rx.recv_timeout(Duration::from_secs(5)) {
        latest[w] = p;
    }
    let pings: u64 = latest.iter().map(|p| p.pings).sum();
    let pongs: u64 = latest.iter().map(|p| p.pongs).sum();
    gateways.stop();
    let per = |b: u64| if ok > 0 { b as f64 / ok as f64 } else { 0.0 };
    HoldResult {
        conns_requested: a.conns,
        conns_established: ok,
        errors,
        dropped_while_holding: dropped,
        workers,
        gateway_processes: pids.len(),
        raw_tcp_connects_per_s: raw_rate,
        ws_connects_per_s: ok as f64 / connect_secs.max(1e-9),
        connect_secs,
        gateway_pss_idle_bytes: pss_idle,
        gateway_pss_bytes: pss,
        gateway_bytes_per_conn: per(pss),
        gateway_bytes_per_conn_over_idle: per(pss.saturating_sub(pss_idle)),
        kernel_tcp_bytes: kernel,
        hold_secs: a.hold_secs,
        ping_interval_s: a.ping_interval_s,
        gateway_cpu_percent_while_holding: gateway_cpu,
        gateway_user_cpu_percent: user_cpu,
        gateway_sys_cpu_percent: sys_cpu,
        pings_while_holding: pings_held,
        gateway_cpu_us_per_ping: gateway_cpu / 100.0 * held_secs * 1e6 / pings_held.max(1) as f64,
        pings_sent: pings,
        pongs_received: pongs,
        gateway_cpu_us_per_connect: connect_cpu.as_secs_f64() * 1e6 / ok.max(1) as f64,
        harness_cpu_secs: harness_cpu.as_secs_f64(),
        kernel_slab_bytes_per_conn: per(slab.saturating_sub(slab0)),
        samples,
    }
}

/// One plotted quantity of a sample, in MiB.
type Measure = Box<dyn Fn(&Sample) -> f64>;

/// Connections (x) against gateway userspace memory and kernel memory (y, MiB).
fn plot(path: &std::path::Path, samples: &[Sample]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    const MIB: f64 = 1048576.0;
    let max_x = samples.iter().map(|s| s.conns).max().unwrap_or(1).max(1) as f64;
    let base_slab = samples.first().map_or(0, |s| s.kernel_slab_bytes);
    let series: [(&str, RGBColor, Measure); 3] = [
        (
            "gateway userspace (PSS, all processes)",
            BLUE,
            Box::new(|s: &Sample| s.gateway_pss_bytes as f64 / MIB),
        ),
        (
            "kernel slab growth (sockets, files)",
            RED,
            Box::new(move |s: &Sample| s.kernel_slab_bytes.saturating_sub(base_slab) as f64 / MIB),
        ),
        (
            "kernel TCP buffers (sockstat)",
            GREEN,
            Box::new(|s: &Sample| s.kernel_tcp_bytes as f64 / MIB),
        ),
    ];
    let max_y = samples
        .iter()
        .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("memory as connections grow", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("MiB")
        .x_label_formatter(&|x| {
            if max_x >= 20_000.0 {
                format!("{:.0}k", x / 1000.0)
            } else {
                format!("{x:.0}")
            }
        })
        .draw()?;
    for (name, color, f) in &series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.conns as f64, f(s))),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

pub fn print(r: &HoldResult) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nhold: {} of {} connections established, errors {:?}",
        r.conns_established, r.conns_requested, r.errors
    );
    let _ = writeln!(
        out,
        "  dropped while holding     {}",
        r.dropped_while_holding
    );
    if let Some(raw) = r.raw_tcp_connects_per_s {
        let _ = writeln!(out, "  raw TCP connects/s        {raw:.0}");
    }
    let _ = writeln!(
        out,
        "  WebSocket connects/s      {:.0}  (upgrade + JWT, {:.1} s)",
        r.ws_connects_per_s, r.connect_secs
    );
    let _ = writeln!(
        out,
        "  gateway CPU per connect   {:.0} us",
        r.gateway_cpu_us_per_connect
    );
    let _ = writeln!(
        out,
        "  gateway PSS               {:.1} MiB over {} process(es) (idle {:.1} MiB)",
        r.gateway_pss_bytes as f64 / 1048576.0,
        r.gateway_processes,
        r.gateway_pss_idle_bytes as f64 / 1048576.0
    );
    let _ = writeln!(
        out,
        "  gateway bytes/connection  {:.0}  ({:.0} above idle)",
        r.gateway_bytes_per_conn, r.gateway_bytes_per_conn_over_idle
    );
    if let Some(k) = r.kernel_tcp_bytes {
        let _ = writeln!(
            out,
            "  kernel TCP memory         {:.1} MiB",
            k as f64 / 1048576.0
        );
    }
    let _ = writeln!(
        out,
        "  kernel slab/connection    {:.0} bytes (both sockets, grown since start)",
        r.kernel_slab_bytes_per_conn
    );
    let _ = writeln!(
        out,
        "  gateway CPU while holding {:.2} % of one core (ping every {} s): user {:.2} %, kernel {:.2} %",
        r.gateway_cpu_percent_while_holding,
        r.ping_interval_s,
        r.gateway_user_cpu_percent,
        r.gateway_sys_cpu_percent
    );
    let _ = writeln!(
        out,
        "  per ping                  {:.1} us of gateway CPU ({} pings while holding)",
        r.gateway_cpu_us_per_ping, r.pings_while_holding
    );
    let _ = writeln!(
        out,
        "  pings / pongs             {} / {}",
        r.pings_sent, r.pongs_received
    );
    let _ = writeln!(
        out,
        "  harness CPU               {:.1} s",
        r.harness_cpu_secs
    );
}

/// `heartbeat`: what holding idle connections costs, per ping.
pub fn print_heartbeat(r: &HoldResult) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nheartbeat: {} idle connections, a ping from each every {} s, held {} s ({} gateway process(es))",
        r.conns_established, r.ping_interval_s, r.hold_secs, r.gateway_processes
    );
    let _ = writeln!(
        out,
        "  gateway CPU   {:.2} % of one core  (user {:.2} %, kernel {:.2} %)",
        r.gateway_cpu_percent_while_holding, r.gateway_user_cpu_percent, r.gateway_sys_cpu_percent
    );
    let _ = writeln!(
        out,
        "  per ping      {:.1} us  ({} pings while holding; {} sent, {} pongs back in all)",
        r.gateway_cpu_us_per_ping, r.pings_while_holding, r.pings_sent, r.pongs_received
    );
    let _ = writeln!(
        out,
        "  dropped {}  errors {:?}  harness CPU {:.1} s",
        r.dropped_while_holding, r.errors, r.harness_cpu_secs
    );
}

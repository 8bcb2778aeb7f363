//! `im-bench drain`: how long a drain takes to move a gateway's clients to another gateway.
//! N WebSocket connections are opened to gateway `--from` (spread over worker processes,
//! `im-bench drain-worker`, one source address each, as `hold` does); then the gateway
//! process `--pid` gets SIGTERM and each worker reconnects every connection the drain closes
//! (1012) to `--to`, as a client that asked `/gateways/pick` would. Reported: seconds from
//! the signal to the first close, to every connection moved, and to the process's exit; closes
//! by kind; failed moves. (Messages across a drain are accounted for by the end-to-end test
//! `logins_spread_over_gateways_and_a_drain_moves_clients_without_loss`.)

use crate::ws::{self, Failure};
use gateway_core::codec::opcode;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

#[derive(clap::Args, Clone)]
pub struct DrainArgs {
    /// The gateway that drains.
    #[arg(long)]
    pub from: SocketAddr,
    /// Where its clients go.
    #[arg(long)]
    pub to: SocketAddr,
    /// The process to send SIGTERM (a multi-process gateway's supervisor forwards it).
    #[arg(long)]
    pub pid: u32,
    #[arg(long)]
    pub conns: u64,
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// Connections per worker process (under the open-file limit).
    #[arg(long, default_value_t = 16_000)]
    pub per_worker: u64,
    /// Give up after this long (connecting and draining each).
    #[arg(long, default_value_t = 180)]
    pub deadline_s: u64,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
pub struct DrainWorkerArgs {
    #[arg(long)]
    pub from: SocketAddr,
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long)]
    pub src: IpAddr,
    #[arg(long)]
    pub conns: u64,
    #[arg(long)]
    pub user_start: u64,
    #[arg(long)]
    pub secret: String,
}

/// A worker's counts, printed as a JSON line every 100 ms.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct Counts {
    connected: u64,
    connect_failed: u64,
    /// Closed by the drained gateway with a 1012 close frame, or without one.
    closed_1012: u64,
    closed_other: u64,
    moved: u64,
    /// Attempts that failed and were tried again (backoff), and why attempts failed.
    move_retries: u64,
    move_errors: std::collections::BTreeMap<String, u64>,
    /// Connections that never moved in `MOVE_ATTEMPTS`.
    move_failed: u64,
}

#[derive(Serialize)]
pub struct DrainResult {
    conns: u64,
    connected: u64,
    workers: u64,
    connect_secs: f64,
    secs_to_first_close: Option<f64>,
    secs_to_all_moved: Option<f64>,
    secs_to_gateway_exit: Option<f64>,
    closed_1012: u64,
    closed_other: u64,
    moved: u64,
    move_retries: u64,
    move_errors: std::collections::BTreeMap<String, u64>,
    move_failed: u64,
    moves_per_sec: Option<f64>,
}

/// One connection's life: to `from`, then, once the drain closes it, to `to`.
async fn client(
    a: Rc<DrainWorkerArgs>,
    i: u64,
    counts: Rc<Cell<Counts>>,
    connecting: Rc<tokio::sync::Semaphore>,
) {
    let bump = |f: fn(&mut Counts)| {
        let mut c = counts.take();
        f(&mut c);
        counts.set(c);
    };
    let token = crate::hold::user_token(&a.secret, a.user_start + i);
    let src = SocketAddr::new(a.src, 0);
    // At most so many connects in flight per worker.
    let permit = connecting.acquire().await.ok();
    let Ok(mut s) = ws::tcp_connect(src, a.from).await else {
        return bump(|c| c.connect_failed += 1);
    };
    if ws::upgrade(&mut s, a.from, &token).await.is_err() {
        return bump(|c| c.connect_failed += 1);
    }
    drop(permit);
    bump(|c| c.connected += 1);
    // Wait for the drain: a close frame (its code), then the end of the stream.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let mut code = None;
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                ws::drain_frames(&mut buf, |op, payload| {
                    if op == opcode::CLOSE && payload.len() >= 2 {
                        code = Some(u16::from_be_bytes([payload[0], payload[1]]));
                    }
                });
                if code.is_some() {
                    break;
                }
            }
        }
    }
    drop(s);
    if code == Some(1012) {
        bump(|c| c.closed_1012 += 1);
    } else {
        bump(|c| c.closed_other += 1);
    }
    // As a client does: reconnect at once, and on a failure again with backoff and jitter.
    let mut pause = Duration::from_millis(250 + (i % 250));
    for attempt in 1..=MOVE_ATTEMPTS {
        let moved = async {
            let mut s = ws::tcp_connect(src, a.to)
                .await
                .map_err(|_| Failure::Connect)?;
            ws::upgrade(&mut s, a.to, &token).await?;
            Ok::<_, Failure>(s)
        };
        match tokio::time::timeout(Duration::from_secs(10), moved).await {
            Ok(Ok(s)) => {
                bump(|c| c.moved += 1);
                // Held until the worker exits.
                std::mem::forget(s);
                return;
            }
            Ok(Err(f)) => note_failure(&counts, format!("{f:?}")),
            Err(_) => note_failure(&counts, "Timeout".into()),
        }
        if attempt < MOVE_ATTEMPTS {
            bump(|c| c.move_retries += 1);
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    bump(|c| c.move_failed += 1);
}

/// Tries to move one connection before it counts as failed.
const MOVE_ATTEMPTS: u32 = 6;

fn note_failure(counts: &Rc<Cell<Counts>>, kind: String) {
    let mut c = counts.take();
    *c.move_errors.entry(kind).or_default() += 1;
    counts.set(c);
}

/// A worker: its connections, reported until stdin closes.
pub fn worker(a: DrainWorkerArgs) {
    gateway_core::gateway::raise_nofile();
    let a = Rc::new(a);
    crate::run_local(async move {
        let counts = Rc::new(Cell::new(Counts::default()));
        let connecting = Rc::new(tokio::sync::Semaphore::new(256));
        for i in 0..a.conns {
            let (a, counts, connecting) = (a.clone(), counts.clone(), connecting.clone());
            tokio::task::spawn_local(client(a, i, counts, connecting));
        }
        // The parent closes stdin when it is done: exit then.
        std::thread::spawn(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
                line.clear();
            }
            std::process::exit(0);
        });
        loop {
            let c = counts.take();
            println!("{}", serde_json::to_string(&c).expect("serialise"));
            counts.set(c);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub fn drain(a: DrainArgs) -> DrainResult {
    gateway_core::gateway::raise_nofile();
    let exe = std::env::current_exe().expect("own path");
    let workers = a.conns.div_ceil(a.per_worker.max(1));
    let (tx, rx) = mpsc::channel::<(usize, Counts)>();
    let mut children = Vec::new();
    for w in 0..workers {
        let conns = a.per_worker.min(a.conns - w * a.per_worker);
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + w as u32);
        let mut child = Command::new(&exe)
            .arg("drain-worker")
            .args(["--from", &a.from.to_string(), "--to", &a.to.to_string()])
            .args(["--src", &src.to_string(), "--conns", &conns.to_string()])
            .args(["--user-start", &(1 + w * a.per_worker).to_string()])
            .args(["--secret", &a.secret])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a worker");
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(c) = serde_json::from_str::<Counts>(&line) {
                    if tx.send((w as usize, c)).is_err() {
                        break;
                    }
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let mut latest = vec![Counts::default(); workers as usize];
    let sum = |l: &[Counts]| {
        l.iter().fold(Counts::default(), |mut s, c| {
            s.connected += c.connected;
            s.connect_failed += c.connect_failed;
            s.closed_1012 += c.closed_1012;
            s.closed_other += c.closed_other;
            s.moved += c.moved;
            s.move_retries += c.move_retries;
            s.move_failed += c.move_failed;
            for (k, v) in &c.move_errors {
                *s.move_errors.entry(k.clone()).or_default() += v;
            }
            s
        })
    };
    let take = |latest: &mut Vec<Counts>| {
        if let Ok((w, c)) = rx.recv_timeout(Duration::from_millis(50)) {
            latest[w] = c;
        }
        while let Ok((w, c)) = rx.try_recv() {
            latest[w] = c;
        }
    };
    let t0 = Instant::now();
    let deadline = Duration::from_secs(a.deadline_s);
    loop {
        take(&mut latest);
        let s = sum(&latest);
        if s.connected + s.connect_failed >= a.conns || t0.elapsed() > deadline {
            break;
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = sum(&latest).connected;
    eprintln!(
        "drain: {connected} of {} connected in {connect_secs:.1} s; draining",
        a.conns
    );
    std::thread::sleep(Duration::from_secs(2));
    let d0 = Instant::now();
    // SAFETY: a signal to the gateway process the caller named.
    unsafe { libc::kill(a.pid as i32, libc::SIGTERM) };
    let (mut first_close, mut all_moved, mut exited) = (None, None, None);
    loop {
        take(&mut latest);
        let s = sum(&latest);
        let t = d0.elapsed().as_secs_f64();
        if first_close.is_none() && s.closed_1012 + s.closed_other > 0 {
            first_close = Some(t);
        }
        if exited.is_none() && !pid_alive(a.pid) {
            exited = Some(t);
        }
        let settled = s.moved + s.move_failed >= connected;
        if all_moved.is_none() && settled {
            all_moved = Some(t);
        }
        if (settled && exited.is_some()) || d0.elapsed() > deadline {
            break;
        }
    }
    let s = sum(&latest);
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    DrainResult {
        conns: a.conns,
        connected,
        workers,
        connect_secs,
        secs_to_first_close: first_close,
        secs_to_all_moved: all_moved,
        secs_to_gateway_exit: exited,
        closed_1012: s.closed_1012,
        closed_other: s.closed_other,
        moved: s.moved,
        move_retries: s.move_retries,
        move_errors: s.move_errors.clone(),
        move_failed: s.move_failed,
        moves_per_sec: all_moved.map(|t| s.moved as f64 / t.max(1e-9)),
    }
}

pub fn print(r: &DrainResult) {
    println!(
        "drain: {} of {} connections; first close after {:?} s, all moved after {:?} s, gateway gone after {:?} s",
        r.connected, r.conns, r.secs_to_first_close, r.secs_to_all_moved, r.secs_to_gateway_exit
    );
    println!(
        "  closes: {} with 1012, {} other; moved {}, retried {} ({:?}), failed {}; {:.0} moves/s",
        r.closed_1012,
        r.closed_other,
        r.moved,
        r.move_retries,
        r.move_errors,
        r.move_failed,
        r.moves_per_sec.unwrap_or(0.0)
    );
}

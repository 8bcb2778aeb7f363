//! `im-bench presence`: how long a user's arrival and departure take to reach a contact
//! (docs/PROTOCOL.md, "Presence"; the seeds promise < 500 ms), beside a message over the
//! same path, measured in the same run.
//!
//! One watcher holds a connection and has exchanged a message each way with each of N
//! subjects (over REST), so they are contacts. Then, one subject at a time:
//!   1. the subject connects; from its upgrade's answer to the watcher's
//!      `{"type":"presence","online":true}` is the **arrival** time;
//!   2. the subject sends the watcher a message; from the send to the watcher's `msg` is the
//!      **message** time: the same hops (gateway → im.upstream → logic → the watcher's
//!      gateway), the floor presence is compared with.
//!
//! When all are online, they close one by one, 20 ms apart; from each close to the
//! watcher's `online: false` is the **departure** time, which includes the debounce
//! (2 s, `OFFLINE_DEBOUNCE`): reported as is and less the debounce.

use crate::api::Http;
use crate::run_local;
use crate::ws;
use gateway_core::codec::opcode;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The server's debounce of a last connection's close (logic/src/stage/online.rs).
const DEBOUNCE_MS: u64 = 2_000;

#[derive(clap::Args)]
pub struct PresenceArgs {
    /// The gateway's WebSocket address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    /// The REST API's address (to make the conversations).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api: SocketAddr,
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// Subjects (users who come and go); the watcher is user `user_base`, the subjects the
    /// next ids.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=5_000))]
    pub subjects: u64,
    /// First user id (seeded users; keep clear of other runs' users).
    #[arg(long, default_value_t = 10_000_000)]
    pub user_base: u64,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct Millis {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Millis {
    fn of(h: &Histogram<u64>) -> Millis {
        let ms = |us: u64| us as f64 / 1000.0;
        Millis {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Serialize)]
pub struct PresenceResult {
    pub subjects: u64,
    /// Connect (upgrade answered) → the watcher's `online: true`.
    pub arrival: Millis,
    /// A message from the subject → the watcher's `msg` (the same hops: the floor).
    pub message: Millis,
    /// Close → the watcher's `online: false`, debounce included, and less the debounce.
    pub departure: Millis,
    pub departure_less_debounce: Millis,
    /// Changes the watcher never heard of within 10 s.
    pub missed: u64,
}

/// What the watcher heard: (kind, user, when).
#[derive(Debug)]
enum Heard {
    Online(u64, Instant),
    Offline(u64, Instant),
    Msg(u64, Instant),
}

fn token(secret: &str, user: u64) -> String {
    im_shared::jwt::sign(
        secret.as_bytes(),
        &im_shared::jwt::Claims::new(user, im_shared::unix_ms() / 1000, 3600),
    )
}

async fn connect(a: &PresenceArgs, user: u64) -> TcpStream {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1)), 0);
    let mut s = ws::tcp_connect(src, a.addr).await.expect("connect");
    ws::upgrade(&mut s, a.addr, &token(&a.secret, user))
        .await
        .expect("upgrade");
    s
}

/// The watcher's reader: every `presence` and `msg` frame, stamped on arrival.
fn watch(mut rd: tokio::net::tcp::OwnedReadHalf, tx: mpsc::UnboundedSender<Heard>) {
    tokio::task::spawn_local(async move {
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 16384];
        loop {
            let n = match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let now = Instant::now();
            ws::drain_frames(&mut buf, |op, payload| {
                if op != opcode::TEXT {
                    return;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    return;
                };
                let id = |k: &str| v[k].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                let heard = match v["type"].as_str() {
                    Some("presence") if v["online"] == true => Heard::Online(id("user"), now),
                    Some("presence") => Heard::Offline(id("user"), now),
                    Some("msg") => Heard::Msg(id("from"), now),
                    _ => return,
                };
                let _ = tx.send(heard);
            });
        }
    });
}

/// Waits for what `pick` accepts; other frames are kept for later waits.
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Heard>,
    kept: &mut Vec<Heard>,
    pick: impl Fn(&Heard) -> Option<Instant>,
) -> Option<Instant> {
    if let Some(i) = kept.iter().position(|h| pick(h).is_some()) {
        return pick(&kept.remove(i));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if let Some(t) = pick(&h) {
            return Some(t);
        }
        kept.push(h);
    }
}

pub fn presence(a: PresenceArgs) -> PresenceResult {
    run_local(run(a))
}

async fn run(a: PresenceArgs) -> PresenceResult {
    let watcher = a.user_base;
    let subjects: Vec<u64> = (1..=a.subjects).map(|i| a.user_base + i).collect();
    // Contacts: the watcher and each subject write to each other once (REST sends).
    let mut http = Http::connect(a.api).await.expect("the REST API");
    let wt = token(&a.secret, watcher);
    for s in &subjects {
        let st_ = token(&a.secret, *s);
        for (from, to) in [(&wt, *s), (&st_, watcher)] {
            let body = format!("{{\"to\":\"{to}\",\"content\":\"hi\"}}");
            let (st, b) = http
                .request("POST", "/api/v1/messages/send", Some(from), &body)
                .await
                .expect("REST");
            assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
        }
    }
    // Persist stores them a moment later (distributed): contacts are read from there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rd, _watcher_writer) = connect(&a, watcher).await.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    watch(rd, tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut arrival, mut message, mut departure, mut less) = (hist(), hist(), hist(), hist());
    let mut kept = Vec::new();
    let mut missed = 0;
    let mut open: HashMap<u64, TcpStream> = HashMap::new();
    let us = |from: Instant, to: Instant| to.saturating_duration_since(from).as_micros() as u64;
    for (i, &s) in subjects.iter().enumerate() {
        let mut conn = connect(&a, s).await;
        let up = Instant::now();
        match wait_for(&mut rx, &mut kept, |h| match h {
            Heard::Online(u, t) if *u == s => Some(*t),
            _ => None,
        })
        .await
        {
            Some(t) => arrival.saturating_record(us(up, t).max(1)),
            None => missed += 1,
        }
        let send = format!(
            "{{\"type\":\"send\",\"cid\":\"p{i}\",\"to\":\"{watcher}\",\"content\":\"x\"}}"
        );
        conn.write_all(&ws::frame(opcode::TEXT, send.as_bytes()))
            .await
            .expect("send");
        let sent = Instant::now();
        match wait_for(&mut rx, &mut kept, |h| match h {
            Heard::Msg(u, t) if *u == s => Some(*t),
            _ => None,
        })
        .await
        {
            Some(t) => message.saturating_record(us(sent, t).max(1)),
            None => missed += 1,
        }
        open.insert(s, conn);
    }
    let mut closed: HashMap<u64, Instant> = HashMap::new();
    for &s in &subjects {
        let conn = open.remove(&s).expect("open");
        drop(conn);
        closed.insert(s, Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for &s in &subjects {
        match wait_for(&mut rx, &mut kept, |h| match h {
            Heard::Offline(u, t) if *u == s => Some(*t),
            _ => None,
        })
        .await
        {
            Some(t) => {
                let took = us(closed[&s], t).max(1);
                departure.saturating_record(took);
                less.saturating_record(took.saturating_sub(DEBOUNCE_MS * 1000).max(1));
            }
            None => missed += 1,
        }
    }
    PresenceResult {
        subjects: a.subjects,
        arrival: Millis::of(&arrival),
        message: Millis::of(&message),
        departure: Millis::of(&departure),
        departure_less_debounce: Millis::of(&less),
        missed,
    }
}

pub fn print(r: &PresenceResult) {
    let line = |what: &str, m: &Millis| {
        println!(
            "{what:<28} n={:<5} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
            m.count, m.p50_ms, m.p99_ms, m.max_ms
        )
    };
    println!("presence, {} subjects:", r.subjects);
    line("arrival (connect → told)", &r.arrival);
    line("message (same hops)", &r.message);
    line("departure (close → told)", &r.departure);
    line("departure less 2 s debounce", &r.departure_less_debounce);
    println!("missed: {}", r.missed);
}

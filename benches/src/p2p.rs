//! `im-bench p2p`: P pairs of users, each sender sending to its receiver at a steady total
//! rate; measures delivered messages per second and latency (send → `msg` at the receiver,
//! and send → `sent` at the sender) with HDR histograms. Each message carries its send time.

use crate::gateway::{self, GatewayArgs};
use crate::proc;
use crate::scrape;
use crate::ws;
use gateway_core::codec::opcode;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

#[derive(clap::Args, Clone)]
pub struct P2pArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// Sender/receiver pairs (two connections each, from one source address).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=9_000))]
    pub pairs: u64,
    /// Messages per second, all pairs together.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Measured seconds (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Content bytes per message (at least 20: the send timestamp).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// First user id (keep clear of other runs' users).
    #[arg(long, default_value_t = 10_000_000)]
    pub user_base: u64,
    /// Send `typing` frames instead of messages (one per frame slot, to the pair's
    /// conversation): what a typing frame costs the gateway, beside a message's cost in a
    /// run without it. Nothing is delivered or acknowledged (logic relays one per 2 s).
    #[arg(long)]
    pub typing: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// host:port of a service's `/metrics` (repeatable): its millisecond histograms over the
    /// window are reported — where a message's time goes between the services.
    #[arg(long = "metrics")]
    pub metrics: Vec<SocketAddr>,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct Latency {
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Serialize)]
pub struct P2pResult {
    pairs: u64,
    pairs_across_shards: u64,
    rate_target: u64,
    secs: u64,
    sent: u64,
    acked: u64,
    delivered: u64,
    errors: u64,
    delivered_per_s: f64,
    delivery_latency: Latency,
    ack_latency: Latency,
    gateway_cpu_percent: Option<f64>,
    /// The gateways' CPU time over the window per frame sent in it (a `send`, or a `typing`
    /// with --typing).
    gateway_cpu_us_per_frame: Option<f64>,
    typing: bool,
    harness_cpu_secs: f64,
    /// The services' histograms over the window (`--metrics`).
    observed: Vec<scrape::Observed>,
}

/// Finds `"key":"` in a JSON frame and parses the 20 digits after it (our timestamps).
fn stamp_after(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = json.windows(key.len()).position(|w| w == key)? + key.len();
    std::str::from_utf8(json.get(at..at + 20)?)
        .ok()?
        .parse()
        .ok()
}

pub fn p2p(a: P2pArgs) -> P2pResult {
    gateway_core::gateway::raise_nofile();
    let gateways = gateway::spawn(&a.gateway, a.addr, &a.secret);
    let pids = gateways.pids();
    let r = crate::run_local(run(a, pids));
    gateways.stop();
    r
}

async fn run(a: P2pArgs, pids: Vec<u32>) -> P2pResult {
    let epoch = Instant::now();
    let now_us = move || epoch.elapsed().as_micros() as u64;
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let delivery = Rc::new(RefCell::new(hist()));
    let ack = Rc::new(RefCell::new(hist()));
    let (delivered, acked, errors) = (
        Rc::new(Cell::new(0u64)),
        Rc::new(Cell::new(0u64)),
        Rc::new(Cell::new(0u64)),
    );
    let measuring = Rc::new(Cell::new(false));
    let src_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1));
    let mut writers: Vec<OwnedWriteHalf> = Vec::with_capacity(a.pairs as usize);
    // Receivers never write, but their write halves must stay open: dropping one shuts the
    // socket's write side, which the gateway would see as a peer going away.
    let mut receiver_writers: Vec<OwnedWriteHalf> = Vec::with_capacity(a.pairs as usize);
    let mut across = 0;
    for i in 0..a.pairs {
        let (sender_id, receiver_id) = (a.user_base + 2 * i, a.user_base + 2 * i + 1);
        let mut shards = [None, None];
        let mut halves = Vec::new();
        for (j, user) in [sender_id, receiver_id].into_iter().enumerate() {
            let src = SocketAddr::new(src_ip, 10_000 + (2 * i as u16).wrapping_add(j as u16));
            let mut s = ws::tcp_connect(src, a.addr).await.expect("connect");
            let token = im_shared::jwt::sign(
                a.secret.as_bytes(),
                &im_shared::jwt::Claims::new(user, im_shared::unix_ms() / 1000, 3600),
            );
            shards[j] = ws::upgrade(&mut s, a.addr, &token).await.expect("upgrade");
            halves.push(s.into_split());
        }
        if shards[0] != shards[1] {
            across += 1;
        }
        let (recv_read, recv_write) = halves.pop().expect("receiver");
        receiver_writers.push(recv_write);
        let (send_read, send_write) = halves.pop().expect("sender");
        writers.push(send_write);
        // Receiver: a `msg` carries the send time in its content.
        for (mut rd, is_sender) in [(recv_read, false), (send_read, true)] {
            let (hist, count) = if is_sender {
                (ack.clone(), acked.clone())
            } else {
                (delivery.clone(), delivered.clone())
            };
            let (errors, measuring) = (errors.clone(), measuring.clone());
            tokio::task::spawn_local(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 16384];
                loop {
                    let n = match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let now = now_us();
                    ws::drain_frames(&mut buf, |op, payload| {
                        if op != opcode::TEXT {
                            return;
                        }
                        let key: &[u8] = if is_sender {
                            b"\"cid\":\""
                        } else {
                            b"\"content\":\""
                        };
                        match stamp_after(payload, key) {
                            Some(t) if measuring.get() => {
                                count.set(count.get() + 1);
                                let _ = hist.borrow_mut().record(now.saturating_sub(t).max(1));
                            }
                            Some(_) => {}
                            None if payload.starts_with(b"{\"type\":\"error\"") => {
                                errors.set(errors.get() + 1)
                            }
                            None => {}
                        }
                    });
                }
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // directory updates settle

    let cpu_sum = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| proc::cpu_time(p))
            .sum::<Duration>()
    };
    let padding = "x".repeat(a.size.saturating_sub(20));
    let mut sent = 0u64;
    let warmup = Duration::from_secs(1);
    let total = warmup + Duration::from_secs(a.secs);
    let start = Instant::now();
    let mut cpu0 = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut next_pair = 0usize;
    let mut measured_from = start;
    let mut sent_before = 0u64;
    let scrape_at = |addrs: Vec<SocketAddr>| {
        // Off the send loop's thread: a scrape must not pause the senders.
        tokio::task::spawn_blocking(move || scrape::snapshot(&addrs))
    };
    let mut before = None;
    while start.elapsed() < total {
        tick.tick().await;
        if !measuring.get() && start.elapsed() >= warmup {
            measuring.set(true);
            measured_from = Instant::now();
            sent_before = sent;
            cpu0 = cpu_sum(&pids);
            before = Some(scrape_at(a.metrics.clone()));
        }
        // Messages due by now at the target rate.
        let due = (start.elapsed().as_secs_f64() * a.rate as f64) as u64;
        while sent < due {
            let t = now_us();
            let to = a.user_base + 2 * next_pair as u64 + 1;
            let text = if a.typing {
                format!(r#"{{"type":"typing","conv":"p:{}:{to}"}}"#, to - 1)
            } else {
                format!(
                    r#"{{"type":"send","cid":"{t:020}","to":"{to}","content":"{t:020}{padding}"}}"#
                )
            };
            if writers[next_pair]
                .write_all(&ws::frame(opcode::TEXT, text.as_bytes()))
                .await
                .is_err()
            {
                errors.set(errors.get() + 1);
            }
            sent += 1;
            next_pair = (next_pair + 1) % writers.len();
        }
    }
    let window = measured_from.elapsed().as_secs_f64();
    let cpu_secs = (!pids.is_empty()).then(|| (cpu_sum(&pids) - cpu0).as_secs_f64());
    let cpu = cpu_secs.map(|s| s / window * 100.0);
    let frames = sent.saturating_sub(sent_before).max(1);
    let cpu_per_frame = cpu_secs.map(|s| s * 1e6 / frames as f64);
    measuring.set(false);
    let after = scrape_at(a.metrics.clone());
    let observed = match before {
        Some(before) => scrape::between(
            &before.await.unwrap_or_default(),
            &after.await.unwrap_or_default(),
        ),
        None => Vec::new(),
    };
    tokio::time::sleep(Duration::from_secs(1)).await; // stragglers (not counted)
    drop(receiver_writers);
    let delivery = delivery.borrow();
    let ack = ack.borrow();
    P2pResult {
        pairs: a.pairs,
        pairs_across_shards: across,
        rate_target: a.rate,
        secs: a.secs,
        sent,
        acked: acked.get(),
        delivered: delivered.get(),
        errors: errors.get(),
        delivered_per_s: delivered.get() as f64 / window,
        delivery_latency: Latency::of(&delivery),
        ack_latency: Latency::of(&ack),
        gateway_cpu_percent: cpu,
        gateway_cpu_us_per_frame: cpu_per_frame,
        typing: a.typing,
        harness_cpu_secs: proc::own_cpu_time().as_secs_f64(),
        observed,
    }
}

pub fn print(r: &P2pResult) {
    println!(
        "\np2p: {} pairs ({} across shards), target {} msg/s for {} s",
        r.pairs, r.pairs_across_shards, r.rate_target, r.secs
    );
    println!(
        "  sent {}  acked {}  delivered {}  errors {}",
        r.sent, r.acked, r.delivered, r.errors
    );
    println!("  delivered/s        {:.0}", r.delivered_per_s);
    let l = &r.delivery_latency;
    println!(
        "  delivery latency   p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
    );
    let l = &r.ack_latency;
    println!(
        "  ack latency        p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
    );
    if let Some(c) = r.gateway_cpu_percent {
        println!("  gateway CPU        {c:.0} % of one core");
    }
    if let Some(c) = r.gateway_cpu_us_per_frame {
        let what = if r.typing { "typing frame" } else { "send" };
        println!("  gateway CPU        {c:.1} us per {what}");
    }
    println!("  harness CPU        {:.1} s", r.harness_cpu_secs);
    scrape::print(&r.observed);
}

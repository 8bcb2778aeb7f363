//! The broker's own share of the distributed path: the three hops a message takes, through the
//! same client code and settings (`im_bus::KafkaBus`) with nothing of ours between them.
//!
//! 1. `probe.up`: produced (linger 1 ms, as the gateway bridge) and consumed in a group (as
//!    logic consumes `im.upstream`);
//! 2. `probe.msg`: produced with acks=all and idempotence, waiting for the acknowledgement (as
//!    logic logs to `im.messages`);
//! 3. `probe.down`: produced (linger 1 ms) and consumed in a group (as a gateway's bridge
//!    consumes `im.downstream.<id>`).
//!
//! Each record carries the time it entered each hop, so each hop's latency and the 3-hop
//! total come from one run. Run at the pipeline's rate for the latency figures, and at a rate
//! the broker cannot keep up with for its 3-hop maximum (`completed_per_s`).

use hdrhistogram::Histogram;
use im_bus::{Bus, KafkaBus, KafkaConfig};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BrokerProbeArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Records per second offered.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured seconds (after `--warmup-secs` of the same load, not counted).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    #[arg(long, default_value_t = 5)]
    pub warmup_secs: u64,
    /// Every record carries a `traceparent` header along the three hops, as a traced
    /// message's records do (what headers cost the broker).
    #[arg(long)]
    pub traceparent: bool,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize, Default)]
pub struct BrokerProbeResult {
    offered_per_s: f64,
    /// Records sent in the window that made all three hops (the latency sample).
    completed: u64,
    /// Records arriving after three hops per second during the window, whenever sent: at
    /// an offered rate above what the broker takes, its 3-hop maximum.
    completed_per_s: f64,
    /// p50 / p99 / max in microseconds.
    up_us: [u64; 3],
    msg_ack_us: [u64; 3],
    down_us: [u64; 3],
    three_hops_us: [u64; 3],
}

const PARTITIONS: i32 = 4;
const LINGER_MS: u32 = 1;
/// Records relayed at once (the logic stage's bound on records in flight).
const IN_FLIGHT_MAX: usize = 20_000;
/// How long the first record may take through the three hops (group joins).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the window the consumers keep reading what is still on its way.
const DRAIN: Duration = Duration::from_secs(10);

fn now_us(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

fn stamp(payload: &mut Vec<u8>, t: u64) {
    payload.extend_from_slice(&t.to_le_bytes());
}

fn stamps(p: &[u8]) -> Vec<u64> {
    p.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

struct Hists {
    up: Histogram<u64>,
    ack: Histogram<u64>,
    down: Histogram<u64>,
    total: Histogram<u64>,
}

fn pct(h: &Histogram<u64>) -> [u64; 3] {
    [h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()]
}

/// How long a consumer may wait for its next record: until `give_up` while the window is not
/// open yet, then until `DRAIN` after it closes.
fn read_wait(window: &Mutex<(u64, u64)>, give_up: u64, epoch: Instant) -> Duration {
    let (_, end) = *window.lock().expect("window");
    let until = if end == u64::MAX {
        give_up
    } else {
        end + DRAIN.as_micros() as u64
    };
    Duration::from_micros(until.saturating_sub(now_us(epoch)))
}

pub fn run(a: BrokerProbeArgs) -> BrokerProbeResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(probe(a))
}

async fn probe(a: BrokerProbeArgs) -> BrokerProbeResult {
    let run = im_shared::unix_ms();
    let (up, msg, down) = (
        format!("probe.up.{run}"),
        format!("probe.msg.{run}"),
        format!("probe.down.{run}"),
    );
    let bus = Arc::new(KafkaBus::new(KafkaConfig {
        brokers: a.kafka_brokers.clone(),
        partitions: PARTITIONS,
        ..Default::default()
    }));
    bus.ensure_topics(&[
        (up.as_str(), PARTITIONS),
        (msg.as_str(), PARTITIONS),
        (down.as_str(), PARTITIONS),
    ])
    .await
    .expect("topics");
    let epoch = Instant::now();
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let hists = Arc::new(Mutex::new(Hists {
        up: new_hist(),
        ack: new_hist(),
        down: new_hist(),
        total: new_hist(),
    }));
    // The window opens once a record has made all three hops (both groups have their
    // partitions; a join takes seconds on some brokers), plus `warmup_secs`.
    let window = Arc::new(Mutex::new((u64::MAX, u64::MAX)));
    let ready = Arc::new(tokio::sync::Notify::new());
    let give_up = now_us(epoch) + READY_TIMEOUT.as_micros() as u64;

    // Hop 3's consumer: records the four stamps.
    let mut down_in = bus
        .group_consumer(&format!("probe-gw-{run}"), &down)
        .expect("consumer");
    let done = Arc::new(Mutex::new(0u64));
    let arrived = Arc::new(Mutex::new(0u64));
    let (h, d, w, r, arr) = (
        hists.clone(),
        done.clone(),
        window.clone(),
        ready.clone(),
        arrived.clone(),
    );
    let receiver = tokio::spawn(async move {
        let mut first = true;
        loop {
            let wait = read_wait(&w, give_up, epoch);
            let Ok(Ok(m)) = tokio::time::timeout(wait, down_in.recv()).await else {
                break;
            };
            if first {
                first = false;
                r.notify_one();
            }
            let t3 = now_us(epoch);
            let s = stamps(&m.payload);
            let (from, end) = *w.lock().expect("window");
            // Throughput: what arrives during the window, whenever it was sent.
            if (from..end).contains(&t3) && s.len() == 3 {
                *arr.lock().expect("count") += 1;
            }
            if s.len() != 3 || s[0] < from || s[0] >= end {
                continue;
            }
            let mut h = h.lock().expect("histograms");
            let _ = h.up.record((s[1] - s[0]).max(1));
            let _ = h.ack.record((s[2] - s[1]).max(1));
            let _ = h.down.record(t3.saturating_sub(s[2]).max(1));
            let _ = h.total.record(t3.saturating_sub(s[0]).max(1));
            *d.lock().expect("count") += 1;
        }
    });

    // Hops 1 → 2 → 3, as logic: consume, log and wait for the ack, then produce downstream.
    let mut up_in = bus
        .group_consumer(&format!("probe-logic-{run}"), &up)
        .expect("consumer");
    let log = bus.producer(LINGER_MS, 0).expect("producer");
    let down_out = bus.producer(LINGER_MS, 10_000).expect("producer");
    let w = window.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    let relay = tokio::spawn(async move {
        loop {
            let wait = read_wait(&w, give_up, epoch);
            let Ok(Ok(m)) = tokio::time::timeout(wait, up_in.recv()).await else {
                break;
            };
            let mut p = m.payload;
            stamp(&mut p, now_us(epoch));
            let (log, down_out, down) = (log.clone(), down_out.clone(), down.clone());
            let msg = msg.clone();
            // In flight together, as the pipelined stage keeps its batches, and as bounded.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            tokio::spawn(async move {
                let _slot = slot;
                let key = m.partition.to_string();
                let (tx, rx) = tokio::sync::oneshot::channel();
                let done: im_bus::Done = Box::new(move |r: Result<(), im_bus::Undelivered<'_>>| {
                    let _ = tx.send(r.is_ok());
                });
                let trace = m.trace.as_ref();
                let queued = log.send_traced(&msg, None, &key, &p, trace, Some(done));
                if queued.is_ok() && rx.await == Ok(true) {
                    stamp(&mut p, now_us(epoch));
                    let _ = down_out.send_traced(&down, None, &key, &p, trace, None);
                }
            });
        }
    });

    // Hop 1's producer: a record every 100 ms until one has come through, then on schedule.
    let up_out = bus.producer(LINGER_MS, 10_000).expect("producer");
    let through = ready.notified();
    tokio::pin!(through);
    loop {
        let mut p = Vec::with_capacity(24);
        stamp(&mut p, now_us(epoch));
        let _ = up_out.send(&up, None, "ready", &p, None);
        tokio::select! {
            _ = &mut through => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(
            now_us(epoch) < give_up,
            "nothing came through the three hops in {READY_TIMEOUT:?}"
        );
    }
    let from = now_us(epoch) + a.warmup_secs * 1_000_000;
    let end = from + a.secs * 1_000_000;
    *window.lock().expect("window") = (from, end);
    let interval = Duration::from_secs_f64(1.0 / a.rate.max(0.001));
    let trace = a
        .traceparent
        .then(|| im_bus::TraceParent::sampled([0x11; 16], [0x22; 8]).expect("valid"));
    let mut next = tokio::time::Instant::now();
    let mut k = 0u64;
    while now_us(epoch) < end {
        let mut p = Vec::with_capacity(24);
        stamp(&mut p, now_us(epoch));
        let key = (k % 1024).to_string();
        let _ = up_out.send_traced(&up, None, &key, &p, trace.as_ref(), None);
        k += 1;
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    let _ = relay.await;
    let _ = receiver.await;
    let h = hists.lock().expect("histograms");
    let completed = *done.lock().expect("count");
    let arrived = *arrived.lock().expect("count");
    BrokerProbeResult {
        offered_per_s: a.rate,
        completed,
        completed_per_s: arrived as f64 / a.secs as f64,
        up_us: pct(&h.up),
        msg_ack_us: pct(&h.ack),
        down_us: pct(&h.down),
        three_hops_us: pct(&h.total),
    }
}

pub fn print(r: &BrokerProbeResult) {
    println!(
        "\nbroker-probe: {:.0} records/s offered, {} of the window's completed; {:.0}/s through",
        r.offered_per_s, r.completed, r.completed_per_s
    );
    for (name, v) in [
        ("produce → consume (upstream)", r.up_us),
        ("produce, acks=all (messages)", r.msg_ack_us),
        ("produce → consume (downstream)", r.down_us),
        ("3 hops", r.three_hops_us),
    ] {
        println!(
            "  {name:32} p50 {} us  p99 {} us  max {} us",
            v[0], v[1], v[2]
        );
    }
}

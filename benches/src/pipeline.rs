//! Benchmarks of the distributed pipeline (gateway → Kafka → logic → Kafka → gateway, and
//! persist): `seed-users` (accounts, and a group, for `p2p` and `fanout` against `im logic`),
//! `fanout` (one group message to every online member: delivery latency over all members),
//! and `persist-rate` (the broker's produce rate, persist's rows/s catching up on a backlog,
//! and single-row INSERTs, in one run).

use crate::proc;
use crate::ws;
use gateway_core::codec::opcode;
use hdrhistogram::Histogram;
use im_shared::records::{self, topics, Versioned};
use im_store::Store;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub struct SeedUsersArgs {
    /// First user id.
    #[arg(long, default_value_t = 10_000_000)]
    pub first: u64,
    #[arg(long)]
    pub count: u64,
    /// Also a group with this id, owned by the first user, with every seeded user a member.
    #[arg(long)]
    pub group: Option<u64>,
    /// Instead of printing SQL, create the users and one group of all of them in this SQLite
    /// database (standalone's `data/im.db`) through the store, and print their ids as JSON.
    /// Ids are the store's own (`--first` and `--group` do not apply); start from an empty
    /// data directory so that they are consecutive.
    #[arg(long)]
    pub sqlite: Option<std::path::PathBuf>,
}

/// What `seed-users --sqlite` created.
#[derive(Serialize)]
struct Seeded {
    first_user: u64,
    last_user: u64,
    group: u64,
}

/// Seeds standalone's database through the same store code the server runs.
fn seed_sqlite(path: &std::path::Path, count: u64) -> Result<Seeded, String> {
    if count < 2 {
        return Err("--count: a group needs at least 2 users".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let err = |e: im_store::StoreError| e.to_string();
        let store = im_store::SqliteStore::open(path).await.map_err(err)?;
        store.migrate().await.map_err(err)?;
        let now = im_shared::unix_ms();
        let tag = now % 1_000_000_000;
        let mut ids = Vec::with_capacity(count as usize);
        for i in 0..count {
            let name = format!("bench{tag}-{i}");
            ids.push(
                store
                    .create_user(&name, "!", &name, now)
                    .await
                    .map_err(err)?,
            );
        }
        if ids.windows(2).any(|w| w[1] != w[0] + 1) {
            return Err("user ids are not consecutive: seed an empty data directory".into());
        }
        let max = u32::try_from(count).map_err(|_| "--count: too many for one group")?;
        let group = store
            .create_group(ids[0], "bench", "", max, now)
            .await
            .map_err(err)?;
        for &u in &ids[1..] {
            store.add_member(group, u, now).await.map_err(err)?;
        }
        Ok(Seeded {
            first_user: ids[0],
            last_user: ids[ids.len() - 1],
            group,
        })
    })
}

/// Prints SQL for `mysql`: users (unusable password hash: tokens are minted with the secret)
/// and optionally one group of all of them.
pub fn seed_users(a: SeedUsersArgs) {
    if let Some(path) = &a.sqlite {
        match seed_sqlite(path, a.count) {
            Ok(s) => println!("{}", serde_json::to_string(&s).expect("serialise")),
            Err(e) => {
                eprintln!("im-bench seed-users: {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        return;
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let _ = writeln!(out, "SET autocommit=0;");
    let mut id = a.first;
    let end = a.first + a.count;
    while id < end {
        let last = (id + 1000).min(end);
        let rows: Vec<String> = (id..last)
            .map(|u| format!("({u},'bench{u}','!','bench{u}',0)"))
            .collect();
        let _ = writeln!(out, "INSERT IGNORE INTO users (id, username, password_hash, nickname, created_ms) VALUES {};", rows.join(","));
        id = last;
    }
    if let Some(g) = a.group {
        let _ = writeln!(out, "INSERT IGNORE INTO chat_groups (id, name, owner_id, max_members, created_ms) VALUES ({g}, 'bench{g}', {}, {}, 0);", a.first, a.count.max(1));
        let mut id = a.first;
        while id < end {
            let last = (id + 1000).min(end);
            let rows: Vec<String> = (id..last).map(|u| format!("({g},{u},0)")).collect();
            let _ = writeln!(
                out,
                "INSERT IGNORE INTO group_members (group_id, user_id, joined_ms) VALUES {};",
                rows.join(",")
            );
            id = last;
        }
    }
    let _ = writeln!(out, "COMMIT;");
}

#[derive(clap::Args)]
pub struct FanoutArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// The group (seed it with `seed-users --group`).
    #[arg(long)]
    pub group: u64,
    /// Members to connect: user ids first..first+members; the first one sends.
    #[arg(long, default_value_t = 10_000_000)]
    pub first: u64,
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..=50_000))]
    pub members: u64,
    /// Group messages to send, one every `interval_ms`.
    #[arg(long, default_value_t = 20)]
    pub messages: u64,
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Send this many messages per second instead (a throughput run), paced on a schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Members that take turns sending [default: enough to keep each under 50 messages/s,
    /// half the gateway's per-connection rate limit].
    #[arg(long)]
    pub senders: Option<u64>,
    /// The server is `im-bench baseline`: it re-broadcasts each `send` frame as it is to
    /// every other connection, so count those instead of `msg` frames.
    #[arg(long)]
    pub baseline: bool,
    /// Server processes' PIDs (gateways, standalone `im`, or the baseline), for their CPU.
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct FanoutResult {
    members_online: u64,
    messages: u64,
    deliveries: u64,
    deliveries_expected: u64,
    errors: u64,
    /// Send → a member's `msg`, over every (member, message).
    latency_p50_us: u64,
    latency_p99_us: u64,
    latency_max_us: u64,
    /// Send → the last member's `msg`, per message.
    all_members_p50_us: u64,
    all_members_p99_us: u64,
    /// Offered messages per second (`--rate`, or 1000 / `--interval-ms`).
    offered_msgs_per_s: f64,
    senders: u64,
    /// From the first send to the last delivery.
    window_secs: f64,
    deliveries_per_s: f64,
    /// Server CPU over the window (utime + stime of every `--gateway-pid`).
    gateway_cpu_secs: Option<f64>,
    /// Server CPU ÷ window: how many cores it used.
    gateway_cores: Option<f64>,
    /// Deliveries ÷ server CPU seconds: deliveries per second per core.
    deliveries_per_cpu_s: Option<f64>,
    harness_cpu_secs: f64,
}

pub fn fanout(a: FanoutArgs) -> FanoutResult {
    gateway_core::gateway::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run_fanout(a))
}

async fn run_fanout(a: FanoutArgs) -> FanoutResult {
    let epoch = Instant::now();
    let now_us = move || epoch.elapsed().as_micros() as u64;
    let lat = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
    ));
    // Per message (by send stamp): deliveries so far and the latest arrival.
    let per_msg: Rc<RefCell<std::collections::HashMap<u64, (u64, u64)>>> = Default::default();
    let (deliveries, errors) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
    let src_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1));
    // What a delivery looks like: the protocol's `msg`, or the baseline's echo of `send`.
    let want: &'static [u8] = if a.baseline {
        b"{\"type\":\"send\""
    } else {
        b"{\"type\":\"msg\""
    };
    let last_delivery = Rc::new(Cell::new(0u64));
    let mut writers = Vec::with_capacity(a.members as usize);
    let t_connect = Instant::now();
    for i in 0..a.members {
        let user = a.first + i;
        let src = SocketAddr::new(src_ip, 10_000 + i as u16);
        let mut s = ws::tcp_connect(src, a.addr).await.expect("connect");
        let token = im_shared::jwt::sign(
            a.secret.as_bytes(),
            &im_shared::jwt::Claims::new(user, im_shared::unix_ms() / 1000, 3600),
        );
        ws::upgrade(&mut s, a.addr, &token).await.expect("upgrade");
        let (mut rd, wr) = s.into_split();
        writers.push(wr);
        let (lat, per_msg, deliveries, errors, last_delivery) = (
            lat.clone(),
            per_msg.clone(),
            deliveries.clone(),
            errors.clone(),
            last_delivery.clone(),
        );
        tokio::task::spawn_local(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 8192];
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
                    if payload.starts_with(b"{\"type\":\"error\"") {
                        errors.set(errors.get() + 1);
                        return;
                    }
                    if !payload.starts_with(want) {
                        return;
                    }
                    let key = b"\"content\":\"";
                    let Some(at) = payload.windows(key.len()).position(|w| w == key) else {
                        return;
                    };
                    let Some(t) = std::str::from_utf8(&payload[at + key.len()..])
                        .ok()
                        .and_then(|s| s.get(..20))
                        .and_then(|s| s.parse::<u64>().ok())
                    else {
                        return;
                    };
                    deliveries.set(deliveries.get() + 1);
                    last_delivery.set(now);
                    let _ = lat.borrow_mut().record(now.saturating_sub(t).max(1));
                    let mut m = per_msg.borrow_mut();
                    let e = m.entry(t).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = e.1.max(now);
                });
            }
        });
    }
    eprintln!(
        "fanout: {} members connected in {:.1} s",
        a.members,
        t_connect.elapsed().as_secs_f64()
    );
    // Presence is written by the gateway's bridge in batches; give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| proc::cpu_time(p))
            .sum::<Duration>()
    };
    let cpu0 = cpu(&a.gateway_pids);
    // 100-byte contents: a 20-digit send stamp (for latency) and padding.
    let padding = "x".repeat(80);
    let rate = a
        .rate
        .unwrap_or(1000.0 / a.interval_ms.max(1) as f64)
        .max(0.001);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let senders = a
        .senders
        .unwrap_or((rate / 50.0).ceil() as u64)
        .clamp(1, a.members);
    let mut stamps = Vec::new();
    let first_send = now_us();
    let mut next = tokio::time::Instant::now();
    for k in 0..a.messages {
        let t = now_us();
        stamps.push(t);
        let text = format!(
            r#"{{"type":"send","cid":"f{k}-{t}","group":"{}","content":"{t:020}{padding}"}}"#,
            a.group
        );
        writers[(k % senders) as usize]
            .write_all(&ws::frame(opcode::TEXT, text.as_bytes()))
            .await
            .expect("send");
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    // Wait (bounded) for the stragglers.
    let expected = a.messages * (a.members - 1);
    let end = Instant::now() + Duration::from_secs(30);
    while deliveries.get() < expected && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gateway_cpu =
        (!a.gateway_pids.is_empty()).then(|| (cpu(&a.gateway_pids) - cpu0).as_secs_f64());
    let window_secs = (last_delivery.get().saturating_sub(first_send) as f64 / 1e6).max(1e-6);
    let mut all = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
    for t in &stamps {
        if let Some((n, last)) = per_msg.borrow().get(t) {
            if *n == a.members - 1 {
                let _ = all.record(last.saturating_sub(*t).max(1));
            }
        }
    }
    let lat = lat.borrow();
    drop(writers);
    FanoutResult {
        members_online: a.members,
        messages: a.messages,
        deliveries: deliveries.get(),
        deliveries_expected: expected,
        errors: errors.get(),
        latency_p50_us: lat.value_at_quantile(0.5),
        latency_p99_us: lat.value_at_quantile(0.99),
        latency_max_us: lat.max(),
        all_members_p50_us: all.value_at_quantile(0.5),
        all_members_p99_us: all.value_at_quantile(0.99),
        offered_msgs_per_s: rate,
        senders,
        window_secs,
        deliveries_per_s: deliveries.get() as f64 / window_secs,
        gateway_cpu_secs: gateway_cpu,
        gateway_cores: gateway_cpu.map(|c| c / window_secs),
        deliveries_per_cpu_s: gateway_cpu.map(|c| deliveries.get() as f64 / c.max(1e-9)),
        harness_cpu_secs: proc::own_cpu_time().as_secs_f64(),
    }
}

pub fn print_fanout(r: &FanoutResult) {
    println!(
        "\nfanout: {} members online, {} group messages",
        r.members_online, r.messages
    );
    println!(
        "  deliveries {} of {}  errors {}",
        r.deliveries, r.deliveries_expected, r.errors
    );
    println!(
        "  send → member     p50 {} us  p99 {} us  max {} us",
        r.latency_p50_us, r.latency_p99_us, r.latency_max_us
    );
    println!(
        "  send → all members  p50 {} us  p99 {} us",
        r.all_members_p50_us, r.all_members_p99_us
    );
    println!(
        "  offered {:.0} msgs/s from {} senders; {:.0} deliveries/s over {:.2} s",
        r.offered_msgs_per_s, r.senders, r.deliveries_per_s, r.window_secs
    );
    if let (Some(c), Some(cores), Some(per)) =
        (r.gateway_cpu_secs, r.gateway_cores, r.deliveries_per_cpu_s)
    {
        println!(
            "  server CPU         {c:.2} s ({cores:.2} cores): {per:.0} deliveries per CPU-second"
        );
    }
    println!("  harness CPU        {:.1} s", r.harness_cpu_secs);
}

#[derive(clap::Args)]
pub struct PersistRateArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/im_bench")]
    pub mysql_url: String,
    /// Records to produce to im.messages, then to be written by persist.
    #[arg(long, default_value_t = 50_000)]
    pub rows: u64,
    /// Rows written one INSERT (one transaction) at a time, for the baseline.
    #[arg(long, default_value_t = 2_000)]
    pub single_rows: u64,
    /// Path to `im`: persist is started after the backlog is produced (so its rate is its own).
    #[arg(long)]
    pub spawn_persist: String,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct PersistRateResult {
    rows: u64,
    produce_per_s: f64,
    persist_rows_per_s: f64,
    persist_secs: f64,
    single_insert_rows: u64,
    single_insert_rows_per_s: f64,
    ratio: f64,
}

const CONVS: u64 = 100;

pub fn persist_rate(a: PersistRateArgs) -> PersistRateResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run_persist_rate(a))
}

fn stored(run: u64, i: u64, conv_base: u64, content: &str) -> records::Stored {
    let c = i % CONVS;
    records::Stored {
        version: records::VERSION,
        id: run * 10_000_000 + i,
        conv: format!("g:{}", conv_base + c),
        seq: i / CONVS + 1,
        from: 1,
        to_user: 0,
        to_group: conv_base + c,
        content: content.to_string(),
        content_type: "text".into(),
        ts: im_shared::unix_ms(),
        cid: format!("r{run}-{i}"),
    }
}

async fn run_persist_rate(a: PersistRateArgs) -> PersistRateResult {
    let store: Arc<dyn Store> = Arc::new(
        im_store::MySqlStore::connect_or_create(&a.mysql_url)
            .await
            .expect("mysql"),
    );
    store.migrate().await.expect("migrate");
    let run = im_shared::unix_ms() % 100_000 + 1;
    let conv_base = run * 1000;
    let content = "x".repeat(100);
    let kafka = im_bus::KafkaConfig {
        brokers: a.kafka_brokers.clone(),
        ..Default::default()
    };
    kafka
        .ensure_topics(&[(topics::MESSAGES, kafka.partitions)])
        .await
        .expect("topics");
    let producer: FutureProducer = kafka.producer(5, 0).create().expect("producer");
    // 1. The backlog, produced as logic does (acks=all, idempotent): the broker's own rate.
    let t = Instant::now();
    let mut futs = Vec::with_capacity(a.rows as usize);
    for i in 0..a.rows {
        let rec = stored(run, i, conv_base, &content);
        let payload = rec.to_bytes();
        loop {
            match producer.send_result(
                FutureRecord::to(topics::MESSAGES)
                    .key(&rec.conv)
                    .payload(&payload),
            ) {
                Ok(f) => {
                    futs.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for f in futs {
        f.await.expect("delivery").expect("produced");
    }
    let produce_per_s = a.rows as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "persist-rate: produced {} records at {produce_per_s:.0}/s",
        a.rows
    );
    // 2. Persist catches up on it.
    let convs: Vec<String> = (0..CONVS).map(|c| format!("g:{}", conv_base + c)).collect();
    let want: u64 = a.rows;
    let t = Instant::now();
    let mut child = std::process::Command::new(&a.spawn_persist)
        .args([
            "persist",
            "--mysql-url",
            &a.mysql_url,
            "--kafka-brokers",
            &a.kafka_brokers,
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn persist");
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let seqs = store.max_seqs(&convs).await.expect("max_seqs");
        let done: u64 = seqs.iter().map(|(_, s)| *s).sum();
        if done >= want || Instant::now() > end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let persist_secs = t.elapsed().as_secs_f64();
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    // 3. The baseline: one INSERT (and transaction) per row, same table, same rows.
    let t = Instant::now();
    for i in 0..a.single_rows {
        let rec = stored(run + 500_000, i, conv_base + 500, &content);
        store
            .insert_messages(std::slice::from_ref(&rec))
            .await
            .expect("insert");
    }
    let single = a.single_rows as f64 / t.elapsed().as_secs_f64();
    let persist_rows_per_s = want as f64 / persist_secs;
    PersistRateResult {
        rows: a.rows,
        produce_per_s,
        persist_rows_per_s,
        persist_secs,
        single_insert_rows: a.single_rows,
        single_insert_rows_per_s: single,
        ratio: persist_rows_per_s / single,
    }
}

pub fn print_persist(r: &PersistRateResult) {
    println!("\npersist-rate: {} rows", r.rows);
    println!(
        "  broker produce (acks=all, idempotent)  {:.0} records/s",
        r.produce_per_s
    );
    println!(
        "  persist catching up (incl. start)      {:.0} rows/s ({:.1} s)",
        r.persist_rows_per_s, r.persist_secs
    );
    println!(
        "  single-row INSERTs                     {:.0} rows/s ({} rows)",
        r.single_insert_rows_per_s, r.single_insert_rows
    );
    println!("  ratio                                  {:.1}x", r.ratio);
}

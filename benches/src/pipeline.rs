//! Benchmarks of the distributed pipeline (gateway → Kafka → logic → Kafka → gateway, and
//! persist): `seed-users` (accounts, and a group, for `p2p` and `fanout` against `im logic`)
//! and `persist-rate` (the broker's produce rate, persist's rows/s catching up on a backlog,
//! and single-row INSERTs, in one run).

use im_shared::records::{self, topics, Versioned};
use im_store::Store;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
            .create_group(&im_store::NewGroup {
                owner: ids[0],
                name: "bench",
                description: "",
                max_members: max,
                public: false,
                history_all: false,
                now_ms: now,
            })
            .await
            .map_err(err)?;
        for &u in &ids[1..] {
            store
                .add_member(group, u, now, im_store::JoinBy::Owner)
                .await
                .map_err(err)?;
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
        ..Default::default()
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
            .insert_messages(std::slice::from_ref(&rec), &[])
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

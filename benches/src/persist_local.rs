//! persist on its own: no broker. A backlog of `im.messages` records is put on the in-process
//! bus, then `persist::Persist` (the real batcher and writer) drains it into the database,
//! MariaDB or SQLite. Beside it, in the same run and on the same database: the same rows as
//! single-row INSERTs (one transaction each, what a naive writer does), and the floor — a bare
//! multi-row INSERT of the same rows, in batches of the same size, into a table with only a
//! primary key (no secondary indexes, no conversation bookkeeping).

use im_bus::{Bus, MemoryBus};
use im_shared::records::{self, topics, Versioned};
use im_store::Store;
use serde::Serialize;
use sqlx::QueryBuilder;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct PersistLocalArgs {
    /// `mysql://...` or `sqlite:PATH` (a file; created).
    #[arg(long)]
    pub db: String,
    #[arg(long, default_value_t = 50_000)]
    pub rows: u64,
    /// Rows written one INSERT (one transaction) at a time.
    #[arg(long, default_value_t = 2_000)]
    pub single_rows: u64,
    /// persist's batch size (its default is 500).
    #[arg(long, default_value_t = 500)]
    pub batch_rows: usize,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct PersistLocalResult {
    backend: String,
    rows: u64,
    batch_rows: usize,
    persist_rows_per_s: f64,
    single_insert_rows_per_s: f64,
    floor_rows_per_s: f64,
    /// persist ÷ floor, and persist ÷ single-row INSERTs.
    of_floor: f64,
    of_single: f64,
}

const CONVS: u64 = 100;
const PARTITIONS: i32 = 4;

pub fn run(a: PersistLocalArgs) -> PersistLocalResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(measure(a))
}

fn row(run: u64, i: u64, content: &str) -> records::Stored {
    let g = run * 1000 + i % CONVS;
    records::Stored {
        version: records::VERSION,
        id: run * 100_000_000 + i + 1,
        conv: format!("g:{g}"),
        seq: i / CONVS + 1,
        from: 1,
        to_group: g,
        content: content.to_string(),
        content_type: "text".into(),
        ts: im_shared::unix_ms(),
        cid: format!("l{run}-{i}"),
        ..Default::default()
    }
}

enum Db {
    MySql(im_store::MySqlStore),
    Sqlite(im_store::SqliteStore),
}

async fn measure(a: PersistLocalArgs) -> PersistLocalResult {
    let db = match a.db.strip_prefix("sqlite:") {
        Some(path) => Db::Sqlite(
            im_store::SqliteStore::open(std::path::Path::new(path))
                .await
                .expect("sqlite"),
        ),
        None => Db::MySql(
            im_store::MySqlStore::connect_or_create(&a.db)
                .await
                .expect("mysql"),
        ),
    };
    let (store, backend): (Arc<dyn Store>, &str) = match &db {
        Db::MySql(s) => (
            Arc::new(im_store::MySqlStore::new(s.pool().clone())),
            "mysql",
        ),
        Db::Sqlite(s) => (
            Arc::new(im_store::SqliteStore::new(s.pool().clone())),
            "sqlite",
        ),
    };
    store.migrate().await.expect("migrate");
    let run = im_shared::unix_ms() % 100_000 + 1;
    let content = "x".repeat(100);
    let rows: Vec<records::Stored> = (0..a.rows).map(|i| row(run, i, &content)).collect();

    // 1. persist draining a backlog on the in-process bus.
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(PARTITIONS, 1 << 30));
    bus.ensure_topics(&[(topics::MESSAGES, PARTITIONS)])
        .await
        .expect("topic");
    let producer = bus.producer(0, 0).expect("producer");
    for r in &rows {
        producer
            .send(topics::MESSAGES, None, &r.conv, &r.to_bytes(), None)
            .expect("backlog");
    }
    let cfg = persist::PersistConfig {
        batch_rows: a.batch_rows.max(1),
        ..Default::default()
    };
    let persist = persist::Persist::new(bus, store.clone(), cfg);
    let stats = persist.stats();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let task = tokio::spawn(persist.run(rx));
    while stats.rows_total.load(Ordering::Relaxed) < a.rows {
        assert!(t.elapsed() < Duration::from_secs(600), "persist stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let persist_rows_per_s = a.rows as f64 / t.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = task.await;

    // 2. Single-row INSERTs through the same store (one transaction each).
    let single: Vec<records::Stored> = (0..a.single_rows)
        .map(|i| row(run + 200_000, i, &content))
        .collect();
    let t = Instant::now();
    for r in &single {
        store
            .insert_messages(std::slice::from_ref(r), &[])
            .await
            .expect("insert");
    }
    let single_insert_rows_per_s = a.single_rows as f64 / t.elapsed().as_secs_f64();

    // 3. The floor: the same rows, multi-row INSERTs of `batch_rows`, one transaction each,
    //    into a table with a primary key and nothing else.
    let floor_rows: Vec<records::Stored> = (0..a.rows)
        .map(|i| row(run + 400_000, i, &content))
        .collect();
    let floor_rows_per_s = match &db {
        Db::MySql(s) => floor_mysql(s.pool(), &floor_rows, a.batch_rows).await,
        Db::Sqlite(s) => floor_sqlite(s.pool(), &floor_rows, a.batch_rows).await,
    };
    PersistLocalResult {
        backend: backend.into(),
        rows: a.rows,
        batch_rows: a.batch_rows,
        persist_rows_per_s,
        single_insert_rows_per_s,
        floor_rows_per_s,
        of_floor: persist_rows_per_s / floor_rows_per_s,
        of_single: persist_rows_per_s / single_insert_rows_per_s,
    }
}

macro_rules! floor {
    ($name:ident, $db:ty) => {
/// Rows per second of bare multi-row INSERTs into `bench_floor_messages`.
async fn $name(pool: &sqlx::Pool<$db>, rows: &[records::Stored], batch: usize) -> f64 {
    let mut conn = pool.acquire().await.expect("connection");
    sqlx::query("DROP TABLE IF EXISTS bench_floor_messages")
        .execute(&mut *conn)
        .await
        .expect("drop");
    sqlx::query(
        "CREATE TABLE bench_floor_messages (id BIGINT PRIMARY KEY, conv VARCHAR(48), \
         seq BIGINT, sender_id BIGINT, cid VARCHAR(64), to_user_id BIGINT, to_group_id BIGINT, \
         content TEXT, content_type VARCHAR(32), ts_ms BIGINT)",
    )
    .execute(&mut *conn)
    .await
    .expect("create");
    let t = Instant::now();
    for chunk in rows.chunks(batch.max(1)) {
        sqlx::query("BEGIN")
            .execute(&mut *conn)
            .await
            .expect("begin");
        let mut q = QueryBuilder::<$db>::new(
            "INSERT INTO bench_floor_messages (id, conv, seq, sender_id, cid, to_user_id, \
             to_group_id, content, content_type, ts_ms) ",
        );
        q.push_values(chunk, |mut b, m| {
            b.push_bind(m.id as i64)
                .push_bind(m.conv.as_str())
                .push_bind(m.seq as i64)
                .push_bind(m.from as i64)
                .push_bind(m.cid.as_str())
                .push_bind(m.to_user as i64)
                .push_bind(m.to_group as i64)
                .push_bind(m.content.as_str())
                .push_bind(m.content_type.as_str())
                .push_bind(m.ts as i64);
        });
        q.build().execute(&mut *conn).await.expect("insert");
        sqlx::query("COMMIT")
            .execute(&mut *conn)
            .await
            .expect("commit");
    }
    let per_s = rows.len() as f64 / t.elapsed().as_secs_f64();
    let _ = sqlx::query("DROP TABLE bench_floor_messages")
        .execute(&mut *conn)
        .await;
    per_s
}

    };
}
floor!(floor_mysql, sqlx::MySql);
floor!(floor_sqlite, sqlx::Sqlite);

pub fn print(r: &PersistLocalResult) {
    println!(
        "\npersist-local: {} rows into {}, batches of {}",
        r.rows, r.backend, r.batch_rows
    );
    println!(
        "  persist (in-process bus → Store)   {:.0} rows/s",
        r.persist_rows_per_s
    );
    println!(
        "  single-row INSERTs                 {:.0} rows/s  (persist {:.1}x)",
        r.single_insert_rows_per_s, r.of_single
    );
    println!(
        "  floor: bare multi-row INSERT, PK only  {:.0} rows/s  (persist {:.2}x of it)",
        r.floor_rows_per_s, r.of_floor
    );
}

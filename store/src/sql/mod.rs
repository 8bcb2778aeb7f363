//! The `Store` implementations for MySQL and SQLite, generated from one body of SQL by
//! `impl_store!`. The SQL sticks to what both dialects accept (`?` placeholders, plain
//! INSERT/SELECT/UPDATE); the schema lives in `migrations/<dialect>/`.

use crate::{
    ConversationRow, GroupChange, GroupRow, InviteRow, Join, JoinBy, MemberRow, MessageRow,
    NewGroup, NewInvite, NewMessage, NewRefresh, PushSubscription, Result, Roster, Store,
    StoreError, Taken, UserRow, View, JOIN_CLOCK_SKEW_MS,
};
use async_trait::async_trait;
use im_shared::records::Stored;
use sqlx::pool::PoolConnection;
use sqlx::{MySql, Pool, QueryBuilder, Row, Sqlite};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod blocks;
mod body;
mod groups;
mod presence;
mod push;
use blocks::impl_blocks;
use body::impl_store;
use groups::impl_groups;
use presence::impl_presence;
use push::impl_push;

/// A sqlx pool of either database.
pub struct SqlStore<DB: sqlx::Database> {
    pool: Pool<DB>,
    /// SQLite's background checkpointer, stopped with the store.
    checkpointer: Option<tokio::task::AbortHandle>,
    /// Set by SQLite's checkpointer when the log should start over: the message writer then
    /// checkpoints on its own connection right after its next commit (`checkpoints`).
    log_restart: Arc<AtomicBool>,
    /// SQLite: the connection messages are written and looked up on, held between calls
    /// (`hot`). A connection's page cache is dropped whenever another connection has
    /// committed since its last read, so retry lookups on pool connections read every index
    /// page again after each of the writer's commits, and the pages the log holds are copies
    /// (pread), not the shared mapping: ≈ 15 µs per message at 10k messages/s. On the
    /// writer's own connection they find the pages it just wrote.
    hot: tokio::sync::Mutex<Option<PoolConnection<DB>>>,
}

/// A connection for `insert_messages` and `find_by_cids`: the held one, or (MySQL, whose
/// server caches pages for every connection) one from the pool for this call.
enum Hot<'a, DB: sqlx::Database> {
    Held(tokio::sync::MutexGuard<'a, Option<PoolConnection<DB>>>),
    Pooled(PoolConnection<DB>),
}

impl<DB: sqlx::Database> Hot<'_, DB> {
    fn conn(&mut self) -> &mut DB::Connection {
        match self {
            Hot::Held(slot) => slot.as_mut().expect("`hot` fills the slot"),
            Hot::Pooled(c) => c,
        }
    }

    /// Ends a call: a held connection whose call failed goes back to the pool (it may be
    /// broken or mid-transaction) and the next call takes another.
    fn release<T>(self, r: Result<T>) -> Result<T> {
        if let (Hot::Held(mut slot), true) = (self, r.is_err()) {
            *slot = None;
        }
        r
    }
}

impl<DB: sqlx::Database> Drop for SqlStore<DB> {
    fn drop(&mut self) {
        if let Some(task) = &self.checkpointer {
            task.abort();
        }
    }
}

pub type MySqlStore = SqlStore<MySql>;
pub type SqliteStore = SqlStore<Sqlite>;

impl<DB: sqlx::Database> SqlStore<DB> {
    pub fn new(pool: Pool<DB>) -> SqlStore<DB> {
        SqlStore {
            pool,
            checkpointer: None,
            log_restart: Arc::default(),
            hot: Default::default(),
        }
    }

    /// The connection for messages: held across calls if `hold` (see `SqlStore::hot`).
    async fn hot(&self, hold: bool) -> Result<Hot<'_, DB>> {
        if !hold {
            return Ok(Hot::Pooled(self.pool.acquire().await?));
        }
        let mut slot = self.hot.lock().await;
        if slot.is_none() {
            *slot = Some(self.pool.acquire().await?);
        }
        Ok(Hot::Held(slot))
    }

    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}

impl MySqlStore {
    /// Connects to `mysql://user:pass@host:port/db`.
    pub async fn connect(url: &str) -> Result<MySqlStore> {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(SqlStore::new(pool))
    }
}

impl MySqlStore {
    /// Like `connect`, creating the database first when the server does not have it yet.
    pub async fn connect_or_create(url: &str) -> Result<MySqlStore> {
        match MySqlStore::connect(url).await {
            Err(StoreError::Unavailable(e)) if e.contains("Unknown database") => {
                let (server, db) = url
                    .rsplit_once('/')
                    .ok_or_else(|| StoreError::Unavailable(format!("no database in {url}")))?;
                let db = db.split('?').next().unwrap_or(db);
                if db.is_empty() || !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(StoreError::Unavailable(format!(
                        "database name `{db}`: letters, digits and '_' only"
                    )));
                }
                let admin = MySqlStore::connect(server).await?;
                sqlx::query(&format!(
                    "CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4"
                ))
                .execute(admin.pool())
                .await?;
                admin.pool().close().await;
                log::info!("created database {db}");
                MySqlStore::connect(url).await
            }
            other => other,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode.
    pub async fn open(path: &std::path::Path) -> Result<SqliteStore> {
        SqliteStore::open_with(path, WalLimits::default()).await
    }

    /// `open` with the log's bounds given (tests make them small).
    pub async fn open_with(path: &std::path::Path, wal: WalLimits) -> Result<SqliteStore> {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .page_size(SQLITE_PAGE_BYTES)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            // Pages are read through a shared mapping rather than copied into each
            // connection's cache by pread: after every commit the other connections' caches
            // are stale, and at thousands of commits a second the copies were ~10 % of CPU.
            .pragma("mmap_size", SQLITE_MMAP_BYTES.to_string())
            .pragma("cache_size", format!("-{}", SQLITE_CACHE_KIB))
            // No checkpoint inside a commit (it copied the log back and synced the database
            // in the writer's path, a stall of tens of ms every thousand pages): a task
            // checkpoints beside the writers instead (`checkpoints`).
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", wal.journal_limit_bytes.to_string())
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let log_restart = Arc::new(AtomicBool::new(false));
        let checkpointer = tokio::spawn(checkpoints(pool.clone(), log_restart.clone(), wal));
        Ok(SqlStore {
            pool,
            checkpointer: Some(checkpointer.abort_handle()),
            log_restart,
            hot: Default::default(),
        })
    }
}

/// The page size of databases created from now on (an existing file keeps its own). Every
/// commit writes each page it touched to the log whole, and a batch of messages touches a
/// leaf of each index per conversation and per sender: at 4 KiB a page that was ≈ 11 KiB of
/// log per message at 10k messages/s.
const SQLITE_PAGE_BYTES: u32 = 1024;
/// The most of the database file SQLite maps (the rest is read with pread).
const SQLITE_MMAP_BYTES: u64 = 1 << 30;
/// Each connection's page cache.
const SQLITE_CACHE_KIB: u64 = 16 << 10;
/// How large SQLite's write-ahead log may grow (see `checkpoints`).
#[derive(Clone, Copy, Debug)]
pub struct WalLimits {
    /// Frames (pages) in the log past which it is started over. The default, 32,768 (32 MiB
    /// of 1 KiB pages): at 10k messages/s the log grows ~56 MB/s (each commit writes every
    /// page it touched), so less than twice a second; each time the message writer waits for
    /// one small checkpoint (two fsyncs).
    pub restart_frames: i64,
    /// The log file is cut back to this when it starts over. The default, 64 MiB, is about as
    /// large as it grows between restarts, so that the next round overwrites blocks already
    /// allocated instead of having the filesystem zero new ones (8 % of a profile's samples
    /// at 10k messages/s while the log grew).
    pub journal_limit_bytes: u64,
}

impl Default for WalLimits {
    fn default() -> WalLimits {
        WalLimits {
            restart_frames: 32_768,
            journal_limit_bytes: 64 << 20,
        }
    }
}

/// How often the background task checkpoints the WAL into the database.
const SQLITE_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Checkpoints the WAL every `SQLITE_CHECKPOINT_EVERY`, PASSIVE: it copies what no reader
/// still needs and never blocks a writer, so commits stay short.
///
/// That alone does not keep the log small. SQLite starts the log over only when a writer
/// begins with every frame already copied, and at thousands of commits a second one always
/// lands between a checkpoint and the next write: the log grew by ~100 MB/s at 10k messages/s,
/// for ever. A RESTART checkpoint from here holds writers through two fsyncs and SQLite's
/// busy-wait backoff (p99 +10 ms). Instead, once the log holds `WalLimits::restart_frames`,
/// this checkpoints once more (the few frames committed meanwhile) and raises `log_restart`;
/// the message writer, the only steady writer, then checkpoints the last few frames on its own
/// connection right after its commit, so its next transaction begins with the log fully
/// copied and starts it over (`restart_log` in `impl_store!`).
async fn checkpoints(pool: Pool<Sqlite>, log_restart: Arc<AtomicBool>, wal: WalLimits) {
    let mut tick = tokio::time::interval(SQLITE_CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        tick.tick().await;
        match checkpoint(&pool, "PASSIVE").await {
            Ok(frames) if frames >= wal.restart_frames => {
                if let Err(e) = checkpoint(&pool, "PASSIVE").await {
                    log::debug!("sqlite checkpoint: {e}");
                }
                log_restart.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => log::debug!("sqlite checkpoint: {e}"),
        }
    }
}

/// One `wal_checkpoint` in `mode`; the frames the log held.
async fn checkpoint(pool: &Pool<Sqlite>, mode: &str) -> Result<i64> {
    let row = sqlx::query(&format!("PRAGMA wal_checkpoint({mode})"))
        .fetch_one(pool)
        .await?;
    // (busy, frames in the log, frames checkpointed)
    Ok(row.try_get::<i64, _>(1)?)
}

const MYSQL_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/mysql/0001_init.sql")),
    (2, include_str!("../../migrations/mysql/0002_fences.sql")),
    (
        3,
        include_str!("../../migrations/mysql/0003_refresh_families.sql"),
    ),
    (
        4,
        include_str!("../../migrations/mysql/0004_group_privacy.sql"),
    ),
    (
        5,
        include_str!("../../migrations/mysql/0005_member_since.sql"),
    ),
    (
        6,
        include_str!("../../migrations/mysql/0006_group_invites.sql"),
    ),
    (
        7,
        include_str!("../../migrations/mysql/0007_group_removals.sql"),
    ),
    (
        8,
        include_str!("../../migrations/mysql/0008_conversation_members_by_conv.sql"),
    ),
    (
        9,
        include_str!("../../migrations/mysql/0009_user_blocks.sql"),
    ),
    (
        10,
        include_str!("../../migrations/mysql/0010_presence_hidden.sql"),
    ),
    (
        11,
        include_str!("../../migrations/mysql/0011_conversation_members_wrote.sql"),
    ),
    (
        12,
        include_str!("../../migrations/mysql/0012_conversation_members_wrote_backfill.sql"),
    ),
    (
        13,
        include_str!("../../migrations/mysql/0013_push_subscriptions.sql"),
    ),
];
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_fences.sql")),
    (
        3,
        include_str!("../../migrations/sqlite/0003_refresh_families.sql"),
    ),
    (
        4,
        include_str!("../../migrations/sqlite/0004_group_privacy.sql"),
    ),
    (
        5,
        include_str!("../../migrations/sqlite/0005_member_since.sql"),
    ),
    (
        6,
        include_str!("../../migrations/sqlite/0006_group_invites.sql"),
    ),
    (
        7,
        include_str!("../../migrations/sqlite/0007_group_removals.sql"),
    ),
    (
        8,
        include_str!("../../migrations/sqlite/0008_conversation_members_by_conv.sql"),
    ),
    (
        9,
        include_str!("../../migrations/sqlite/0009_user_blocks.sql"),
    ),
    (
        10,
        include_str!("../../migrations/sqlite/0010_presence_hidden.sql"),
    ),
    (
        11,
        include_str!("../../migrations/sqlite/0011_conversation_members_wrote.sql"),
    ),
    (
        12,
        include_str!("../../migrations/sqlite/0012_conversation_members_wrote_backfill.sql"),
    ),
    (
        13,
        include_str!("../../migrations/sqlite/0013_push_subscriptions.sql"),
    ),
];

/// The statements of a migration file: split at `;` line ends, comment-only chunks dropped.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n").map(str::trim).filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
}

fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Rows per multi-row message INSERT: 10 placeholders each makes 5,000, well under SQLite's
/// 32,766 and MySQL's 65,535 per statement.
const MESSAGE_CHUNK_ROWS: usize = 512;
/// Content bytes per multi-row message INSERT, so that one statement stays far below MySQL's
/// `max_allowed_packet` (16 MiB by default on MariaDB) however long the messages are (padding,
/// with the shortest row, at most doubles it).
const MESSAGE_CHUNK_BYTES: usize = 4 << 20;
/// Keys per statement for the other multi-row statements (at most 2 placeholders a key).
const KEY_CHUNK: usize = 1024;
/// Keys per `find_by_cids` statement: an OR chain is as deep as it is long, and SQLite refuses
/// expressions deeper than 1,000.
const CID_CHUNK: usize = 256;

/// `chunk`'s items, then `chunk[fill]` again until the count is the next power of two. Every
/// multi-row statement is sent at one of a few sizes (1, 2, 4, ... 1,024 rows), so each is
/// parsed once per connection and then found in sqlx's statement cache: a statement of the
/// exact batch size was parsed anew every batch (8 % of standalone's CPU at 10k msg/s). The
/// repeats are harmless by construction at each call site (IGNORE, a no-op upsert, an OR or
/// IN term twice) and cost at most as much again as the rows themselves.
fn padded<T>(chunk: &[T], fill: usize) -> impl Iterator<Item = &T> {
    let n = chunk.len();
    chunk
        .iter()
        .chain(std::iter::repeat_n(&chunk[fill], n.next_power_of_two() - n))
}

/// The index of the row with the least content: the cheapest one to repeat as padding.
fn shortest(chunk: &[Stored]) -> usize {
    (0..chunk.len())
        .min_by_key(|&i| chunk[i].content.len())
        .unwrap_or(0)
}

/// `batch` cut into runs of at most `MESSAGE_CHUNK_ROWS` rows and, unless a single message is
/// larger, `MESSAGE_CHUNK_BYTES` bytes of content.
fn message_chunks(batch: &[Stored]) -> Vec<&[Stored]> {
    let mut chunks = Vec::with_capacity(batch.len() / MESSAGE_CHUNK_ROWS + 1);
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in batch.iter().enumerate() {
        let len = m.content.len() + m.cid.len() + m.conv.len();
        if i > start && (i - start == MESSAGE_CHUNK_ROWS || bytes + len > MESSAGE_CHUNK_BYTES) {
            chunks.push(&batch[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < batch.len() {
        chunks.push(&batch[start..]);
    }
    chunks
}

/// The highest seq of each conversation in `batch`, in conversation order (a fixed lock order
/// for concurrent writers).
fn highest_seqs(batch: &[Stored]) -> Vec<(&str, u64)> {
    let mut max: BTreeMap<&str, u64> = BTreeMap::new();
    for m in batch {
        let seq = max.entry(m.conv.as_str()).or_insert(m.seq);
        *seq = (*seq).max(m.seq);
    }
    max.into_iter().collect()
}

/// (user, conv) for both parties of every two-person message in `batch`, each once.
/// A member of a conversation: (user, conv).
type Member<'a> = (u64, &'a str);

/// The members of the batch's two-person conversations: those who wrote in them (marked
/// `wrote`: presence's contacts), and those who only received.
fn pair_members(batch: &[Stored]) -> (Vec<Member<'_>>, Vec<Member<'_>>) {
    let mut wrote: BTreeSet<Member<'_>> = BTreeSet::new();
    let mut got: BTreeSet<Member<'_>> = BTreeSet::new();
    for m in batch.iter().filter(|m| m.to_user != 0) {
        wrote.insert((m.from, m.conv.as_str()));
        got.insert((m.to_user, m.conv.as_str()));
    }
    let got = got.difference(&wrote).copied().collect();
    (wrote.into_iter().collect(), got)
}

/// 0 means "none" in the record schema, NULL in the tables.
fn nonzero(v: u64) -> Option<i64> {
    (v != 0).then(|| to_i64(v))
}

impl_store!(
    MySql,
    "mysql",
    MYSQL_MIGRATIONS,
    "SELECT GET_LOCK('im_migrate', 60)",
    "SELECT RELEASE_LOCK('im_migrate')",
    last_insert_id: "SELECT CAST(LAST_INSERT_ID() AS SIGNED)",
    for_update: " FOR UPDATE",
    bump_seq: "INSERT INTO conversations (conv, max_seq) VALUES (?, 1) ON DUPLICATE KEY UPDATE max_seq = max_seq + 1",
    insert_ignore: "INSERT IGNORE",
    raise_max_seq: " ON DUPLICATE KEY UPDATE max_seq = GREATEST(max_seq, VALUES(max_seq))",
    raise_fence: "INSERT INTO log_fences (log_partition, epoch) VALUES (?, ?) ON DUPLICATE KEY UPDATE epoch = GREATEST(epoch, VALUES(epoch))",
    // Collation pinned to the tables': compared with conv columns in joins.
    group_conv: "(CONCAT('g:', gm.group_id) COLLATE utf8mb4_unicode_ci)",
    restart_log: "",
    hold_hot: false,
    begin_write: "BEGIN",
    mark_wrote: " ON DUPLICATE KEY UPDATE wrote = 1"
);
// One SQLite file has one writer at a time: no lock statements, no row locks.
impl_store!(
    Sqlite,
    "sqlite",
    SQLITE_MIGRATIONS,
    "SELECT 1",
    "SELECT 1",
    last_insert_id: "SELECT last_insert_rowid()",
    for_update: "",
    bump_seq: "INSERT INTO conversations (conv, max_seq) VALUES (?, 1) ON CONFLICT(conv) DO UPDATE SET max_seq = max_seq + 1",
    insert_ignore: "INSERT OR IGNORE",
    raise_max_seq: " ON CONFLICT(conv) DO UPDATE SET max_seq = MAX(max_seq, excluded.max_seq)",
    raise_fence: "INSERT INTO log_fences (log_partition, epoch) VALUES (?, ?) ON CONFLICT(log_partition) DO UPDATE SET epoch = MAX(epoch, excluded.epoch)",
    group_conv: "('g:' || gm.group_id)",
    restart_log: "PRAGMA wal_checkpoint(PASSIVE)",
    hold_hot: true,
    // Transactions that read, then write: a deferred one would fail with SQLITE_BUSY when
    // another wrote in between, where an immediate one waits for the write lock.
    begin_write: "BEGIN IMMEDIATE",
    mark_wrote: " ON CONFLICT(user_id, conv) DO UPDATE SET wrote = 1"
);
impl_presence!(MySql);
impl_presence!(Sqlite);
impl_push!(
    MySql,
    begin_write: "BEGIN",
    for_update: " FOR UPDATE",
    last_insert_id: "SELECT CAST(LAST_INSERT_ID() AS SIGNED)"
);
impl_push!(
    Sqlite,
    begin_write: "BEGIN IMMEDIATE",
    for_update: "",
    last_insert_id: "SELECT last_insert_rowid()"
);

/// How a user comes into a group, as `join_in` checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Owner,
    Id,
    Invite,
}

impl From<JoinBy> for Entry {
    fn from(by: JoinBy) -> Entry {
        match by {
            JoinBy::Owner => Entry::Owner,
            JoinBy::Id => Entry::Id,
        }
    }
}

/// The columns `message_row` reads, in one place.
macro_rules! message_columns {
    () => {
        "id, conv, seq, sender_id, to_user_id, to_group_id, content, content_type, ts_ms"
    };
}
use message_columns;

fn message_row<R: Row>(r: &R) -> Result<MessageRow>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(MessageRow {
        id: r.try_get::<i64, _>("id")? as u64,
        conv: r.try_get("conv")?,
        seq: r.try_get::<i64, _>("seq")? as u64,
        sender: r.try_get::<i64, _>("sender_id")? as u64,
        to_user: r.try_get::<Option<i64>, _>("to_user_id")?.map(|v| v as u64),
        to_group: r
            .try_get::<Option<i64>, _>("to_group_id")?
            .map(|v| v as u64),
        content: r.try_get("content")?,
        content_type: r.try_get("content_type")?,
        ts_ms: r.try_get::<i64, _>("ts_ms")? as u64,
    })
}

/// The columns `invite_row` reads, in one place.
macro_rules! invite_columns {
    () => {
        "id, group_id, created_by, created_ms, expires_ms, uses_max, uses"
    };
}
use invite_columns;

fn invite_row<R: Row>(r: &R) -> Result<InviteRow>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(InviteRow {
        id: r.try_get::<i64, _>("id")? as u64,
        group: r.try_get::<i64, _>("group_id")? as u64,
        created_by: r.try_get::<i64, _>("created_by")? as u64,
        created_ms: r.try_get::<i64, _>("created_ms")? as u64,
        expires_ms: r.try_get::<i64, _>("expires_ms")? as u64,
        uses_max: r.try_get::<i64, _>("uses_max")? as u32,
        uses: r.try_get::<i64, _>("uses")? as u32,
    })
}

fn user_row<R: Row>(r: &R) -> Result<UserRow>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let id: i64 = r.try_get("id")?;
    Ok(UserRow {
        id: id as u64,
        username: r.try_get("username")?,
        password_hash: r.try_get("password_hash")?,
        nickname: r.try_get("nickname")?,
        avatar: r.try_get("avatar")?,
        presence_hidden: r.try_get::<i64, _>("presence_hidden")? != 0,
    })
}

impl From<StoreError> for String {
    fn from(e: StoreError) -> String {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        message_chunks, padded, shortest, statements, Stored, MESSAGE_CHUNK_BYTES,
        MESSAGE_CHUNK_ROWS,
    };

    #[test]
    fn statements_are_padded_to_a_power_of_two_with_the_chosen_row() {
        let sizes = |n: usize| padded(&vec![0u8; n], 0).count();
        assert_eq!(
            (sizes(1), sizes(2), sizes(3), sizes(5), sizes(512)),
            (1, 2, 4, 8, 512)
        );
        let rows: Vec<u32> = padded(&[7, 8, 9], 1).copied().collect();
        assert_eq!(rows, [7, 8, 9, 8]);
        let batch = [stored(30), stored(2), stored(10)];
        assert_eq!(shortest(&batch), 1);
    }

    fn stored(content_bytes: usize) -> Stored {
        Stored {
            content: "x".repeat(content_bytes),
            ..Default::default()
        }
    }

    #[test]
    fn message_batches_are_cut_by_rows_and_by_bytes() {
        assert!(message_chunks(&[]).is_empty());
        let batch: Vec<Stored> = (0..MESSAGE_CHUNK_ROWS * 2 + 1)
            .map(|_| stored(10))
            .collect();
        let lens: Vec<usize> = message_chunks(&batch).iter().map(|c| c.len()).collect();
        assert_eq!(lens, [MESSAGE_CHUNK_ROWS, MESSAGE_CHUNK_ROWS, 1]);

        // Three messages of 40% of the byte budget: two fit a statement, the third starts
        // the next; a message over the budget goes alone rather than being refused.
        let big = MESSAGE_CHUNK_BYTES * 2 / 5;
        let batch = [
            stored(big),
            stored(big),
            stored(big),
            stored(MESSAGE_CHUNK_BYTES * 2),
            stored(1),
        ];
        let lens: Vec<usize> = message_chunks(&batch).iter().map(|c| c.len()).collect();
        assert_eq!(lens, [2, 1, 1, 1]);
        assert_eq!(lens.iter().sum::<usize>(), batch.len());
    }

    #[test]
    fn migration_files_split_into_statements() {
        for (mysql, sqlite) in super::MYSQL_MIGRATIONS.iter().zip(super::SQLITE_MIGRATIONS) {
            assert_eq!(
                mysql.0, sqlite.0,
                "both dialects number their migrations alike"
            );
            let tables = |sql| {
                let stmts: Vec<&str> = statements(sql).collect();
                assert!(
                    stmts.iter().all(|s| s.contains("CREATE")
                        || s.contains("ALTER TABLE")
                        || s.contains("UPDATE conversation_members")),
                    "{stmts:#?}"
                );
                stmts.iter().filter(|s| s.contains("CREATE TABLE")).count()
            };
            assert_eq!(
                tables(mysql.1),
                tables(sqlite.1),
                "both dialects create the same tables in migration {}",
                mysql.0
            );
        }
        let first: Vec<&str> = statements(super::MYSQL_MIGRATIONS[0].1).collect();
        assert_eq!(
            first.iter().filter(|s| s.contains("CREATE TABLE")).count(),
            7
        );
    }
}

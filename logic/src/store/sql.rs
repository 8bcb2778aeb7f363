//! The `Store` implementations for MySQL and SQLite, generated from one body of SQL by
//! `impl_store!`. The SQL sticks to what both dialects accept (`?` placeholders, plain
//! INSERT/SELECT/UPDATE); the schema lives in `migrations/<dialect>/`.

use super::{Result, Store, StoreError, UserRow};
use async_trait::async_trait;
use sqlx::{MySql, Pool, Row, Sqlite};

/// A sqlx pool of either database.
pub struct SqlStore<DB: sqlx::Database> {
    pool: Pool<DB>,
}

pub type MySqlStore = SqlStore<MySql>;
pub type SqliteStore = SqlStore<Sqlite>;

impl<DB: sqlx::Database> SqlStore<DB> {
    pub fn new(pool: Pool<DB>) -> SqlStore<DB> {
        SqlStore { pool }
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

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode.
    pub async fn open(path: &std::path::Path) -> Result<SqliteStore> {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        Ok(SqlStore::new(pool))
    }
}

const MYSQL_MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../../migrations/mysql/0001_init.sql"))];
const SQLITE_MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../../migrations/sqlite/0001_init.sql"))];

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

macro_rules! impl_store {
    ($db:ty, $name:literal, $migrations:expr, $lock:literal, $unlock:literal) => {
        #[async_trait]
        impl Store for SqlStore<$db> {
            fn backend(&self) -> &'static str {
                $name
            }

            async fn migrate(&self) -> Result<()> {
                let mut conn = self.pool.acquire().await?;
                // Several instances may start at once: one migrates, the others wait.
                sqlx::query($lock).execute(&mut *conn).await?;
                let result: Result<()> = async {
                    sqlx::query(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT NOT NULL PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                    )
                    .execute(&mut *conn)
                    .await?;
                    for &(version, sql) in $migrations {
                        let done: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                            .bind(version)
                            .fetch_optional(&mut *conn)
                            .await?;
                        if done.is_some() {
                            continue;
                        }
                        for stmt in statements(sql) {
                            sqlx::query(stmt).execute(&mut *conn).await?;
                        }
                        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES (?, ?)")
                            .bind(version)
                            .bind(to_i64(im_shared::unix_ms()))
                            .execute(&mut *conn)
                            .await?;
                        log::info!("{} schema migration {version} applied", $name);
                    }
                    Ok(())
                }
                .await;
                sqlx::query($unlock).execute(&mut *conn).await?;
                result
            }

            async fn create_user(&self, username: &str, password_hash: &str, nickname: &str, now_ms: u64) -> Result<u64> {
                sqlx::query("INSERT INTO users (username, password_hash, nickname, avatar, created_ms) VALUES (?, ?, ?, '', ?)")
                    .bind(username)
                    .bind(password_hash)
                    .bind(nickname)
                    .bind(to_i64(now_ms))
                    .execute(&self.pool)
                    .await?;
                let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = ?")
                    .bind(username)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(id as u64)
            }

            async fn user_by_username(&self, username: &str) -> Result<Option<UserRow>> {
                let row = sqlx::query("SELECT id, username, password_hash, nickname, avatar FROM users WHERE username = ?")
                    .bind(username)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| user_row(&r)).transpose()
            }

            async fn user_by_id(&self, id: u64) -> Result<Option<UserRow>> {
                let row = sqlx::query("SELECT id, username, password_hash, nickname, avatar FROM users WHERE id = ?")
                    .bind(to_i64(id))
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| user_row(&r)).transpose()
            }

            async fn update_profile(&self, id: u64, nickname: Option<&str>, avatar: Option<&str>) -> Result<bool> {
                let r = sqlx::query("UPDATE users SET nickname = COALESCE(?, nickname), avatar = COALESCE(?, avatar) WHERE id = ?")
                    .bind(nickname)
                    .bind(avatar)
                    .bind(to_i64(id))
                    .execute(&self.pool)
                    .await?;
                if r.rows_affected() > 0 {
                    return Ok(true);
                }
                // MySQL reports 0 rows affected when nothing changed; tell that from "no user".
                Ok(self.user_by_id(id).await?.is_some())
            }

            async fn put_refresh(&self, token_hash: &str, user_id: u64, expires_ms: u64) -> Result<()> {
                sqlx::query("INSERT INTO refresh_tokens (token_hash, user_id, expires_ms) VALUES (?, ?, ?)")
                    .bind(token_hash)
                    .bind(to_i64(user_id))
                    .bind(to_i64(expires_ms))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn take_refresh(&self, token_hash: &str, now_ms: u64) -> Result<Option<u64>> {
                let row = sqlx::query("SELECT user_id, expires_ms FROM refresh_tokens WHERE token_hash = ?")
                    .bind(token_hash)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                // The DELETE decides: of two concurrent uses of one token, only one removes it.
                let deleted = sqlx::query("DELETE FROM refresh_tokens WHERE token_hash = ?")
                    .bind(token_hash)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                let expires: i64 = row.try_get("expires_ms")?;
                let user: i64 = row.try_get("user_id")?;
                Ok((deleted == 1 && expires > to_i64(now_ms)).then_some(user as u64))
            }

            async fn drop_refresh_tokens(&self, user_id: u64) -> Result<()> {
                sqlx::query("DELETE FROM refresh_tokens WHERE user_id = ?").bind(to_i64(user_id)).execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

impl_store!(
    MySql,
    "mysql",
    MYSQL_MIGRATIONS,
    "SELECT GET_LOCK('im_migrate', 60)",
    "SELECT RELEASE_LOCK('im_migrate')"
);
// One SQLite file has one writer at a time already; a no-op stands in for the lock.
impl_store!(Sqlite, "sqlite", SQLITE_MIGRATIONS, "SELECT 1", "SELECT 1");

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
    })
}

impl From<StoreError> for String {
    fn from(e: StoreError) -> String {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::statements;

    #[test]
    fn migration_files_split_into_statements() {
        for (_, sql) in super::MYSQL_MIGRATIONS
            .iter()
            .chain(super::SQLITE_MIGRATIONS)
        {
            let stmts: Vec<&str> = statements(sql).collect();
            let tables = stmts.iter().filter(|s| s.contains("CREATE TABLE")).count();
            assert_eq!(
                tables, 7,
                "both dialects create the same seven tables: {stmts:#?}"
            );
            assert!(stmts.iter().all(|s| s.contains("CREATE")));
        }
    }
}

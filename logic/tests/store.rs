//! The `Store` trait against both real backends: MariaDB (MySQL protocol) on this machine and
//! SQLite in a temporary directory. Each MySQL test gets a database of its own.

use logic::store::{MySqlStore, SqliteStore, Store, StoreError};
use std::sync::atomic::{AtomicU32, Ordering};

/// The server the tests use; override with IM_TEST_MYSQL_URL (no database path).
fn mysql_server() -> String {
    std::env::var("IM_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// Drops a test database made by `fresh_mysql`.
pub async fn drop_mysql(store: MySqlStore) {
    let name: String = sqlx::query_scalar("SELECT DATABASE()")
        .fetch_one(store.pool())
        .await
        .expect("current database");
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(store.pool())
        .await
        .expect("drop the test database");
    store.pool().close().await;
}

/// A fresh, empty database on the MySQL server; fails loudly when the server is down.
pub async fn fresh_mysql() -> MySqlStore {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "im_test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let admin = MySqlStore::connect(&format!("{}/test", mysql_server()))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "MySQL/MariaDB is required for these tests at {} ({e}); .ci/run starts it",
                mysql_server()
            )
        });
    for stmt in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&stmt)
            .execute(admin.pool())
            .await
            .expect("create the test database");
    }
    let store = MySqlStore::connect(&format!("{}/{name}", mysql_server()))
        .await
        .expect("connect to the test database");
    store.migrate().await.expect("migrations apply");
    store
}

pub async fn fresh_sqlite(dir: &std::path::Path) -> SqliteStore {
    let store = SqliteStore::open(&dir.join("im.db"))
        .await
        .expect("open sqlite");
    store.migrate().await.expect("migrations apply");
    store
}

async fn accounts_and_refresh_tokens(s: &dyn Store) {
    let id = s.create_user("alice", "hash", "Alice", 1).await.unwrap();
    assert!(matches!(
        s.create_user("alice", "h2", "Other", 2).await,
        Err(StoreError::Conflict)
    ));
    let u = s.user_by_username("alice").await.unwrap().unwrap();
    assert_eq!(
        (u.id, u.nickname.as_str(), u.avatar.as_str()),
        (id, "Alice", "")
    );
    assert_eq!(s.user_by_id(id).await.unwrap().unwrap().username, "alice");
    assert!(s.user_by_id(id + 1000).await.unwrap().is_none());
    // SQL metacharacters are data.
    let tricky = "o'brien\"; DROP TABLE users; --";
    let t = s.create_user("bobby", "h", tricky, 3).await.unwrap();
    assert_eq!(s.user_by_id(t).await.unwrap().unwrap().nickname, tricky);
    assert!(s.update_profile(id, Some("Al"), None).await.unwrap());
    assert!(
        s.update_profile(id, Some("Al"), None).await.unwrap(),
        "an unchanged row still exists"
    );
    assert!(!s.update_profile(id + 1000, Some("x"), None).await.unwrap());
    assert_eq!(s.user_by_id(id).await.unwrap().unwrap().nickname, "Al");

    s.put_refresh("h1", id, 1_000).await.unwrap();
    assert_eq!(s.take_refresh("h1", 500).await.unwrap(), Some(id));
    assert_eq!(
        s.take_refresh("h1", 500).await.unwrap(),
        None,
        "a refresh token works once"
    );
    s.put_refresh("h2", id, 1_000).await.unwrap();
    assert_eq!(s.take_refresh("h2", 1_000).await.unwrap(), None, "expired");
    s.put_refresh("h3", id, 9_000).await.unwrap();
    s.drop_refresh_tokens(id).await.unwrap();
    assert_eq!(
        s.take_refresh("h3", 1).await.unwrap(),
        None,
        "logout forgets them"
    );
    // Migrations are idempotent.
    s.migrate().await.unwrap();
}

#[tokio::test]
async fn accounts_and_refresh_tokens_on_mysql() {
    let store = fresh_mysql().await;
    accounts_and_refresh_tokens(&store).await;
    drop_mysql(store).await;
}

#[tokio::test]
async fn accounts_and_refresh_tokens_on_sqlite() {
    let dir = tempdir();
    accounts_and_refresh_tokens(&fresh_sqlite(&dir).await).await;
    let _ = std::fs::remove_dir_all(dir);
}

pub fn tempdir() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "im-logic-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

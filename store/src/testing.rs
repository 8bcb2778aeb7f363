//! Test helpers: a fresh MySQL database per test (on the real MariaDB, which `scripts/test`
//! starts), a fresh SQLite file per test, and a temporary directory. Used by this crate's
//! tests and by the services' tests (logic's REST API runs on a real store).

use crate::{MySqlStore, SqliteStore, Store};
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
    // Databases of test runs that died mid-test (their process is gone) are dropped here.
    let stale: Vec<String> = sqlx::query_scalar(r"SHOW DATABASES LIKE 'im\_test\_%'")
        .fetch_all(admin.pool())
        .await
        .unwrap_or_default();
    for db in stale {
        let pid = db.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
                .execute(admin.pool())
                .await;
        }
    }
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

pub fn tempdir() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "im-store-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

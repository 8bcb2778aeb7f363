//! The `Store` trait against both real backends: MariaDB (MySQL protocol) on this machine and
//! SQLite in a temporary directory. Each MySQL test gets a database of its own.

mod common;

use common::{drop_mysql, fresh_mysql, fresh_sqlite, tempdir};
use logic::store::{Store, StoreError};

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

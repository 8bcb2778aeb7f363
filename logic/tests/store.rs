//! The `Store` trait against both real backends: MariaDB (MySQL protocol) on this machine and
//! SQLite in a temporary directory. Each MySQL test gets a database of its own.

mod common;

use common::{drop_mysql, fresh_mysql, fresh_sqlite, tempdir};
use logic::store::{NewMessage, Store, StoreError};

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

fn msg<'a>(
    id: u64,
    conv: &'a str,
    sender: u64,
    cid: &'a str,
    to_user: Option<u64>,
    to_group: Option<u64>,
) -> NewMessage<'a> {
    NewMessage {
        id,
        conv,
        sender,
        cid,
        to_user,
        to_group,
        content: "hello 'there'",
        content_type: "text",
        ts_ms: id,
    }
}

async fn messages_and_conversations(s: &dyn Store) {
    let a = s.create_user("ann", "h", "Ann", 1).await.unwrap();
    let b = s.create_user("ben", "h", "Ben", 1).await.unwrap();
    let conv = format!("p:{}:{}", a.min(b), a.max(b));
    let m1 = s
        .append_message(&msg(100, &conv, a, "c1", Some(b), None))
        .await
        .unwrap();
    let m2 = s
        .append_message(&msg(101, &conv, b, "c1", Some(a), None))
        .await
        .unwrap();
    assert_eq!(
        (m1.seq, m2.seq),
        (1, 2),
        "same cid from another sender is another message"
    );
    let again = s
        .append_message(&msg(999, &conv, a, "c1", Some(b), None))
        .await
        .unwrap();
    assert_eq!(
        (again.id, again.seq),
        (100, 1),
        "a retry returns the first message"
    );
    let m3 = s
        .append_message(&msg(102, &conv, a, "C1", Some(b), None))
        .await
        .unwrap();
    assert_eq!(m3.seq, 3, "client ids are case-exact");

    let h = s.history(&conv, u64::MAX, 10).await.unwrap();
    assert_eq!(h.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 2, 1]);
    assert_eq!(h[2].content, "hello 'there'");
    assert_eq!(h[2].to_user, Some(b));
    let page = s.history(&conv, 3, 1).await.unwrap();
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);

    let list = s.conversations(b).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].conv.as_str(), list[0].max_seq, list[0].read_seq),
        (conv.as_str(), 3, 0)
    );
    assert_eq!(list[0].last_message.as_ref().unwrap().id, 102);
    s.update_membership(b, &conv, Some(2), None, Some(true))
        .await
        .unwrap();
    s.update_membership(b, &conv, Some(1), Some(true), None)
        .await
        .unwrap();
    let c = &s.conversations(b).await.unwrap()[0];
    assert_eq!(
        (c.read_seq, c.muted, c.pinned),
        (2, true, true),
        "read position never moves back"
    );
    s.update_membership(b, &conv, Some(1_000), None, None)
        .await
        .unwrap();
    assert_eq!(
        s.conversations(b).await.unwrap()[0].read_seq,
        3,
        "nor past the end"
    );

    // Groups: members see the group's conversation before any read position exists.
    let g = s.create_group(a, "g", "", 10, 1).await.unwrap();
    s.add_member(g, b, 1).await.unwrap();
    let gconv = format!("g:{g}");
    assert!(s
        .conversations(b)
        .await
        .unwrap()
        .iter()
        .any(|c| c.conv == gconv && c.max_seq == 0));
    s.append_message(&msg(200, &gconv, a, "g1", None, Some(g)))
        .await
        .unwrap();
    let gc = s
        .conversations(b)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.conv == gconv)
        .unwrap();
    assert_eq!(
        (gc.max_seq, gc.read_seq, gc.last_message.unwrap().to_group),
        (1, 0, Some(g))
    );

    let c = s.create_user("cat", "h", "Cat", 1).await.unwrap();
    let conv_ac = format!("p:{}:{}", a.min(c), a.max(c));
    s.open_pair(&conv_ac, a, c).await.unwrap();
    s.open_pair(&conv_ac, a, c).await.unwrap();
    assert!(s
        .conversations(c)
        .await
        .unwrap()
        .iter()
        .any(|x| x.conv == conv_ac && x.max_seq == 0));
}

#[tokio::test]
async fn messages_and_conversations_on_mysql() {
    let store = fresh_mysql().await;
    messages_and_conversations(&store).await;
    drop_mysql(store).await;
}

#[tokio::test]
async fn messages_and_conversations_on_sqlite() {
    let dir = tempdir();
    messages_and_conversations(&fresh_sqlite(&dir).await).await;
    let _ = std::fs::remove_dir_all(dir);
}

//! The `Store` trait against both real backends: MariaDB (MySQL protocol) on this machine and
//! SQLite in a temporary directory. Each MySQL test gets a database of its own.

use im_shared::records::Stored;
use im_store::testing::{drop_mysql, fresh_mysql, fresh_sqlite, tempdir};
use im_store::{
    GroupChange, Join, JoinBy, MessageRow, NewGroup, NewInvite, NewMessage, NewRefresh,
    PushSubscription, Roster, Store, StoreError, Taken, View, JOIN_CLOCK_SKEW_MS,
};

/// A private group of ten seats owned by `owner`, history from each member's join.
fn group(owner: u64) -> NewGroup<'static> {
    NewGroup {
        owner,
        name: "g",
        description: "",
        max_members: 10,
        public: false,
        history_all: false,
        now_ms: 1,
    }
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

    // Blocks: new once, listed ascending, bounded, lifted.
    assert_eq!(s.block(id, t, 2, 5).await.unwrap(), Some(true));
    assert_eq!(s.block(id, t, 2, 5).await.unwrap(), Some(false), "again");
    assert_eq!(s.block(id, t + 50, 2, 5).await.unwrap(), Some(true));
    assert_eq!(
        s.block(id, t + 60, 2, 5).await.unwrap(),
        None,
        "two at most"
    );
    assert_eq!(
        s.block(id + 1000, t, 2, 5).await.unwrap(),
        None,
        "no such user"
    );
    assert_eq!(s.blocked_by(id).await.unwrap(), [t, t + 50]);
    assert!(s.blocked_by(t).await.unwrap().is_empty(), "one way");
    assert!(s.unblock(id, t + 50).await.unwrap());
    assert!(!s.unblock(id, t + 50).await.unwrap());
    assert_eq!(s.blocked_by(id).await.unwrap(), [t]);
    assert_eq!(s.user_by_id(id).await.unwrap().unwrap().nickname, "Al");

    // Far-future expiries: `put_refresh` forgets this user's rows that expired by the clock.
    let far = im_shared::unix_ms() + 3_600_000;
    let refresh =
        |hash: &'static str, family: &'static str, jti: &'static str, exp_s: u64| NewRefresh {
            token_hash: hash,
            user_id: id,
            expires_ms: far,
            family,
            access_jti: jti,
            access_exp_s: exp_s,
        };
    s.put_refresh(&refresh("h1", "fa", "j1", 100))
        .await
        .unwrap();
    let fresh = Taken::Fresh {
        user_id: id,
        family: "fa".into(),
    };
    assert_eq!(s.take_refresh("h1", 500).await.unwrap(), fresh);
    assert_eq!(
        s.take_refresh("h1", 500).await.unwrap(),
        Taken::Reused {
            user_id: id,
            family: "fa".into(),
            used_ms: 500,
        },
        "a refresh token works once; the second use is a reuse"
    );
    assert_eq!(s.take_refresh("nope", 500).await.unwrap(), Taken::Unknown);
    assert_eq!(
        s.take_refresh("h1", far).await.unwrap(),
        Taken::Unknown,
        "expired"
    );
    s.put_refresh(&refresh("h2", "fa", "j2", 200))
        .await
        .unwrap();
    s.put_refresh(&refresh("h3", "fb", "j3", 300))
        .await
        .unwrap();
    let mut access = s.family_access("fa", 150).await.unwrap();
    access.sort();
    assert_eq!(access, [("j2".to_string(), 200)], "j1 expired at 100");
    assert_eq!(
        s.family_of_access("j3").await.unwrap().as_deref(),
        Some("fb")
    );
    assert_eq!(s.family_of_access("j9").await.unwrap(), None);
    let mut families = s.refresh_families(id).await.unwrap();
    families.sort();
    assert_eq!(families, ["fa", "fb"]);
    s.drop_refresh_family("fa").await.unwrap();
    assert_eq!(s.take_refresh("h2", 1).await.unwrap(), Taken::Unknown);
    assert!(matches!(
        s.take_refresh("h3", 1).await.unwrap(),
        Taken::Fresh { .. }
    ));
    s.put_refresh(&refresh("h4", "fc", "j4", 400))
        .await
        .unwrap();
    s.drop_refresh_tokens(id).await.unwrap();
    assert_eq!(
        s.take_refresh("h4", 1).await.unwrap(),
        Taken::Unknown,
        "logging out everywhere forgets them"
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

    let h = s.history(&conv, View::ALL, u64::MAX, 10).await.unwrap();
    assert_eq!(h.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 2, 1]);
    assert_eq!(h[2].content, "hello 'there'");
    assert_eq!(h[2].to_user, Some(b));
    let page = s.history(&conv, View::ALL, 3, 1).await.unwrap();
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
    assert_eq!(
        s.conversations(a).await.unwrap()[0].peer_read_seq,
        Some(3),
        "a's view of b's receipts"
    );
    assert_eq!(
        s.update_membership(b, &conv, Some(1), None, None)
            .await
            .unwrap(),
        3,
        "the position as stored"
    );
    assert_eq!(s.block(b, a, 10, 1).await.unwrap(), Some(true));
    assert_eq!(s.blockers_of(a).await.unwrap(), [b]);
    for (who, _) in [(a, "the blocked"), (b, "the blocker")] {
        assert_eq!(
            s.conversations(who).await.unwrap()[0].peer_read_seq,
            None,
            "no receipts while either blocks the other"
        );
    }
    assert!(s.unblock(b, a).await.unwrap());

    // Groups: members see the group's conversation before any read position exists.
    let g = s.create_group(&group(a)).await.unwrap();
    s.add_member(g, b, 1, JoinBy::Owner).await.unwrap();
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

/// What presence reads (docs/PROTOCOL.md, "Presence"): contacts, groups in common, the
/// hidden flag.
async fn presence_queries(s: &dyn Store) {
    let a = s.create_user("ann", "h", "Ann", 1).await.unwrap();
    let b = s.create_user("ben", "h", "Ben", 1).await.unwrap();
    let c = s.create_user("cat", "h", "Cat", 1).await.unwrap();
    let d = s.create_user("dan", "h", "Dan", 1).await.unwrap();
    let pair = |x: u64, y: u64| format!("p:{}:{}", x.min(y), x.max(y));
    // Ann and Ben write to each other (the standalone path); Ann and Cat too (persist's
    // batches); Ann only opens a conversation with Dan, and writes to him: one way.
    let (ab, ac, ad) = (pair(a, b), pair(a, c), pair(a, d));
    s.append_message(&msg(1, &ab, a, "1", Some(b), None))
        .await
        .unwrap();
    s.append_message(&msg(2, &ab, b, "2", Some(a), None))
        .await
        .unwrap();
    let batch = [rec(3, &ac, 1, a, c, 0, "3"), rec(4, &ac, 2, c, a, 0, "4")];
    s.insert_messages(&batch, &[]).await.unwrap();
    s.open_pair(&ad, a, d).await.unwrap();
    s.append_message(&msg(5, &ad, a, "5", Some(d), None))
        .await
        .unwrap();
    let mut want = vec![b, c];
    want.sort_unstable();
    assert_eq!(
        s.contacts(a, 100).await.unwrap(),
        want,
        "Dan never wrote back"
    );
    assert_eq!(s.contacts(b, 100).await.unwrap(), [a], "both ways");
    assert!(s.contacts(d, 100).await.unwrap().is_empty());
    assert_eq!(s.contacts(a, 1).await.unwrap().len(), 1, "bounded");
    assert!(s.are_contacts(a, b).await.unwrap() && s.are_contacts(c, a).await.unwrap());
    assert!(!s.are_contacts(a, d).await.unwrap() && !s.are_contacts(a, a).await.unwrap());
    // Dan writes back: now they are.
    let back = [rec(6, &ad, 2, d, a, 0, "6")];
    s.insert_messages(&back, &[]).await.unwrap();
    assert!(s.are_contacts(d, a).await.unwrap());
    assert_eq!(s.contacts(d, 100).await.unwrap(), [a]);
    // Groups in common.
    let g = s.create_group(&group(c)).await.unwrap();
    s.add_member(g, d, 1, JoinBy::Owner).await.unwrap();
    assert!(s.share_a_group(c, d).await.unwrap() && s.share_a_group(d, c).await.unwrap());
    assert!(!s.share_a_group(a, d).await.unwrap());
    // Hiding.
    assert!(!s.user_by_id(b).await.unwrap().unwrap().presence_hidden);
    assert!(s.set_presence_hidden(b, true).await.unwrap());
    assert!(
        s.set_presence_hidden(b, true).await.unwrap(),
        "again: still a user"
    );
    assert!(s.user_by_id(b).await.unwrap().unwrap().presence_hidden);
    assert_eq!(s.hiding_presence(&[a, b, c, 999_999]).await.unwrap(), [b]);
    assert!(
        !s.set_presence_hidden(999_999, true).await.unwrap(),
        "no such user"
    );
    assert!(s.set_presence_hidden(b, false).await.unwrap());
    assert!(s.hiding_presence(&[a, b]).await.unwrap().is_empty());
}

/// Web Push subscriptions (docs/PROTOCOL.md, "Offline push"): per user, capped, an endpoint
/// owned by the last to subscribe with it.
async fn push_subscriptions(s: &dyn Store) {
    let a = s.create_user("ann", "h", "Ann", 1).await.unwrap();
    let b = s.create_user("ben", "h", "Ben", 1).await.unwrap();
    let sub = |user: u64, n: u32| PushSubscription {
        id: 0,
        user_id: user,
        endpoint: format!("https://push.example/ep/{n}"),
        p256dh: format!("key{n}"),
        auth: format!("auth{n}"),
        created_ms: 0,
    };
    for (n, at) in [(1, 10), (2, 20), (3, 30)] {
        let id = s.add_push_subscription(&sub(a, n), 2, at).await.unwrap();
        assert!(id.is_some_and(|id| id > 0));
    }
    let got = s.push_subscriptions(a).await.unwrap();
    let eps: Vec<&str> = got.iter().map(|x| x.endpoint.as_str()).collect();
    assert_eq!(
        eps,
        ["https://push.example/ep/3", "https://push.example/ep/2"],
        "newest first; past the cap of 2 the oldest went"
    );
    assert_eq!(
        (got[0].p256dh.as_str(), got[0].auth.as_str()),
        ("key3", "auth3")
    );
    assert_eq!((got[0].user_id, got[0].created_ms), (a, 30));
    // The same browser subscribes for Ben: it is his now, Ann's is gone.
    let id = s
        .add_push_subscription(&sub(b, 3), 2, 40)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.push_subscriptions(b).await.unwrap()[0].id, id);
    assert_eq!(s.push_subscriptions(a).await.unwrap().len(), 1);
    assert!(s
        .add_push_subscription(&sub(999_999, 9), 2, 50)
        .await
        .unwrap()
        .is_none());
    // Unsubscribing is the owner's only; a gone one is dropped by id.
    assert!(!s
        .remove_push_subscription(a, "https://push.example/ep/3")
        .await
        .unwrap());
    assert!(s
        .remove_push_subscription(b, "https://push.example/ep/3")
        .await
        .unwrap());
    assert!(s.push_subscriptions(b).await.unwrap().is_empty());
    let left = s.push_subscriptions(a).await.unwrap();
    s.drop_push_subscription(left[0].id).await.unwrap();
    assert!(s.push_subscriptions(a).await.unwrap().is_empty());
    // Logged out everywhere: all of a user's go.
    for n in [7, 8] {
        s.add_push_subscription(&sub(a, n), 2, 60).await.unwrap();
    }
    assert_eq!(s.drop_push_subscriptions_of(a).await.unwrap(), 2);
    assert!(s.push_subscriptions(a).await.unwrap().is_empty());
    // Muting, which push honours.
    let ab = format!("p:{}:{}", a.min(b), a.max(b));
    assert!(
        !s.muted(a, &ab).await.unwrap(),
        "not a member yet: not muted"
    );
    s.update_membership(a, &ab, None, Some(true), None)
        .await
        .unwrap();
    assert!(s.muted(a, &ab).await.unwrap());
    assert!(!s.muted(b, &ab).await.unwrap());
    s.update_membership(a, &ab, None, Some(false), None)
        .await
        .unwrap();
    assert!(!s.muted(a, &ab).await.unwrap());
}

#[tokio::test]
async fn push_subscriptions_on_mysql() {
    let store = fresh_mysql().await;
    push_subscriptions(&store).await;
    drop_mysql(store).await;
}

#[tokio::test]
async fn push_subscriptions_on_sqlite() {
    let dir = tempdir();
    push_subscriptions(&fresh_sqlite(&dir).await).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn presence_queries_on_mysql() {
    let store = fresh_mysql().await;
    presence_queries(&store).await;
    drop_mysql(store).await;
}

#[tokio::test]
async fn presence_queries_on_sqlite() {
    let dir = tempdir();
    presence_queries(&fresh_sqlite(&dir).await).await;
    let _ = std::fs::remove_dir_all(dir);
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

/// Private groups: what a new member sees (from their join, or everything), settings, and
/// invite links (expiry, use count, revocation, the limit of live invites).
async fn group_privacy_and_invites(s: &dyn Store) {
    let a = s.create_user("ann", "h", "Ann", 1).await.unwrap();
    let b = s.create_user("ben", "h", "Ben", 1).await.unwrap();
    let c = s.create_user("cat", "h", "Cat", 1).await.unwrap();
    let d = s.create_user("dan", "h", "Dan", 1).await.unwrap();
    let g = s.create_group(&group(a)).await.unwrap();
    let gc = format!("g:{g}");
    let row = s.group(g).await.unwrap().unwrap();
    assert_eq!((row.public, row.history_all), (false, false));
    for (i, cid) in ["x1", "x2", "x3"].into_iter().enumerate() {
        s.append_message(&msg(300 + i as u64, &gc, a, cid, None, Some(g)))
            .await
            .unwrap();
    }

    // Joining after three messages (at 5 s): b sees from seq 4 stamped from 4 s, reads from
    // 3, nothing unread.
    assert_eq!(
        s.add_member(g, b, 5_000, JoinBy::Id).await.unwrap(),
        Join::NoSuchGroup,
        "a private group is not joined by id"
    );
    assert_eq!(
        s.add_member(g, b, 5_000, JoinBy::Owner).await.unwrap(),
        Join::Added
    );
    let b_view = View {
        after_seq: 3,
        from_ms: 5_000 - JOIN_CLOCK_SKEW_MS,
    };
    assert_eq!(s.member_view(g, b).await.unwrap(), Some(b_view));
    assert_eq!(
        s.member_view(g, a).await.unwrap(),
        Some(View::default()),
        "the owner"
    );
    assert_eq!(s.member_view(g, c).await.unwrap(), None);
    let view = |rows: Vec<im_store::ConversationRow>| {
        let c = rows.into_iter().find(|c| c.conv == gc).unwrap();
        (c.max_seq, c.read_seq, c.last_message.map(|m| m.seq))
    };
    assert_eq!(
        view(s.conversations(b).await.unwrap()),
        (3, 3, None),
        "the last message is from before the join"
    );
    assert_eq!(view(s.conversations(a).await.unwrap()), (3, 0, Some(3)));
    assert!(s
        .history(&gc, b_view, u64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
    // Sequenced before the join, stored after it (persist behind): hidden by its time.
    fn at(ts_ms: u64, m: NewMessage<'_>) -> NewMessage<'_> {
        NewMessage { ts_ms, ..m }
    }
    s.append_message(&at(3_500, msg(309, &gc, a, "x4", None, Some(g))))
        .await
        .unwrap();
    assert_eq!(view(s.conversations(b).await.unwrap()), (4, 3, None));
    assert!(s
        .history(&gc, b_view, u64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
    s.append_message(&at(10_000, msg(310, &gc, a, "x5", None, Some(g))))
        .await
        .unwrap();
    assert_eq!(view(s.conversations(b).await.unwrap()), (5, 3, Some(5)));
    assert_eq!(
        seqs(&s.history(&gc, b_view, u64::MAX, 10).await.unwrap()),
        [5]
    );

    // Settings: all history, public, a new name; an unknown group changes nothing.
    let all = GroupChange {
        history_all: Some(true),
        ..Default::default()
    };
    assert!(s.update_group(g, &all).await.unwrap());
    assert_eq!(s.member_view(g, b).await.unwrap(), Some(View::ALL));
    assert!(!s.update_group(g + 1000, &all).await.unwrap());
    let public = GroupChange {
        public: Some(true),
        name: Some("renamed"),
        ..Default::default()
    };
    assert!(s.update_group(g, &public).await.unwrap());
    let row = s.group(g).await.unwrap().unwrap();
    assert_eq!(
        (row.public, row.history_all, row.name.as_str()),
        (true, true, "renamed")
    );
    assert!(s.roster(g).await.unwrap().unwrap().public);
    assert!(s
        .update_group(
            g,
            &GroupChange {
                history_all: Some(false),
                ..Default::default()
            }
        )
        .await
        .unwrap());

    // A member who leaves and comes back (by id: the group is public now) starts again then.
    assert!(s.remove_member(g, b).await.unwrap());
    assert!(!s.remove_member(g, b).await.unwrap());
    s.append_message(&at(20_000, msg(311, &gc, a, "x6", None, Some(g))))
        .await
        .unwrap();
    assert_eq!(
        s.add_member(g, b, 30_000, JoinBy::Id).await.unwrap(),
        Join::Added
    );
    assert_eq!(s.member_view(g, b).await.unwrap().unwrap().after_seq, 6);
    assert_eq!(view(s.conversations(b).await.unwrap()), (6, 6, None));

    // Invites.
    let invite = |hash, expires_ms, uses_max| NewInvite {
        group: g,
        token_hash: hash,
        created_by: a,
        created_ms: 10,
        expires_ms,
        uses_max,
    };
    let once = s.create_invite(&invite("t1", 1_000, 1), 2).await.unwrap();
    let once = once.expect("first invite");
    let short = s.create_invite(&invite("t2", 20, 0), 2).await.unwrap();
    assert!(short.is_some());
    assert_eq!(
        s.create_invite(&invite("t3", 1_000, 0), 2).await.unwrap(),
        None,
        "two live invites at most"
    );
    let nowhere = NewInvite {
        group: g + 1000,
        ..invite("t4", 1_000, 0)
    };
    assert_eq!(s.create_invite(&nowhere, 2).await.unwrap(), None);
    assert_eq!(s.invite("t1", 15).await.unwrap().unwrap().id, once);
    assert_eq!(s.invite("nope", 15).await.unwrap(), None);
    assert_eq!(
        s.join_by_invite("t1", c, 15).await.unwrap(),
        Some((g, Join::Added))
    );
    assert!(s.is_member(g, c).await.unwrap());
    assert_eq!(s.invite("t1", 15).await.unwrap(), None, "used up");
    assert_eq!(s.join_by_invite("t1", d, 15).await.unwrap(), None);
    assert!(!s.is_member(g, d).await.unwrap());
    assert_eq!(
        s.join_by_invite("t2", c, 15).await.unwrap(),
        Some((g, Join::AlreadyMember)),
        "a member's use counts for nothing"
    );
    let listed = s.invites(g, 15).await.unwrap();
    assert_eq!(
        listed.iter().map(|i| (i.id, i.uses)).collect::<Vec<_>>(),
        [(short.unwrap(), 0), (once, 1)],
        "newest first"
    );
    assert_eq!(
        s.join_by_invite("t2", d, 25).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(s.invite("t2", 25).await.unwrap(), None);
    assert_eq!(
        s.invites(g, 25).await.unwrap().len(),
        1,
        "the expired one is gone"
    );
    assert!(s
        .create_invite(&invite("t3", 1_000, 0), 2)
        .await
        .unwrap()
        .is_some());
    assert!(!s.revoke_invite(g + 1000, once).await.unwrap());
    assert!(s.revoke_invite(g, once).await.unwrap());
    assert!(!s.revoke_invite(g, once).await.unwrap());

    // A full group takes no one by invite, and counts no use.
    let small = s
        .create_group(&NewGroup {
            max_members: 2,
            ..group(a)
        })
        .await
        .unwrap();
    let to_small = NewInvite {
        group: small,
        ..invite("s1", 1_000, 5)
    };
    s.create_invite(&to_small, 2).await.unwrap().unwrap();
    assert_eq!(
        s.join_by_invite("s1", b, 15).await.unwrap(),
        Some((small, Join::Added))
    );
    assert_eq!(
        s.join_by_invite("s1", c, 15).await.unwrap(),
        Some((small, Join::Full))
    );
    assert_eq!(s.invites(small, 15).await.unwrap()[0].uses, 1);

    // Removed by the owner: no way back by invite or id, until the owner adds them again.
    assert!(s.expel_member(g, c, 40).await.unwrap());
    assert!(!s.expel_member(g, c, 40).await.unwrap());
    assert!(!s.is_member(g, c).await.unwrap());
    assert_eq!(
        s.join_by_invite("t3", c, 50).await.unwrap(),
        Some((g, Join::Removed))
    );
    assert_eq!(
        s.add_member(g, c, 50, JoinBy::Id).await.unwrap(),
        Join::Removed
    );
    assert_eq!(
        s.invites(g, 50).await.unwrap()[0].uses,
        0,
        "a refused join uses nothing"
    );
    assert_eq!(
        s.add_member(g, c, 60, JoinBy::Owner).await.unwrap(),
        Join::Added
    );
    assert!(
        s.remove_member(g, c).await.unwrap(),
        "leaving leaves no mark"
    );
    assert_eq!(
        s.join_by_invite("t3", c, 70).await.unwrap(),
        Some((g, Join::Added))
    );
}

#[tokio::test]
async fn group_privacy_and_invites_on_mysql() {
    let store = fresh_mysql().await;
    group_privacy_and_invites(&store).await;
    drop_mysql(store).await;
}

#[tokio::test]
async fn group_privacy_and_invites_on_sqlite() {
    let dir = tempdir();
    group_privacy_and_invites(&fresh_sqlite(&dir).await).await;
    let _ = std::fs::remove_dir_all(dir);
}

fn rec(id: u64, conv: &str, seq: u64, from: u64, to_user: u64, to_group: u64, cid: &str) -> Stored {
    Stored {
        version: im_shared::records::VERSION,
        id,
        conv: conv.to_owned(),
        seq,
        from,
        to_user,
        to_group,
        content: format!("m{id} 'quoted' \"é\" \u{1F600}"),
        content_type: "text".into(),
        ts: 1_700_000_000_000 + id,
        cid: cid.to_owned(),
        ..Default::default()
    }
}

fn seqs(rows: &[MessageRow]) -> Vec<u64> {
    rows.iter().map(|m| m.seq).collect()
}

async fn sorted_max_seqs(s: &dyn Store, convs: &[String]) -> Vec<(String, u64)> {
    let mut v = s.max_seqs(convs).await.unwrap();
    v.sort();
    v
}

/// The persist service's batch write and the pipeline's reads, as `im.messages` replays them.
async fn message_batches(s: &dyn Store) {
    let a = s.create_user("ann", "h", "Ann", 1).await.unwrap();
    let b = s.create_user("ben", "h", "Ben", 1).await.unwrap();
    let c = s.create_user("cat", "h", "Cat", 1).await.unwrap();
    let g = s.create_group(&group(a)).await.unwrap();
    assert_eq!(
        s.add_member(g, b, 1, JoinBy::Owner).await.unwrap(),
        Join::Added
    );
    let ab = format!("p:{}:{}", a.min(b), a.max(b));
    let ac = format!("p:{}:{}", a.min(c), a.max(c));
    let gc = format!("g:{g}");

    // 1500 messages, round-robin over two pairs and a group: seqs 1..=500 in each.
    let batch: Vec<Stored> = (0..1500u64)
        .map(|i| {
            let seq = i / 3 + 1;
            let cid = format!("c{i}");
            match i % 3 {
                0 => rec(
                    10_000 + i,
                    &ab,
                    seq,
                    if i % 2 == 0 { a } else { b },
                    if i % 2 == 0 { b } else { a },
                    0,
                    &cid,
                ),
                1 => rec(10_000 + i, &ac, seq, c, a, 0, &cid),
                _ => rec(10_000 + i, &gc, seq, b, 0, g, &cid),
            }
        })
        .collect();
    assert_eq!(s.insert_messages(&[], &[]).await.unwrap(), 0);
    assert_eq!(s.insert_messages(&batch, &[]).await.unwrap(), 1500);

    for conv in [&ab, &ac, &gc] {
        let h = s.history(conv, View::ALL, u64::MAX, 1000).await.unwrap();
        assert_eq!(seqs(&h), (1..=500).rev().collect::<Vec<u64>>(), "{conv}");
    }
    // Every field survives, 0 becomes NULL (None).
    let first_group = s.history(&gc, View::ALL, 2, 1).await.unwrap();
    assert_eq!(
        first_group,
        vec![MessageRow {
            id: 10_002,
            conv: gc.clone(),
            seq: 1,
            sender: b,
            to_user: None,
            to_group: Some(g),
            content: "m10002 'quoted' \"é\" \u{1F600}".into(),
            content_type: "text".into(),
            ts_ms: 1_700_000_010_002,
        }]
    );
    let first_pair = &s.history(&ab, View::ALL, 2, 1).await.unwrap()[0];
    assert_eq!(
        (
            first_pair.id,
            first_pair.sender,
            first_pair.to_user,
            first_pair.to_group
        ),
        (10_000, a, Some(b), None)
    );

    let all = [ab.clone(), ac.clone(), gc.clone(), "p:0:404".to_string()];
    let mut expected = vec![(ab.clone(), 500), (ac.clone(), 500), (gc.clone(), 500)];
    expected.sort();
    assert_eq!(
        sorted_max_seqs(s, &all).await,
        expected,
        "a conversation with no row is absent"
    );
    assert!(s.max_seqs(&[]).await.unwrap().is_empty());

    // The pair conversations are in both parties' lists (and nobody else's), with their last message.
    let convs_of = |u: u64| async move {
        let mut v: Vec<(String, u64, Option<u64>)> = s
            .conversations(u)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.conv, c.max_seq, c.last_message.map(|m| m.id)))
            .collect();
        v.sort();
        v
    };
    let last_ab = Some(10_000 + 3 * 499);
    let last_ac = Some(10_001 + 3 * 499);
    let last_g = Some(10_002 + 3 * 499);
    let mut want_a = vec![
        (ab.clone(), 500, last_ab),
        (ac.clone(), 500, last_ac),
        (gc.clone(), 500, last_g),
    ];
    want_a.sort();
    let mut want_b = vec![(ab.clone(), 500, last_ab), (gc.clone(), 500, last_g)];
    want_b.sort();
    assert_eq!(convs_of(a).await, want_a);
    assert_eq!(convs_of(b).await, want_b);
    assert_eq!(convs_of(c).await, vec![(ac.clone(), 500, last_ac)]);

    // Fences ride with a batch (or alone), only ever rise, and are per partition.
    assert_eq!(s.fence(3).await.unwrap(), 0);
    assert_eq!(s.insert_messages(&[], &[(3, 5), (4, 1)]).await.unwrap(), 0);
    assert_eq!(s.insert_messages(&[], &[(3, 4)]).await.unwrap(), 0);
    assert_eq!(
        (s.fence(3).await.unwrap(), s.fence(4).await.unwrap()),
        (5, 1)
    );
    assert_eq!(s.insert_messages(&[], &[(3, 7)]).await.unwrap(), 0);
    assert_eq!(s.fence(3).await.unwrap(), 7);

    // A replay of the whole batch stores nothing and changes nothing.
    assert_eq!(s.insert_messages(&batch, &[]).await.unwrap(), 0);
    assert_eq!(
        s.history(&ab, View::ALL, u64::MAX, 1000)
            .await
            .unwrap()
            .len(),
        500
    );
    assert_eq!(sorted_max_seqs(s, &all).await, expected);
    assert_eq!(convs_of(b).await, want_b);

    // Old and new mixed: only the new are stored, and max_seq follows them.
    let mut mixed: Vec<Stored> = batch[1400..].to_vec();
    mixed.extend((0..50u64).map(|i| rec(20_000 + i, &ab, 501 + i, a, b, 0, &format!("n{i}"))));
    assert_eq!(s.insert_messages(&mixed, &[]).await.unwrap(), 50);
    assert_eq!(
        s.history(&ab, View::ALL, u64::MAX, 1000)
            .await
            .unwrap()
            .len(),
        550
    );
    assert_eq!(
        s.max_seqs(std::slice::from_ref(&ab)).await.unwrap(),
        vec![(ab.clone(), 550)]
    );

    // An older batch replayed later never moves max_seq back, nor does a new row with a
    // lower seq than the conversation's highest.
    assert_eq!(s.insert_messages(&batch[..30], &[]).await.unwrap(), 0);
    assert_eq!(
        s.max_seqs(std::slice::from_ref(&ab)).await.unwrap(),
        vec![(ab.clone(), 550)]
    );
    let late = format!("p:{}:{}", b.min(c), b.max(c));
    assert_eq!(
        s.insert_messages(&[rec(30_000, &late, 5, b, c, 0, "l5")], &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.insert_messages(&[rec(30_001, &late, 3, b, c, 0, "l3")], &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.max_seqs(std::slice::from_ref(&late)).await.unwrap(),
        vec![(late.clone(), 5)]
    );

    // Each unique key on its own makes a row a duplicate: id, (conv, seq), (sender, cid).
    let same_id = rec(10_000, &late, 9, b, c, 0, "fresh-1");
    let same_seq = rec(30_002, &late, 5, b, c, 0, "fresh-2");
    let same_cid = rec(30_003, &late, 10, b, c, 0, "l5");
    assert_eq!(
        s.insert_messages(&[same_id, same_seq, same_cid], &[])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        seqs(&s.messages_after(&late, 0, 10).await.unwrap()),
        vec![3, 5]
    );
    assert_eq!(s.messages_after(&late, 0, 10).await.unwrap()[1].id, 30_000);
    // max_seq is the last seq handed out (the schema's word), so it follows the batch even
    // where the batch's rows were refused.
    assert_eq!(
        s.max_seqs(std::slice::from_ref(&late)).await.unwrap(),
        vec![(late.clone(), 10)]
    );

    // find_by_cids: present pairs with their rows; a wrong sender, another case, or an
    // unknown cid are absent.
    let mut found = s
        .find_by_cids(&[
            (a, "c0".into()),
            (c, "c1".into()),
            (b, "c0".into()),
            (a, "C0".into()),
            (a, "nope".into()),
            (a, "n7".into()),
        ])
        .await
        .unwrap();
    found.sort_by_key(|(_, cid, _)| cid.clone());
    let summary: Vec<(u64, &str, u64, u64)> = found
        .iter()
        .map(|(u, cid, m)| (*u, cid.as_str(), m.id, m.seq))
        .collect();
    assert_eq!(
        summary,
        vec![
            (a, "c0", 10_000, 1),
            (c, "c1", 10_001, 1),
            (a, "n7", 20_007, 508)
        ]
    );
    assert_eq!(found[0].2.conv, ab);
    assert!(s.find_by_cids(&[]).await.unwrap().is_empty());
    // More keys than one statement takes.
    let keys: Vec<(u64, String)> = batch.iter().map(|m| (m.from, m.cid.clone())).collect();
    let found = s.find_by_cids(&keys).await.unwrap();
    assert_eq!(found.len(), 1500);
    assert!(found
        .iter()
        .all(|(u, cid, m)| *u == m.sender && *cid == format!("c{}", m.id - 10_000)));

    // messages_after: oldest first, bounded, past the end is empty.
    assert_eq!(
        seqs(&s.messages_after(&ab, 0, 2).await.unwrap()),
        vec![1, 2]
    );
    assert_eq!(
        seqs(&s.messages_after(&ab, 545, 3).await.unwrap()),
        vec![546, 547, 548]
    );
    assert_eq!(
        seqs(&s.messages_after(&ab, 548, 100).await.unwrap()),
        vec![549, 550]
    );
    assert!(s.messages_after(&ab, 550, 100).await.unwrap().is_empty());
    assert!(s
        .messages_after("p:0:404", 0, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.messages_after(&gc, 499, 5).await.unwrap()[0].to_group,
        Some(g)
    );

    let mut ab_ids = vec![a, b];
    ab_ids.sort();
    let roster = |members| {
        Some(Roster {
            public: false,
            members,
        })
    };
    assert_eq!(s.roster(g).await.unwrap(), roster(ab_ids));
    assert_eq!(s.roster(g + 1000).await.unwrap(), None);
    assert!(s.remove_member(g, b).await.unwrap());
    assert_eq!(s.roster(g).await.unwrap(), roster(vec![a]));
}

#[tokio::test]
async fn message_batches_on_mysql() {
    let store = fresh_mysql().await;
    message_batches(&store).await;
    drop_mysql(store).await;
}

#[tokio::test]
async fn message_batches_on_sqlite() {
    let dir = tempdir();
    message_batches(&fresh_sqlite(&dir).await).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// SQLite starts its write-ahead log over only when a writer begins with every frame already
/// checkpointed; with back-to-back commits a checkpoint on another connection never catches
/// up, and the log grew for as long as the load lasted (1.3 GB in 12 s at 10k messages/s).
/// With small bounds, the log must start over (the file is cut back to its limit, so its size
/// falls) and stay within a few ticks' growth of the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_ahead_log_stays_bounded_under_back_to_back_commits() {
    let dir = tempdir();
    let wal = im_store::WalLimits {
        restart_frames: 256,
        journal_limit_bytes: 1 << 20,
    };
    let s = im_store::SqliteStore::open_with(&dir.join("im.db"), wal)
        .await
        .unwrap();
    s.migrate().await.unwrap();
    // New databases use small pages: each commit writes the pages it touched whole, so the
    // page size is the log's bytes per touched index leaf (sql/mod.rs, SQLITE_PAGE_BYTES).
    let page: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(page, 1024);
    let log = dir.join("im.db-wal");
    let (mut largest, mut shrank, mut last) = (0u64, 0u32, 0u64);
    let mut seqs = vec![0u64; 200];
    let mut id = 0u64;
    let started = std::time::Instant::now();
    // Until the log has started over a few times, or 20 s (it must not take that long).
    while shrank < 3 && started.elapsed() < std::time::Duration::from_secs(20) {
        let batch: Vec<Stored> = (0..30)
            .map(|i| {
                id += 1;
                // Spread over 200 conversations, so each commit touches many index pages.
                let c = ((id * 7919 + i) % 200) as usize;
                seqs[c] += 1;
                let cid = format!("c{id}");
                rec(
                    id,
                    &format!("p:{}:{}", c + 1, c + 1001),
                    seqs[c],
                    c as u64 + 1,
                    0,
                    0,
                    &cid,
                )
            })
            .collect();
        assert_eq!(s.insert_messages(&batch, &[]).await.unwrap(), 30);
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if size < last {
            shrank += 1;
        }
        largest = largest.max(size);
        last = size;
    }
    assert!(
        shrank >= 3,
        "the log never started over ({largest} bytes at most, {id} rows)"
    );
    assert!(largest < 64 << 20, "the log reached {largest} bytes");
    // Nothing was lost on the way.
    let stored = s.messages_after("p:1:1001", 0, 10_000).await.unwrap();
    assert_eq!(stored.len() as u64, seqs[0]);
    std::fs::remove_dir_all(&dir).ok();
}

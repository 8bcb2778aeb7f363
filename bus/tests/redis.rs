//! Presence and revocations on the real Redis (127.0.0.1:6379, or IM_TEST_REDIS_URL). Keys
//! carry this process's id, so parallel runs do not meet.
#![cfg(feature = "redis")]

use im_bus::presence::{Change, Connection, Presence, RedisPresence};
use im_bus::revocation::{self, RedisRevocations, Revocations, RevokedSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn url() -> String {
    std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn required(e: String) -> ! {
    panic!(
        "Redis is required for this test at {} ({e}); scripts/test starts it",
        url()
    )
}

#[tokio::test]
async fn revoked_tokens_live_in_redis_until_they_would_have_expired() {
    let r = RedisRevocations::connect(&url())
        .await
        .unwrap_or_else(|e| required(e));
    let pid = std::process::id();
    let (j1, j2, j3) = (
        format!("t{pid}-1"),
        format!("t{pid}-2"),
        format!("t{pid}-3"),
    );
    let now = im_shared::unix_ms() / 1000;
    assert!(!r.is_revoked(&j1, now).await.unwrap());
    r.revoke(&j1, now + 60).await.unwrap();
    assert!(r.is_revoked(&j1, now).await.unwrap());
    assert!(!r.is_revoked(&j2, now).await.unwrap());
    // A token that is about to expire is kept at least a second, then Redis forgets it.
    r.revoke(&j3, now).await.unwrap();
    assert!(r.is_revoked(&j3, now).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        !r.is_revoked(&j3, now).await.unwrap(),
        "the key expired with the token"
    );
}

#[tokio::test]
async fn a_gateways_set_follows_revocations_made_before_and_after_it_starts() {
    let r = RedisRevocations::connect(&url())
        .await
        .unwrap_or_else(|e| required(e));
    let pid = std::process::id();
    let (before, after) = (format!("f{pid}-before"), format!("f{pid}-after"));
    let now = im_shared::unix_ms() / 1000;
    r.revoke(&before, now + 60).await.unwrap();
    let set = Arc::new(RevokedSet::default());
    let stop = Arc::new(AtomicBool::new(false));
    revocation::redis::follow(&url(), set.clone(), stop.clone()).unwrap();
    let seen = |jti: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if set.contains(jti, now) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    assert!(seen(&before), "loaded at start");
    r.revoke(&after, now + 60).await.unwrap();
    assert!(seen(&after), "followed on the channel");
    assert!(
        !set.contains(&after, now + 60),
        "gone once the token would be"
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
}

#[tokio::test]
async fn presence_routes_to_the_gateways_holding_a_user() {
    let p = RedisPresence::connect(&url(), 60)
        .await
        .unwrap_or_else(|e| required(e));
    // Users far above any test's ids, distinct per process.
    let base = 9_000_000_000 + std::process::id() as u64 * 10;
    let (u1, u2, u3) = (base + 1, base + 2, base + 3);
    let online = |user, conn, jti: &str| Change::Online {
        user,
        conn,
        jti: jti.into(),
        device: Some("phone".into()),
    };
    let counts = p
        .apply(
            "gw-a",
            &[
                online(u1, 10, "t1"),
                online(u1, 11, "t2"),
                online(u2, 12, "t3"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(counts, [1, 2, 1], "connections per user after each change");
    let counts = p
        .apply(
            "gw-b",
            &[online(u1, 10, "t4"), Change::Refresh(vec![u1, u2])],
        )
        .await
        .unwrap();
    assert_eq!(counts, [3, 0]);
    let g = p.gateways(&[u1, u2, u3]).await.unwrap();
    assert_eq!(g[&u1], vec!["gw-a", "gw-b"]);
    assert_eq!(g[&u2], vec!["gw-a"]);
    assert!(!g.contains_key(&u3));
    let mut c = p.connections(u1).await.unwrap();
    c.sort();
    let conn = |gateway: &str, conn, jti: &str| Connection {
        gateway: gateway.into(),
        conn,
        jti: jti.into(),
        device: "phone".into(),
    };
    assert_eq!(
        c,
        vec![
            conn("gw-a", 10, "t1"),
            conn("gw-a", 11, "t2"),
            conn("gw-b", 10, "t4")
        ]
    );
    let last = [Change::Offline { user: u2, conn: 12 }];
    assert_eq!(p.apply("gw-a", &last).await.unwrap(), [0]);
    let gone = [
        Change::Offline { user: u1, conn: 10 },
        Change::Offline { user: u1, conn: 11 },
    ];
    assert_eq!(p.apply("gw-a", &gone).await.unwrap(), [2, 1]);
    assert!(p.gateways(&[u2]).await.unwrap().is_empty());
    assert_eq!(p.gateways(&[u1]).await.unwrap()[&u1], vec!["gw-b"]);
    let last = [Change::Offline { user: u1, conn: 10 }];
    assert_eq!(p.apply("gw-b", &last).await.unwrap(), [0]);
}

/// Two gateways opening, then closing, one user's connections at the same moment: exactly one
/// of them sees the first connection (count 1) and exactly one the last (count 0), whatever
/// the interleaving — what presence events rest on (docs/PROTOCOL.md, "Presence"). (A local
/// Redis runs each client's pipelined buffer in one go, so this passes without the `MULTI`
/// too; `MULTI` is what guarantees it when a pipeline arrives in pieces, as on a busy network.)
#[tokio::test]
async fn of_two_gateways_racing_exactly_one_sees_the_first_and_the_last_connection() {
    let a = RedisPresence::connect(&url(), 60)
        .await
        .unwrap_or_else(|e| required(e));
    // A second client: its own connection, so the two writes race on the server.
    let b = RedisPresence::connect(&url(), 60).await.unwrap();
    let base = 9_100_000_000 + std::process::id() as u64 * 1_000;
    for user in base..base + 50 {
        let open = |conn| Change::Online {
            user,
            conn,
            jti: "j".into(),
            device: None,
        };
        let (x, y) = ([open(1)], [open(2)]);
        let (ca, cb) = tokio::join!(a.apply("gw-a", &x), b.apply("gw-b", &y));
        let mut counts = [ca.unwrap()[0], cb.unwrap()[0]];
        counts.sort_unstable();
        assert_eq!(counts, [1, 2], "opens of user {user}");
        let x = [Change::Offline { user, conn: 1 }];
        let y = [Change::Offline { user, conn: 2 }];
        let (ca, cb) = tokio::join!(a.apply("gw-a", &x), b.apply("gw-b", &y));
        let mut counts = [ca.unwrap()[0], cb.unwrap()[0]];
        counts.sort_unstable();
        assert_eq!(counts, [0, 1], "closes of user {user}");
    }
}

/// The gateway registry (`registry`): the processes of one URL summed, a draining one left
/// out, and a URL whose every process drains not offered at all.
#[tokio::test]
async fn the_registry_offers_live_gateways_summed_over_their_processes() {
    use im_bus::registry::{Announcement, RedisRegistry, Registry};
    let r = RedisRegistry::open(&url()).unwrap_or_else(|e| required(e));
    let pid = std::process::id();
    let (a, b) = (
        format!("ws://a-{pid}.test/ws"),
        format!("ws://b-{pid}.test/ws"),
    );
    let ann = |ws_url: &str, process: &str, connections: u64, draining: bool| Announcement {
        ws_url: ws_url.into(),
        process: process.into(),
        connections,
        shards: 2,
        draining,
    };
    r.announce(&ann(&a, "p0", 10, false))
        .await
        .unwrap_or_else(|e| required(e));
    r.announce(&ann(&a, "p1", 5, false)).await.unwrap();
    r.announce(&ann(&b, "p0", 1, false)).await.unwrap();
    let ours = |live: Vec<im_bus::registry::Gateway>| -> Vec<(String, u64, u32)> {
        live.into_iter()
            .filter(|g| g.ws_url.contains(&format!("-{pid}.")))
            .map(|g| (g.ws_url, g.connections, g.shards))
            .collect()
    };
    assert_eq!(
        ours(r.live().await.unwrap()),
        [(a.clone(), 15, 4), (b.clone(), 1, 2)]
    );
    r.announce(&ann(&a, "p1", 5, true)).await.unwrap();
    r.announce(&ann(&b, "p0", 1, true)).await.unwrap();
    assert_eq!(
        ours(r.live().await.unwrap()),
        [(a.clone(), 10, 2)],
        "draining processes and URLs are left out"
    );
    r.announce(&ann(&a, "p0", 10, true)).await.unwrap();
    assert!(ours(r.live().await.unwrap()).is_empty());
    // A process that died long ago (stamped at 1 ms): the next announcement deletes it.
    let client = redis::Client::open(url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let k = format!("im:gw:url:{a}");
    let _: () = redis::cmd("HSET")
        .arg(&k)
        .arg("dead")
        .arg("5 1 1 0")
        .query_async(&mut c)
        .await
        .unwrap();
    r.announce(&ann(&a, "p0", 10, false)).await.unwrap();
    let dead: bool = redis::cmd("HEXISTS")
        .arg(&k)
        .arg("dead")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!dead, "a dead process's field is deleted");
    assert_eq!(ours(r.live().await.unwrap()), [(a.clone(), 10, 2)]);
}

//! Snowflake worker leases on a real Redis: the machine's (127.0.0.1:6379, or
//! IM_TEST_REDIS_URL) with a key prefix of this test's own, and a private `redis-server` for
//! the outage, which this test starts and kills.
#![cfg(feature = "redis")]

use im_bus::lease::{acquire, HeldLease, LeaseSettings};
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn url() -> String {
    std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn settings(prefix: &str) -> LeaseSettings {
    LeaseSettings {
        prefix: format!("im:test:{}:{prefix}:", std::process::id()),
        ttl: Duration::from_millis(1_500),
        renew_every: Duration::from_millis(200),
        margin: Duration::from_millis(300),
    }
}

async fn take(
    url: &str,
    holder: &str,
    want: Option<u16>,
    s: &LeaseSettings,
) -> Result<(HeldLease, watch::Sender<bool>), String> {
    let (stop, rx) = watch::channel(false);
    let held = acquire(url, holder, want, 5, s.clone(), rx).await?;
    Ok((held, stop))
}

/// Waits up to `within` for `f` to hold.
async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test]
async fn instances_lease_distinct_worker_ids_and_a_held_id_is_refused() {
    let s = settings("distinct");
    let (a, stop_a) = take(&url(), "logic-a", None, &s)
        .await
        .expect("Redis is required");
    let (b, _stop_b) = take(&url(), "logic-b", None, &s).await.unwrap();
    assert_eq!(a.lease.current(), Some(5), "the first takes its hint");
    assert_eq!(b.lease.current(), Some(6), "the second, the next free id");
    // A third started while the first's lease is held: asking for its id is refused
    // with who holds it; asking for none gets another.
    let err = take(&url(), "logic-c", Some(5), &s).await.err().unwrap();
    assert!(err.contains("leased by logic-a/"), "{err}");
    let (c, _stop_c) = take(&url(), "logic-c", None, &s).await.unwrap();
    assert_eq!(c.lease.current(), Some(7));
    // Leases outlive their TTL while renewed.
    tokio::time::sleep(s.ttl * 2).await;
    assert_eq!(
        (a.lease.current(), b.lease.current(), c.lease.current()),
        (Some(5), Some(6), Some(7))
    );
    // Stopping releases the id at once, and stops minting.
    stop_a.send(true).unwrap();
    a.keeper.await.unwrap();
    assert_eq!(a.lease.current(), None);
    let (d, _stop_d) = take(&url(), "logic-d", Some(5), &s).await.unwrap();
    assert_eq!(d.lease.current(), Some(5));
}

#[tokio::test]
async fn a_lease_taken_over_by_another_holder_stops_minting_and_moves_to_a_free_id() {
    let s = settings("stolen");
    let (a, _stop) = take(&url(), "logic-a", None, &s)
        .await
        .expect("Redis is required");
    assert_eq!(a.lease.current(), Some(5));
    // As if the key had expired during an outage and another instance had taken the id.
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg(format!("{}5", s.prefix))
        .arg("someone-else")
        .arg("PX")
        .arg(10_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let moved = eventually(
        Duration::from_secs(3),
        || matches!(a.lease.current(), Some(w) if w != 5),
    )
    .await;
    assert!(moved, "still {:?}", a.lease.current());
    let owner: String = redis::cmd("GET")
        .arg(format!("{}5", s.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        owner, "someone-else",
        "the other holder's key is left alone"
    );
}

/// A private `redis-server` on a free port, killed with the guard.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        Self::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) is required");
        // Killed and reaped by Drop, also when it never listens.
        let redis = PrivateRedis { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not listen on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_down_mints_until_the_lease_runs_out_then_leases_again_when_it_is_back() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let redis = PrivateRedis::start(port);
    let s = settings("outage");
    let (a, _stop) = take(&redis.url(), "logic-a", None, &s).await.unwrap();
    assert_eq!(a.lease.current(), Some(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    drop(redis);
    // Still minting on the last renewal's credit...
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.lease.current(), Some(5), "minting stopped at once");
    // ...until it runs out: no later than the TTL less the margin after the last renewal.
    let stopped = eventually(s.ttl, || a.lease.current().is_none()).await;
    assert!(
        stopped,
        "still minting {:?} after the kill",
        killed.elapsed()
    );
    assert!(killed.elapsed() <= s.ttl, "{:?}", killed.elapsed());
    // Redis back (empty: the key is gone): the keeper leases an id again.
    let _redis = PrivateRedis::start(port);
    let back = eventually(Duration::from_secs(5), || a.lease.current().is_some()).await;
    assert!(back, "no lease after Redis came back");
}

/// A Redis that refuses this process (here: it wants a password we do not have) is reported
/// by the services' first connection with Redis's own reason, instead of being retried
/// quietly by a connection manager for minutes.
#[tokio::test]
async fn a_redis_that_refuses_us_is_reported_with_its_reason() {
    use im_bus::presence::RedisPresence;
    use im_bus::revocation::RedisRevocations;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let redis = PrivateRedis::start_with(port, &["--requirepass", "not-ours"]);
    let e = RedisRevocations::connect(&redis.url())
        .await
        .err()
        .expect("connected without the password");
    assert!(e.contains("NOAUTH") || e.contains("Authentication"), "{e}");
    let e = RedisPresence::connect(&redis.url(), 60)
        .await
        .err()
        .expect("connected without the password");
    assert!(e.contains("NOAUTH") || e.contains("Authentication"), "{e}");
}

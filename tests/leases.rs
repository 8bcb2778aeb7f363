//! Snowflake worker leases across real `im logic` processes, MariaDB and Redis: instances get
//! distinct worker ids (and mint with them), an instance asking for a held id refuses to
//! start and names the holder, and a stopped instance frees its id at once.
//!
//! The instances serve REST only (`--no-pipeline`): then `POST /messages/send` mints the id
//! in the API itself, so the ids it answers show the worker without a broker.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;

const WORKER_BITS_SHIFT: u32 = 12;

fn spawn_logic(
    dir: &std::path::Path,
    name: &str,
    db: &str,
    redis: &str,
    worker: Option<u16>,
) -> (Proc, SocketAddr) {
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = im();
    cmd.args(["logic", "--no-pipeline", "--api-listen", &api.to_string()])
        .args([
            "--mysql-url",
            db,
            "--redis-url",
            redis,
            "--jwt-secret",
            SECRET,
        ])
        // The same logic id for all: the same first choice of worker id.
        .args(["--argon2-m-kib", "8", "--logic-id", "logic-lease"])
        .env("RUST_LOG", "info");
    if let Some(w) = worker {
        cmd.args(["--worker-id", &w.to_string()]);
    }
    (Proc::spawn(name, cmd, dir), api)
}

/// The worker id a process's log says it leased.
fn leased_worker(p: &Proc) -> u16 {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        if let Some(rest) = log.split("leased Snowflake worker ").nth(1) {
            let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            return n.parse().unwrap();
        }
        assert!(
            Instant::now() < end,
            "{} leased nothing:\n{}",
            p.name,
            p.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn login(api: SocketAddr, name: &str, register: bool) -> (u64, String) {
    let body = json!({"username": name, "password": "password-123"});
    if register {
        let (st, v) = http(api, "POST", "/api/v1/users/register", None, &body);
        assert_eq!(st, 201, "{v}");
    }
    let (st, v) = http(api, "POST", "/api/v1/auth/login", None, &body);
    assert_eq!(st, 200, "{v}");
    (
        v["user_id"].as_str().unwrap().parse().unwrap(),
        v["token"].as_str().unwrap().to_string(),
    )
}

/// The worker id inside the id of a message sent through `api`.
fn minted_worker(api: SocketAddr, token: &str, to: u64, cid: &str) -> u16 {
    let (st, v): (u16, Value) = http(
        api,
        "POST",
        "/api/v1/messages/send",
        Some(token),
        &json!({"to": to.to_string(), "content": "hello", "cid": cid}),
    );
    assert_eq!(st, 200, "{v}");
    let id: u64 = v["id"].as_str().unwrap().parse().unwrap();
    ((id >> WORKER_BITS_SHIFT) & 1023) as u16
}

#[test]
fn logic_instances_lease_distinct_worker_ids_and_a_held_id_refuses_to_start() {
    let dir = scratch("leases");
    let db = fresh_db("leases");
    let redis = fresh_redis(6);

    let (mut a, api_a) = spawn_logic(&dir, "logic-a", &db, &redis, None);
    wait_port(api_a, "im logic a", Duration::from_secs(60));
    let (b, api_b) = spawn_logic(&dir, "logic-b", &db, &redis, None);
    wait_port(api_b, "im logic b", Duration::from_secs(60));
    let (wa, wb) = (leased_worker(&a), leased_worker(&b));
    assert_ne!(wa, wb, "two instances, one worker id");
    assert_eq!(wb, (wa + 1) % 1024, "the second takes the next free id");

    // Each mints with its own.
    let (alice, ta) = login(api_a, "alice", true);
    let (bob, tb) = login(api_a, "bob", true);
    assert_eq!(minted_worker(api_a, &ta, bob, "c1"), wa);
    assert_eq!(minted_worker(api_b, &tb, alice, "c2"), wb);

    // A third asking for a's id while a holds it: a clear error, and no start.
    let (mut c, api_c) = spawn_logic(&dir, "logic-c", &db, &redis, Some(wa));
    let end = Instant::now() + Duration::from_secs(30);
    while c.alive() {
        assert!(Instant::now() < end, "logic-c started with a held id");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = c.log_tail();
    assert!(
        log.contains(&format!(
            "Snowflake worker id {wa} is leased by logic-lease/"
        )),
        "{log}"
    );
    assert!(std::net::TcpStream::connect(api_c).is_err());

    // a stops: its id is free at once, for an instance that asks for it.
    assert!(a.stop().is_some_and(|s| s.success()), "{}", a.log_tail());
    let (d, api_d) = spawn_logic(&dir, "logic-d", &db, &redis, Some(wa));
    wait_port(api_d, "im logic d", Duration::from_secs(60));
    assert_eq!(leased_worker(&d), wa);
    let (_, td) = login(api_d, "alice", false);
    assert_eq!(minted_worker(api_d, &td, bob, "c3"), wa);
    drop((b, d));
}

//! End to end through the distributed pipeline: a real Kafka-protocol broker (nisshi), MariaDB
//! and Redis, with `im gateway` ×2, `im logic` and `im persist` as separate processes.
//! (The broker is installed by `.ci/run`; see tests/support.)

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::load;
use support::*;

/// One deployment at a time: each is a broker and five processes on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until Redis shows `n` connections of `user` (presence is written asynchronously).
fn wait_presence(c: &Cluster, user: u64, n: usize) {
    let db = c.redis.rsplit('/').next().unwrap().to_string();
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let out = std::process::Command::new("redis-cli")
            .args(["-n", &db, "HLEN", &format!("im:presence:{user}")])
            .output()
            .unwrap();
        let have: usize = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if have == n {
            return;
        }
        assert!(
            Instant::now() < end,
            "presence of {user}: {have} connections, want {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn msgs(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|v| v["type"] == "msg").collect()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    msgs(frames)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect()
}

const T: Duration = Duration::from_secs(20);

#[test]
fn messages_cross_gateways_once_in_order_and_an_offline_device_syncs() {
    let _g = serial();
    let c = Cluster::start("delivery", 1, 2);
    let (alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    let (carol, tc) = c.user("carol");
    let mut a0 = c.ws(0, &ta); // alice's sending device, on gateway 0
    let mut a1 = c.ws(1, &ta); // alice's other device, on gateway 1
    let mut b = c.ws(1, &tb);
    let mut cr = c.ws(0, &tc);
    wait_presence(&c, alice, 2);
    wait_presence(&c, bob, 1);
    wait_presence(&c, carol, 1);

    // 1:1, across gateways: acks in seq order, every other device gets each message once.
    for i in 0..20 {
        a0.send(json!({"type": "send", "cid": format!("p{i}"), "to": bob.to_string(), "content": format!("hello {i}")}));
    }
    let mut acks = Vec::new();
    let mut seen = Vec::new();
    while acks.len() < 20 {
        acks.push(a0.until(T, &mut seen, |v| v["type"] == "sent"));
    }
    assert!(
        seen.is_empty(),
        "the sending device gets acks, not its own messages: {seen:?}\n{}",
        c.logs()
    );
    let ack_seqs: Vec<u64> = acks.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(ack_seqs, (1..=20).collect::<Vec<_>>());
    let conv = format!("p:{}:{}", alice.min(bob), alice.max(bob));
    assert!(acks.iter().all(|v| v["conv"] == conv.as_str()));
    for ws in [&mut b, &mut a1] {
        let mut got = Vec::new();
        while seqs(&got).len() < 20 {
            let v = ws.until(T, &mut Vec::new(), |v| v["type"] == "msg");
            got.push(v);
        }
        got.extend(ws.drain(Duration::from_millis(500)));
        assert_eq!(
            seqs(&got),
            (1..=20).collect::<Vec<_>>(),
            "once each, in seq order"
        );
        assert_eq!(got[3]["content"], "hello 3");
        assert_eq!(got[3]["from"], alice.to_string());
        assert_eq!(got[3]["id"], acks[3]["id"]);
    }

    // Marked read the moment it arrives, before persist has stored it (as the browser client
    // does, over REST): the read position still covers it (logic waits, bounded, for the
    // database to hold it).
    a0.send(json!({"type": "send", "cid": "p20", "to": bob.to_string(), "content": "read me"}));
    let m = b.until(T, &mut Vec::new(), |v| v["type"] == "msg");
    assert_eq!(m["seq"], 21);
    let (st, v) = http(
        c.api,
        "PUT",
        &format!("/api/v1/conversations/{conv}"),
        Some(&tb),
        &json!({"read_seq": 21}),
    );
    assert_eq!(st, 204, "{v}");
    let end = std::time::Instant::now() + T;
    loop {
        let (st, convs) = http(
            c.api,
            "GET",
            "/api/v1/conversations",
            Some(&tb),
            &Value::Null,
        );
        assert_eq!(st, 200, "{convs}");
        let entry = convs
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["conv"] == conv.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        if entry["read_seq"] == 21 && entry["unread"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "bob's read of seq 21 did not stick: {entry}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut early = Vec::new();
    a0.until(T, &mut early, |v| v["type"] == "sent" && v["cid"] == "p20");
    let mut early1 = Vec::new();
    a1.until(T, &mut early1, |v| v["type"] == "msg" && v["seq"] == 21);

    // Bob's read reached both of Alice's devices as a receipt (✓✓ up to 21).
    for (ws, early) in [(&mut a0, early), (&mut a1, early1)] {
        let receipt = |v: &Value| v["type"] == "receipt";
        let r = match early.into_iter().find(receipt) {
            Some(r) => r,
            None => ws.until(T, &mut Vec::new(), receipt),
        };
        assert_eq!(
            (r["conv"].as_str(), r["from"].as_str(), r["seq"].as_u64()),
            (
                Some(conv.as_str()),
                Some(bob.to_string().as_str()),
                Some(21)
            ),
            "{r}"
        );
    }
    // Alice reads on one device (a WebSocket `read`): her other device's unread count follows
    // (`read`), Bob gets a receipt, and the reading device is not told its own read.
    a0.send(json!({"type": "read", "conv": conv, "seq": 21}));
    let r = a1.until(T, &mut Vec::new(), |v| v["type"] == "read");
    assert_eq!(
        (r["conv"].as_str(), r["seq"].as_u64()),
        (Some(conv.as_str()), Some(21))
    );
    let r = b.until(T, &mut Vec::new(), |v| v["type"] == "receipt");
    assert_eq!(
        (r["from"].as_str(), r["seq"].as_u64()),
        (Some(alice.to_string().as_str()), Some(21))
    );
    let own: Vec<Value> = a0.drain(Duration::from_millis(300));
    assert!(
        own.iter().all(|v| v["type"] != "read"),
        "the reading device was told: {own:?}"
    );

    // A group: created and joined over REST, fanned out to members on both gateways.
    let gid = c.group(&ta, "team", &[&tb, &tc]);
    for i in 0..3 {
        a0.send(json!({"type": "send", "cid": format!("g{i}"), "group": gid.to_string(), "content": format!("all {i}")}));
        let ack = a0.until(T, &mut Vec::new(), |v| v["type"] == "sent");
        assert_eq!(ack["seq"], i + 1);
    }
    for ws in [&mut b, &mut cr, &mut a1] {
        let mut got = Vec::new();
        while seqs(&got).len() < 3 {
            got.push(ws.until(T, &mut Vec::new(), |v| v["type"] == "msg"));
        }
        got.extend(ws.drain(Duration::from_millis(300)));
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        let group = gid.to_string();
        assert!(msgs(&got).iter().all(|m| m["group"] == group.as_str()));
    }

    // Typing: relayed to the other members online, once per interval, never to the typist's
    // own devices, never stored.
    let gconv = format!("g:{gid}");
    a0.send(json!({"type": "typing", "conv": gconv}));
    a0.send(json!({"type": "typing", "conv": gconv}));
    for ws in [&mut b, &mut cr] {
        let t = ws.until(T, &mut Vec::new(), |v| v["type"] == "typing");
        assert_eq!(
            (t["conv"].as_str(), t["from"].as_str()),
            (Some(gconv.as_str()), Some(alice.to_string().as_str()))
        );
        let more = ws.drain(Duration::from_millis(500));
        assert!(
            more.iter().all(|v| v["type"] != "typing"),
            "the second, within the interval, is dropped: {more:?}"
        );
    }
    assert!(a1
        .drain(Duration::from_millis(200))
        .iter()
        .all(|v| v["type"] != "typing"));
    b.send(json!({"type": "typing", "conv": conv}));
    for ws in [&mut a0, &mut a1] {
        let t = ws.until(T, &mut Vec::new(), |v| v["type"] == "typing");
        assert_eq!(t["from"].as_str(), Some(bob.to_string().as_str()));
    }

    // Blocking: Carol blocks Bob. His WebSocket send to her is refused with the reason, and
    // her typing does not reach him; unblocked, he writes again.
    let block = format!("/api/v1/users/{bob}/block");
    let (st, v) = http(c.api, "PUT", &block, Some(&tc), &Value::Null);
    assert_eq!(st, 204, "{v}");
    b.send(json!({"type": "send", "cid": "blk1", "to": carol.to_string(), "content": "hello?"}));
    let e = b.until(T, &mut Vec::new(), |v| {
        v["type"] == "error" || v["type"] == "sent"
    });
    assert_eq!(
        (e["code"].as_u64(), e["cid"].as_str(), e["message"].as_str()),
        (
            Some(4030),
            Some("blk1"),
            Some("this user does not accept your messages")
        )
    );
    let pconv = format!("p:{}:{}", bob.min(carol), bob.max(carol));
    cr.send(json!({"type": "typing", "conv": pconv}));
    assert!(b
        .drain(Duration::from_millis(500))
        .iter()
        .all(|v| v["type"] != "typing"));
    let (st, v) = http(c.api, "DELETE", &block, Some(&tc), &Value::Null);
    assert_eq!(st, 204, "{v}");
    b.send(json!({"type": "send", "cid": "blk2", "to": carol.to_string(), "content": "hello"}));
    let ack = b.until(T, &mut Vec::new(), |v| {
        v["type"] == "error" || v["type"] == "sent"
    });
    assert_eq!(ack["type"], "sent", "{ack}");
    cr.until(T, &mut Vec::new(), |v| {
        v["type"] == "msg" && v["content"] == "hello"
    });

    // Carol goes offline; what she misses comes back by sync after her last seq.
    cr.close();
    wait_presence(&c, carol, 0);
    for i in 3..6 {
        a0.send(json!({"type": "send", "cid": format!("g{i}"), "group": gid.to_string(), "content": format!("while away {i}")}));
        a0.until(T, &mut Vec::new(), |v| v["type"] == "sent");
    }
    let mut cr = c.ws(0, &tc);
    cr.send(json!({"type": "sync", "conv": format!("g:{gid}"), "after": 3, "limit": 100}));
    let sync = cr.until(T, &mut Vec::new(), |v| v["type"] == "sync");
    let got: Vec<u64> = sync["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![4, 5, 6], "{sync}");
    assert_eq!(sync["messages"][0]["content"], "while away 3");
    assert_eq!(sync["more"], false);

    // REST sends go through the same pipeline: sequenced after the WebSocket ones, live.
    let (st, v) = http(
        c.api,
        "POST",
        "/api/v1/messages/send",
        Some(&ta),
        &json!({"to": bob.to_string(), "content": "via rest", "cid": "rest-1"}),
    );
    assert_eq!(st, 200, "{v}\n{}", c.logs());
    assert_eq!(v["seq"], 22);
    // (Bob also got the group messages sent while Carol was away.)
    let live = b.until(T, &mut Vec::new(), |v| {
        v["type"] == "msg" && v["conv"] == conv.as_str()
    });
    assert_eq!(
        (live["seq"].as_u64(), live["content"].as_str()),
        (Some(22), Some("via rest"))
    );
    // A retry of the same cid is the same message.
    let (_, again) = http(
        c.api,
        "POST",
        "/api/v1/messages/send",
        Some(&ta),
        &json!({"to": bob.to_string(), "content": "via rest", "cid": "rest-1"}),
    );
    assert_eq!(again["id"], v["id"]);

    // Refusals come back to the sender with the cid.
    let (_, outsider) = c.user("dave");
    let mut d = c.ws(1, &outsider);
    d.send(json!({"type": "send", "cid": "x1", "group": gid.to_string(), "content": "let me in"}));
    let e = d.until(T, &mut Vec::new(), |v| v["type"] == "error");
    assert_eq!(
        (e["code"].as_u64(), e["cid"].as_str()),
        (Some(4040), Some("x1")),
        "a private group does not exist for an outsider"
    );
    d.send(json!({"type": "send", "cid": "x2", "to": "999999", "content": "anyone?"}));
    let e = d.until(T, &mut Vec::new(), |v| v["type"] == "error");
    assert_eq!(
        (e["code"].as_u64(), e["cid"].as_str()),
        (Some(4040), Some("x2"))
    );
    d.send(json!({"type": "sync", "conv": conv, "after": 0, "limit": 10}));
    let e = d.until(T, &mut Vec::new(), |v| v["type"] == "error");
    assert_eq!(
        e["code"], 4040,
        "another pair's conversation does not exist for dave"
    );

    // Persist wrote everything once: 22 pair messages, 1 between Bob and Carol, 6 group ones.
    let end = Instant::now() + T;
    while mysql_query(&c.db, "SELECT COUNT(*) FROM messages") != "29" {
        assert!(
            Instant::now() < end,
            "rows: {}",
            mysql_query(&c.db, "SELECT COUNT(*) FROM messages")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        mysql_query(
            &c.db,
            &format!("SELECT max_seq FROM conversations WHERE conv = '{conv}'")
        ),
        "22"
    );

    // Both services count what went through them.
    let (st, text) = get_text(c.gateways[0].1, "/metrics");
    assert_eq!(st, 200);
    let produced = metric(&text, "im_bridge_produced_total{gateway=\"gw0\"}");
    assert!(produced.is_some_and(|n| n >= 28), "{text}");
    // The heaps: Rust's allocator (mimalloc, registered by the binary) and the C libraries'.
    let rust = metric(
        &text,
        "im_allocator_committed_bytes{allocator=\"mimalloc\"}",
    );
    assert!(rust.is_some_and(|n| n >= 1 << 20), "{text}");
    assert!(metric(&text, "im_malloc_in_use_bytes").is_some_and(|n| n > 0));
    let (st, text) = get_text(c.api, "/metrics");
    assert_eq!(st, 200);
    assert_eq!(metric(&text, "im_logic_messages_total"), Some(29), "{text}");
    assert!(
        metric(&text, "im_logic_retries_total").is_some_and(|n| n >= 1),
        "{text}"
    );
    assert!(
        metric(&text, "im_logic_refused_total").is_some_and(|n| n >= 2),
        "{text}"
    );

    // Dave joins by an invite after six group messages: sync shows him none of them, and the
    // next one arrives live (the group shows history from each member's join).
    let (st, v) = http(
        c.api,
        "POST",
        &format!("/api/v1/groups/{gid}/invites"),
        Some(&ta),
        &json!({"max_uses": 1}),
    );
    assert_eq!(st, 201, "{v}");
    let join = format!("/api/v1/invites/{}/join", v["token"].as_str().unwrap());
    let (st, v) = http(c.api, "POST", &join, Some(&outsider), &Value::Null);
    assert_eq!(st, 200, "{v}");
    d.send(json!({"type": "sync", "conv": gconv, "after": 0, "limit": 10}));
    let sync = d.until(T, &mut Vec::new(), |v| v["type"] == "sync");
    assert_eq!(sync["messages"], json!([]), "{sync}");
    a0.send(json!({"type": "send", "cid": "g6", "group": gid.to_string(), "content": "welcome"}));
    let live = d.until(T, &mut Vec::new(), |v| v["type"] == "msg");
    assert_eq!(
        (live["seq"].as_u64(), live["content"].as_str()),
        (Some(7), Some("welcome"))
    );
    d.send(json!({"type": "sync", "conv": gconv, "after": 0, "limit": 10}));
    let sync = d.until(T, &mut Vec::new(), |v| v["type"] == "sync");
    assert_eq!(sync["messages"].as_array().map(Vec::len), Some(1), "{sync}");
    assert_eq!(sync["messages"][0]["seq"], 7);

    // Logout closes the connections its token opened with 1008, and only those; the token
    // cannot open new ones, on any gateway.
    let (st, v) = http(
        c.api,
        "POST",
        "/api/v1/auth/login",
        None,
        &json!({"username": "bob", "password": "password-123"}),
    );
    assert_eq!(st, 200, "{v}");
    let tb2 = v["token"].as_str().unwrap().to_string();
    let mut b2 = c.ws(0, &tb2);
    wait_presence(&c, bob, 2);
    let (st, v) = http(
        c.api,
        "POST",
        "/api/v1/auth/logout",
        Some(&tb),
        &Value::Null,
    );
    assert_eq!(st, 204, "{v}");
    assert_eq!(b.close_code(T), Some(1008), "{}", c.logs());
    b2.send(json!({"type": "ping"}));
    b2.until(T, &mut Vec::new(), |v| v["type"] == "pong");
    for (_, addr) in &c.gateways {
        // The gateways learn of the logout over Redis pub/sub: a moment, not a round trip.
        let end = Instant::now() + Duration::from_secs(5);
        while Ws::upgrade_status(*addr, &tb) != 401 {
            assert!(
                Instant::now() < end,
                "a revoked token still upgrades on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The broker goes away: a sender gets a retryable error with its cid after a bounded
    // wait (the gateway's produce timeout, 5 s by default), and the connection stays open.
    let mut c = c;
    c.broker.kill9();
    let t0 = Instant::now();
    a0.send(json!({"type": "send", "cid": "down-1", "to": bob.to_string(), "content": "anyone?"}));
    let e = a0.until(T, &mut Vec::new(), |v| v["type"] == "error");
    assert_eq!(
        (e["code"].as_u64(), e["cid"].as_str()),
        (Some(5032), Some("down-1")),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    a0.send(json!({"type": "ping"}));
    a0.until(T, &mut Vec::new(), |v| v["type"] == "pong");
}

/// Presence (docs/PROTOCOL.md, "Presence") across two gateways: a contact's arrival is
/// told at once and their leaving after the debounce; a reload within it tells nobody;
/// their own other device gets the device list; someone who is not a contact hears
/// nothing; hiding one's presence tells contacts "offline" at once.
#[test]
fn presence_reaches_contacts_and_own_devices_across_gateways() {
    let _g = serial();
    let c = Cluster::start("presence", 1, 2);
    let (alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    let (carol, tc) = c.user("carol");
    // Alice and Bob are contacts (they wrote to each other); Carol wrote to Alice, who did
    // not answer: Carol is nobody to Alice.
    for (from, to) in [(&ta, bob), (&tb, alice), (&tc, alice)] {
        let body = json!({"to": to.to_string(), "content": "hi"});
        let (st, v) = http(c.api, "POST", "/api/v1/messages/send", Some(from), &body);
        assert_eq!(st, 200, "{v}");
    }
    // Contacts are read from the database: wait until persist has stored the exchange.
    let end = Instant::now() + T;
    let of_alice = format!("/api/v1/users/{alice}/presence");
    while http(c.api, "GET", &of_alice, Some(&tb), &Value::Null).0 != 200 {
        assert!(Instant::now() < end, "Alice and Bob never became contacts");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, _) = http(c.api, "GET", &of_alice, Some(&tc), &Value::Null);
    assert_eq!(st, 404, "a message one way makes no contact");
    let mut b = c.ws(1, &tb).with_presence();
    let mut cr = c.ws(1, &tc).with_presence();
    wait_presence(&c, bob, 1);
    wait_presence(&c, carol, 1);
    // Frames about Alice (Bob's own arrival may reach Alice late: logic serves once its
    // group has settled).
    let alice_id = alice.to_string();
    let is_presence = |v: &Value| v["type"] == "presence" && v["user"] == alice_id.as_str();
    let online = |on: bool| json!({"type": "presence", "user": alice.to_string(), "online": on});

    let mut a0 = c.ws(0, &ta).with_presence();
    assert_eq!(b.until(T, &mut Vec::new(), is_presence), online(true));
    // A second device (on the other gateway): the first is told the device list; Bob,
    // for whom nothing changed, is not.
    let a1 = c.ws(1, &ta).with_presence();
    let mine = a0.until(T, &mut Vec::new(), is_presence);
    assert_eq!(mine["user"], alice.to_string());
    assert_eq!(mine["online"], true);
    assert_eq!(mine["devices"].as_array().map(Vec::len), Some(2), "{mine}");
    drop(a1);
    let mine = a0.until(T, &mut Vec::new(), is_presence);
    assert_eq!(mine["devices"].as_array().map(Vec::len), Some(1), "{mine}");
    let heard: Vec<Value> = b.drain(Duration::from_millis(500));
    assert!(!heard.iter().any(is_presence), "{heard:?}");

    // The last device closes: Bob is told after the debounce, not before.
    let closed = Instant::now();
    drop(a0);
    assert_eq!(b.until(T, &mut Vec::new(), is_presence), online(false));
    let after = closed.elapsed();
    assert!(
        after >= Duration::from_millis(1_900),
        "told after {after:?}"
    );
    // Back, then a reload (close and reopen on the same gateway) within the debounce.
    let a0 = c.ws(0, &ta).with_presence();
    assert_eq!(b.until(T, &mut Vec::new(), is_presence), online(true));
    wait_presence(&c, alice, 1);
    drop(a0);
    let _a0 = c.ws(0, &ta).with_presence();
    let heard = b.drain(Duration::from_secs(4));
    assert!(
        !heard.iter().any(is_presence),
        "a reload is not news: {heard:?}"
    );
    let heard = cr.drain(Duration::from_millis(200));
    assert!(heard.is_empty(), "Carol is nobody's contact: {heard:?}");

    // Hiding her presence: Bob is told at once that she left, and asking says so too.
    let (st, v) = http(
        c.api,
        "PUT",
        "/api/v1/users/profile",
        Some(&ta),
        &json!({"hide_presence": true}),
    );
    assert_eq!((st, &v["hide_presence"]), (200, &json!(true)), "{v}");
    assert_eq!(b.until(T, &mut Vec::new(), is_presence), online(false));
    let (st, v) = http(
        c.api,
        "GET",
        &format!("/api/v1/users/{alice}/presence"),
        Some(&tb),
        &Value::Null,
    );
    assert_eq!(
        (st, v),
        (200, json!({"user": alice.to_string(), "online": false}))
    );
}

/// Offline push in the distributed mode (docs/PROTOCOL.md, "Offline push"): logic POSTs a
/// signed notification for a message to a user with no device online, retrying after the
/// receiver's 503; a user online gets none.
#[test]
fn offline_push_reaches_the_webhook_from_the_distributed_pipeline() {
    let _g = serial();
    const SECRET: &str = "push-secret-distributed";
    let (url, rx) = webhook_receiver();
    let mut c = Cluster::start("push", 1, 1);
    assert!(c.logic.stop().is_some());
    c.restart_logic_with(&["--push-webhook-url", &url, "--push-webhook-secret", SECRET]);
    let (_alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    // REST sends: 200 once logic has its partitions again (5032 until then).
    // A fixed cid: a send retried while logic rebalances is the same message, not another.
    let send = |content: &str| {
        let body = json!({"to": bob.to_string(), "content": content, "cid": content});
        send_until_acked(c.api, &ta, &body, || c.logs())
    };
    let sent = send("are you there?");
    let first = rx.recv_timeout(T).expect("a POST");
    let again = rx.recv_timeout(T).expect("tried again after the 503");
    let (n, signed) = webhook_body(&again, SECRET);
    assert!(signed, "a bad signature: {again}");
    assert_eq!(webhook_body(&first, SECRET).0, n, "the same notification");
    assert_eq!(
        (&n["user"], &n["id"]),
        (&json!(bob.to_string()), &sent["id"])
    );
    assert_eq!(n["preview"], "are you there?");
    // Bob online: his message goes live, and nothing to the webhook.
    let mut b = c.ws(0, &tb);
    wait_presence(&c, bob, 1);
    send("now you are");
    b.until(T, &mut Vec::new(), |v| v["type"] == "msg");
    assert!(
        rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "a push for a user who is online"
    );
}

/// Web Push from the distributed pipeline (docs/PROTOCOL.md, "Offline push"): logic, with a
/// VAPID key pair of the operator's, wakes a subscribed browser through its push service (the
/// test's), retried after a 503, the payload encrypted for the browser; a user online gets
/// none.
#[test]
fn web_push_reaches_a_browser_from_the_distributed_pipeline() {
    use logic::push::ece::receiver::{check_vapid, Browser};
    use logic::push::ece::Vapid;
    let _g = serial();
    let (origin, rx) = support::push_receiver("201 Created");
    let (public, private) = Vapid::generate().unwrap();
    let prefix = format!("{origin}/push/");
    let mut c = Cluster::start("webpush", 1, 1);
    assert!(c.logic.stop().is_some());
    c.restart_logic_with(&[
        "--web-push-vapid-public-key",
        &public,
        "--web-push-vapid-private-key",
        &private,
        "--web-push-subject",
        "mailto:ops@example.com",
        "--web-push-endpoints",
        &prefix,
    ]);
    let (_alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    let (st, v) = http(c.api, "GET", "/api/v1/push/vapid", Some(&tb), &Value::Null);
    assert_eq!(
        (st, v["public_key"].as_str()),
        (200, Some(public.as_str())),
        "{v}"
    );
    let browser = Browser::new();
    let sub = browser.subscription(&format!("{prefix}bob-phone"));
    let (st, v) = http(c.api, "POST", "/api/v1/push/subscriptions", Some(&tb), &sub);
    assert_eq!(st, 201, "{v}");
    let send = |content: &str| {
        let body = json!({"to": bob.to_string(), "content": content, "cid": content});
        send_until_acked(c.api, &ta, &body, || c.logs())
    };
    let sent = send("ping from afar");
    let _busy = rx.recv_timeout(T).expect("a POST");
    let req = rx.recv_timeout(T).expect("tried again after the 503");
    let (head, body) = support::split_request(&req);
    let auth = support::header_of(&head, "Authorization").expect("a VAPID claim");
    let (claims, k) = check_vapid(auth, &origin).unwrap();
    assert_eq!(
        (claims["sub"].as_str(), k.as_str()),
        (Some("mailto:ops@example.com"), public.as_str())
    );
    let payload: Value = serde_json::from_slice(&browser.open(&body).unwrap()).unwrap();
    assert_eq!(
        (&payload["id"], &payload["preview"]),
        (&sent["id"], &json!("ping from afar"))
    );
    // Bob online: live, and no push.
    let mut b = c.ws(0, &tb);
    wait_presence(&c, bob, 1);
    send("now live");
    b.until(T, &mut Vec::new(), |v| v["type"] == "msg");
    assert!(
        rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "a push for a user who is online"
    );
}

/// The gateway registry and a drain (docs/PROTOCOL.md, "Gateways and draining"): logins are
/// spread over two gateways by their load; a gateway told to stop leaves the registry, closes
/// its clients with 1012 over its drain window, and they come back on the other gateway
/// (`GET /gateways/pick`), where `sync` gives each every message acknowledged to its sender
/// while it moved: none lost, none twice.
#[test]
fn logins_spread_over_gateways_and_a_drain_moves_clients_without_loss() {
    let _g = serial();
    const USERS: usize = 12;
    let mut c = Cluster::start_with_gateway_args("drain", 14, 2, &["--drain-window-s", "2"]);
    let urls: Vec<String> = c
        .gateways
        .iter()
        .map(|g| format!("ws://{}/ws", g.1))
        .collect();
    let url_of = |i: usize| urls[i].clone();
    // Both gateways announce themselves at once; logic reads the registry once a second.
    let end = Instant::now() + T;
    let api = c.api;
    let pick = |token: &str| {
        let (st, v) = http(
            api,
            "GET",
            "/api/v1/gateways/pick",
            Some(token),
            &Value::Null,
        );
        assert_eq!(st, 200, "{v}");
        v["ws_url"].as_str().unwrap().to_string()
    };
    let (_, probe) = c.user("probe");
    // Until one answer names a gateway (not logic's --ws-url); picks alternate, so one call.
    while !urls.contains(&pick(&probe)) {
        assert!(
            Instant::now() < end,
            "no gateway in the registry\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1_200));
    // Logins, each connecting where its answer says.
    let mut users = Vec::new();
    for i in 0..USERS {
        let v = c.register_and_login(&format!("mover{i}"));
        let url = v["ws_url"].as_str().unwrap().to_string();
        let id: u64 = v["user_id"].as_str().unwrap().parse().unwrap();
        users.push((id, v["token"].as_str().unwrap().to_string(), url));
    }
    let on = |i: usize| users.iter().filter(|u| u.2 == url_of(i)).count();
    assert!(
        on(0) >= USERS / 3 && on(1) >= USERS / 3,
        "logins not spread: {} and {} of {USERS}",
        on(0),
        on(1)
    );
    let addr_of = |url: &str| -> std::net::SocketAddr {
        url.trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .parse()
            .unwrap()
    };
    let mut socks: Vec<Ws> = users
        .iter()
        .map(|u| Ws::connect(addr_of(&u.2), &u.1))
        .collect();
    // Everyone on gateway 0 gets messages from the user after them while it drains.
    let drained: Vec<usize> = (0..USERS).filter(|&i| users[i].2 == url_of(0)).collect();
    let senders: Vec<(u64, String)> = users.iter().map(|u| (u.0, u.1.clone())).collect();
    let targets: Vec<(usize, usize)> = drained.iter().map(|&i| ((i + 1) % USERS, i)).collect();
    let sending = std::thread::spawn(move || {
        let mut acked: HashMap<String, u64> = HashMap::new();
        for round in 0..15 {
            for &(from, to) in &targets {
                // Retried with its cid until acknowledged: a retry is the same message.
                let body = json!({"to": senders[to].0.to_string(), "content": format!("m{round}"), "cid": format!("d{from}-{to}-{round}")});
                let v = send_until_acked(api, &senders[from].1, &body, String::new);
                let conv = v["conv"].as_str().unwrap().to_string();
                let e = acked.entry(conv).or_default();
                *e = (*e).max(v["seq"].as_u64().unwrap());
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(500));
    let drain_began = Instant::now();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(c.gateways[0].0.pid() as i32, libc::SIGTERM) };
    for &i in &drained {
        assert_eq!(
            socks[i].close_code(T),
            Some(1012),
            "user {i}: not told the service restarts"
        );
    }
    while c.gateways[0].0.alive() {
        assert!(
            drain_began.elapsed() < T,
            "gateway 0 did not stop after its drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Back, where the registry says now.
    for &i in &drained {
        let url = pick(&users[i].1);
        assert_eq!(url, url_of(1), "sent to the drained gateway");
        socks[i] = Ws::connect(addr_of(&url), &users[i].1);
    }
    let acked = sending.join().unwrap();
    assert!(!acked.is_empty());
    for &i in &drained {
        let me = users[i].0;
        let from = users[(i + 1) % USERS].0;
        let conv = format!("p:{}:{}", me.min(from), me.max(from));
        let want = acked[&conv];
        socks[i].send(json!({"type": "sync", "conv": conv, "after": 0, "limit": 500}));
        let v = socks[i].until(T, &mut Vec::new(), |v| v["type"] == "sync");
        let seqs: Vec<u64> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=want).collect::<Vec<_>>(),
            "user {i}: what sync gives after the move"
        );
    }
}

/// The example nginx configuration (deploy/nginx/im.conf), run as it is with its addresses
/// and paths replaced: https to the REST API, wss to two gateways that announce nginx's
/// address, least connections spreading the sockets; a gateway that drains sends its client
/// 1012 through nginx, and the client comes back through nginx to the other gateway.
#[test]
fn nginx_in_front_serves_wss_and_https_and_a_drain_moves_through_it() {
    use support::tls;
    use tungstenite::Message;
    let _g = serial();
    assert!(
        std::path::Path::new("/usr/sbin/nginx").exists(),
        "nginx is required (scripts/test installs nginx-light)"
    );
    let lb: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let public = format!("wss://{lb}/ws");
    let args = ["--public-ws-url", &public, "--drain-window-s", "1"];
    let c = Cluster::start_with_gateway_args("nginx", 15, 2, &args);
    let dir = c.dir.join("nginx");
    let (cert, key) = tls::pem_files(&dir.join("tls"));
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("tmp").join(sub)).unwrap();
    }
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/im.conf"),
    )
    .unwrap();
    let mut conf = example.clone();
    let d = dir.display();
    for (from, to) in [
        // In the foreground, for the test to own; workers as this user; this machine's
        // open-file limit.
        (
            "worker_processes auto;",
            "daemon off;\nuser root;\nworker_processes 1;".to_string(),
        ),
        (
            "worker_rlimit_nofile 200000;",
            "worker_rlimit_nofile 4096;".into(),
        ),
        (
            "worker_connections 100000;",
            "worker_connections 1024;".into(),
        ),
        ("/run/im-nginx.pid", format!("{d}/nginx.pid")),
        ("/var/log/nginx/im-error.log", format!("{d}/error.log")),
        ("/var/lib/nginx/", format!("{d}/tmp/")),
        (
            "server 127.0.0.1:8090 ",
            format!("server {} ", c.gateways[0].1),
        ),
        (
            "server 127.0.0.1:8091 ",
            format!("server {} ", c.gateways[1].1),
        ),
        ("server 127.0.0.1:8080;", format!("server {};", c.api)),
        ("listen 443 ssl;", format!("listen {lb} ssl;")),
        ("/etc/im/tls/fullchain.pem", cert.display().to_string()),
        ("/etc/im/tls/privkey.pem", key.display().to_string()),
    ] {
        assert!(conf.contains(from), "the example no longer has {from:?}");
        conf = conf.replace(from, &to);
    }
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let check = std::process::Command::new("/usr/sbin/nginx")
        .arg("-t")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut cmd = std::process::Command::new("/usr/sbin/nginx");
    cmd.arg("-p").arg(&dir).arg("-c").arg(&conf_path);
    let _nginx = Proc::spawn("nginx", cmd, &dir);
    wait_port(lb, "nginx", Duration::from_secs(20));
    // https: the REST API; login hands out nginx's address.
    let https = |method: &str, path: &str, token: Option<&str>, body: &Value| {
        support::http_on(tls::connect(lb), method, path, token, body)
    };
    let mut users = Vec::new();
    for name in ["tls-alice", "tls-bob"] {
        let cred = json!({"username": name, "password": "password-123"});
        let (st, v) = https("POST", "/api/v1/users/register", None, &cred);
        assert_eq!(st, 201, "{v}");
        let (st, v) = https("POST", "/api/v1/auth/login", None, &cred);
        assert_eq!(st, 200, "{v}");
        // Both gateways announce nginx's URL: one registry entry, and login names it.
        assert_eq!(v["ws_url"], public.as_str(), "{v}");
        let id: u64 = v["user_id"].as_str().unwrap().parse().unwrap();
        users.push((id, v["token"].as_str().unwrap().to_string()));
    }
    let gw_addrs: Vec<std::net::SocketAddr> = c.gateways.iter().map(|g| g.1).collect();
    let held = |gw: usize| -> u64 {
        let (_, text) = get_text(gw_addrs[gw], "/metrics");
        text.lines()
            .filter(|l| l.starts_with("im_gateway_connections{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
            // The scrape's own connection is one of them.
            .saturating_sub(1)
    };
    // wss: one socket each; least connections puts them on different gateways.
    let mut alice = tls::wss(lb, &users[0].1);
    let mut bob = tls::wss(lb, &users[1].1);
    let end = Instant::now() + T;
    while (held(0), held(1)) != (1, 1) {
        assert!(Instant::now() < end, "sockets: {} and {}", held(0), held(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let next_msg = |ws: &mut tungstenite::WebSocket<tls::TlsStream>| -> Value {
        loop {
            match ws.read().expect("a frame") {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "msg" {
                        return v;
                    }
                }
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    };
    let send = |ws: &mut tungstenite::WebSocket<tls::TlsStream>, to: u64, cid: &str| {
        let f = json!({"type": "send", "cid": cid, "to": to.to_string(), "content": cid});
        ws.send(Message::text(f.to_string())).unwrap();
    };
    send(&mut alice, users[1].0, "over tls");
    assert_eq!(next_msg(&mut bob)["content"], "over tls");
    // Drain the gateway that holds alice: her socket gets 1012 through nginx.
    let gw_of_alice = {
        // Close bob's socket for a moment: the gateway left with one socket is alice's.
        bob.close(None).ok();
        let end = Instant::now() + T;
        loop {
            let (a, b) = (held(0), held(1));
            if a + b == 1 {
                break if a == 1 { 0 } else { 1 };
            }
            assert!(Instant::now() < end, "sockets: {a} and {b}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut bob = tls::wss(lb, &users[1].1);
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(c.gateways[gw_of_alice].0.pid() as i32, libc::SIGTERM) };
    let code = loop {
        match alice.read() {
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, Some(1012), "the drain's close code through nginx");
    // Back through nginx at once, while the other gateway still drains: it no longer listens,
    // so nginx takes alice to the gateway left.
    let mut alice = tls::wss(lb, &users[0].1);
    let end = Instant::now() + T;
    while held(1 - gw_of_alice) != 2 {
        assert!(
            Instant::now() < end,
            "both sockets should be on the gateway left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    send(&mut alice, users[1].0, "after the drain");
    assert_eq!(next_msg(&mut bob)["content"], "after the drain");
}

/// `POST /messages/send` with `body` (which names a cid, so a retry is the same message) until
/// it is acknowledged, within `T`; `context` is printed if it never is.
fn send_until_acked(
    api: std::net::SocketAddr,
    token: &str,
    body: &Value,
    context: impl Fn() -> String,
) -> Value {
    let end = Instant::now() + T;
    loop {
        let (st, v) = http(api, "POST", "/api/v1/messages/send", Some(token), body);
        if st == 200 {
            return v;
        }
        assert!(Instant::now() < end, "send: {st} {v}\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `redis-cli` on this deployment's database; its output, trimmed.
fn redis_cli(c: &Cluster, args: &[&str]) -> String {
    let db = c.redis.rsplit('/').next().unwrap().to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-n", &db])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A user's presence entries, `field value` lines, sorted.
fn presence_entries(c: &Cluster, user: u64) -> Vec<String> {
    let all = redis_cli(c, &["HGETALL", &format!("im:presence:{user}")]);
    let lines: Vec<&str> = all.lines().collect();
    let mut entries: Vec<String> = lines.chunks(2).map(|kv| kv.join(" ")).collect();
    entries.sort();
    entries
}

/// Presence that Redis lost while the connections stayed open (a Redis restarted without its
/// data, a failover to a replica that was behind, an outage longer than the TTL) is written
/// again: each gateway keeps what it wrote and writes it again at every refresh (a third of
/// `--presence-ttl-s`), token ids included, so live delivery resumes without a reconnect and
/// a logout still finds the connections.
#[test]
fn presence_that_redis_lost_is_written_again() {
    let _g = serial();
    let c = Cluster::start_with_gateway_args("presence_lost", 13, 2, &["--presence-ttl-s", "6"]);
    let (alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    let mut a = c.ws(0, &ta);
    let mut b0 = c.ws(0, &tb);
    let mut b1 = c.ws(1, &tb);
    wait_presence(&c, alice, 1);
    wait_presence(&c, bob, 2);
    let before = presence_entries(&c, bob);
    assert_eq!(before.len(), 2, "{before:?}");

    redis_cli(&c, &["DEL", &format!("im:presence:{bob}")]);
    assert!(presence_entries(&c, bob).is_empty());
    let t = Instant::now();
    wait_presence(&c, bob, 2);
    let back = t.elapsed();
    assert_eq!(
        presence_entries(&c, bob),
        before,
        "the same entries, with their token ids"
    );
    let ttl: i64 = redis_cli(&c, &["TTL", &format!("im:presence:{bob}")])
        .parse()
        .unwrap();
    assert!((1..=6).contains(&ttl), "the entry expires again: TTL {ttl}");

    // Live delivery to both of bob's devices, without a reconnect.
    a.send(json!({"type": "send", "cid": "after", "to": bob.to_string(), "content": "back"}));
    a.until(T, &mut Vec::new(), |v| v["type"] == "sent");
    for ws in [&mut b0, &mut b1] {
        let m = ws.until(T, &mut Vec::new(), |v| v["type"] == "msg");
        assert_eq!(m["content"], "back");
    }
    eprintln!("presence written again {back:?} after it was deleted (refresh every 2 s)");
}

/// `n` senders on the first gateway, all to `r`.
fn senders_to(c: &Cluster, n: usize, r: u64) -> Vec<(String, load::Target, usize)> {
    (0..n)
        .map(|i| (c.user(&format!("sender{i}")).1, load::Target::User(r), 0))
        .collect()
}

/// The acks of every sender.
fn acks(sent: &[load::Sent]) -> Vec<&HashMap<String, Value>> {
    sent.iter().map(|s| &s.acks).collect()
}

#[test]
fn kill_9_of_persist_mid_stream_leaves_exactly_every_message_once() {
    let _g = serial();
    let mut c = Cluster::start("persist", 2, 1);
    let (r, _) = c.user("receiver");
    let senders = senders_to(&c, 5, r);
    let (sent, ()) = load::run_senders(
        &mut c,
        &senders,
        2_000,
        3_000,
        Duration::from_secs(10),
        |c| {
            c.persist.kill9();
            std::thread::sleep(Duration::from_millis(500));
            c.restart_persist();
        },
    );
    let acks = acks(&sent);
    assert_eq!(acks.iter().map(|a| a.len()).sum::<usize>(), 10_000);
    load::wait_rows(&c, 10_000);
    load::check_stored(&c, &acks, 10_000);
}

#[test]
fn kill_9_of_logic_loses_and_duplicates_nothing_acknowledged() {
    let _g = serial();
    let mut c = Cluster::start("logic", 3, 1);
    let (r, _) = c.user("receiver");
    let senders = senders_to(&c, 4, r);
    let (sent, ()) = load::run_senders(&mut c, &senders, 500, 600, Duration::from_secs(3), |c| {
        // Persist goes down first, so the restarted logic must recover the seqs and retries
        // it handed out from the im.messages tail, not from the database.
        c.persist.kill9();
        std::thread::sleep(Duration::from_millis(500));
        c.logic.kill9();
        std::thread::sleep(Duration::from_millis(300));
        c.restart_logic();
        std::thread::sleep(Duration::from_secs(3));
        c.restart_persist();
    });
    let acks = acks(&sent);
    assert_eq!(acks.iter().map(|a| a.len()).sum::<usize>(), 2_000);
    load::wait_rows(&c, 2_000);
    load::check_stored(&c, &acks, 2_000);
}

/// Tracing (README.md, "Tracing"): a send over a WebSocket is one trace from the gateway that
/// took it, through the broker's record headers to logic and back to both gateways, each
/// process exporting its spans over OTLP/HTTP to the test's collector.
#[test]
fn a_traced_send_is_one_trace_from_gateway_through_logic_to_both_gateways() {
    let _g = serial();
    let (collector, requests) = http_receiver("200 OK", "200 OK");
    let args = ["--otlp-endpoint", &collector, "--otlp-sample-ratio", "1"];
    let c = Cluster::start_with_args("tracing", 1, 2, &args, &args[..2]);
    let (alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    let mut a = c.ws(0, &ta);
    let mut b = c.ws(1, &tb);
    wait_presence(&c, alice, 1);
    wait_presence(&c, bob, 1);
    a.send(json!({"type": "send", "cid": "traced", "to": bob.to_string(), "content": "follow me"}));
    let sent = a.until(T, &mut Vec::new(), |v| v["type"] == "sent");
    let m = b.until(T, &mut Vec::new(), |v| v["type"] == "msg");
    assert_eq!(m["content"], "follow me");

    // Every process exports within its 1 s interval; collect until the trace is whole.
    let want = [
        "im.send",
        "im.upstream",
        "im.sequence",
        "im.durable",
        "im.route",
    ];
    let trace = collect_trace(&requests, T, |s| trace_with(s, &want, 3), || c.logs());
    let one = |n: &str| trace.iter().find(|s| s.name == n).unwrap();
    let (send, up, seq, durable, route) = (
        one("im.send"),
        one("im.upstream"),
        one("im.sequence"),
        one("im.durable"),
        one("im.route"),
    );
    // The tree: send → upstream → (the record) sequence → durable and route → (the records)
    // deliver, on each gateway that holds a recipient or the sender.
    assert_eq!(send.parent, None, "the root");
    assert_eq!(up.parent.as_ref(), Some(&send.id));
    assert_eq!(seq.parent.as_ref(), Some(&up.id));
    assert_eq!(durable.parent.as_ref(), Some(&seq.id));
    assert_eq!(route.parent.as_ref(), Some(&seq.id));
    let delivers: Vec<&Span> = trace.iter().filter(|s| s.name == "im.deliver").collect();
    assert!(delivers
        .iter()
        .all(|d| d.parent.as_ref() == Some(&route.id)));
    for (s, service) in [(send, "im-gateway"), (up, "im-gateway"), (seq, "im-logic")] {
        assert_eq!(s.service, service, "{s:?}");
    }
    assert!(delivers.iter().all(|d| d.service == "im-gateway"));
    // Bob's gateway delivered the message; alice's the answer (and the copy for her other
    // devices, of which she has none).
    let mut what: Vec<&str> = delivers
        .iter()
        .map(|d| d.attrs["im.record"].as_str().unwrap())
        .collect();
    what.sort();
    assert_eq!(what, ["deliver", "deliver", "reply"]);
    // What the spans say: the conversation and seq, the outcome, and times that nest.
    assert_eq!(send.attrs["im.outcome"], "sent");
    assert_eq!(send.attrs["im.cid"], "traced");
    assert_eq!(
        route.attrs["im.seq"],
        json!(sent["seq"].as_u64().unwrap().to_string())
    );
    assert_eq!(seq.attrs["im.decision"], "assigned");
    assert!(
        send.start <= up.start && up.end <= send.end,
        "{send:?} {up:?}"
    );
    assert!(up.start <= seq.start && seq.start <= durable.start && durable.end <= route.start);
    assert!(route.start <= send.end);

    // The exporters count what they sent.
    let (_, text) = get_text(c.gateways[1].1, "/metrics");
    assert!(
        metric(&text, "im_trace_spans_exported_total") >= Some(1),
        "{text}"
    );
    let (_, text) = get_text(c.api, "/metrics");
    assert!(
        metric(&text, "im_trace_spans_exported_total") >= Some(3),
        "{text}"
    );
}

/// Gateways tracing, logic not (no `--otlp-endpoint`): logic records nothing but passes each
/// record's context on, so the sender's gateway still ends its root with the answer and the
/// deliveries join the trace under the gateway's own span.
#[test]
fn a_logic_that_does_not_trace_passes_the_trace_on() {
    let _g = serial();
    let (collector, requests) = http_receiver("200 OK", "200 OK");
    let args = ["--otlp-endpoint", &collector, "--otlp-sample-ratio", "1"];
    let c = Cluster::start_with_args("tracing_passed_on", 1, 2, &args, &[]);
    let (alice, ta) = c.user("alice");
    let (bob, tb) = c.user("bob");
    let mut a = c.ws(0, &ta);
    let mut b = c.ws(1, &tb);
    wait_presence(&c, alice, 1);
    wait_presence(&c, bob, 1);
    a.send(json!({"type": "send", "cid": "passed", "to": bob.to_string(), "content": "on"}));
    a.until(T, &mut Vec::new(), |v| v["type"] == "sent");
    b.until(T, &mut Vec::new(), |v| v["type"] == "msg");
    let want = ["im.send", "im.upstream"];
    let trace = collect_trace(&requests, T, |s| trace_with(s, &want, 3), || c.logs());
    let one = |n: &str| trace.iter().find(|s| s.name == n).unwrap();
    let (send, up) = (one("im.send"), one("im.upstream"));
    assert_eq!(
        send.attrs["im.outcome"], "sent",
        "the root ended with the answer"
    );
    assert!(
        trace.iter().all(|s| s.service == "im-gateway"),
        "{trace:#?}"
    );
    let logic = ["im.sequence", "im.durable", "im.route"];
    assert!(trace.iter().all(|s| !logic.contains(&s.name.as_str())));
    // Logic passed the upstream span's context on: the deliveries hang under it.
    assert!(trace
        .iter()
        .filter(|s| s.name == "im.deliver")
        .all(|d| d.parent.as_ref() == Some(&up.id)));
}

//! `im standalone` end to end: the whole pipeline in one process on the in-process bus and
//! SQLite. Its data survives a stop (SIGTERM) and a crash (SIGKILL): every acknowledged
//! message is there once afterwards. And the browser client works in a real browser
//! (headless Chromium, driven by `tests/browser/chat.mjs`).

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{free_port, http, im, scratch, wait_port, Proc, Ws};

struct Standalone {
    proc: Proc,
    api: SocketAddr,
    ws: SocketAddr,
}

impl Standalone {
    /// Starts `im standalone` on free ports with its data in `data`.
    fn start(dir: &Path, data: &Path, name: &str) -> Standalone {
        Standalone::start_with(dir, data, name, &[])
    }

    /// `start`, with more environment (settings by their IM_* variables).
    fn start_with(dir: &Path, data: &Path, name: &str, env: &[(&str, &str)]) -> Standalone {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let ws: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = im();
        cmd.arg("standalone")
            .args(["--api-listen", &api.to_string()])
            .args(["--ws-listen", &ws.to_string()])
            .arg("--data-dir")
            .arg(data)
            .args(["--shards", "2", "--no-pin", "--msgs-per-sec-max", "1000"])
            // Test-strength password hashing: registration is not what is tested here.
            .args(["--argon2-m-kib", "64"])
            .envs(env.iter().copied())
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(name, cmd, dir);
        wait_port(api, "im standalone (REST)", Duration::from_secs(60));
        wait_port(ws, "im standalone (WebSocket)", Duration::from_secs(60));
        Standalone { proc, api, ws }
    }

    fn user(&self, name: &str) -> (u64, String) {
        let body = json!({"username": name, "password": "password-123"});
        let (st, v) = http(self.api, "POST", "/api/v1/users/register", None, &body);
        assert_eq!(st, 201, "{v}");
        self.login(name)
    }

    fn login(&self, name: &str) -> (u64, String) {
        let body = json!({"username": name, "password": "password-123"});
        let (st, v) = http(self.api, "POST", "/api/v1/auth/login", None, &body);
        assert_eq!(st, 200, "{v}");
        (
            v["user_id"].as_str().unwrap().parse().unwrap(),
            v["token"].as_str().unwrap().to_string(),
        )
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// Sends `n` messages (`to` a user or a `group`) with cids `prefix-i`, and returns their
/// `sent` acks by cid once all are in.
fn send_all(ws: &mut Ws, target: Value, prefix: &str, n: usize) -> HashMap<String, Value> {
    for i in 0..n {
        let mut m = json!({"type": "send", "cid": format!("{prefix}-{i}"), "content": format!("{prefix} {i}")});
        for (k, v) in target.as_object().unwrap() {
            m[k] = v.clone();
        }
        ws.send(m);
    }
    let mut acks = HashMap::new();
    let mut seen = Vec::new();
    while acks.len() < n {
        let v = ws.until(WAIT, &mut seen, |v| {
            v["type"] == "sent" || v["type"] == "error"
        });
        assert_eq!(v["type"], "sent", "a send failed: {v}");
        acks.insert(v["cid"].as_str().unwrap().to_string(), v);
    }
    acks
}

/// Every message of `conv` through `sync`, following `more`.
fn sync_all(ws: &mut Ws, conv: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let after = out.last().map(|m| m["seq"].as_u64().unwrap()).unwrap_or(0);
        ws.send(json!({"type": "sync", "conv": conv, "after": after, "limit": 500}));
        let mut seen = Vec::new();
        let v = ws.until(WAIT, &mut seen, |v| {
            v["type"] == "sync" || v["type"] == "error"
        });
        assert_eq!(v["type"], "sync", "sync failed: {v}");
        out.extend(v["messages"].as_array().unwrap().iter().cloned());
        if v["more"] != true {
            return out;
        }
    }
}

/// The conversation holds exactly the acknowledged messages, once each, in seq order 1..n.
fn assert_exactly(messages: &[Value], acks: &HashMap<String, Value>, when: &str) {
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=acks.len() as u64).collect::<Vec<_>>(),
        "{when}: seqs 1..{} once each",
        acks.len()
    );
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for m in messages {
        assert!(
            by_id.insert(m["id"].as_str().unwrap(), m).is_none(),
            "{when}: a duplicate id"
        );
    }
    for (cid, ack) in acks {
        let m = by_id
            .get(ack["id"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{when}: acknowledged {cid} ({ack}) is missing"));
        assert_eq!(m["seq"], ack["seq"], "{when}: {cid}");
        let (prefix, i) = cid.rsplit_once('-').unwrap();
        assert_eq!(m["content"], format!("{prefix} {i}"), "{when}: {cid}");
    }
}

#[test]
fn acknowledged_messages_survive_a_stop_and_a_crash_once_each() {
    let dir = scratch("standalone-restart");
    let data = dir.join("data");
    let s = Standalone::start(&dir, &data, "standalone-1");
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let group = support::group(s.api, &ta, "team", &[&tb]).to_string();
    let pair = format!("p:{}:{}", alice.min(bob), alice.max(bob));
    let gconv = format!("g:{group}");

    let mut a = Ws::connect(s.ws, &ta);
    let mut b = Ws::connect(s.ws, &tb);
    let mut p2p = send_all(&mut a, json!({"to": bob.to_string()}), "before-stop", 40);
    let mut grp = send_all(&mut a, json!({"group": group}), "group", 10);
    // Bob was online: he got them live.
    let live: Vec<Value> = b.drain(Duration::from_millis(500));
    let live_msgs = live.iter().filter(|v| v["type"] == "msg").count();
    assert_eq!(live_msgs, 50, "live deliveries to bob: {live:?}");

    // The generated secret is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("jwt_secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "jwt_secret mode {mode:o}");

    // A clean stop, and a start on the same data: the secret is kept, the tokens still work.
    let mut s = s;
    let status = s.proc.stop();
    assert!(
        status.is_some_and(|st| st.success()),
        "a clean stop exits 0, got {status:?}:\n{}",
        s.proc.log_tail()
    );
    let s = Standalone::start(&dir, &data, "standalone-2");
    let mut b = Ws::connect(s.ws, &tb);
    assert_exactly(&sync_all(&mut b, &pair), &p2p, "after SIGTERM");
    assert_exactly(&sync_all(&mut b, &gconv), &grp, "after SIGTERM (group)");

    // Seqs go on from the database, and a retry of a pre-restart cid gets its first ack.
    let mut a = Ws::connect(s.ws, &ta);
    let again = send_all(&mut a, json!({"to": bob.to_string()}), "before-stop", 1);
    assert_eq!(
        again["before-stop-0"]["id"], p2p["before-stop-0"]["id"],
        "retry after restart"
    );
    p2p.extend(send_all(
        &mut a,
        json!({"to": bob.to_string()}),
        "after-start",
        20,
    ));
    grp.extend(send_all(&mut a, json!({"group": group}), "group2", 5));

    // A crash right after the acks: nothing acknowledged is lost (acks follow the SQLite commit).
    let mut s = s;
    s.proc.kill9();
    let s = Standalone::start(&dir, &data, "standalone-3");
    let mut b = Ws::connect(s.ws, &tb);
    assert_exactly(&sync_all(&mut b, &pair), &p2p, "after SIGKILL");
    assert_exactly(&sync_all(&mut b, &gconv), &grp, "after SIGKILL (group)");

    // History and unread agree with sync.
    let (st, h) = http(
        s.api,
        "GET",
        &format!("/api/v1/messages/history?conv={pair}&limit=100"),
        Some(&tb),
        &Value::Null,
    );
    assert_eq!(st, 200);
    assert_eq!(h["messages"].as_array().unwrap().len(), p2p.len());
    let (st, convs) = http(
        s.api,
        "GET",
        "/api/v1/conversations",
        Some(&tb),
        &Value::Null,
    );
    assert_eq!(st, 200);
    let unread: HashMap<String, u64> = convs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["conv"].as_str().unwrap().to_string(),
                c["unread"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(unread[&pair], p2p.len() as u64, "{convs}");
    assert_eq!(unread[&gconv], grp.len() as u64, "{convs}");
}

/// Presence in standalone (docs/PROTOCOL.md, "Presence"): the gateway and logic share the
/// process and presence lives in its memory; a contact is told of an arrival at once and of
/// a departure after the debounce, and can ask.
#[test]
fn presence_is_told_to_contacts_in_standalone() {
    let dir = scratch("standalone-presence");
    let s = Standalone::start(&dir, &dir.join("data"), "standalone-presence");
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    // Contacts: they wrote to each other.
    for (from, to) in [(&ta, bob), (&tb, alice)] {
        let body = json!({"to": to.to_string(), "content": "hi"});
        let (st, v) = http(s.api, "POST", "/api/v1/messages/send", Some(from), &body);
        assert_eq!(st, 200, "{v}");
    }
    let mut b = Ws::connect(s.ws, &tb).with_presence();
    // Bob's connection is in presence before Alice arrives (his own arrival is not the test).
    let of_bob = format!("/api/v1/users/{bob}/presence");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while http(s.api, "GET", &of_bob, Some(&ta), &Value::Null).1["online"] != true {
        assert!(std::time::Instant::now() < end, "Bob never showed online");
        std::thread::sleep(Duration::from_millis(50));
    }
    let is_presence = |v: &Value| v["type"] == "presence";
    let online = |on: bool| json!({"type": "presence", "user": alice.to_string(), "online": on});
    let a = Ws::connect(s.ws, &ta);
    let t = Duration::from_secs(10);
    assert_eq!(b.until(t, &mut Vec::new(), is_presence), online(true));
    let ask = || {
        http(
            s.api,
            "GET",
            &format!("/api/v1/users/{alice}/presence"),
            Some(&tb),
            &Value::Null,
        )
    };
    assert_eq!(
        ask(),
        (200, json!({"user": alice.to_string(), "online": true}))
    );
    let closed = std::time::Instant::now();
    drop(a);
    assert_eq!(b.until(t, &mut Vec::new(), is_presence), online(false));
    assert!(closed.elapsed() >= Duration::from_millis(1_900));
    assert_eq!(ask().1["online"], false);
}

/// Offline push (docs/PROTOCOL.md, "Offline push") to a webhook receiver of the test's own: a
/// message for a user with no device online becomes a signed POST, retried after a 503; one
/// for a user who is online does not.
#[test]
fn offline_push_goes_to_a_signed_webhook_in_standalone() {
    const SECRET: &str = "push-secret-for-the-test";
    let (url, rx) = support::webhook_receiver();
    let dir = scratch("standalone-push");
    let env = [
        ("IM_PUSH_WEBHOOK_URL", url.as_str()),
        ("IM_PUSH_WEBHOOK_SECRET", SECRET),
    ];
    let s = Standalone::start_with(&dir, &dir.join("data"), "standalone-push", &env);
    let (_alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let send = |content: &str| {
        let body = json!({"to": bob.to_string(), "content": content});
        let (st, v) = http(s.api, "POST", "/api/v1/messages/send", Some(&ta), &body);
        assert_eq!(st, 200, "{v}");
        v
    };
    let sent = send("are you there?");
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("a POST");
    let again = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("tried again after the 503");
    let body_of = |req: &str| req.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    assert_eq!(
        body_of(&first),
        body_of(&again),
        "the same notification, signed anew"
    );
    assert!(again.starts_with("POST /hook HTTP/1.1\r\n"), "{again}");
    let (n, signed) = support::webhook_body(&again, SECRET);
    assert!(signed, "a bad signature: {again}");
    assert_eq!(n["user"], bob.to_string());
    assert_eq!(n["id"], sent["id"]);
    assert_eq!(n["seq"], sent["seq"]);
    assert_eq!(n["preview"], "are you there?");
    // Bob online: no push.
    let mut b = Ws::connect(s.ws, &tb);
    let of_bob = format!("/api/v1/users/{bob}/presence");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while http(s.api, "GET", &of_bob, Some(&tb), &Value::Null).1["online"] != true {
        assert!(std::time::Instant::now() < end, "Bob never showed online");
        std::thread::sleep(Duration::from_millis(50));
    }
    send("now you are");
    b.until(Duration::from_secs(10), &mut Vec::new(), |v| {
        v["type"] == "msg"
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "a push for a user who is online"
    );
}

/// The data directory holds password hashes, messages and the secret: 0700, its files 0600,
/// whether standalone creates them or finds them readable by others (a directory made by an
/// older version, or by hand).
#[test]
fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = scratch("standalone-private-data");
    let fresh = dir.join("fresh");
    let found = dir.join("found");
    std::fs::create_dir_all(&found).unwrap();
    std::fs::set_permissions(&found, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["im.db", "jwt_secret"] {
        let content = if f == "im.db" { "" } else { "an-old-secret\n" };
        std::fs::write(found.join(f), content).unwrap();
        std::fs::set_permissions(found.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A directory that holds other things keeps its mode (a warning says so): our files in
    // it are still private.
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("notes.txt"), "not ours").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Standalone::start(&dir, &shared, "standalone-shared-dir");
    s.user("private");
    assert_eq!(
        mode(&shared),
        0o755,
        "a directory of other things is left as it is"
    );
    for f in ["im.db", "jwt_secret"] {
        assert_eq!(mode(&shared.join(f)), 0o600, "{f}");
    }
    drop(s);
    for data in [&fresh, &found] {
        let s = Standalone::start(&dir, data, "standalone-private");
        // A registration writes through the log: the log and shared-memory files exist.
        s.user("private");
        assert_eq!(mode(data), 0o700, "{}", data.display());
        for f in ["im.db", "im.db-wal", "im.db-shm", "jwt_secret"] {
            assert_eq!(mode(&data.join(f)), 0o600, "{}", data.join(f).display());
        }
        drop(s);
    }
}

/// Web Push (docs/PROTOCOL.md, "Offline push") with standalone's own key: a browser (the
/// test, holding the subscription's private key) subscribes; a message while Bob has no device
/// online reaches his push service (the test's), retried after a 503, encrypted for that
/// browser and signed with the VAPID key `GET /push/vapid` names; a muted conversation pushes
/// nothing.
#[test]
fn web_push_wakes_a_subscribed_browser_in_standalone() {
    use logic::push::ece::receiver::{check_vapid, Browser};
    let (origin, rx) = support::push_receiver("201 Created");
    let dir = scratch("standalone-web-push");
    let prefix = format!("{origin}/push/");
    let env = [("IM_WEB_PUSH_ENDPOINTS", prefix.as_str())];
    let s = Standalone::start_with(&dir, &dir.join("data"), "standalone-web-push", &env);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let (st, vapid) = http(s.api, "GET", "/api/v1/push/vapid", Some(&tb), &Value::Null);
    assert_eq!(st, 200, "{vapid}");
    let browser = Browser::new();
    let endpoint = format!("{prefix}bob-laptop");
    let sub = browser.subscription(&endpoint);
    let (st, v) = http(s.api, "POST", "/api/v1/push/subscriptions", Some(&tb), &sub);
    assert_eq!(st, 201, "{v}");
    // Elsewhere than a push service, or with a key that is not one: refused.
    let mut elsewhere = sub.clone();
    elsewhere["endpoint"] = json!("http://127.0.0.1:1/admin");
    let (st, v) = http(
        s.api,
        "POST",
        "/api/v1/push/subscriptions",
        Some(&tb),
        &elsewhere,
    );
    assert_eq!((st, v["code"].as_u64()), (400, Some(4003)), "{v}");
    let mut bad_key = sub.clone();
    bad_key["keys"]["p256dh"] = json!("AAAA");
    let (st, _) = http(
        s.api,
        "POST",
        "/api/v1/push/subscriptions",
        Some(&tb),
        &bad_key,
    );
    assert_eq!(st, 400);
    let send = |content: &str| {
        let body = json!({"to": bob.to_string(), "content": content});
        let (st, v) = http(s.api, "POST", "/api/v1/messages/send", Some(&ta), &body);
        assert_eq!(st, 200, "{v}");
        v
    };
    let sent = send("wake up, bob");
    let _busy = rx.recv_timeout(Duration::from_secs(10)).expect("a POST");
    let req = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("tried again after the 503");
    let (head, body) = support::split_request(&req);
    assert!(
        head.starts_with("POST /push/bob-laptop HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(
        support::header_of(&head, "Content-Encoding"),
        Some("aes128gcm")
    );
    let auth = support::header_of(&head, "Authorization").expect("a VAPID claim");
    let (_claims, k) = check_vapid(auth, &origin).unwrap();
    assert_eq!(
        k,
        vapid["public_key"].as_str().unwrap(),
        "signed with the key browsers subscribe with"
    );
    let payload: Value = serde_json::from_slice(&browser.open(&body).unwrap()).unwrap();
    assert_eq!(payload["type"], "message");
    assert_eq!(payload["from_name"], "alice");
    assert_eq!(payload["preview"], "wake up, bob");
    assert_eq!(
        (&payload["id"], &payload["user"]),
        (&sent["id"], &json!(bob.to_string()))
    );
    // Muted: nothing.
    let conv = format!("p:{}:{}", alice.min(bob), alice.max(bob));
    let path = format!("/api/v1/conversations/{conv}");
    let (st, v) = http(s.api, "PUT", &path, Some(&tb), &json!({"muted": true}));
    assert_eq!(st, 204, "{v}");
    send("shh");
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "a push for a muted conversation"
    );
    // Unsubscribed: the subscription is gone for good.
    let gone = json!({"endpoint": endpoint});
    let (st, _) = http(
        s.api,
        "DELETE",
        "/api/v1/push/subscriptions",
        Some(&tb),
        &gone,
    );
    assert_eq!(st, 204);
    let (st, v) = http(
        s.api,
        "GET",
        "/api/v1/push/subscriptions",
        Some(&tb),
        &Value::Null,
    );
    assert_eq!(
        (st, v["subscriptions"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
}

/// The Grafana dashboard and the Prometheus alert rules under `deploy/` name only metrics the
/// services serve: every `im_*` name in them is a family of standalone's `/metrics` (the
/// gateway's, its bridge's, logic's and persist's), histogram suffixes aside; and the
/// dashboard is JSON whose panels each query something.
#[test]
fn every_metric_the_dashboard_and_alerts_use_is_served() {
    let dir = scratch("standalone-deploy");
    let s = Standalone::start(&dir, &dir.join("data"), "standalone-deploy");
    // The gateway's port serves the gateway's, its bridge's and persist's; the REST port
    // logic's (as in the distributed mode, where each process serves its own).
    let (st, gateway) = support::get_text(s.ws, "/metrics");
    assert_eq!(st, 200);
    let (st, logic) = support::get_text(s.api, "/metrics");
    assert_eq!(st, 200);
    let text = format!("{gateway}\n{logic}");
    let families: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dashboard = std::fs::read_to_string(root.join("grafana/im-dashboard.json")).unwrap();
    let alerts = std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap();
    let d: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    for p in d["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {} queries nothing", p["title"]);
        }
    }
    assert!(alerts.matches("- alert: ").count() >= 10);
    for (file, body) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let mut used: Vec<&str> = Vec::new();
        let mut rest = body.as_str();
        while let Some(i) = rest.find("im_") {
            let name_len = rest[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len() - i);
            // A name, not the middle of a word (`{job="im-gateway"}` has no underscore).
            let whole = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric();
            if whole {
                used.push(&rest[i..i + name_len]);
            }
            rest = &rest[i + name_len..];
        }
        assert!(used.len() >= 12, "{file}: only {} metric uses", used.len());
        for name in used {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| families.contains(f))
                .unwrap_or(name);
            assert!(
                families.contains(family),
                "{file} uses {name}, which /metrics does not serve"
            );
        }
    }
}

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[test]
fn the_browser_client_chats_in_headless_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium is missing at {chromium} (set CHROMIUM, or `apt-get install chromium`; .ci/run installs it)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci --prefix tests/browser` (.ci/run does)"
    );
    let dir = scratch("standalone-browser");
    // The script plays bob's push service on this port (Web Push).
    let push_port = free_port();
    let endpoints = format!("http://127.0.0.1:{push_port}/push/");
    let env = [("IM_WEB_PUSH_ENDPOINTS", endpoints.as_str())];
    let s = Standalone::start_with(&dir, &dir.join("data"), "standalone", &env);
    let out = dir.join("screenshots");
    std::fs::create_dir_all(&out).unwrap();
    let run = std::process::Command::new("node")
        .arg(browser_dir().join("chat.mjs"))
        .env("IM_BASE_URL", format!("http://{}", s.api))
        .env("IM_OUT_DIR", &out)
        .env("IM_PUSH_PORT", push_port.to_string())
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node (Node.js) to run tests/browser/chat.mjs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        run.status.success() && text.contains("browser e2e: ok"),
        "the browser test failed ({}):\n{text}\n===== server =====\n{}",
        run.status,
        s.proc.log_tail()
    );
    for f in ["alice.png", "bob.png"] {
        let p = out.join(f);
        assert!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "no screenshot at {}",
            p.display()
        );
    }
    println!("screenshots of the final state: {}", out.display());
}

/// Tracing in one process (README.md, "Tracing"): the same spans as the distributed pipeline,
/// their context carried by the in-process bus, exported to the test's collector.
#[test]
fn a_traced_send_is_one_trace_in_standalone() {
    let (collector, requests) = support::http_receiver("200 OK", "200 OK");
    let dir = scratch("standalone-tracing");
    let env = [
        ("IM_OTLP_ENDPOINT", collector.as_str()),
        ("IM_OTLP_SAMPLE_RATIO", "1"),
    ];
    let s = Standalone::start_with(&dir, &dir.join("data"), "standalone-tracing", &env);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let mut a = Ws::connect(s.ws, &ta);
    let mut b = Ws::connect(s.ws, &tb);
    // Bob is online (presence) before Alice writes, so his message is delivered live.
    let mut sent = Value::Null;
    for i in 0..50 {
        let cid = format!("t{i}");
        a.send(json!({"type": "send", "cid": cid, "to": bob.to_string(), "content": "traced"}));
        sent = a.until(WAIT, &mut Vec::new(), |v| v["type"] == "sent");
        if b.recv(Duration::from_millis(500))
            .is_some_and(|m| m["type"] == "msg")
        {
            break;
        }
    }
    assert_eq!(sent["type"], "sent");
    let want = [
        "im.send",
        "im.upstream",
        "im.sequence",
        "im.durable",
        "im.route",
    ];
    // One deliver span for the message (both users on the one gateway), one for `sent`.
    let trace = support::collect_trace(
        &requests,
        WAIT,
        |spans| {
            // The trace of the send Bob received live.
            let live: Vec<support::Span> = spans
                .iter()
                .filter(|s| s.name != "im.send" || s.attrs["im.cid"] == sent["cid"])
                .cloned()
                .collect();
            support::trace_with(&live, &want, 2)
        },
        || s.proc.log_tail(),
    );
    let one = |n: &str| trace.iter().find(|s| s.name == n).unwrap();
    let (send, up, seq) = (one("im.send"), one("im.upstream"), one("im.sequence"));
    assert_eq!(send.parent, None);
    assert_eq!(up.parent.as_ref(), Some(&send.id));
    assert_eq!(seq.parent.as_ref(), Some(&up.id));
    assert_eq!(one("im.durable").parent.as_ref(), Some(&seq.id));
    let route = one("im.route");
    assert_eq!(route.parent.as_ref(), Some(&seq.id));
    assert!(trace
        .iter()
        .filter(|s| s.name == "im.deliver")
        .all(|d| d.parent.as_ref() == Some(&route.id)));
    assert!(trace.iter().all(|s| s.service == "im"), "{trace:#?}");
    assert_eq!(send.attrs["im.outcome"], "sent");
    // Standalone's durability point is persist's commit: the durable span covers it.
    let durable = one("im.durable");
    assert!(durable.end <= route.start && route.start <= send.end);
}

/// Every error answered to a client is counted by code: those a shard makes itself
/// (`im_gateway_error_frames_total`) and those logic answers through the bridge
/// (`im_bridge_error_replies_total`).
#[test]
fn errors_answered_to_clients_are_counted_by_code() {
    let dir = scratch("standalone-errors");
    let s = Standalone::start(&dir, &dir.join("data"), "standalone-errors");
    let (_, ta) = s.user("alice");
    let mut a = Ws::connect(s.ws, &ta);
    let is_error = |v: &Value| v["type"] == "error";
    // The shard's own: a type it does not know.
    a.send(json!({"type": "no-such-type"}));
    let shard_code = a.until(WAIT, &mut Vec::new(), is_error)["code"].clone();
    // Logic's, through the bridge: a send to nobody.
    a.send(json!({"type": "send", "cid": "c1", "to": "999999999", "content": "hello?"}));
    let logic_code = a.until(WAIT, &mut Vec::new(), is_error)["code"].clone();
    assert_eq!((&shard_code, &logic_code), (&json!(4001), &json!(4040)));
    let (_, text) = support::get_text(s.ws, "/metrics");
    let counted = |family: &str, code: &Value| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter(|l| l.contains(&format!("code=\"{code}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        counted("im_gateway_error_frames_total", &shard_code),
        1,
        "{text}"
    );
    assert_eq!(
        counted("im_bridge_error_replies_total", &logic_code),
        1,
        "{text}"
    );
    assert_eq!(counted("im_bridge_error_replies_total", &shard_code), 0);
}

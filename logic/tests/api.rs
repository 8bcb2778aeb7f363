//! The REST API through the real router, on both real backends: happy paths and, for each
//! endpoint, the bad inputs (docs/PROTOCOL.md, "REST").

use axum::body::Body;
use axum::http::{Request, StatusCode};
use im_bus::presence::{Change, MemoryPresence, Presence};
use im_bus::revocation::RevokedSet;
use im_shared::ErrorCode;
use im_store::testing::{drop_mysql, fresh_mysql, fresh_sqlite, tempdir};
use im_store::Store;
use logic::api::{self, ApiConfig, AppState};
use logic::auth::{self, PasswordCost};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tower::ServiceExt;

const SECRET: &[u8] = b"api-test-secret";

struct Api {
    app: axum::Router,
    state: Arc<AppState>,
}

impl Api {
    fn new(store: Arc<dyn Store>) -> Api {
        Api::with_cost(store, PasswordCost::test())
    }

    fn with_cost(store: Arc<dyn Store>, cost: PasswordCost) -> Api {
        Api::build(store, cost, 100, api::MetricsAt::Api, 0)
    }

    /// With a pipeline on the in-process bus (no stage runs: what needs one is not asked),
    /// and presence in memory, which the test writes as a gateway would.
    async fn with_pipeline(store: Arc<dyn Store>) -> (Api, Arc<MemoryPresence>) {
        let bus: Arc<dyn im_bus::Bus> = Arc::new(im_bus::MemoryBus::new(4, 1 << 20));
        let presence = Arc::new(MemoryPresence::default());
        let blocks = Arc::new(logic::stage::blocks::Blocks::new(store.clone()));
        let pipeline = api::Pipeline {
            client: logic::stage::client::PipelineClient::start(bus, "api-test")
                .await
                .unwrap(),
            members: Arc::new(logic::stage::members::Members::new(store.clone())),
            blocks,
            stats: Default::default(),
            presence: presence.clone(),
            web_push: None,
        };
        let cost = PasswordCost::test();
        let api = Api::build_with(store, cost, 100, api::MetricsAt::Api, 0, Some(pipeline));
        (api, presence)
    }

    fn build(
        store: Arc<dyn Store>,
        cost: PasswordCost,
        sends_per_s_max: u32,
        metrics: api::MetricsAt,
        refresh_reuse_grace_ms: u64,
    ) -> Api {
        Api::build_with(
            store,
            cost,
            sends_per_s_max,
            metrics,
            refresh_reuse_grace_ms,
            None,
        )
    }

    fn build_with(
        store: Arc<dyn Store>,
        cost: PasswordCost,
        sends_per_s_max: u32,
        metrics: api::MetricsAt,
        refresh_reuse_grace_ms: u64,
        pipeline: Option<api::Pipeline>,
    ) -> Api {
        let state = AppState::new(
            store,
            Arc::new(RevokedSet::default()),
            ApiConfig {
                jwt_secret: SECRET.to_vec(),
                access_ttl_s: 600,
                refresh_ttl_s: 3600,
                password_cost: cost,
                ws_url: "ws://127.0.0.1:8090/ws".into(),
                gateways: None,
                // The tests' requests name their client in X-Forwarded-For (`Api::login_from`).
                trusted_proxies: vec![std::net::Ipv4Addr::UNSPECIFIED.into()],
                token_lifetime_max_s: im_shared::jwt::LIFETIME_MAX_S,
                sends_per_s_max,
                metrics,
                // 0 by default here: the tests reuse refresh tokens at once.
                refresh_reuse_grace_ms,
            },
            auth::dummy_hash(cost),
            Arc::new(im_shared::snowflake::WorkerLease::fixed(1)),
            pipeline,
        );
        let state = Arc::new(state);
        Api {
            app: api::router(state.clone()),
            state,
        }
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: String,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (ct, text) = match body {
            Some(b) => (Some("application/json"), b.to_string()),
            None => (None, String::new()),
        };
        self.raw(method, path, token, ct, text).await
    }

    async fn register(&self, username: &str, password: &str) -> (StatusCode, Value) {
        self.call(
            "POST",
            "/api/v1/users/register",
            None,
            Some(json!({"username": username, "password": password})),
        )
        .await
    }

    async fn login(&self, username: &str, password: &str) -> (StatusCode, Value) {
        self.call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": username, "password": password})),
        )
        .await
    }
}

/// A login from client address `from` (the tests' router trusts 0.0.0.0 as a proxy, and
/// in-process requests come from it): status, `Retry-After`, body.
async fn login_from(
    app: &axum::Router,
    from: &str,
    username: &str,
    password: &str,
) -> (StatusCode, Option<u64>, Value) {
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/auth/login")
        .header("content-type", "application/json")
        // A client's own claim on the left, our proxy's on the right: the right one counts.
        .header("x-forwarded-for", format!("10.9.9.9, {from}"))
        .body(Body::from(
            json!({"username": username, "password": password}).to_string(),
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, retry, serde_json::from_slice(&bytes).unwrap())
}

/// Brute force is slowed per (account, address) and per address, never by account alone;
/// argon2 runs at most once per core however many logins arrive at once.
async fn login_throttling(api: &Api) {
    assert_eq!(
        api.register("victim", "correct horse").await.0,
        StatusCode::CREATED
    );
    let app = &api.app;
    let attacker = "198.51.100.7";
    for i in 0..5 {
        let r = login_from(app, attacker, "victim", &format!("guess {i}")).await;
        assert_eq!(r.0, StatusCode::UNAUTHORIZED, "attempt {i}: {r:?}");
    }
    // Even the right password waits now: the attempt is not even checked.
    let r = login_from(app, attacker, "victim", "correct horse").await;
    assert_eq!(r.0, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.2["code"], 4290);
    assert_eq!(r.1, Some(1), "Retry-After: the first wait is a second");
    // The victim, from their own address, is not locked out.
    let r = login_from(app, "192.0.2.10", "victim", "correct horse").await;
    assert_eq!(r.0, StatusCode::OK, "{r:?}");
    // Once the wait has passed, the attacker's address may try again (once, then 2 s).
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let r = login_from(app, attacker, "victim", "guess 5").await;
    assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = login_from(app, attacker, "victim", "guess 6").await;
    assert_eq!(
        (r.0, r.1),
        (StatusCode::TOO_MANY_REQUESTS, Some(2)),
        "{r:?}"
    );

    // Per address: many accounts, four failures each, add up to the address's limit.
    let sprayer = "203.0.113.5";
    for i in 0..20 {
        let r = login_from(app, sprayer, &format!("user{}", i % 5), "password1").await;
        assert_eq!(r.0, StatusCode::UNAUTHORIZED, "attempt {i}: {r:?}");
    }
    let r = login_from(app, sprayer, "victim", "correct horse").await;
    assert_eq!(r.0, StatusCode::TOO_MANY_REQUESTS, "{r:?}");

    // 64 logins at once: argon2 runs at most once per core.
    let mut logins = tokio::task::JoinSet::new();
    for i in 0..64 {
        let (app, from) = (app.clone(), format!("192.0.2.{}", 100 + i));
        logins.spawn(async move { login_from(&app, &from, "victim", "correct horse").await.0 });
    }
    let answers = logins.join_all().await;
    assert!(answers.iter().all(|s| *s == StatusCode::OK), "{answers:?}");
    let cores = std::thread::available_parallelism().unwrap().get();
    let peak = api
        .state
        .hashing_peak
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=cores).contains(&peak), "peak {peak}, cores {cores}");
}

#[tokio::test]
async fn login_throttling_on_sqlite() {
    let dir = tempdir();
    // Hashes of 1 MiB: slow enough that 64 logins at once overlap unless they are held apart.
    let cost = PasswordCost {
        m_kib: 1024,
        t: 1,
        p: 1,
    };
    login_throttling(&Api::with_cost(Arc::new(fresh_sqlite(&dir).await), cost)).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `POST /messages/send` has the WebSocket's budget: per user, bursts of twice the rate,
/// then 429 with Retry-After; another user is not affected.
#[tokio::test]
async fn rest_sends_are_rate_limited_on_sqlite() {
    let dir = tempdir();
    let api = Api::build(
        Arc::new(fresh_sqlite(&dir).await),
        PasswordCost::test(),
        2,
        api::MetricsAt::Api,
        0,
    );
    let (ann, a) = user(&api, "ann").await;
    let (ben, b) = user(&api, "ben").await;
    let send = |tok: &str, to: &str, i: u32| {
        let (tok, body) = (
            tok.to_string(),
            json!({"to": to, "content": format!("m{i}"), "cid": format!("c{i}")}),
        );
        let api = &api;
        async move {
            api.call("POST", "/api/v1/messages/send", Some(&tok), Some(body))
                .await
        }
    };
    for i in 0..4 {
        assert_eq!(send(&a, &ben, i).await.0, StatusCode::OK, "burst send {i}");
    }
    let r = send(&a, &ben, 4).await;
    assert_eq!(err(&r), (429, 4290), "{r:?}");
    assert_eq!(
        send(&b, &ann, 0).await.0,
        StatusCode::OK,
        "ben has his own budget"
    );
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/messages/send")
        .header("authorization", format!("Bearer {a}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({"to": ben, "content": "x"}).to_string()))
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    let _ = std::fs::remove_dir_all(dir);
}

/// A refresh token presented again within the grace period is its own client retrying a
/// refresh whose answer it lost: refused, but the session goes on.
#[tokio::test]
async fn a_refresh_retried_at_once_does_not_end_the_session() {
    let dir = tempdir();
    let store: Arc<dyn Store> = Arc::new(fresh_sqlite(&dir).await);
    let api = Api::build(
        store,
        PasswordCost::test(),
        100,
        api::MetricsAt::Api,
        60_000,
    );
    user(&api, "hal").await;
    let r = api.login("hal", "correct horse").await;
    let refresh = r.1["refresh_token"].as_str().unwrap().to_string();
    let body = json!({"refresh_token": refresh});
    let first = api
        .call("POST", "/api/v1/auth/refresh", None, Some(body.clone()))
        .await;
    assert_eq!(first.0, StatusCode::OK, "{first:?}");
    let again = api
        .call("POST", "/api/v1/auth/refresh", None, Some(body))
        .await;
    assert_eq!(err(&again), (401, 4010));
    let token = first.1["token"].as_str().unwrap();
    let r = api
        .call("GET", "/api/v1/users/profile", Some(token), None)
        .await;
    assert_eq!(r.0, StatusCode::OK, "the session goes on: {r:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `/metrics` on the API port by default; with `--metrics-listen`, only on its own router
/// (the API port answers 404).
#[tokio::test]
async fn metrics_can_leave_the_api_port() {
    let dir = tempdir();
    let store: Arc<dyn Store> = Arc::new(fresh_sqlite(&dir).await);
    let get = |app: axum::Router, path: &'static str| async move {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        app.oneshot(req).await.unwrap().status()
    };
    let here = Api::build(
        store.clone(),
        PasswordCost::test(),
        100,
        api::MetricsAt::Api,
        0,
    );
    assert_eq!(get(here.app.clone(), "/metrics").await, StatusCode::OK);
    let own = api::MetricsAt::Own("127.0.0.1:9".parse().unwrap());
    let away = Api::build(store, PasswordCost::test(), 100, own, 0);
    assert_eq!(
        get(away.app.clone(), "/metrics").await,
        StatusCode::NOT_FOUND
    );
    let metrics = api::metrics_router(away.state.clone());
    assert_eq!(get(metrics.clone(), "/metrics").await, StatusCode::OK);
    assert_eq!(
        get(metrics, "/api/v1/users/profile").await,
        StatusCode::NOT_FOUND
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Status and error code of an answer.
fn err(r: &(StatusCode, Value)) -> (u16, u64) {
    (r.0.as_u16(), r.1["code"].as_u64().unwrap_or(0))
}

async fn accounts(api: &Api) {
    // Register.
    let r = api.register("Alice", "correct horse").await;
    assert_eq!(r.0, StatusCode::CREATED, "{r:?}");
    let alice_id = r.1["user_id"]
        .as_str()
        .expect("user id as a string")
        .to_string();
    assert_eq!(
        err(&api.register("alice", "another pass").await),
        (409, 4090),
        "usernames are case-insensitive"
    );
    let bad_registrations = [
        (json!({"password": "correct horse"}), 4002),
        (json!({"username": "bob"}), 4002),
        (json!({"username": 5, "password": "correct horse"}), 4000),
        (
            json!({"username": "b".repeat(33), "password": "correct horse"}),
            4003,
        ),
        (
            json!({"username": "al ice", "password": "correct horse"}),
            4003,
        ),
        (
            json!({"username": "_bob", "password": "correct horse"}),
            4003,
        ),
        (json!({"username": "bob", "password": "short"}), 4003),
        (
            json!({"username": "bob", "password": "p".repeat(129)}),
            4003,
        ),
        (
            json!({"username": "bob", "password": "correct horse", "nickname": "n".repeat(65)}),
            4003,
        ),
        (
            json!({"username": "bob", "password": "correct horse", "nickname": "a\u{0007}b"}),
            4003,
        ),
        (json!([1, 2]), 4000),
    ];
    for (body, code) in bad_registrations {
        let r = api
            .call("POST", "/api/v1/users/register", None, Some(body.clone()))
            .await;
        assert_eq!(err(&r), (400, code), "{body} -> {r:?}");
    }
    let r = api
        .raw(
            "POST",
            "/api/v1/users/register",
            None,
            Some("application/json"),
            "{not json".into(),
        )
        .await;
    assert_eq!(err(&r), (400, 4000));
    let r = api
        .raw(
            "POST",
            "/api/v1/users/register",
            None,
            None,
            r#"{"username":"x","password":"y"}"#.into(),
        )
        .await;
    assert_eq!(err(&r), (400, 4000), "missing content type");

    // A body larger than the server reads: 413; a route with the wrong method, or OPTIONS
    // (no CORS here): 405. Both with the JSON error body.
    let huge = format!(
        r#"{{"username":"bob","password":"{}"}}"#,
        "p".repeat(api::BODY_BYTES_MAX)
    );
    let r = api
        .raw(
            "POST",
            "/api/v1/users/register",
            None,
            Some("application/json"),
            huge,
        )
        .await;
    assert_eq!(err(&r), (413, 4004), "{r:?}");
    for method in ["DELETE", "OPTIONS", "GET"] {
        let r = api
            .raw(method, "/api/v1/auth/login", None, None, String::new())
            .await;
        assert_eq!(err(&r), (405, 4050), "{method}: {r:?}");
    }

    // Login: right, wrong password, unknown user — the two failures look the same.
    let r = api.login("ALICE", "correct horse").await;
    assert_eq!(r.0, StatusCode::OK, "{r:?}");
    assert_eq!(r.1["user_id"], alice_id.as_str());
    assert_eq!(r.1["ws_url"], "ws://127.0.0.1:8090/ws");
    assert_eq!(r.1["expires_in"], 600);
    let token = r.1["token"].as_str().unwrap().to_string();
    let refresh = r.1["refresh_token"].as_str().unwrap().to_string();
    let wrong = api.login("alice", "wrong horse").await;
    let unknown = api.login("nobody", "correct horse").await;
    assert_eq!(err(&wrong), (401, 4010));
    assert_eq!(wrong.1, unknown.1, "no hint which part was wrong");
    assert_eq!(err(&api.login("bad name!", "x").await), (401, 4010));
    assert_eq!(
        err(&api
            .call(
                "POST",
                "/api/v1/auth/login",
                None,
                Some(json!({"username": "alice"}))
            )
            .await),
        (400, 4002)
    );

    // Profile, with the token and with bad ones.
    let r = api
        .call("GET", "/api/v1/users/profile", Some(&token), None)
        .await;
    assert_eq!(
        r.1,
        json!({"user_id": alice_id, "username": "alice", "nickname": "Alice", "avatar": "", "hide_presence": false})
    );
    let expired = jwt_for(alice_id.parse().unwrap(), -10);
    let forged = im_shared::jwt::sign(
        b"other secret",
        &im_shared::jwt::Claims::new(alice_id.parse().unwrap(), now_s(), 60),
    );
    let mut tampered = token.clone();
    tampered.insert(tampered.len() - 3, 'x');
    // Signed with the right secret, but claiming too much: a lifetime to the end of time, an
    // issue time in the future, a user id no user can have.
    let forever = {
        let mut c = im_shared::jwt::Claims::new(alice_id.parse().unwrap(), now_s(), 60);
        c.exp = u64::MAX;
        im_shared::jwt::sign(SECRET, &c)
    };
    let future = {
        let mut c = im_shared::jwt::Claims::new(alice_id.parse().unwrap(), now_s() + 3600, 60);
        c.exp = now_s() + 7200;
        im_shared::jwt::sign(SECRET, &c)
    };
    let huge_sub = {
        let mut c = im_shared::jwt::Claims::new(1, now_s(), 60);
        c.sub = (1u64 << 63).to_string();
        im_shared::jwt::sign(SECRET, &c)
    };
    for bad in [
        None,
        Some("garbage"),
        Some(expired.as_str()),
        Some(forged.as_str()),
        Some(tampered.as_str()),
        Some(forever.as_str()),
        Some(future.as_str()),
        Some(huge_sub.as_str()),
    ] {
        assert_eq!(
            err(&api.call("GET", "/api/v1/users/profile", bad, None).await),
            (401, 4010),
            "{bad:?}"
        );
    }
    // A well-signed token for a user that does not exist opens nothing: no groups, no sends.
    let ghost = im_shared::jwt::sign(
        SECRET,
        &im_shared::jwt::Claims::new(alice_id.parse::<u64>().unwrap() + 100_000, now_s(), 60),
    );
    for (method, path, body) in [
        ("GET", "/api/v1/users/profile", None),
        (
            "POST",
            "/api/v1/groups/create",
            Some(json!({"name": "ghosts"})),
        ),
        (
            "POST",
            "/api/v1/messages/send",
            Some(json!({"to": alice_id, "content": "boo"})),
        ),
    ] {
        let r = api.call(method, path, Some(&ghost), body).await;
        assert_eq!(err(&r), (401, 4010), "{method} {path}: {r:?}");
    }
    let tricky = "Robert'); DROP TABLE users;--";
    let r = api
        .call(
            "PUT",
            "/api/v1/users/profile",
            Some(&token),
            Some(json!({"nickname": tricky, "avatar": "https://x.test/a.png"})),
        )
        .await;
    assert_eq!(
        (r.1["nickname"].as_str(), r.1["avatar"].as_str()),
        (Some(tricky), Some("https://x.test/a.png")),
        "{r:?}"
    );
    assert_eq!(
        err(&api
            .call(
                "PUT",
                "/api/v1/users/profile",
                Some(&token),
                Some(json!({"avatar": "javascript:alert(1)"}))
            )
            .await),
        (400, 4003)
    );
    assert_eq!(
        err(&api
            .call(
                "PUT",
                "/api/v1/users/profile",
                Some(&token),
                Some(json!({"nickname": ""}))
            )
            .await),
        (400, 4003)
    );
    assert_eq!(
        err(&api
            .call(
                "PUT",
                "/api/v1/users/profile",
                None,
                Some(json!({"nickname": "x"}))
            )
            .await),
        (401, 4010)
    );
    // Names that hide or reorder text, and avatars other browsers should not fetch.
    for body in [
        json!({"nickname": "gnp\u{202E}exe."}),
        json!({"nickname": "\u{200B}\u{200B}"}),
        json!({"avatar": "http://x.test/a.png"}),
        json!({"avatar": "https://me:pw@x.test/a.png"}),
    ] {
        let r = api
            .call(
                "PUT",
                "/api/v1/users/profile",
                Some(&token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(err(&r), (400, 4003), "{body} -> {r:?}");
    }
    let r = api
        .call(
            "PUT",
            "/api/v1/users/profile",
            Some(&token),
            Some(json!({"avatar": "HTTPS://X.Test:443/A.png#me"})),
        )
        .await;
    assert_eq!(r.1["avatar"], "https://x.test/A.png", "normalised: {r:?}");
    let r = api
        .call(
            "POST",
            "/api/v1/groups/create",
            Some(&token),
            Some(json!({"name": "\u{202E}quorum"})),
        )
        .await;
    assert_eq!(err(&r), (400, 4003), "{r:?}");

    // Refresh rotates within the login's family: the new pair works.
    let refresh_with = |t: &str| {
        let body = json!({"refresh_token": t});
        async move {
            api.call("POST", "/api/v1/auth/refresh", None, Some(body))
                .await
        }
    };
    let profile = |t: &str| {
        let t = t.to_string();
        async move {
            api.call("GET", "/api/v1/users/profile", Some(&t), None)
                .await
                .0
        }
    };
    let pair = |r: &(StatusCode, Value)| {
        assert_eq!(r.0, StatusCode::OK, "{r:?}");
        (
            r.1["token"].as_str().unwrap().to_string(),
            r.1["refresh_token"].as_str().unwrap().to_string(),
        )
    };
    let (token2, refresh2) = pair(&refresh_with(&refresh).await);
    assert_eq!(profile(&token2).await, StatusCode::OK);
    // Another login is another session.
    let (token_b, refresh_b) = pair(&api.login("alice", "correct horse").await);

    // A rotated refresh token used again was copied: its whole family ends, the access
    // tokens it issued included, whoever holds them.
    assert_eq!(err(&refresh_with(&refresh).await), (401, 4010), "reuse");
    for t in [&token, &token2] {
        assert_eq!(profile(t).await, StatusCode::UNAUTHORIZED, "revoked");
    }
    assert_eq!(
        err(&refresh_with(&refresh2).await),
        (401, 4010),
        "the family's current refresh token ends too"
    );
    // The other session lives on.
    assert_eq!(profile(&token_b).await, StatusCode::OK);
    let (token_b2, refresh_b2) = pair(&refresh_with(&refresh_b).await);
    assert_eq!(
        err(&api
            .call("POST", "/api/v1/auth/refresh", None, Some(json!({})))
            .await),
        (400, 4002)
    );

    // Logout ends this session: its access and refresh tokens. Other sessions go on.
    let (token_c, refresh_c) = pair(&api.login("alice", "correct horse").await);
    let r = api
        .call("POST", "/api/v1/auth/logout", Some(&token_b2), None)
        .await;
    assert_eq!(r.0, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(profile(&token_b2).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        profile(&token_b).await,
        StatusCode::UNAUTHORIZED,
        "its earlier token too"
    );
    assert_eq!(err(&refresh_with(&refresh_b2).await), (401, 4010));
    assert_eq!(
        profile(&token_c).await,
        StatusCode::OK,
        "other sessions live on"
    );

    // Logout everywhere ends every session of the user.
    let (token_d, _) = pair(&api.login("alice", "correct horse").await);
    let r = api
        .call("POST", "/api/v1/auth/logout-all", Some(&token_c), None)
        .await;
    assert_eq!(r.0, StatusCode::NO_CONTENT, "{r:?}");
    for t in [&token_c, &token_d] {
        assert_eq!(profile(t).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(err(&refresh_with(&refresh_c).await), (401, 4010));

    assert_eq!(
        err(&api.call("GET", "/api/v1/nope", None, None).await),
        (404, 4040)
    );
}

/// Registers and logs in; the user id and token.
async fn user(api: &Api, name: &str) -> (String, String) {
    assert_eq!(
        api.register(name, "correct horse").await.0,
        StatusCode::CREATED
    );
    let r = api.login(name, "correct horse").await;
    (
        r.1["user_id"].as_str().unwrap().to_string(),
        r.1["token"].as_str().unwrap().to_string(),
    )
}

async fn groups(api: &Api) {
    let (alice, a) = user(api, "alice").await;
    let (bob, b) = user(api, "bob").await;
    let (carol, c) = user(api, "carol").await;
    let (_, d) = user(api, "dave").await;
    let create = |body: Value, tok: Option<String>| async move {
        api.call("POST", "/api/v1/groups/create", tok.as_deref(), Some(body))
            .await
    };

    let r = create(
        json!({"name": "rustaceans", "description": "<b>hi</b>", "max_members": 3, "visibility": "public"}),
        Some(a.clone()),
    )
    .await;
    assert_eq!(r.0, StatusCode::CREATED, "{r:?}");
    let g = r.1["group_id"].as_str().unwrap().to_string();
    for (body, code) in [
        (json!({"description": "x"}), 4002),
        (json!({"name": ""}), 4003),
        (json!({"name": "n".repeat(65)}), 4003),
        (json!({"name": "x", "max_members": 1}), 4003),
        (json!({"name": "x", "max_members": 10_001}), 4003),
        (json!({"name": "x", "max_members": "ten"}), 4000),
        (json!({"name": "x", "description": "d".repeat(513)}), 4003),
    ] {
        assert_eq!(
            err(&create(body.clone(), Some(a.clone())).await),
            (400, code),
            "{body}"
        );
    }
    assert_eq!(err(&create(json!({"name": "x"}), None).await), (401, 4010));

    let path = format!("/api/v1/groups/{g}");
    let r = api.call("GET", &path, Some(&b), None).await;
    assert_eq!(
        (r.1["owner_id"].as_str(), r.1["member_count"].as_u64()),
        (Some(alice.as_str()), Some(1))
    );
    assert_eq!(r.1["description"], "<b>hi</b>", "stored verbatim");
    assert_eq!(
        err(&api.call("GET", "/api/v1/groups/abc", Some(&b), None).await),
        (400, 4003)
    );
    assert_eq!(
        err(&api
            .call("GET", "/api/v1/groups/999999", Some(&b), None)
            .await),
        (404, 4040)
    );
    assert_eq!(
        err(&api
            .call("POST", "/api/v1/groups/999999/join", Some(&b), None)
            .await),
        (404, 4040)
    );

    // Join (idempotent), list members (members only).
    assert_eq!(
        api.call("POST", &format!("{path}/join"), Some(&b), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.call("POST", &format!("{path}/join"), Some(&b), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.call("GET", &path, Some(&b), None).await.1["member_count"],
        2
    );
    assert_eq!(
        err(&api
            .call("GET", &format!("{path}/members"), Some(&c), None)
            .await),
        (403, 4030)
    );
    let r = api
        .call("GET", &format!("{path}/members"), Some(&b), None)
        .await;
    let ids: Vec<&str> = r.1["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![alice.as_str(), bob.as_str()]);
    let r = api
        .call("GET", &format!("{path}/members?limit=1"), Some(&b), None)
        .await;
    assert_eq!(
        (
            r.1["members"].as_array().unwrap().len(),
            r.1["more"].as_bool()
        ),
        (1, Some(true))
    );
    let r = api
        .call(
            "GET",
            &format!("{path}/members?limit=1&after={alice}"),
            Some(&b),
            None,
        )
        .await;
    assert_eq!(r.1["members"][0]["user_id"], bob.as_str());
    assert_eq!(
        err(&api
            .call("GET", &format!("{path}/members?limit=0"), Some(&b), None)
            .await),
        (400, 4003)
    );

    // The owner adds; others may not; the group fills up.
    let add = |tok: String, body: Value| {
        let path = format!("{path}/members");
        async move { api.call("POST", &path, Some(&tok), Some(body)).await }
    };
    assert_eq!(
        err(&add(b.clone(), json!({"user_id": carol})).await),
        (403, 4030)
    );
    assert_eq!(
        err(&add(a.clone(), json!({"user_id": "999999"})).await),
        (404, 4040)
    );
    assert_eq!(
        err(&add(a.clone(), json!({"user_id": "x"})).await),
        (400, 4003)
    );
    assert_eq!(err(&add(a.clone(), json!({})).await), (400, 4002));
    assert_eq!(
        add(a.clone(), json!({"user_id": carol})).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        err(&api
            .call("POST", &format!("{path}/join"), Some(&d), None)
            .await),
        (409, 4090),
        "full at 3"
    );

    // Leave and remove.
    assert_eq!(
        api.call("POST", &format!("{path}/leave"), Some(&b), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        err(&api
            .call("POST", &format!("{path}/leave"), Some(&b), None)
            .await),
        (409, 4090)
    );
    assert_eq!(
        err(&api
            .call("POST", &format!("{path}/leave"), Some(&a), None)
            .await),
        (409, 4090),
        "owner stays"
    );
    let remove = |tok: String, who: String| {
        let path = format!("{path}/members/{who}");
        async move { api.call("DELETE", &path, Some(&tok), None).await }
    };
    assert_eq!(err(&remove(c.clone(), alice.clone()).await), (403, 4030));
    assert_eq!(err(&remove(a.clone(), alice.clone()).await), (409, 4090));
    assert_eq!(
        remove(a.clone(), carol.clone()).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(err(&remove(a.clone(), carol.clone()).await), (404, 4040));
    assert_eq!(err(&remove(a.clone(), "nope".into()).await), (400, 4003));
    assert_eq!(
        api.call("GET", &path, Some(&a), None).await.1["member_count"],
        1
    );
}

#[tokio::test]
async fn groups_on_mysql() {
    let store = Arc::new(fresh_mysql().await);
    groups(&Api::new(store.clone())).await;
    drop_mysql(Arc::into_inner(store).expect("the api is gone")).await;
}

#[tokio::test]
async fn groups_on_sqlite() {
    let dir = tempdir();
    groups(&Api::new(Arc::new(fresh_sqlite(&dir).await))).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Private groups (the default): invisible to outsiders, joined by invite links the owner
/// makes and revokes; new members see the history from their join unless the group shows it
/// all. The security review's row "anyone can join any group and read its whole history".
async fn private_groups(api: &Api) {
    let (ann, a) = user(api, "ann").await;
    let (_, b) = user(api, "ben").await;
    let (cat, c) = user(api, "cat").await;
    let (_, d) = user(api, "dan").await;
    let call = |method: &'static str, path: String, tok: &str, body: Option<Value>| {
        let tok = tok.to_string();
        async move { api.call(method, &path, Some(&tok), body).await }
    };
    let r = call(
        "POST",
        "/api/v1/groups/create".into(),
        &a,
        Some(json!({"name": "secret"})),
    )
    .await;
    assert_eq!(r.0, StatusCode::CREATED, "{r:?}");
    let g = r.1["group_id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/groups/{g}");
    let r = call("GET", path.clone(), &a, None).await;
    assert_eq!(
        (&r.1["visibility"], &r.1["history"], &r.1["member"]),
        (&json!("private"), &json!("since_join"), &json!(true))
    );
    let send = |tok: &str, content: &str| {
        call(
            "POST",
            "/api/v1/messages/send".into(),
            tok,
            Some(json!({"group": g, "content": content})),
        )
    };
    for i in 1..=3 {
        assert_eq!(send(&a, &format!("before {i}")).await.0, StatusCode::OK);
    }

    // An outsider learns nothing: every route is 404, as for an id never used.
    let unknown = "/api/v1/groups/999999";
    for p in [path.as_str(), unknown] {
        for (method, route, body) in [
            ("GET", String::new(), None),
            ("POST", "/join".into(), None),
            ("POST", "/leave".into(), None),
            ("GET", "/members".into(), None),
            ("GET", "/invites".into(), None),
            ("POST", "/invites".into(), Some(json!({}))),
            ("PATCH", String::new(), Some(json!({"name": "mine"}))),
        ] {
            assert_eq!(
                err(&call(method, format!("{p}{route}"), &c, body).await),
                (404, 4040),
                "{method} {p}{route}"
            );
        }
    }
    assert_eq!(
        err(&call(
            "GET",
            format!("/api/v1/messages/history?conv=g:{g}"),
            &c,
            None
        )
        .await),
        (404, 4040)
    );
    assert_eq!(err(&send(&c, "let me in").await), (404, 4040));

    // Invites: the owner makes them; members who are not the owner may not.
    let invite = |tok: &str, body: Value| call("POST", format!("{path}/invites"), tok, Some(body));
    for (body, why) in [
        (json!({"expires_in_s": 59}), "too short"),
        (json!({"expires_in_s": 30 * 86_400 + 1}), "too long"),
        (json!({"max_uses": 10_001}), "too many uses"),
    ] {
        assert_eq!(err(&invite(&a, body).await), (400, 4003), "{why}");
    }
    let r = invite(&a, json!({"max_uses": 1, "expires_in_s": 3600})).await;
    assert_eq!(r.0, StatusCode::CREATED, "{r:?}");
    let once = r.1["token"].as_str().unwrap().to_string();
    assert_eq!(once.len(), 32);
    assert_eq!((&r.1["max_uses"], &r.1["uses"]), (&json!(1), &json!(0)));
    let expires = r.1["expires_ms"].as_u64().unwrap();
    let now = im_shared::unix_ms();
    assert!((now + 3_590_000..=now + 3_600_000).contains(&expires));
    let r = call("GET", format!("/api/v1/invites/{once}"), &b, None).await;
    assert_eq!(
        (&r.1["group"]["name"], &r.1["group"]["member_count"]),
        (&json!("secret"), &json!(1)),
        "{r:?}"
    );
    for bad in ["0123", "zz".repeat(16).as_str(), &once.to_uppercase()] {
        assert_eq!(
            err(&call("POST", format!("/api/v1/invites/{bad}/join"), &b, None).await),
            (404, 4040),
            "{bad}"
        );
    }
    let r = call("POST", format!("/api/v1/invites/{once}/join"), &b, None).await;
    assert_eq!((r.0, &r.1["group_id"]), (StatusCode::OK, &json!(g)));
    assert_eq!(
        err(&call("POST", format!("/api/v1/invites/{once}/join"), &c, None).await),
        (404, 4040),
        "used up"
    );
    assert_eq!(
        err(&call("GET", format!("/api/v1/invites/{once}"), &c, None).await),
        (404, 4040)
    );
    assert_eq!(err(&invite(&b, json!({})).await), (403, 4030));
    assert_eq!(
        err(&call("GET", format!("{path}/invites"), &b, None).await),
        (403, 4030)
    );
    assert_eq!(
        err(&call(
            "PATCH",
            path.clone(),
            &b,
            Some(json!({"visibility": "public"}))
        )
        .await),
        (403, 4030)
    );

    // Ben joined after three messages: he sees none of them, and nothing is unread.
    let hist = |tok: &str| {
        call(
            "GET",
            format!("/api/v1/messages/history?conv=g:{g}"),
            tok,
            None,
        )
    };
    let seqs = |v: &Value| -> Vec<u64> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    assert!(seqs(&hist(&b).await.1).is_empty());
    assert_eq!(seqs(&hist(&a).await.1), [3, 2, 1]);
    let listed = |tok: &str| {
        let tok = tok.to_string();
        let conv = format!("g:{g}");
        async move {
            let r = api
                .call("GET", "/api/v1/conversations", Some(&tok), None)
                .await;
            r.1.as_array()
                .unwrap()
                .iter()
                .find(|c| c["conv"] == conv.as_str())
                .cloned()
                .unwrap()
        }
    };
    let mine = listed(&b).await;
    assert_eq!(
        (&mine["unread"], &mine["last_message"]),
        (&json!(0), &Value::Null)
    );
    assert_eq!(send(&b, "hello, I am new").await.0, StatusCode::OK);
    assert_eq!(seqs(&hist(&b).await.1), [4]);

    // A second invite, with no limit: Cat joins; revoked, it lets no one else in.
    let r = invite(&a, json!({})).await;
    let open = r.1["token"].as_str().unwrap().to_string();
    let open_id = r.1["invite_id"].as_str().unwrap().to_string();
    assert!(r.1["expires_ms"].as_u64().unwrap() >= now + 7 * 86_400_000 - 60_000);
    assert_eq!(
        call("POST", format!("/api/v1/invites/{open}/join"), &c, None)
            .await
            .0,
        StatusCode::OK
    );
    let r = call("GET", format!("{path}/invites"), &a, None).await;
    let uses: Vec<(&Value, &Value)> = r.1["invites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (&i["invite_id"], &i["uses"]))
        .collect();
    assert_eq!(uses[0], (&json!(open_id), &json!(1)), "{r:?}");
    assert!(
        r.1["invites"][0].get("token").is_none(),
        "tokens are shown once"
    );
    // Removed by the owner, Cat cannot come back by the link; added again, she is in.
    assert_eq!(
        call("DELETE", format!("{path}/members/{cat}"), &a, None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        err(&call("POST", format!("/api/v1/invites/{open}/join"), &c, None).await),
        (403, 4030),
        "removed"
    );
    assert_eq!(
        err(&call("GET", path.clone(), &c, None).await),
        (404, 4040),
        "a private group is gone for whoever leaves it"
    );
    assert_eq!(
        call(
            "POST",
            format!("{path}/members"),
            &a,
            Some(json!({"user_id": cat}))
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    let revoke = format!("{path}/invites/{open_id}");
    assert_eq!(
        err(&call("DELETE", revoke.clone(), &b, None).await),
        (403, 4030)
    );
    assert_eq!(
        call("DELETE", revoke.clone(), &a, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(err(&call("DELETE", revoke, &a, None).await), (404, 4040));
    assert_eq!(
        err(&call("POST", format!("/api/v1/invites/{open}/join"), &d, None).await),
        (404, 4040),
        "revoked"
    );

    // Settings: bad values; all history; public (then anyone may look and join by id).
    for body in [
        json!({"visibility": "secret"}),
        json!({"history": "some"}),
        json!({"name": ""}),
        json!({"name": "a\u{202e}b"}),
    ] {
        assert_eq!(
            err(&call("PATCH", path.clone(), &a, Some(body.clone())).await),
            (400, 4003),
            "{body}"
        );
    }
    let r = call("PATCH", path.clone(), &a, Some(json!({"history": "all"}))).await;
    assert_eq!((r.0, &r.1["history"]), (StatusCode::OK, &json!("all")));
    assert_eq!(seqs(&hist(&b).await.1), [4, 3, 2, 1]);
    assert_eq!(
        err(&call("POST", format!("{path}/join"), &d, None).await),
        (404, 4040)
    );
    let r = call(
        "PATCH",
        path.clone(),
        &a,
        Some(json!({"visibility": "public", "name": "open now"})),
    )
    .await;
    assert_eq!(
        (&r.1["visibility"], &r.1["name"], &r.1["owner_id"]),
        (&json!("public"), &json!("open now"), &json!(ann))
    );
    let r = call("GET", path.clone(), &d, None).await;
    assert_eq!(
        (&r.1["member"], &r.1["member_count"]),
        (&json!(false), &json!(3))
    );
    assert_eq!(
        err(&send(&d, "hi").await),
        (403, 4030),
        "public: not a member"
    );
    assert_eq!(
        call("POST", format!("{path}/join"), &d, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(seqs(&hist(&d).await.1), [4, 3, 2, 1], "history: all");
}

/// Blocking: no two-person messages either way, a clear error, listed, lifted.
async fn blocking(api: &Api) {
    let (ann, a) = user(api, "ann").await;
    let (ben, b) = user(api, "ben").await;
    let call = |method: &'static str, path: String, tok: &str, body: Option<Value>| {
        let tok = tok.to_string();
        async move { api.call(method, &path, Some(&tok), body).await }
    };
    let send = |tok: &str, to: &str| {
        call(
            "POST",
            "/api/v1/messages/send".into(),
            tok,
            Some(json!({"to": to, "content": "hi"})),
        )
    };
    assert_eq!(send(&a, &ben).await.0, StatusCode::OK);
    let block = format!("/api/v1/users/{ann}/block");
    assert_eq!(
        call("PUT", block.clone(), &b, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call("PUT", block.clone(), &b, None).await.0,
        StatusCode::NO_CONTENT,
        "idempotent"
    );
    let r = send(&a, &ben).await;
    assert_eq!(err(&r), (403, 4030));
    assert_eq!(r.1["message"], "this user does not accept your messages");
    let r = send(&b, &ann).await;
    assert_eq!(err(&r), (403, 4030), "nor the other way");
    assert!(r.1["message"]
        .as_str()
        .unwrap()
        .contains("you have blocked"));
    let r = call("GET", "/api/v1/users/blocked".into(), &b, None).await;
    assert_eq!(r.1["users"], json!([ann]));
    // Nor can Ann put Ben in a group of hers, where her messages would reach him.
    let r = call(
        "POST",
        "/api/v1/groups/create".into(),
        &a,
        Some(json!({"name": "around"})),
    )
    .await;
    let g = r.1["group_id"].as_str().unwrap().to_string();
    let add = format!("/api/v1/groups/{g}/members");
    let r = call("POST", add, &a, Some(json!({ "user_id": ben }))).await;
    assert_eq!(err(&r), (403, 4030));
    for (path, code) in [
        (format!("/api/v1/users/{ben}/block"), (400, 4003)),
        ("/api/v1/users/999999/block".into(), (404, 4040)),
        ("/api/v1/users/x/block".into(), (400, 4003)),
    ] {
        assert_eq!(
            err(&call("PUT", path.clone(), &b, None).await),
            code,
            "{path}"
        );
    }
    assert_eq!(
        call("DELETE", block.clone(), &b, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(err(&call("DELETE", block, &b, None).await), (404, 4040));
    assert_eq!(send(&a, &ben).await.0, StatusCode::OK, "lifted at once");
}

#[tokio::test]
async fn blocking_on_mysql() {
    let store = Arc::new(fresh_mysql().await);
    blocking(&Api::new(store.clone())).await;
    drop_mysql(Arc::into_inner(store).expect("the api is gone")).await;
}

#[tokio::test]
async fn blocking_on_sqlite() {
    let dir = tempdir();
    blocking(&Api::new(Arc::new(fresh_sqlite(&dir).await))).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn private_groups_on_mysql() {
    let store = Arc::new(fresh_mysql().await);
    private_groups(&Api::new(store.clone())).await;
    drop_mysql(Arc::into_inner(store).expect("the api is gone")).await;
}

#[tokio::test]
async fn private_groups_on_sqlite() {
    let dir = tempdir();
    private_groups(&Api::new(Arc::new(fresh_sqlite(&dir).await))).await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn messages(api: &Api) {
    let (ann, a) = user(api, "ann").await;
    let (ben, b) = user(api, "ben").await;
    let (cat, c) = user(api, "cat").await;
    let (ai, bi): (u64, u64) = (ann.parse().unwrap(), ben.parse().unwrap());
    let pair = format!("p:{}:{}", ai.min(bi), ai.max(bi));
    let send = |tok: &str, body: Value| {
        let tok = tok.to_string();
        async move {
            api.call("POST", "/api/v1/messages/send", Some(&tok), Some(body))
                .await
        }
    };

    let tricky = "<img src=x onerror=alert(1)> '; DROP TABLE messages; --";
    let r = send(&a, json!({"to": ben, "content": tricky, "cid": "c1"})).await;
    assert_eq!(r.0, StatusCode::OK, "{r:?}");
    assert_eq!(
        (r.1["conv"].as_str(), r.1["seq"].as_u64()),
        (Some(pair.as_str()), Some(1))
    );
    let retry = send(&a, json!({"to": ben, "content": tricky, "cid": "c1"})).await;
    assert_eq!(
        (retry.1["id"].clone(), retry.1["seq"].as_u64()),
        (r.1["id"].clone(), Some(1)),
        "a retry is stored once"
    );
    assert_eq!(
        send(&b, json!({"to": ai, "content": "back"})).await.1["seq"],
        2
    );
    for (body, status, code) in [
        (json!({"to": ben}), 400, 4002),
        (json!({"to": ben, "content": ""}), 400, 4002),
        (
            json!({"to": ben, "content": "x".repeat(32 * 1024 + 1)}),
            400,
            4004,
        ),
        (json!({"to": ann, "content": "me"}), 400, 4003),
        (json!({"to": "999999", "content": "x"}), 404, 4040),
        (json!({"to": "abc", "content": "x"}), 400, 4003),
        (json!({"to": ben, "group": "1", "content": "x"}), 400, 4003),
        (json!({"content": "x"}), 400, 4002),
        (
            json!({"to": ben, "content": "x", "cid": "c".repeat(65)}),
            400,
            4003,
        ),
        (json!({"group": "999999", "content": "x"}), 404, 4040),
    ] {
        assert_eq!(err(&send(&a, body.clone()).await), (status, code), "{body}");
    }
    assert_eq!(
        err(&api
            .call(
                "POST",
                "/api/v1/messages/send",
                None,
                Some(json!({"to": ben, "content": "x"}))
            )
            .await),
        (401, 4010)
    );

    // A group conversation: members send, others may not.
    let g = api
        .call(
            "POST",
            "/api/v1/groups/create",
            Some(&a),
            Some(json!({"name": "g", "visibility": "public"})),
        )
        .await
        .1["group_id"]
        .as_str()
        .unwrap()
        .to_string();
    api.call("POST", &format!("/api/v1/groups/{g}/join"), Some(&b), None)
        .await;
    assert_eq!(
        send(&a, json!({"group": g, "content": "hello group"}))
            .await
            .1["seq"],
        1
    );
    assert_eq!(
        err(&send(&c, json!({"group": g, "content": "let me in"})).await),
        (403, 4030)
    );

    // History: newest first, pages, and only for those in the conversation.
    let hist = |tok: &str, q: String| {
        let tok = tok.to_string();
        async move {
            api.call(
                "GET",
                &format!("/api/v1/messages/history?{q}"),
                Some(&tok),
                None,
            )
            .await
        }
    };
    let r = hist(&b, format!("conv={pair}")).await;
    let seqs: Vec<u64> = r.1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!((seqs, r.1["more"].as_bool()), (vec![2, 1], Some(false)));
    assert_eq!(
        r.1["messages"][1]["content"], tricky,
        "stored and returned verbatim"
    );
    assert_eq!(r.1["messages"][1]["from"], ann.as_str());
    let r = hist(&b, format!("conv={pair}&limit=1")).await;
    assert_eq!(
        (r.1["messages"][0]["seq"].as_u64(), r.1["more"].as_bool()),
        (Some(2), Some(true))
    );
    let r = hist(&b, format!("conv={pair}&before_seq=2&limit=1")).await;
    assert_eq!(
        (r.1["messages"][0]["seq"].as_u64(), r.1["more"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(
        err(&hist(&c, format!("conv={pair}")).await),
        (404, 4040),
        "another pair's conversation"
    );
    assert_eq!(err(&hist(&c, format!("conv=g:{g}")).await), (403, 4030));
    assert_eq!(
        hist(&b, format!("conv=g:{g}")).await.1["messages"][0]["group"],
        g.as_str()
    );
    assert_eq!(err(&hist(&b, "conv=p:2:1".into()).await), (400, 4003));
    assert_eq!(err(&hist(&b, String::new()).await), (400, 4002));
    assert_eq!(
        err(&hist(&b, format!("conv={pair}&limit=0")).await),
        (400, 4003)
    );
    assert_eq!(
        err(&hist(&b, format!("conv={pair}&limit=abc")).await),
        (400, 4000)
    );

    // The conversation list, unread counts and read positions.
    let list = api
        .call("GET", "/api/v1/conversations", Some(&b), None)
        .await
        .1;
    let p2p = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["conv"] == pair.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (
            p2p["kind"].as_str(),
            p2p["peer"].as_str(),
            p2p["unread"].as_u64()
        ),
        (Some("p2p"), Some(ann.as_str()), Some(2))
    );
    assert_eq!(p2p["last_message"]["content"], "back");
    let grp = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "group")
        .unwrap()
        .clone();
    assert_eq!(
        (grp["group"].as_str(), grp["unread"].as_u64()),
        (Some(g.as_str()), Some(1))
    );
    let r = api
        .call("GET", "/api/v1/messages/unread", Some(&b), None)
        .await;
    assert_eq!(r.1["total"], 3);
    let r = api
        .call(
            "PUT",
            &format!("/api/v1/conversations/{pair}"),
            Some(&b),
            Some(json!({"read_seq": 2, "pinned": true})),
        )
        .await;
    assert_eq!(r.0, StatusCode::NO_CONTENT, "{r:?}");
    let r = api
        .call("GET", "/api/v1/messages/unread", Some(&b), None)
        .await;
    assert_eq!(
        (
            r.1["total"].as_u64(),
            r.1["conversations"].as_array().unwrap().len()
        ),
        (Some(1), 1)
    );
    assert_eq!(
        err(&api
            .call(
                "PUT",
                &format!("/api/v1/conversations/{pair}"),
                Some(&c),
                Some(json!({"read_seq": 1}))
            )
            .await),
        (404, 4040)
    );
    // A conversation with a user that does not exist: 404, and nothing is left behind (the
    // caller's conversation list does not grow a row for it).
    let ghost = bi.max(ai) + 1_000;
    let ghost_pair = format!("p:{}:{}", bi.min(ghost), bi.max(ghost));
    for body in [
        json!({"read_seq": 1}),
        json!({"read_seq": u64::MAX >> 1}),
        json!({"muted": true}),
    ] {
        let r = api
            .call(
                "PUT",
                &format!("/api/v1/conversations/{ghost_pair}"),
                Some(&b),
                Some(body.clone()),
            )
            .await;
        assert_eq!(err(&r), (404, 4040), "{body}");
    }
    let r = api
        .call("GET", "/api/v1/conversations", Some(&b), None)
        .await;
    assert!(!r.1.to_string().contains(&ghost_pair), "{}", r.1);
    assert_eq!(
        err(&api
            .call(
                "PUT",
                "/api/v1/conversations/nope",
                Some(&b),
                Some(json!({"read_seq": 1}))
            )
            .await),
        (400, 4003)
    );
    assert_eq!(
        err(&api
            .call(
                "PUT",
                &format!("/api/v1/conversations/{pair}"),
                Some(&b),
                Some(json!({"read_seq": -1}))
            )
            .await),
        (400, 4000)
    );

    // Opening a two-person conversation without a message.
    let r = api
        .call(
            "POST",
            "/api/v1/conversations/create",
            Some(&c),
            Some(json!({"user_id": ann})),
        )
        .await;
    let opened = r.1["conv"].as_str().unwrap().to_string();
    let list = api
        .call("GET", "/api/v1/conversations", Some(&c), None)
        .await
        .1;
    assert_eq!(list[0]["conv"], opened.as_str());
    assert_eq!(list[0]["max_seq"], 0);
    assert_eq!(
        err(&api
            .call(
                "POST",
                "/api/v1/conversations/create",
                Some(&c),
                Some(json!({"user_id": cat}))
            )
            .await),
        (400, 4003)
    );
    assert_eq!(
        err(&api
            .call(
                "POST",
                "/api/v1/conversations/create",
                Some(&c),
                Some(json!({"user_id": "999999"}))
            )
            .await),
        (404, 4040)
    );
}

#[tokio::test]
async fn messages_on_mysql() {
    let store = Arc::new(fresh_mysql().await);
    messages(&Api::new(store.clone())).await;
    drop_mysql(Arc::into_inner(store).expect("the api is gone")).await;
}

#[tokio::test]
async fn messages_on_sqlite() {
    let dir = tempdir();
    messages(&Api::new(Arc::new(fresh_sqlite(&dir).await))).await;
    let _ = std::fs::remove_dir_all(dir);
}

fn now_s() -> u64 {
    im_shared::unix_ms() / 1000
}

fn jwt_for(user: u64, ttl_from_now: i64) -> String {
    let mut c = im_shared::jwt::Claims::new(user, now_s(), 60);
    c.exp = (now_s() as i64 + ttl_from_now) as u64;
    im_shared::jwt::sign(SECRET, &c)
}

#[tokio::test]
async fn accounts_on_mysql() {
    let store = Arc::new(fresh_mysql().await);
    accounts(&Api::new(store.clone())).await;
    drop_mysql(Arc::into_inner(store).expect("the api is gone")).await;
}

#[tokio::test]
async fn accounts_on_sqlite() {
    let dir = tempdir();
    accounts(&Api::new(Arc::new(fresh_sqlite(&dir).await))).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Presence on request (docs/PROTOCOL.md, "Presence"): who may see whose, hiding, blocking,
/// a group's online members.
async fn presence(api: &Api, online: &MemoryPresence) {
    let (ann, a) = user(api, "ann").await;
    let (ben, b) = user(api, "ben").await;
    let (cat, c) = user(api, "cat").await;
    let (_dan, d) = user(api, "dan").await;
    let call = |method: &'static str, path: String, tok: &str, body: Option<Value>| {
        let tok = tok.to_string();
        async move { api.call(method, &path, Some(&tok), body).await }
    };
    // Ann and Ben are contacts (they wrote to each other); Cat is in Ben's group; Dan only
    // opened a conversation with Ben and wrote to him: one way is not enough.
    let (ann_id, ben_id, dan_id): (u64, u64, u64) = (
        ann.parse().unwrap(),
        ben.parse().unwrap(),
        _dan.parse().unwrap(),
    );
    let write = |id: u64, from: u64, to: u64| {
        let conv = format!("p:{}:{}", from.min(to), from.max(to));
        async move {
            let m = im_store::NewMessage {
                id,
                conv: &conv,
                sender: from,
                cid: &id.to_string(),
                to_user: Some(to),
                to_group: None,
                content: "hi",
                content_type: "text",
                ts_ms: 1,
            };
            api.state.store.append_message(&m).await.unwrap();
        }
    };
    write(1, ann_id, ben_id).await;
    write(2, ben_id, ann_id).await;
    let r = call(
        "POST",
        "/api/v1/conversations/create".into(),
        &d,
        Some(json!({ "user_id": ben })),
    )
    .await;
    assert_eq!(r.0, StatusCode::OK, "{r:?}");
    write(3, dan_id, ben_id).await;
    let r = call(
        "POST",
        "/api/v1/groups/create".into(),
        &b,
        Some(json!({"name": "ben's"})),
    )
    .await;
    let g = r.1["group_id"].as_str().unwrap().to_string();
    let add = format!("/api/v1/groups/{g}/members");
    let r = call("POST", add, &b, Some(json!({ "user_id": cat }))).await;
    assert_eq!(r.0, StatusCode::NO_CONTENT);
    // Ben connects from his phone.
    let conn = Change::Online {
        user: ben_id,
        conn: 1,
        jti: "j".into(),
        device: Some("phone".into()),
    };
    online.apply("gw-1", &[conn]).await.unwrap();
    let of_ben = format!("/api/v1/users/{ben}/presence");
    let seen = json!({"user": ben, "online": true});
    assert_eq!(
        call("GET", of_ben.clone(), &a, None).await.1,
        seen,
        "a contact"
    );
    assert_eq!(
        call("GET", of_ben.clone(), &c, None).await.1,
        seen,
        "in a group with him"
    );
    let r = call("GET", of_ben.clone(), &d, None).await;
    assert_eq!(err(&r), (404, 4040), "anyone else: as for an unknown user");
    for (path, code) in [
        ("/api/v1/users/999999/presence", (404, 4040)),
        ("/api/v1/users/x/presence", (400, 4003)),
    ] {
        assert_eq!(
            err(&call("GET", path.into(), &a, None).await),
            code,
            "{path}"
        );
    }
    // Oneself: the devices too.
    let r = call("GET", of_ben.clone(), &b, None).await;
    assert_eq!(
        r.1,
        json!({"user": ben, "online": true, "devices": ["phone"]})
    );
    let r = call("GET", format!("/api/v1/users/{ann}/presence"), &a, None).await;
    assert_eq!(r.1, json!({"user": ann, "online": false, "devices": []}));
    // A group's online members, for its members only.
    let of_group = format!("/api/v1/groups/{g}/presence");
    let r = call("GET", of_group.clone(), &c, None).await;
    assert_eq!(
        r.1,
        json!({"group": g, "online": [ben], "members": 2, "checked": 2})
    );
    assert_eq!(
        err(&call("GET", of_group.clone(), &d, None).await),
        (404, 4040)
    );
    // Hidden: offline to everyone else, in the group too; not to himself.
    let hide = |on: bool| {
        call(
            "PUT",
            "/api/v1/users/profile".into(),
            &b,
            Some(json!({"hide_presence": on})),
        )
    };
    let r = hide(true).await;
    assert_eq!(r.1["hide_presence"], true, "{r:?}");
    let r = call("GET", "/api/v1/users/profile".into(), &b, None).await;
    assert_eq!(r.1["hide_presence"], true);
    let r = call("GET", format!("/api/v1/users/{ben}"), &a, None).await;
    assert!(
        r.1.get("hide_presence").is_none(),
        "a setting, not shown to others"
    );
    let hidden = json!({"user": ben, "online": false});
    assert_eq!(call("GET", of_ben.clone(), &a, None).await.1, hidden);
    assert_eq!(
        call("GET", of_group.clone(), &c, None).await.1["online"],
        json!([])
    );
    assert_eq!(
        call("GET", of_ben.clone(), &b, None).await.1["online"],
        true
    );
    assert_eq!(hide(false).await.1["hide_presence"], false);
    assert_eq!(call("GET", of_ben.clone(), &a, None).await.1, seen);
    // A block, either way, ends it.
    let block = format!("/api/v1/users/{ann}/block");
    assert_eq!(call("PUT", block, &b, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        err(&call("GET", of_ben.clone(), &a, None).await),
        (404, 4040)
    );
    let of_ann = format!("/api/v1/users/{ann}/presence");
    assert_eq!(err(&call("GET", of_ann, &b, None).await), (404, 4040));
    // Gone offline.
    let gone = Change::Offline {
        user: ben_id,
        conn: 1,
    };
    online.apply("gw-1", &[gone]).await.unwrap();
    assert_eq!(call("GET", of_ben, &c, None).await.1["online"], false);
}

#[tokio::test]
async fn presence_on_mysql() {
    let store = Arc::new(fresh_mysql().await);
    let (api, online) = Api::with_pipeline(store.clone()).await;
    presence(&api, &online).await;
    drop(api);
    drop_mysql(Arc::into_inner(store).expect("the api is gone")).await;
}

#[tokio::test]
async fn presence_on_sqlite() {
    let dir = tempdir();
    let store = Arc::new(fresh_sqlite(&dir).await);
    let (api, online) = Api::with_pipeline(store.clone()).await;
    presence(&api, &online).await;
    // Without a pipeline there is no presence to read: a clear 503.
    let plain = Api::new(store);
    let (ann, a) = user(&plain, "solo").await;
    let path = format!("/api/v1/users/{ann}/presence");
    assert_eq!(
        err(&plain.call("GET", &path, Some(&a), None).await),
        (503, 5031)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Error answers are counted by code in `/metrics` (`im_logic_api_errors_total`), the
/// router's own 404 and 405 included.
#[tokio::test]
async fn error_answers_are_counted_by_code() {
    let dir = tempdir();
    let store: Arc<dyn Store> = Arc::new(fresh_sqlite(&dir).await);
    let api = Api::build(store, PasswordCost::test(), 100, api::MetricsAt::Api, 0);
    let count = |code: ErrorCode| api::API_ERRORS.of(code).load(Ordering::Relaxed);
    let (nf, na, ua) = (
        count(ErrorCode::NotFound),
        count(ErrorCode::MethodNotAllowed),
        count(ErrorCode::Unauthorized),
    );
    let r = api.call("GET", "/api/v1/no-such-route", None, None).await;
    assert_eq!(err(&r), (404, 4040));
    let r = api.call("GET", "/api/v1/users/register", None, None).await;
    assert_eq!(err(&r), (405, 4050));
    let r = api.call("GET", "/api/v1/users/profile", None, None).await;
    assert_eq!(err(&r), (401, 4010));
    let r = api.call("GET", "/healthz", None, None).await;
    assert_eq!(r.0, StatusCode::OK);
    // Other tests of this binary run beside this one: at least ours.
    assert!(count(ErrorCode::NotFound) > nf);
    assert!(count(ErrorCode::MethodNotAllowed) > na);
    assert!(count(ErrorCode::Unauthorized) > ua);
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("# TYPE im_logic_api_errors_total counter"),
        "{text}"
    );
    assert!(
        text.contains("im_logic_api_errors_total{code=\"4040\"}"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

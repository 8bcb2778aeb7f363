//! The REST API through the real router, on both real backends: happy paths and, for each
//! endpoint, the bad inputs (PROTOCOL.md, "REST").

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{drop_mysql, fresh_mysql, fresh_sqlite, tempdir};
use logic::api::{self, ApiConfig, AppState};
use logic::auth::{self, MemoryRevocations, PasswordCost};
use logic::store::Store;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const SECRET: &[u8] = b"api-test-secret";

struct Api {
    app: axum::Router,
}

impl Api {
    fn new(store: Arc<dyn Store>) -> Api {
        let cost = PasswordCost::test();
        let state = AppState {
            store,
            revocations: Arc::new(MemoryRevocations::default()),
            cfg: ApiConfig {
                jwt_secret: SECRET.to_vec(),
                access_ttl_s: 600,
                refresh_ttl_s: 3600,
                password_cost: cost,
                ws_url: "ws://127.0.0.1:8090/ws".into(),
            },
            dummy_hash: auth::dummy_hash(cost),
        };
        Api {
            app: api::router(Arc::new(state)),
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
        json!({"user_id": alice_id, "username": "alice", "nickname": "Alice", "avatar": ""})
    );
    let expired = jwt_for(alice_id.parse().unwrap(), -10);
    let forged = im_shared::jwt::sign(
        b"other secret",
        &im_shared::jwt::Claims::new(alice_id.parse().unwrap(), now_s(), 60),
    );
    let mut tampered = token.clone();
    tampered.insert(tampered.len() - 3, 'x');
    for bad in [
        None,
        Some("garbage"),
        Some(expired.as_str()),
        Some(forged.as_str()),
        Some(tampered.as_str()),
    ] {
        assert_eq!(
            err(&api.call("GET", "/api/v1/users/profile", bad, None).await),
            (401, 4010),
            "{bad:?}"
        );
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

    // Refresh rotates: the new token works, the old refresh token does not.
    let r = api
        .call(
            "POST",
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{r:?}");
    let token2 = r.1["token"].as_str().unwrap().to_string();
    let refresh2 = r.1["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(
        err(&api
            .call(
                "POST",
                "/api/v1/auth/refresh",
                None,
                Some(json!({"refresh_token": refresh}))
            )
            .await),
        (401, 4010)
    );
    assert_eq!(
        err(&api
            .call("POST", "/api/v1/auth/refresh", None, Some(json!({})))
            .await),
        (400, 4002)
    );

    // Logout revokes the token and every refresh token.
    let r = api
        .call("POST", "/api/v1/auth/logout", Some(&token2), None)
        .await;
    assert_eq!(r.0, StatusCode::NO_CONTENT);
    assert_eq!(
        err(&api
            .call("GET", "/api/v1/users/profile", Some(&token2), None)
            .await),
        (401, 4010)
    );
    assert_eq!(
        err(&api
            .call(
                "POST",
                "/api/v1/auth/refresh",
                None,
                Some(json!({"refresh_token": refresh2}))
            )
            .await),
        (401, 4010)
    );
    assert_eq!(
        api.call("GET", "/api/v1/users/profile", Some(&token), None)
            .await
            .0,
        StatusCode::OK,
        "other sessions live on"
    );

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
        json!({"name": "rustaceans", "description": "<b>hi</b>", "max_members": 3}),
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

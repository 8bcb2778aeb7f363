//! `openapi.json` and the router agree: every documented operation is routed with the
//! documented protection, documented paths have no undocumented methods, and every route in
//! the source is documented.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use im_bus::revocation::RevokedSet;
use logic::api::{self, ApiConfig, AppState, OPENAPI_JSON};
use logic::auth::{self, PasswordCost};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use tower::ServiceExt;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{user_id}", "2")
        .replace("{conv}", "p:1:2")
        .replace("{username}", "alice")
        .replace("{invite_id}", "3")
        .replace("{token}", "0123456789abcdef0123456789abcdef")
}

#[tokio::test]
async fn the_spec_and_the_router_agree() {
    let spec: Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
    assert_eq!(spec["openapi"], "3.0.3");
    let dir = im_store::testing::tempdir();
    let cost = PasswordCost::test();
    let state = AppState::new(
        Arc::new(im_store::testing::fresh_sqlite(&dir).await),
        Arc::new(RevokedSet::default()),
        ApiConfig {
            jwt_secret: b"s".to_vec(),
            access_ttl_s: 60,
            refresh_ttl_s: 60,
            password_cost: cost,
            ws_url: String::new(),
            gateways: None,
            trusted_proxies: Vec::new(),
            token_lifetime_max_s: im_shared::jwt::LIFETIME_MAX_S,
            sends_per_s_max: 100,
            metrics: Default::default(),
            refresh_reuse_grace_ms: 10_000,
        },
        auth::dummy_hash(cost),
        Arc::new(im_shared::snowflake::WorkerLease::fixed(1)),
        None,
    );
    let app = api::router(Arc::new(state));
    let call = |method: &str, path: String| {
        let req = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(format!("/api/v1{path}"));
        let req = req
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };

    let mut documented = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().expect("paths") {
        for method in METHODS {
            let (status, body) = call(method, concrete(path)).await;
            match ops.get(method) {
                Some(op) => {
                    documented.insert(format!("{} {path}", method.to_uppercase()));
                    assert!(
                        !body.contains("no such route"),
                        "{method} {path} is documented but not routed"
                    );
                    if op.get("security").is_some() {
                        assert_eq!(
                            status,
                            StatusCode::UNAUTHORIZED,
                            "{method} {path} is documented as needing a token"
                        );
                    } else {
                        assert_ne!(
                            status,
                            StatusCode::UNAUTHORIZED,
                            "{method} {path} is documented as open"
                        );
                    }
                }
                None => assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is routed but not documented"
                ),
            }
        }
    }

    // Routes in the source that the spec does not mention at all. The router's body is read
    // as one string (rustfmt wraps long calls) and cut at each `.route(`.
    let source = include_str!("../src/api/mod.rs");
    let body = source
        .split("pub fn router(")
        .nth(1)
        .expect("a router function");
    let body: String = body[..body.find("\n}\n").expect("its end")]
        .split_whitespace()
        .collect();
    let mut routed = BTreeSet::new();
    for call in body.split(".route(").skip(1) {
        let path = call.split('"').nth(1).expect("a quoted path");
        if [
            "/healthz",
            "/metrics",
            "/",
            "/app.js",
            "/style.css",
            "/sw.js",
        ]
        .contains(&path)
        {
            continue; // outside /api/v1: load balancers, Prometheus, the browser client
        }
        for method in METHODS {
            if call.contains(&format!("{method}(")) {
                routed.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert_eq!(
        routed, documented,
        "routes in src/api/mod.rs vs operations in openapi.json"
    );
    let _ = std::fs::remove_dir_all(dir);
}

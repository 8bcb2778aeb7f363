//! The REST API of docs/PROTOCOL.md under `/api/v1`, on axum. Every error is
//! `{"code": <number>, "message": "..."}` with a fitting HTTP status, including the ones axum
//! would produce itself (bad JSON, wrong content type, unknown route).

mod accounts;
pub mod gateways;
mod groups;
mod messages;
mod names;
mod presence;
mod push;
pub mod throttle;
mod web;

use crate::auth::PasswordCost;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use im_bus::presence::Presence;
use im_bus::revocation::Revocations;
use im_shared::metrics::{ErrorCounts, Kind, Prom, CONTENT_TYPE};
use im_shared::{jwt, ErrorCode};
use im_store::{Store, StoreError};
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Settings of the API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub jwt_secret: Vec<u8>,
    pub access_ttl_s: u64,
    pub refresh_ttl_s: u64,
    pub password_cost: PasswordCost,
    /// The gateway login answers with when there is no registry, or no live gateway in it.
    pub ws_url: String,
    /// The gateway registry (distributed mode): login answers with the least-loaded gateway.
    pub gateways: Option<gateways::GatewayRegistry>,
    /// Proxies whose `X-Forwarded-For` names the client (`--trusted-proxy`); from any other
    /// peer the header is ignored and the socket's address is the client's.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The longest lifetime (`exp − iat`) a token may claim (`--token-lifetime-max-s`).
    pub token_lifetime_max_s: u64,
    /// `POST /messages/send` per user and second, bursts of twice that (`--msgs-per-sec-max`,
    /// the WebSocket's per-connection budget).
    pub sends_per_s_max: u32,
    /// Where `/metrics` is served.
    pub metrics: MetricsAt,
    /// How long after its use a refresh token presented again is taken for its own
    /// client's retry (refused, the session goes on) rather than a copy (the session ends).
    pub refresh_reuse_grace_ms: u64,
}

/// Where the API's `/metrics` is served (`--metrics-listen`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsAt {
    /// On the API's port (the default).
    #[default]
    Api,
    /// On an address of its own; the API's port answers 404 for it.
    Own(std::net::SocketAddr),
    /// Not by the API: the process serves them elsewhere (standalone's metrics listener).
    Elsewhere,
}

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub revocations: Arc<dyn Revocations>,
    pub cfg: ApiConfig,
    /// Checked when the username is unknown, so that it takes as long as a wrong password.
    pub dummy_hash: String,
    /// Message ids for `POST /messages/send` without a pipeline (`--no-pipeline`), under the
    /// process's lease. With a pipeline the stage mints and this never does: one minter per
    /// lease.
    pub snowflake: std::sync::Mutex<im_shared::snowflake::Leased>,
    /// With the Kafka pipeline: `POST /messages/send` goes through it, and membership changes
    /// drop the pipeline's cached member lists.
    pub pipeline: Option<Pipeline>,
    /// Failed logins per (account, address) and per address (`throttle.rs`).
    pub logins: std::sync::Mutex<throttle::LoginThrottle>,
    /// REST sends per user (`throttle.rs`).
    pub sends: std::sync::Mutex<throttle::SendBudget>,
    /// Users known to exist (accounts are never deleted), so that checking a token's user
    /// costs no query after its first request; cleared when full.
    pub known_users: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// argon2 runs at once, at most: each holds `PasswordCost::m_kib` of memory, so a burst
    /// of logins waits here instead of taking a buffer each (`accounts::hashing`).
    pub hashing: Arc<tokio::sync::Semaphore>,
    /// argon2 runs now, and the most there have been at once (tests hold it to the cores).
    pub hashing_now: std::sync::atomic::AtomicUsize,
    pub hashing_peak: std::sync::atomic::AtomicUsize,
    /// Who blocks whom (shared with the stage when there is one).
    pub blocks: Arc<crate::stage::blocks::Blocks>,
    /// Where clients are sent to connect (`gateways.rs`).
    pub gateways: gateways::Picker,
}

#[derive(Clone)]
pub struct Pipeline {
    pub client: Arc<crate::stage::client::PipelineClient>,
    pub members: Arc<crate::stage::members::Members>,
    pub blocks: Arc<crate::stage::blocks::Blocks>,
    pub stats: Arc<crate::stage::StageStats>,
    pub presence: Arc<dyn Presence>,
    /// Web Push, when configured: what `/push/*` answers with.
    pub web_push: Option<Arc<crate::push::webpush::WebPush>>,
}

/// Prometheus text: what the service is, and the pipeline stage's counters when it runs one.
async fn metrics(axum::extract::State(st): axum::extract::State<State>) -> Response {
    let mut out = String::new();
    let pipeline = st.pipeline.is_some().to_string();
    let labels = [
        ("store", st.store.backend()),
        ("pipeline", pipeline.as_str()),
    ];
    let mut prom = Prom::new(&mut out);
    prom.single(
        "im_logic_info",
        Kind::Gauge,
        "The logic service.",
        &labels,
        1,
    );
    im_shared::metrics::render_heap(&mut prom);
    if let Some(p) = &st.pipeline {
        p.stats.render(&mut out);
    }
    render_api_errors(&mut out);
    im_telemetry::render(&mut out);
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], out).into_response()
}

impl AppState {
    /// The state of a new API; `dummy_hash` from `auth::dummy_hash` at the same cost.
    pub fn new(
        store: Arc<dyn Store>,
        revocations: Arc<dyn Revocations>,
        cfg: ApiConfig,
        dummy_hash: String,
        lease: Arc<im_shared::snowflake::WorkerLease>,
        pipeline: Option<Pipeline>,
    ) -> AppState {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sends = throttle::SendBudget::new(cfg.sends_per_s_max);
        let blocks = match &pipeline {
            Some(p) => p.blocks.clone(),
            None => Arc::new(crate::stage::blocks::Blocks::new(store.clone())),
        };
        let gateways = gateways::Picker::new(cfg.gateways.clone(), cfg.ws_url.clone());
        AppState {
            gateways,
            blocks,
            store,
            revocations,
            cfg,
            dummy_hash,
            snowflake: std::sync::Mutex::new(im_shared::snowflake::Leased::new(lease)),
            pipeline,
            logins: Default::default(),
            sends: std::sync::Mutex::new(sends),
            known_users: Default::default(),
            hashing: Arc::new(tokio::sync::Semaphore::new(cores)),
            hashing_now: Default::default(),
            hashing_peak: Default::default(),
        }
    }

    /// A group's membership changed: cached member lists are stale.
    pub fn members_changed(&self, group: u64) {
        if let Some(p) = &self.pipeline {
            p.members.invalidate(group);
        }
    }
}

pub type State = Arc<AppState>;

/// The largest REST request body read (axum's default, said here): larger ones get 413.
pub const BODY_BYTES_MAX: usize = 2 << 20;

/// `/metrics` and `/healthz` alone, for `MetricsAt::Own`.
pub fn metrics_router(state: State) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "this address serves GET /metrics and GET /healthz",
            )
        })
        .with_state(state)
}

pub fn router(state: State) -> Router {
    let metrics_here = state.cfg.metrics == MetricsAt::Api;
    let api = Router::new()
        .route("/users/register", post(accounts::register))
        .route("/auth/login", post(accounts::login))
        .route("/auth/refresh", post(accounts::refresh))
        .route("/auth/logout", post(accounts::logout))
        .route("/auth/logout-all", post(accounts::logout_all))
        .route(
            "/users/profile",
            get(accounts::get_profile).put(accounts::put_profile),
        )
        .route("/users/by-name/{username}", get(accounts::get_user_by_name))
        .route("/users/blocked", get(accounts::blocked))
        .route(
            "/users/{id}/block",
            axum::routing::put(accounts::block).delete(accounts::unblock),
        )
        .route("/users/{id}", get(accounts::get_user))
        .route("/users/{id}/presence", get(presence::user))
        .route("/gateways/pick", get(gateways::pick))
        .route("/push/vapid", get(push::vapid))
        .route(
            "/push/subscriptions",
            get(push::list)
                .post(push::subscribe)
                .delete(push::unsubscribe),
        )
        .route("/openapi.json", get(openapi))
        .route("/messages/send", post(messages::send))
        .route("/messages/history", get(messages::history))
        .route("/messages/unread", get(messages::unread))
        .route("/conversations", get(messages::conversations))
        .route("/conversations/create", post(messages::create))
        .route(
            "/conversations/{conv}",
            axum::routing::put(messages::update),
        )
        .route("/groups/create", post(groups::create))
        .route("/groups/{id}", get(groups::get).patch(groups::change))
        .route("/groups/{id}/join", post(groups::join))
        .route("/groups/{id}/leave", post(groups::leave))
        .route("/groups/{id}/presence", get(presence::group))
        .route(
            "/groups/{id}/members",
            get(groups::members).post(groups::add_member),
        )
        .route(
            "/groups/{id}/members/{user_id}",
            axum::routing::delete(groups::remove_member),
        )
        .route(
            "/groups/{id}/invites",
            get(groups::invites).post(groups::create_invite),
        )
        .route(
            "/groups/{id}/invites/{invite_id}",
            axum::routing::delete(groups::revoke_invite),
        )
        .route("/invites/{token}", get(groups::invite_preview))
        .route("/invites/{token}/join", post(groups::invite_join));
    let root = Router::new()
        .nest("/api/v1", api)
        .route("/", get(web::index))
        .route("/app.js", get(web::app_js))
        .route("/style.css", get(web::style_css))
        .route("/sw.js", get(web::service_worker))
        .route("/healthz", get(|| async { "ok\n" }));
    let root = if metrics_here {
        root.route("/metrics", get(metrics))
    } else {
        root
    };
    root.fallback(|| async {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
    })
    .method_not_allowed_fallback(|| async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "this route does not take that method",
        )
    })
    .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
    .layer(axum::middleware::from_fn(count_errors))
    .with_state(state)
}

/// The OpenAPI 3 description of this API (hand-written; `tests/openapi.rs` holds it to the
/// router).
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
}

/// An error answer: status, numeric code and message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// With `Retry-After: secs` (at least 1).
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after_s = Some(secs.max(1));
        self
    }

    pub fn bad(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }
}

/// The `error` answers the REST API gave, by code (one API per process; `count_errors`).
pub static API_ERRORS: ErrorCounts = ErrorCounts::new();

/// Counts each answer that is an `ApiError` (it leaves its code in the response's
/// extensions).
async fn count_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    if let Some(code) = resp.extensions().get::<ErrorCode>() {
        API_ERRORS.count(*code);
    }
    resp
}

/// `API_ERRORS` in Prometheus text.
pub fn render_api_errors(out: &mut String) {
    API_ERRORS.render(
        &mut Prom::new(out),
        "im_logic_api_errors_total",
        "error answers of the REST API, by code (4xxx: the request; 5xxx: this service or what it depends on)",
        &[],
    );
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code.code(), "message": self.message });
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(self.code);
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, "already exists")
            }
            StoreError::Unavailable(why) => {
                log::warn!("database: {why}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::DependencyDown,
                    "the database is unavailable; retry later",
                )
            }
        }
    }
}

/// `Json<T>` whose rejections are our JSON errors (axum's are plain text).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::bad(
                ErrorCode::BadRequest,
                "expected Content-Type: application/json",
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!("the request body is larger than {BODY_BYTES_MAX} bytes"),
            )),
            Err(e) => {
                let text = e.body_text();
                let code = if text.contains("missing field") {
                    ErrorCode::MissingField
                } else {
                    ErrorCode::BadRequest
                };
                Err(ApiError::bad(code, text))
            }
        }
    }
}

/// `Query<T>` whose rejections are our JSON errors.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Params(v))
            .map_err(|e| ApiError::bad(ErrorCode::BadRequest, e.body_text()))
    }
}

/// The client's address: the socket's peer, or, when that peer is a trusted proxy, the
/// nearest address in `X-Forwarded-For` that is not one (read from the right: a client can
/// put anything on the left of the list, and only what our proxies appended is theirs).
/// Unspecified (0.0.0.0) when the router runs without a socket (in-process tests).
pub struct ClientAddr(pub std::net::IpAddr);

impl FromRequestParts<State> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip());
        Ok(ClientAddr(client_addr(
            peer,
            &parts.headers,
            &state.cfg.trusted_proxies,
        )))
    }
}

fn client_addr(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> std::net::IpAddr {
    // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|t| t.to_canonical() == ip);
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in hops.iter().rev() {
        match hop_addr(hop) {
            Some(ip) if is_trusted(ip) => continue,
            Some(ip) => return ip,
            // Garbage where the client's address should be: the last trusted hop is the
            // nearest address anyone vouches for.
            None => break,
        }
    }
    peer
}

/// One `X-Forwarded-For` entry: an address, with or without a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`) or brackets.
fn hop_addr(hop: &str) -> Option<std::net::IpAddr> {
    let hop = hop.trim();
    let ip = hop
        .parse::<std::net::IpAddr>()
        .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        .or_else(|_| hop.trim_start_matches('[').trim_end_matches(']').parse())
        .ok()?;
    Some(ip.to_canonical())
}

/// Users known to exist, at most (8 bytes and the set's overhead each).
const KNOWN_USERS_MAX: usize = 1 << 20;

/// Whether `user` has an account: from the cache, or the database once.
async fn user_exists(state: &State, user: u64) -> Result<bool, ApiError> {
    let known = |s: &AppState| {
        s.known_users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&user)
    };
    if known(state) {
        return Ok(true);
    }
    if state.store.user_by_id(user).await?.is_none() {
        return Ok(false);
    }
    let mut set = state
        .known_users
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if set.len() >= KNOWN_USERS_MAX {
        set.clear();
    }
    set.insert(user);
    Ok(true)
}

/// The caller, from `Authorization: Bearer <JWT>`: signature, expiry and revocation checked.
pub struct Caller {
    pub user_id: u64,
    pub jti: String,
    pub exp: u64,
}

impl FromRequestParts<State> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("expected a Bearer token"))?;
        let now = im_shared::unix_ms() / 1000;
        let claims = jwt::verify(
            &state.cfg.jwt_secret,
            token.trim(),
            now,
            state.cfg.token_lifetime_max_s,
        )
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        match state.revocations.is_revoked(&claims.jti, now).await {
            Ok(false) => {}
            Ok(true) => return Err(ApiError::unauthorized("invalid token: revoked")),
            // Fail closed: without the revocation list we cannot tell a logged-out token.
            Err(why) => {
                log::warn!("revocations: {why}");
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::DependencyDown,
                    "the session store is unavailable; retry later",
                ));
            }
        }
        let user_id = claims.user_id();
        if !user_exists(state, user_id).await? {
            return Err(ApiError::unauthorized(
                "invalid token: its user does not exist",
            ));
        }
        Ok(Caller {
            user_id,
            jti: claims.jti,
            exp: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_address_is_what_a_trusted_proxy_appended() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let proxy = ip("10.0.0.1");
        let xff = |v: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert("x-forwarded-for", v.parse().unwrap());
            h
        };
        let trusted = [proxy];
        // Not from the proxy: the header is ignored.
        assert_eq!(
            client_addr(ip("203.0.113.9"), &xff("1.1.1.1"), &trusted),
            ip("203.0.113.9")
        );
        // From the proxy (also as a mapped address): the right-most entry that is not it.
        for peer in ["10.0.0.1", "::ffff:10.0.0.1"] {
            let h = xff("6.6.6.6, 198.51.100.4");
            assert_eq!(
                client_addr(ip(peer), &h, &trusted),
                ip("198.51.100.4"),
                "{peer}"
            );
        }
        for (v, want) in [
            ("198.51.100.4:5678", "198.51.100.4"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("198.51.100.4, 10.0.0.1", "198.51.100.4"),
            ("nonsense", "10.0.0.1"),
        ] {
            assert_eq!(client_addr(proxy, &xff(v), &trusted), ip(want), "{v}");
        }
        assert_eq!(
            client_addr(proxy, &axum::http::HeaderMap::new(), &trusted),
            proxy,
            "no header: the proxy itself"
        );
    }
}

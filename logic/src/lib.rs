//! The logic service: accounts, tokens, groups, conversations and history over REST
//! (PROTOCOL.md, "REST"), on MySQL or SQLite through one `Store` trait.
//!
//! Where to look: `store` (the trait and its two sqlx implementations, the schema in
//! `migrations/`), `auth` (argon2id passwords, access and refresh tokens), `api` (the axum
//! routes and their JSON errors).

pub mod api;
pub mod auth;
pub mod pipeline;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

/// Builds the API state around a store (migrated here) and serves it on `listen` until
/// `shutdown` resolves.
pub async fn serve(
    store: Arc<dyn store::Store>,
    revocations: Arc<dyn auth::Revocations>,
    cfg: api::ApiConfig,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(store, revocations, cfg, listen, None, shutdown).await
}

/// `serve`, with the Kafka pipeline behind `POST /messages/send`.
pub async fn serve_with(
    store: Arc<dyn store::Store>,
    revocations: Arc<dyn auth::Revocations>,
    cfg: api::ApiConfig,
    listen: SocketAddr,
    pipeline: Option<api::Pipeline>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    store.migrate().await.map_err(std::io::Error::other)?;
    let cost = cfg.password_cost;
    let dummy_hash = tokio::task::spawn_blocking(move || auth::dummy_hash(cost))
        .await
        .map_err(std::io::Error::other)?;
    let snowflake = std::sync::Mutex::new(im_shared::snowflake::Snowflake::new(cfg.worker_id));
    let state = api::AppState {
        store,
        revocations,
        cfg,
        dummy_hash,
        snowflake,
        pipeline,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    log::info!("logic REST API on http://{}/api/v1", listener.local_addr()?);
    axum::serve(listener, api::router(Arc::new(state)))
        .with_graceful_shutdown(shutdown)
        .await
}

//! The logic service: accounts, tokens, groups, conversations and history over REST
//! (PROTOCOL.md, "REST"), on MySQL or SQLite through one `Store` trait.
//!
//! Where to look: `store` (the trait and its two sqlx implementations, the schema in
//! `migrations/`), `auth` (argon2id passwords, access and refresh tokens), `api` (the axum
//! routes and their JSON errors).

pub mod api;
pub mod auth;
pub mod store;

//! Accounts and tokens: register, login, refresh, logout, profile.

use super::{names, ApiError, Body, Caller, ClientAddr, State};
use crate::auth;
use axum::extract::State as S;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use im_shared::{jwt, ErrorCode};
use im_store::Taken;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::Ordering;

const USERNAME_CHARS: std::ops::RangeInclusive<usize> = 3..=32;
const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=128;
const NICKNAME_CHARS_MAX: usize = 64;

/// Usernames are case-insensitive: stored lower-case, letters, digits, `_`, `.`, `-`.
fn username(raw: &str) -> Result<String, ApiError> {
    let name = raw.to_ascii_lowercase();
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !USERNAME_CHARS.contains(&name.chars().count())
        || !ok_chars
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            "username: 3 to 32 letters, digits, '_', '.' or '-', starting with a letter or digit",
        ));
    }
    Ok(name)
}

fn password(raw: &str) -> Result<&str, ApiError> {
    if !PASSWORD_CHARS.contains(&raw.chars().count()) || raw.trim().is_empty() {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            "password: 8 to 128 characters",
        ));
    }
    Ok(raw)
}

fn nickname(raw: &str) -> Result<&str, ApiError> {
    names::display_name(raw, NICKNAME_CHARS_MAX, "nickname")
}

/// How long a password check waits for a free argon2 slot before answering 503.
const HASHING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs argon2 work `f` on the blocking pool, holding one of `AppState::hashing`'s slots:
/// at most one argon2 buffer per core exists at a time, however many logins arrive (64 at
/// once took the process from 36 to 743 MiB before). Past `HASHING_WAIT` in the queue: 503.
async fn hashing<T: Send + 'static>(
    st: &State,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let slot = tokio::time::timeout(HASHING_WAIT, st.hashing.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Busy,
                "too many logins at once; retry shortly",
            )
            .retry_after(1)
        })?;
    let now = st.hashing_now.fetch_add(1, Ordering::Relaxed) + 1;
    st.hashing_peak.fetch_max(now, Ordering::Relaxed);
    // The slot and the count go with the work: a login whose client goes away stops waiting
    // for it, but the argon2 run (and its buffer) lasts until it ends.
    let held = st.clone();
    let r = tokio::task::spawn_blocking(move || {
        let out = f();
        held.hashing_now.fetch_sub(1, Ordering::Relaxed);
        drop(slot);
        out
    })
    .await;
    r.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Busy,
            "password hashing failed",
        )
    })
}

#[derive(Deserialize)]
pub struct Register {
    username: String,
    password: String,
    nickname: Option<String>,
}

pub async fn register(
    S(st): S<State>,
    Body(r): Body<Register>,
) -> Result<impl IntoResponse, ApiError> {
    let name = username(&r.username)?;
    let pw = password(&r.password)?.to_owned();
    // The nickname defaults to the name as typed: "Alice" logs in as alice, shows as Alice.
    let nick = nickname(r.nickname.as_deref().unwrap_or(&r.username))?.to_owned();
    let cost = st.cfg.password_cost;
    let hash = hashing(&st, move || auth::hash_password(&pw, cost)).await?;
    let id = st
        .store
        .create_user(&name, &hash, &nick, im_shared::unix_ms())
        .await
        .map_err(|e| match e {
            im_store::StoreError::Conflict => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::Conflict,
                "username is taken",
            ),
            other => other.into(),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "user_id": id.to_string() })),
    ))
}

#[derive(Deserialize)]
pub struct Login {
    username: String,
    password: String,
}

#[derive(Serialize)]
pub struct Tokens {
    token: String,
    refresh_token: String,
    expires_in: u64,
    user_id: String,
    ws_url: String,
}

/// A new access token and refresh token in `family` (one per login, kept by each refresh).
async fn issue_tokens(st: &State, user_id: u64, family: &str) -> Result<Json<Tokens>, ApiError> {
    let now_ms = im_shared::unix_ms();
    let claims = jwt::Claims::new(user_id, now_ms / 1000, st.cfg.access_ttl_s);
    let token = jwt::sign(&st.cfg.jwt_secret, &claims);
    let (refresh_token, hash) = auth::new_refresh_token();
    st.store
        .put_refresh(&im_store::NewRefresh {
            token_hash: &hash,
            user_id,
            expires_ms: now_ms + st.cfg.refresh_ttl_s * 1000,
            family,
            access_jti: &claims.jti,
            access_exp_s: claims.exp,
        })
        .await?;
    Ok(Json(Tokens {
        token,
        refresh_token,
        expires_in: st.cfg.access_ttl_s,
        user_id: user_id.to_string(),
        ws_url: st.gateways.pick().await,
    }))
}

const BAD_LOGIN: &str = "invalid username or password";

pub async fn login(
    S(st): S<State>,
    ClientAddr(addr): ClientAddr,
    Body(l): Body<Login>,
) -> Result<Json<Tokens>, ApiError> {
    // Throttled before anything is looked up: the same answer for names that exist and
    // names that do not, and no argon2 work for an address that must wait.
    let wait = lock(&st.logins).attempt(&l.username, addr, im_shared::unix_ms());
    if let Some(ms) = wait {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many failed logins: wait before trying again",
        )
        .retry_after(ms.div_ceil(1000)));
    }
    // Malformed names cannot exist; answer exactly as for a wrong password.
    let user = match username(&l.username) {
        Ok(name) => st.store.user_by_username(&name).await?,
        Err(_) => None,
    };
    let (hash, id) = match &user {
        Some(u) => (u.password_hash.clone(), Some(u.id)),
        None => (st.dummy_hash.clone(), None),
    };
    let pw = l.password;
    let ok = hashing(&st, move || auth::verify_password(&pw, &hash)).await?;
    match id {
        Some(id) if ok => {
            lock(&st.logins).succeeded(&l.username, addr);
            issue_tokens(&st, id, &jwt::random_hex(16)).await
        }
        // Counted as a failure already (`attempt`).
        _ => Err(ApiError::unauthorized(BAD_LOGIN)),
    }
}

/// The throttle's lock; a panic elsewhere while holding it leaves counts that are still
/// counts, so a poisoned lock is used as it is.
fn lock(
    m: &std::sync::Mutex<super::throttle::LoginThrottle>,
) -> std::sync::MutexGuard<'_, super::throttle::LoginThrottle> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Deserialize)]
pub struct Refresh {
    refresh_token: String,
}

/// `POST /auth/refresh`: a used refresh token for a new pair in the same family. A refresh
/// token presented a second time was copied (OAuth 2.0 Security BCP, "refresh token
/// rotation"): its whole family ends, access tokens included, whoever holds them.
pub async fn refresh(S(st): S<State>, Body(r): Body<Refresh>) -> Result<Json<Tokens>, ApiError> {
    let hash = auth::refresh_hash(&r.refresh_token);
    match st.store.take_refresh(&hash, im_shared::unix_ms()).await? {
        Taken::Fresh { user_id, family } if st.store.user_by_id(user_id).await?.is_some() => {
            // Tokens from before families existed start one.
            let family = if family.is_empty() {
                jwt::random_hex(16)
            } else {
                family
            };
            issue_tokens(&st, user_id, &family).await
        }
        // Its own client retrying a refresh whose answer it lost (a timeout, a dropped
        // connection) is no theft: refused, but the session goes on.
        Taken::Reused { used_ms, .. }
            if im_shared::unix_ms().saturating_sub(used_ms) < st.cfg.refresh_reuse_grace_ms =>
        {
            Err(ApiError::unauthorized(
                "refresh token already used: use the one its refresh returned, or log in again",
            ))
        }
        Taken::Reused {
            user_id, family, ..
        } if !family.is_empty() => {
            log::warn!("refresh token reused for user {user_id}: ending its session");
            end_family(&st, user_id, &family).await?;
            Err(ApiError::unauthorized(
                "refresh token already used: this session has ended everywhere; log in again",
            ))
        }
        _ => Err(ApiError::unauthorized("invalid or expired refresh token")),
    }
}

fn session_store_down(why: String) -> ApiError {
    log::warn!("revocations: {why}");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::DependencyDown,
        "the session store is unavailable; retry later",
    )
}

/// Ends a login's session: its access tokens revoked (and their WebSockets closed), its
/// refresh tokens forgotten. Revocations first: if they fail, nothing is forgotten and the
/// caller may retry.
async fn end_family(st: &State, user_id: u64, family: &str) -> Result<(), ApiError> {
    let now_s = im_shared::unix_ms() / 1000;
    let access = st.store.family_access(family, now_s).await?;
    for (jti, exp) in &access {
        st.revocations
            .revoke(jti, *exp)
            .await
            .map_err(session_store_down)?;
    }
    st.store.drop_refresh_family(family).await?;
    let jtis: Vec<&str> = access.iter().map(|(j, _)| j.as_str()).collect();
    close_connections(st, user_id, |jti| jtis.contains(&jti)).await;
    Ok(())
}

/// Closes `user`'s WebSockets whose token `which` names, with 1008 (docs/PROTOCOL.md,
/// "Tokens"); the gateways also refuse revoked tokens at the next upgrade. Best effort:
/// presence may be a moment old.
async fn close_connections(st: &State, user_id: u64, which: impl Fn(&str) -> bool) {
    let Some(p) = &st.pipeline else { return };
    match p.presence.connections(user_id).await {
        Ok(conns) => {
            for c in conns.iter().filter(|c| which(&c.jti)) {
                if let Err(e) = p.client.close(&c.gateway, c.conn, "token revoked") {
                    log::warn!("logout: {e}");
                }
            }
        }
        Err(e) => log::warn!("logout: open connections not closed: {e}"),
    }
}

/// `POST /auth/logout`: ends this session (the login this access token belongs to) on every
/// device that shares it; the user's other logins go on.
pub async fn logout(S(st): S<State>, caller: Caller) -> Result<StatusCode, ApiError> {
    st.revocations
        .revoke(&caller.jti, caller.exp)
        .await
        .map_err(session_store_down)?;
    match st.store.family_of_access(&caller.jti).await? {
        Some(family) => end_family(&st, caller.user_id, &family).await?,
        // A token from before sessions were kept (its refresh tokens have no family), or one
        // no login issued (`im token`): it is revoked, and its user's refresh tokens from
        // before sessions with it (as logout did then).
        None => {
            st.store.drop_refresh_without_family(caller.user_id).await?;
            close_connections(&st, caller.user_id, |jti| jti == caller.jti).await
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /auth/logout-all`: ends every session of the user: all access tokens its logins
/// issued are revoked, all refresh tokens forgotten, all its WebSockets closed.
pub async fn logout_all(S(st): S<State>, caller: Caller) -> Result<StatusCode, ApiError> {
    st.revocations
        .revoke(&caller.jti, caller.exp)
        .await
        .map_err(session_store_down)?;
    let now_s = im_shared::unix_ms() / 1000;
    for family in st.store.refresh_families(caller.user_id).await? {
        for (jti, exp) in st.store.family_access(&family, now_s).await? {
            st.revocations
                .revoke(&jti, exp)
                .await
                .map_err(session_store_down)?;
        }
    }
    st.store.drop_refresh_tokens(caller.user_id).await?;
    // No browser of the user's is woken any more either: a browser they meant to cut off
    // would go on showing their messages' previews (each subscribes again at its next login).
    st.store.drop_push_subscriptions_of(caller.user_id).await?;
    close_connections(&st, caller.user_id, |_| true).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A user's public profile; for the user themself, their settings too.
async fn profile_of(st: &State, id: u64, own: bool) -> Result<Json<serde_json::Value>, ApiError> {
    let u =
        st.store.user_by_id(id).await?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such user")
        })?;
    let mut v = json!({ "user_id": u.id.to_string(), "username": u.username, "nickname": u.nickname, "avatar": u.avatar });
    if own {
        v["hide_presence"] = json!(u.presence_hidden);
    }
    Ok(Json(v))
}

pub async fn get_profile(
    S(st): S<State>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    profile_of(&st, caller.user_id, true).await
}

/// `GET /users/{id}`: another user's public profile (a client names its conversations).
pub async fn get_user(
    S(st): S<State>,
    caller: Caller,
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = im_shared::conv::parse_id(&raw)
        .ok_or_else(|| ApiError::bad(ErrorCode::InvalidField, "user id: a positive integer"))?;
    profile_of(&st, id, id == caller.user_id).await
}

/// How many users one may block.
pub const BLOCKS_MAX: u32 = 10_000;

pub(super) fn user_in_path(raw: &str) -> Result<u64, ApiError> {
    im_shared::conv::parse_id(raw)
        .ok_or_else(|| ApiError::bad(ErrorCode::InvalidField, "user id: a positive integer"))
}

/// `PUT /users/{id}/block`: no more two-person messages, receipts or typing between the
/// caller and this user (either way), nor typing from them in shared groups.
pub async fn block(
    S(st): S<State>,
    caller: Caller,
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let other = user_in_path(&raw)?;
    if other == caller.user_id {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            "you cannot block yourself",
        ));
    }
    if st.store.user_by_id(other).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such user",
        ));
    }
    let now = im_shared::unix_ms();
    if st
        .store
        .block(caller.user_id, other, BLOCKS_MAX, now)
        .await?
        .is_none()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            "you block 10000 users already",
        ));
    }
    st.blocks.invalidate(caller.user_id, other);
    super::presence::block_changed(&st, caller.user_id, other, true).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /users/{id}/block`.
pub async fn unblock(
    S(st): S<State>,
    caller: Caller,
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let other = user_in_path(&raw)?;
    if !st.store.unblock(caller.user_id, other).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "you do not block this user",
        ));
    }
    st.blocks.invalidate(caller.user_id, other);
    // They may still be apart: the other may block the caller.
    let apart = !matches!(st.blocks.refusal(caller.user_id, other).await, Ok(None));
    super::presence::block_changed(&st, caller.user_id, other, apart).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /users/blocked`: the users the caller blocks.
pub async fn blocked(S(st): S<State>, caller: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    let ids = st.store.blocked_by(caller.user_id).await?;
    Ok(Json(
        json!({ "users": ids.iter().map(|id| id.to_string()).collect::<Vec<_>>() }),
    ))
}

/// `GET /users/by-name/{username}`: find a user to talk to by username (case-insensitive,
/// as usernames are stored lower-case).
pub async fn get_user_by_name(
    S(st): S<State>,
    _caller: Caller,
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = username(&raw)?;
    let u =
        st.store.user_by_username(&name).await?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such user")
        })?;
    profile_of(&st, u.id, false).await
}

#[derive(Deserialize)]
pub struct ProfileUpdate {
    nickname: Option<String>,
    avatar: Option<String>,
    /// Look offline to everyone else (docs/PROTOCOL.md, "Presence").
    hide_presence: Option<bool>,
}

pub async fn put_profile(
    S(st): S<State>,
    caller: Caller,
    Body(p): Body<ProfileUpdate>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let nick = p.nickname.as_deref().map(nickname).transpose()?;
    let av = p.avatar.as_deref().map(names::avatar_url).transpose()?;
    if !st
        .store
        .update_profile(caller.user_id, nick, av.as_deref())
        .await?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such user",
        ));
    }
    if let Some(hide) = p.hide_presence {
        let me = caller.user_id;
        let was = st
            .store
            .user_by_id(me)
            .await?
            .is_some_and(|u| u.presence_hidden);
        if hide != was {
            // Who sees the user while it is shown: read before hiding, after showing.
            let shown_to = if hide {
                super::presence::audience_of(&st, me).await?
            } else {
                Vec::new()
            };
            st.store.set_presence_hidden(me, hide).await?;
            let shown_to = if hide {
                shown_to
            } else {
                super::presence::audience_of(&st, me).await?
            };
            super::presence::hidden_changed(&st, me, hide, &shown_to).await;
        }
    }
    profile_of(&st, caller.user_id, true).await
}

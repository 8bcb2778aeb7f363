//! Presence on request (docs/PROTOCOL.md, "Presence"): one user's, or a group's online
//! members. The pushes are the stage's (`stage/online.rs`); these answer a client that has
//! just connected, or opens a group's member list.
//!
//! Who may see a user's presence: the user, their contacts (a two-person conversation
//! with them) and those in a group with them, unless either blocks the other. Anyone else
//! gets the answer an unknown user gets (404), so presence reveals no one's existence. A
//! user who hides their presence looks offline to everyone else.

use super::groups;
use super::{ApiError, Caller, State};
use crate::stage::online;
use axum::extract::{Path, State as S};
use axum::http::StatusCode;
use axum::Json;
use im_bus::presence::Presence;
use im_shared::{protocol, ErrorCode};
use serde_json::{json, Value};
use std::sync::Arc;

/// Members of a group looked up per request, at most (the first by user id).
pub const GROUP_MEMBERS_MAX: usize = 1_000;

fn no_such_user() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such user")
}

/// Presence needs the pipeline (it is what knows the connections).
fn presence_of(st: &State) -> Result<&Arc<dyn Presence>, ApiError> {
    st.pipeline.as_ref().map(|p| &p.presence).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "presence needs the message pipeline (this instance runs without one)",
        )
    })
}

fn unavailable(why: String) -> ApiError {
    log::warn!("presence: {why}");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::DependencyDown,
        "presence is unavailable; retry later",
    )
}

/// `GET /users/{id}/presence`: `{"user","online"}`, and for oneself `devices`.
pub async fn user(
    S(st): S<State>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = super::accounts::user_in_path(&raw)?;
    let presence = presence_of(&st)?;
    let me = caller.user_id;
    if id == me {
        let conns = presence.connections(me).await.map_err(unavailable)?;
        let mut devices: Vec<&str> = conns.iter().map(|c| c.device.as_str()).collect();
        devices.sort_unstable();
        let mut out = Vec::new();
        protocol::encode_presence(me, !conns.is_empty(), Some(&devices), &mut out);
        return Ok(Json(own_frame(out)));
    }
    let u = st.store.user_by_id(id).await?.ok_or_else(no_such_user)?;
    let allowed = st
        .blocks
        .refusal(me, id)
        .await
        .map_err(unavailable)?
        .is_none()
        && (st.store.are_contacts(me, id).await? || st.store.share_a_group(me, id).await?);
    if !allowed {
        return Err(no_such_user());
    }
    let online = !u.presence_hidden && presence_online(&**presence, &[id]).await?.contains(&id);
    Ok(Json(json!({ "user": id.to_string(), "online": online })))
}

/// The `presence` frame's fields, as the REST answer.
fn own_frame(json: Vec<u8>) -> Value {
    let mut v: Value = serde_json::from_slice(&json).expect("our own JSON");
    if let Some(o) = v.as_object_mut() {
        o.remove("type");
    }
    v
}

/// Which of `users` have a connection.
async fn presence_online(presence: &dyn Presence, users: &[u64]) -> Result<Vec<u64>, ApiError> {
    let on = presence.gateways(users).await.map_err(unavailable)?;
    let mut ids: Vec<u64> = on.into_keys().collect();
    ids.sort_unstable();
    Ok(ids)
}

/// `GET /groups/{id}/presence`: for a member, which of the group's first
/// `GROUP_MEMBERS_MAX` members (by id) are online, less those who hide it and those either
/// side blocks.
pub async fn group(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let presence = presence_of(&st)?;
    let seen = groups::seen(&st, &gid, caller.user_id).await?;
    if !seen.member {
        return Err(groups::forbidden("only members see who is online"));
    }
    let roster = st
        .store
        .roster(seen.group.id)
        .await?
        .ok_or_else(groups::not_found)?;
    let checked = roster.members.len().min(GROUP_MEMBERS_MAX);
    let mut online = presence_online(&**presence, &roster.members[..checked]).await?;
    let me = caller.user_id;
    if !online.is_empty() {
        let hidden = st.store.hiding_presence(&online).await?;
        let blocked = st.blocks.of(me).await.map_err(unavailable)?;
        let blockers = st.blocks.blockers_of(me).await.map_err(unavailable)?;
        online.retain(|u| {
            *u == me
                || (hidden.binary_search(u).is_err()
                    && blocked.binary_search(u).is_err()
                    && blockers.binary_search(u).is_err())
        });
    }
    let ids: Vec<String> = online.iter().map(u64::to_string).collect();
    Ok(Json(json!({
        "group": seen.group.id.to_string(),
        "online": ids,
        "members": roster.members.len(),
        "checked": checked,
    })))
}

/// After `PUT /users/profile` changed `hide_presence`: the contacts are told at once —
/// "offline" when the user hides it, whether or not they are online (a contact may still
/// show them online from before, or from a close whose debounce is running), and "online"
/// when they show it while online. `audience` is who sees them while it is shown (read
/// before hiding, after showing).
pub(super) async fn hidden_changed(st: &State, user: u64, hidden: bool, audience: &[u64]) {
    let Some(p) = &st.pipeline else {
        return;
    };
    if !hidden && !shown_online(st, &*p.presence, user).await {
        return;
    }
    let mut json = Vec::with_capacity(64);
    protocol::encode_presence(user, !hidden, None, &mut json);
    let send = |gw: &str, key: &str, body| {
        if let Err(e) = p.client.downstream(gw, key, body) {
            log::debug!("logic: a presence frame was not queued: {e}");
        }
    };
    let key = user.to_string();
    if let Err(e) = online::tell_users(&*p.presence, send, audience, &key, &json).await {
        log::debug!("logic: presence of user {user} not told: {e}");
    }
}

/// After `a` blocked `b` (or lifted the block), between contacts: each one's devices are
/// told the other's presence as it now looks to them, where that changed — "offline" for
/// one shown online while either blocks the other, "online" again once neither does.
/// (Someone who is not a contact is told nothing: they never saw it.)
pub(super) async fn block_changed(st: &State, a: u64, b: u64, apart: bool) {
    let Some(p) = &st.pipeline else {
        return;
    };
    if !matches!(st.store.are_contacts(a, b).await, Ok(true)) {
        return;
    }
    let send = |gw: &str, key: &str, body| {
        if let Err(e) = p.client.downstream(gw, key, body) {
            log::debug!("logic: a presence frame was not queued: {e}");
        }
    };
    for (about, to) in [(a, b), (b, a)] {
        if !shown_online(st, &*p.presence, about).await {
            continue;
        }
        let mut json = Vec::with_capacity(64);
        protocol::encode_presence(about, !apart, None, &mut json);
        let key = about.to_string();
        if let Err(e) = online::tell_users(&*p.presence, send, &[to], &key, &json).await {
            log::debug!("logic: presence of user {about} not told: {e}");
        }
    }
}

/// Whether `user` is online as others see it (not hidden).
async fn shown_online(st: &State, presence: &dyn Presence, user: u64) -> bool {
    let hidden = st
        .store
        .user_by_id(user)
        .await
        .ok()
        .flatten()
        .is_none_or(|u| u.presence_hidden);
    !hidden && matches!(presence.gateways(&[user]).await, Ok(on) if on.contains_key(&user))
}

/// Who sees `user`'s presence while it is shown (for `hidden_changed`).
pub(super) async fn audience_of(st: &State, user: u64) -> Result<Vec<u64>, ApiError> {
    online::audience(&*st.store, &st.blocks, user)
        .await
        .map_err(unavailable)
}

//! Web Push subscriptions (docs/PROTOCOL.md, "Offline push"): the browser client asks for the
//! server's VAPID key, subscribes with its push service, and hands the subscription here; the
//! stage's pusher then wakes that browser for messages that arrive while the user has no
//! device online (`push::webpush`).

use super::{ApiError, Body, Caller, State};
use crate::push::ece::UaKeys;
use crate::push::webpush::{WebPush, SUBSCRIPTIONS_MAX};
use axum::extract::State as S;
use axum::http::StatusCode;
use axum::Json;
use im_shared::ErrorCode;
use im_store::PushSubscription;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

fn web_push(st: &State) -> Result<&Arc<WebPush>, ApiError> {
    st.pipeline
        .as_ref()
        .and_then(|p| p.web_push.as_ref())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "web push is not configured on this server",
            )
        })
}

/// `GET /push/vapid`: the key to subscribe with (`applicationServerKey`).
pub async fn vapid(S(st): S<State>, _caller: Caller) -> Result<Json<Value>, ApiError> {
    let wp = web_push(&st)?;
    Ok(Json(json!({
        "public_key": wp.public_key(),
        "subscriptions_max": SUBSCRIPTIONS_MAX,
    })))
}

/// A browser's `PushSubscription.toJSON()` (`expirationTime` and the like are ignored).
#[derive(Deserialize)]
pub struct Subscription {
    endpoint: String,
    keys: Keys,
}

#[derive(Deserialize)]
pub struct Keys {
    p256dh: String,
    auth: String,
}

/// `POST /push/subscriptions`: this browser, for the caller. 201 `{"id"}`.
pub async fn subscribe(
    S(st): S<State>,
    caller: Caller,
    Body(s): Body<Subscription>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let wp = web_push(&st)?;
    wp.allowed()
        .admits(&s.endpoint)
        .map_err(|e| ApiError::bad(ErrorCode::InvalidField, e))?;
    let keys = UaKeys::from_base64url(&s.keys.p256dh, &s.keys.auth)
        .map_err(|e| ApiError::bad(ErrorCode::InvalidField, e))?;
    let row = PushSubscription {
        id: 0,
        user_id: caller.user_id,
        endpoint: s.endpoint,
        // Stored as we send them: unpadded base64url.
        p256dh: crate::push::ece::encode(&keys.p256dh),
        auth: crate::push::ece::encode(&keys.auth),
        created_ms: 0,
    };
    let now = im_shared::unix_ms();
    let id = st
        .store
        .add_push_subscription(&row, SUBSCRIPTIONS_MAX, now)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such user"))?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id.to_string() }))))
}

#[derive(Deserialize)]
pub struct Unsubscribe {
    endpoint: String,
}

/// `DELETE /push/subscriptions` `{"endpoint"}`: this browser no longer. 204, or 404 when the
/// caller had no subscription there.
pub async fn unsubscribe(
    S(st): S<State>,
    caller: Caller,
    Body(u): Body<Unsubscribe>,
) -> Result<StatusCode, ApiError> {
    web_push(&st)?;
    if st
        .store
        .remove_push_subscription(caller.user_id, &u.endpoint)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such subscription",
        ))
    }
}

/// `GET /push/subscriptions`: the caller's, newest first (a browser finds its own by its
/// endpoint).
pub async fn list(S(st): S<State>, caller: Caller) -> Result<Json<Value>, ApiError> {
    web_push(&st)?;
    let subs = st.store.push_subscriptions(caller.user_id).await?;
    let out: Vec<Value> = subs
        .iter()
        .map(|s| {
            json!({
                "id": s.id.to_string(),
                "endpoint": s.endpoint,
                "created_ms": s.created_ms,
            })
        })
        .collect();
    Ok(Json(json!({ "subscriptions": out })))
}

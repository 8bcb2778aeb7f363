//! Messages and conversations: send over HTTP (for bots; through the pipeline when there is
//! one, straight to the store otherwise), history pages, unread counts, the conversation list and read positions.

use super::{ApiError, Body, Caller, Params, State};
use axum::extract::{Path, State as S};
use axum::http::StatusCode;
use axum::Json;
use im_shared::conv::{parse_id, Conv};
use im_shared::protocol::{CID_BYTES_MAX, CONTENT_BYTES_MAX, CONTENT_TYPE_BYTES_MAX};
use im_shared::ErrorCode;
use im_store::{MessageRow, NewMessage, View};
use serde::Deserialize;
use serde_json::{json, Value};

const HISTORY_PAGE_MAX: u32 = 500;
const HISTORY_PAGE_DEFAULT: u32 = 50;

/// A lookup that failed on the database, as an answer.
fn db_error(why: String) -> ApiError {
    ApiError::from(im_store::StoreError::Unavailable(why))
}

fn invalid(msg: &str) -> ApiError {
    ApiError::bad(ErrorCode::InvalidField, msg)
}

/// An id given as a decimal string (the protocol's form) or a JSON number.
pub(super) fn id_value(v: &Value, what: &str) -> Result<u64, ApiError> {
    match v {
        Value::String(s) => parse_id(s),
        // The same range as a string's: 1 to 2^63 − 1 (what the databases can hold).
        Value::Number(n) => n.as_u64().filter(|&v| v > 0 && v <= i64::MAX as u64),
        _ => None,
    }
    .ok_or_else(|| invalid(&format!("{what} must be a decimal id")))
}

fn conv_param(raw: &str) -> Result<Conv, ApiError> {
    Conv::parse(raw)
        .ok_or_else(|| invalid("conv must be p:<smaller id>:<larger id> or g:<group id>"))
}

/// The caller may read and write `conv`: a party of a two-person one, a member of a group's.
/// What they see of it (a group member: from their join, unless the group shows all its
/// history).
async fn authorize(st: &State, user: u64, conv: Conv) -> Result<View, ApiError> {
    let no_conv = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such conversation",
        )
    };
    match conv {
        Conv::Pair(a, b) if conv.has_party(user) => {
            // A conversation with a user that does not exist does not exist either (and must
            // not leave membership rows behind).
            let peer = if a == user { b } else { a };
            match st.store.user_by_id(peer).await? {
                Some(_) => Ok(View::ALL),
                None => Err(no_conv()),
            }
        }
        // Another pair's conversation does not exist as far as this caller can tell.
        Conv::Pair(..) => Err(no_conv()),
        Conv::Group(g) => {
            if let Some(view) = st.store.member_view(g, user).await? {
                return Ok(view);
            }
            // A private group does not exist for a non-member either.
            match st.store.group(g).await? {
                Some(group) if group.public => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    "not a member of this group",
                )),
                _ => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NotFound,
                    "no such group",
                )),
            }
        }
    }
}

/// A message as clients see it: the fields of the WebSocket `msg` frame.
pub fn message_json(m: &MessageRow) -> Value {
    let mut v = json!({
        "type": "msg",
        "id": m.id.to_string(),
        "conv": m.conv,
        "seq": m.seq,
        "from": m.sender.to_string(),
        "content": m.content,
        "content_type": m.content_type,
        "ts": m.ts_ms,
    });
    if let Some(u) = m.to_user {
        v["to"] = json!(u.to_string());
    }
    if let Some(g) = m.to_group {
        v["group"] = json!(g.to_string());
    }
    v
}

#[derive(Deserialize)]
pub struct Send {
    to: Option<Value>,
    group: Option<Value>,
    content: Option<String>,
    content_type: Option<String>,
    cid: Option<String>,
}

pub async fn send(
    S(st): S<State>,
    caller: Caller,
    Body(s): Body<Send>,
) -> Result<Json<Value>, ApiError> {
    let over = st
        .sends
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take(caller.user_id, im_shared::unix_ms());
    if let Some(ms) = over {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!(
                "more than {} sends a second: slow down",
                st.cfg.sends_per_s_max
            ),
        )
        .retry_after(ms.div_ceil(1000)));
    }
    let content = s
        .content
        .ok_or_else(|| ApiError::bad(ErrorCode::MissingField, "missing field `content`"))?;
    if content.is_empty() {
        return Err(ApiError::bad(ErrorCode::MissingField, "`content` is empty"));
    }
    if content.len() > CONTENT_BYTES_MAX {
        return Err(ApiError::bad(
            ErrorCode::TooLarge,
            format!("`content` is longer than {CONTENT_BYTES_MAX} bytes"),
        ));
    }
    let content_type = s.content_type.unwrap_or_else(|| "text".into());
    if content_type.is_empty() || content_type.len() > CONTENT_TYPE_BYTES_MAX {
        return Err(invalid("content_type: 1 to 32 bytes"));
    }
    // Without a cid a retry cannot be recognised; HTTP senders should give one.
    let cid = s
        .cid
        .unwrap_or_else(|| format!("http-{}", im_shared::jwt::random_hex(12)));
    if cid.is_empty() || cid.len() > CID_BYTES_MAX {
        return Err(invalid("cid: 1 to 64 bytes"));
    }
    let (conv, to_user, to_group) = match (&s.to, &s.group) {
        (Some(to), None) => {
            let to = id_value(to, "to")?;
            let conv = Conv::pair(caller.user_id, to)
                .ok_or_else(|| invalid("cannot send a message to yourself"))?;
            if st.store.user_by_id(to).await?.is_none() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NotFound,
                    "no such user",
                ));
            }
            if let Some(why) = st
                .blocks
                .refusal(caller.user_id, to)
                .await
                .map_err(db_error)?
            {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    why,
                ));
            }
            (conv, Some(to), None)
        }
        (None, Some(g)) => {
            let g = id_value(g, "group")?;
            let conv = Conv::Group(g);
            authorize(&st, caller.user_id, conv).await?;
            (conv, None, Some(g))
        }
        (None, None) => {
            return Err(ApiError::bad(
                ErrorCode::MissingField,
                "give `to` or `group`",
            ))
        }
        (Some(_), Some(_)) => return Err(invalid("give `to` or `group`, not both")),
    };
    if let Some(p) = &st.pipeline {
        return send_through_pipeline(
            p,
            caller.user_id,
            conv,
            cid,
            to_user,
            to_group,
            content,
            content_type,
        )
        .await;
    }
    let now = im_shared::unix_ms();
    let id = st
        .snowflake
        .lock()
        .expect("snowflake lock")
        .next(now)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::DependencyDown,
                "no message ids: this logic instance has no Snowflake worker lease (Redis); retry with the same cid",
            )
        })?;
    let conv_s = conv.to_string();
    let m = NewMessage {
        id,
        conv: &conv_s,
        sender: caller.user_id,
        cid: &cid,
        to_user,
        to_group,
        content: &content,
        content_type: &content_type,
        ts_ms: now,
    };
    let stored = st.store.append_message(&m).await?;
    Ok(Json(
        json!({ "id": stored.id.to_string(), "conv": stored.conv, "seq": stored.seq, "ts": stored.ts_ms, "cid": cid }),
    ))
}

/// The distributed path: the same `im.upstream` record a WebSocket `send` makes, answered by
/// the pipeline with the same `sent` or `error`.
#[allow(clippy::too_many_arguments)]
async fn send_through_pipeline(
    p: &crate::api::Pipeline,
    user: u64,
    conv: Conv,
    cid: String,
    to_user: Option<u64>,
    to_group: Option<u64>,
    content: String,
    content_type: String,
) -> Result<Json<Value>, ApiError> {
    let body = im_shared::records::UpstreamBody::Send(im_shared::records::Send {
        cid: cid.clone(),
        to_user: to_user.unwrap_or(0),
        to_group: to_group.unwrap_or(0),
        content,
        content_type,
    });
    let timeout = std::time::Duration::from_secs(15);
    let json = p
        .client
        .request(user, &conv.to_string(), body, timeout)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::DependencyDown,
                format!("{e}; retry with the same cid"),
            )
        })?;
    let v: Value = serde_json::from_slice(&json).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::DependencyDown,
            e.to_string(),
        )
    })?;
    if v["type"] == "sent" {
        return Ok(Json(
            json!({ "id": v["id"], "conv": v["conv"], "seq": v["seq"], "ts": v["ts"], "cid": cid }),
        ));
    }
    let code = v["code"].as_u64().and_then(ErrorCode::from_code);
    let (status, code) = match code {
        Some(c @ ErrorCode::Forbidden) => (StatusCode::FORBIDDEN, c),
        Some(c @ ErrorCode::NotFound) => (StatusCode::NOT_FOUND, c),
        Some(c @ ErrorCode::InvalidField) => (StatusCode::BAD_REQUEST, c),
        Some(c @ ErrorCode::Busy) => (StatusCode::SERVICE_UNAVAILABLE, c),
        _ => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::DependencyDown),
    };
    let msg = v["message"]
        .as_str()
        .unwrap_or("the pipeline refused the message");
    Err(ApiError::new(status, code, msg))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    conv: Option<String>,
    before_seq: Option<u64>,
    limit: Option<u32>,
}

pub async fn history(
    S(st): S<State>,
    caller: Caller,
    Params(q): Params<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let conv = conv_param(
        q.conv
            .as_deref()
            .ok_or_else(|| ApiError::bad(ErrorCode::MissingField, "missing `conv`"))?,
    )?;
    let limit = q.limit.unwrap_or(HISTORY_PAGE_DEFAULT);
    if !(1..=HISTORY_PAGE_MAX).contains(&limit) {
        return Err(invalid("limit: 1 to 500"));
    }
    let view = authorize(&st, caller.user_id, conv).await?;
    let before = q.before_seq.unwrap_or(u64::MAX).min(i64::MAX as u64);
    // One extra row tells whether there is more.
    let mut rows = st
        .store
        .history(&conv.to_string(), view, before, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok(Json(
        json!({ "messages": rows.iter().map(message_json).collect::<Vec<_>>(), "more": more }),
    ))
}

fn conversation_json(caller: u64, c: &im_store::ConversationRow) -> Value {
    let unread = c.max_seq.saturating_sub(c.read_seq);
    let mut v = json!({
        "conv": c.conv,
        "max_seq": c.max_seq,
        "read_seq": c.read_seq,
        "unread": unread,
        "muted": c.muted,
        "pinned": c.pinned,
        "last_message": c.last_message.as_ref().map(message_json),
    });
    match Conv::parse(&c.conv) {
        Some(Conv::Pair(a, b)) => {
            v["kind"] = json!("p2p");
            v["peer"] = json!(if a == caller { b } else { a }.to_string());
            v["peer_read_seq"] = json!(c.peer_read_seq.unwrap_or(0));
        }
        Some(Conv::Group(g)) => {
            v["kind"] = json!("group");
            v["group"] = json!(g.to_string());
        }
        None => {}
    }
    v
}

pub async fn conversations(S(st): S<State>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let rows = st.store.conversations(caller.user_id).await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|c| conversation_json(caller.user_id, c))
            .collect(),
    )))
}

pub async fn unread(S(st): S<State>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let rows = st.store.conversations(caller.user_id).await?;
    let per: Vec<Value> = rows
        .iter()
        .filter(|c| c.max_seq > c.read_seq)
        .map(|c| json!({ "conv": c.conv, "unread": c.max_seq - c.read_seq }))
        .collect();
    let total: u64 = rows
        .iter()
        .map(|c| c.max_seq.saturating_sub(c.read_seq))
        .sum();
    Ok(Json(json!({ "total": total, "conversations": per })))
}

#[derive(Deserialize)]
pub struct CreatePair {
    user_id: Value,
}

pub async fn create(
    S(st): S<State>,
    caller: Caller,
    Body(c): Body<CreatePair>,
) -> Result<Json<Value>, ApiError> {
    let peer = id_value(&c.user_id, "user_id")?;
    let conv = Conv::pair(caller.user_id, peer)
        .ok_or_else(|| invalid("cannot open a conversation with yourself"))?;
    if st.store.user_by_id(peer).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such user",
        ));
    }
    st.store
        .open_pair(&conv.to_string(), caller.user_id, peer)
        .await?;
    Ok(Json(json!({ "conv": conv.to_string() })))
}

#[derive(Deserialize)]
pub struct Update {
    read_seq: Option<u64>,
    muted: Option<bool>,
    pinned: Option<bool>,
}

/// How long marking a conversation read waits for persist to store the messages it covers.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How far past the stored last seq a read position is waited for: one conversation's
/// messages delivered live and not yet stored (persist commits every few milliseconds).
const READ_AHEAD_MAX: u64 = 100;

/// Whether a read position `seq` may be a message persist has not stored yet, with the
/// conversation stored up to `stored`: then it is worth waiting for. Past `READ_AHEAD_MAX`
/// it is a client's error or abuse (a huge `read_seq` held each request for the whole wait).
fn worth_waiting(seq: u64, stored: u64) -> bool {
    seq > stored && seq - stored <= READ_AHEAD_MAX
}

pub async fn update(
    S(st): S<State>,
    caller: Caller,
    Path(conv): Path<String>,
    Body(u): Body<Update>,
) -> Result<StatusCode, ApiError> {
    let conv = conv_param(&conv)?;
    authorize(&st, caller.user_id, conv).await?;
    if let (Some(seq), Some(_)) = (u.read_seq, &st.pipeline) {
        // The client may have the message live before persist has stored it: wait for it,
        // but only for a seq that can be in flight. One far past what is stored is capped
        // to what is stored at once (`update_membership` caps), not waited for.
        let conv = conv.to_string();
        let stored = st
            .store
            .max_seqs(std::slice::from_ref(&conv))
            .await?
            .first()
            .map_or(0, |(_, s)| *s);
        if worth_waiting(seq, stored) {
            im_store::wait_stored(&*st.store, &conv, seq, READ_WAIT).await?;
        }
    }
    let conv_s = conv.to_string();
    let stored = st
        .store
        .update_membership(caller.user_id, &conv_s, u.read_seq, u.muted, u.pinned)
        .await?;
    if let (Some(_), Some(p)) = (u.read_seq, &st.pipeline) {
        // Every device of the caller's (a REST call is none of them) and the peer; the
        // position as stored, which is capped at the conversation's end.
        let seq = stored;
        let send = |gw: &str, key: &str, body| {
            if let Err(e) = p.client.downstream(gw, key, body) {
                log::debug!("logic: a read event was not queued: {e}");
            }
        };
        let user = caller.user_id;
        let peer_told = match conv {
            Conv::Pair(a, b) => {
                let peer = if a == user { b } else { a };
                matches!(st.blocks.refusal(user, peer).await, Ok(None))
            }
            Conv::Group(_) => false,
        };
        let r = crate::stage::receipts::Reading {
            user,
            reader: None,
            conv,
            seq,
            peer_told,
        };
        crate::stage::receipts::tell_read(&*p.presence, send, r).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_read_position_just_past_what_is_stored_is_waited_for() {
        assert!(!worth_waiting(5, 7), "stored already");
        assert!(!worth_waiting(7, 7), "stored already");
        assert!(worth_waiting(8, 7), "the next message, maybe in flight");
        assert!(worth_waiting(7 + READ_AHEAD_MAX, 7));
        assert!(
            !worth_waiting(8 + READ_AHEAD_MAX, 7),
            "too far ahead to be in flight"
        );
        assert!(!worth_waiting(u64::MAX, 0), "capped at once");
    }
}

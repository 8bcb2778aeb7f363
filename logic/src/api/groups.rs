//! Groups: create, read, join, leave, and members (list for members; add and remove for the
//! owner). Membership changes here are what the pipeline's member cache will listen to.

use super::{ApiError, Body, Caller, Params, State};
use axum::extract::{Path, State as S};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use im_shared::conv::parse_id;
use im_shared::ErrorCode;
use im_store::{GroupRow, Join};
use serde::Deserialize;
use serde_json::{json, Value};

const NAME_CHARS_MAX: usize = 64;
const DESCRIPTION_CHARS_MAX: usize = 512;
const MAX_MEMBERS: std::ops::RangeInclusive<u32> = 2..=10_000;
const MAX_MEMBERS_DEFAULT: u32 = 500;
const MEMBERS_PAGE_MAX: u32 = 500;

fn id(raw: &str, what: &str) -> Result<u64, ApiError> {
    parse_id(raw).ok_or_else(|| {
        ApiError::bad(
            ErrorCode::InvalidField,
            format!("{what} must be a decimal id"),
        )
    })
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such group")
}

fn forbidden(why: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, why)
}

fn conflict(why: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, why)
}

async fn existing(st: &State, raw: &str) -> Result<GroupRow, ApiError> {
    st.store
        .group(id(raw, "group id")?)
        .await?
        .ok_or_else(not_found)
}

fn group_json(g: &GroupRow) -> Value {
    json!({
        "group_id": g.id.to_string(),
        "name": g.name,
        "description": g.description,
        "owner_id": g.owner_id.to_string(),
        "max_members": g.max_members,
        "member_count": g.member_count,
        "created_ms": g.created_ms,
    })
}

#[derive(Deserialize)]
pub struct Create {
    name: String,
    description: Option<String>,
    max_members: Option<u32>,
}

pub async fn create(
    S(st): S<State>,
    caller: Caller,
    Body(c): Body<Create>,
) -> Result<impl IntoResponse, ApiError> {
    let name = super::names::display_name(&c.name, NAME_CHARS_MAX, "name")?;
    let description = c.description.unwrap_or_default();
    if description.chars().count() > DESCRIPTION_CHARS_MAX {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            "description: at most 512 characters",
        ));
    }
    // Shown beside the name: it must not reorder what follows it either.
    if super::names::has_bidi_control(&description) {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            "description: no bidirectional formatting characters",
        ));
    }
    let max = c.max_members.unwrap_or(MAX_MEMBERS_DEFAULT);
    if !MAX_MEMBERS.contains(&max) {
        return Err(ApiError::bad(
            ErrorCode::InvalidField,
            "max_members: 2 to 10000",
        ));
    }
    let id = st
        .store
        .create_group(
            caller.user_id,
            name,
            &description,
            max,
            im_shared::unix_ms(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "group_id": id.to_string() })),
    ))
}

pub async fn get(
    S(st): S<State>,
    _caller: Caller,
    Path(gid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(group_json(&existing(&st, &gid).await?)))
}

async fn add(st: &State, g: &GroupRow, user: u64) -> Result<StatusCode, ApiError> {
    match st
        .store
        .add_member(g.id, user, im_shared::unix_ms())
        .await?
    {
        Join::Added => {
            st.members_changed(g.id);
            Ok(StatusCode::NO_CONTENT)
        }
        Join::AlreadyMember => Ok(StatusCode::NO_CONTENT),
        Join::Full => Err(conflict("the group is full")),
        Join::NoSuchGroup => Err(not_found()),
    }
}

pub async fn join(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let g = existing(&st, &gid).await?;
    add(&st, &g, caller.user_id).await
}

pub async fn leave(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let g = existing(&st, &gid).await?;
    if g.owner_id == caller.user_id {
        return Err(conflict("the owner cannot leave the group"));
    }
    if !st.store.remove_member(g.id, caller.user_id).await? {
        return Err(conflict("not a member"));
    }
    st.members_changed(g.id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct Page {
    after: Option<String>,
    limit: Option<u32>,
}

pub async fn members(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
    Params(p): Params<Page>,
) -> Result<Json<Value>, ApiError> {
    let g = existing(&st, &gid).await?;
    if !st.store.is_member(g.id, caller.user_id).await? {
        return Err(forbidden("only members see the member list"));
    }
    let after = match p.after.as_deref() {
        None | Some("") => 0,
        Some(a) => id(a, "after")?,
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=MEMBERS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad(ErrorCode::InvalidField, "limit: 1 to 500"));
    }
    let rows = st.store.members(g.id, after, limit).await?;
    let more = rows.len() as u32 == limit;
    let members: Vec<Value> = rows
        .iter()
        .map(|m| json!({ "user_id": m.user_id.to_string(), "username": m.username, "nickname": m.nickname, "joined_ms": m.joined_ms }))
        .collect();
    Ok(Json(json!({ "members": members, "more": more })))
}

#[derive(Deserialize)]
pub struct AddMember {
    user_id: Value,
}

pub async fn add_member(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
    Body(a): Body<AddMember>,
) -> Result<StatusCode, ApiError> {
    let g = existing(&st, &gid).await?;
    if g.owner_id != caller.user_id {
        return Err(forbidden("only the owner adds members"));
    }
    let user = match &a.user_id {
        Value::String(s) => id(s, "user_id")?,
        Value::Number(n) => n.as_u64().filter(|&v| v > 0).ok_or_else(|| {
            ApiError::bad(ErrorCode::InvalidField, "user_id must be a decimal id")
        })?,
        _ => {
            return Err(ApiError::bad(
                ErrorCode::InvalidField,
                "user_id must be a decimal id",
            ))
        }
    };
    if st.store.user_by_id(user).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such user",
        ));
    }
    add(&st, &g, user).await
}

pub async fn remove_member(
    S(st): S<State>,
    caller: Caller,
    Path((gid, uid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let g = existing(&st, &gid).await?;
    if g.owner_id != caller.user_id {
        return Err(forbidden("only the owner removes members"));
    }
    let user = id(&uid, "user id")?;
    if user == g.owner_id {
        return Err(conflict("the owner cannot be removed"));
    }
    if !st.store.remove_member(g.id, user).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "not a member",
        ));
    }
    st.members_changed(g.id);
    Ok(StatusCode::NO_CONTENT)
}

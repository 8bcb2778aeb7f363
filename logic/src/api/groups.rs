//! Groups: create, read, change, join, leave, members (list for members; add and remove for
//! the owner), and invite links. Membership changes here are what the pipeline's member cache
//! listens to.
//!
//! A group is private unless its owner makes it public. A private group does not exist for
//! anyone outside it: every route answers 404 "no such group", as for an id never used, so
//! ids (1, 2, 3, …) reveal nothing. People join a private group by an invite link, or by the
//! owner adding them; a public one by its id as well.

use super::messages::id_value;
use super::{ApiError, Body, Caller, Params, State};
use crate::auth;
use axum::extract::{Path, State as S};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use im_shared::conv::parse_id;
use im_shared::ErrorCode;
use im_store::{GroupChange, GroupRow, InviteRow, Join, JoinBy, NewGroup, NewInvite};
use serde::Deserialize;
use serde_json::{json, Value};

const NAME_CHARS_MAX: usize = 64;
const DESCRIPTION_CHARS_MAX: usize = 512;
const MAX_MEMBERS: std::ops::RangeInclusive<u32> = 2..=10_000;
const MAX_MEMBERS_DEFAULT: u32 = 500;
const MEMBERS_PAGE_MAX: u32 = 500;
/// An invite's life: a week unless asked otherwise, a minute to 30 days.
const INVITE_TTL_S_DEFAULT: u64 = 7 * 24 * 3600;
const INVITE_TTL_S: std::ops::RangeInclusive<u64> = 60..=30 * 24 * 3600;
/// Uses of one invite (0: no limit, which the group's size bounds anyway).
const INVITE_USES_MAX: u32 = 10_000;
/// Unexpired invites per group: each is a row, and the owner's list shows them all.
pub const LIVE_INVITES_MAX: u32 = 100;

fn id(raw: &str, what: &str) -> Result<u64, ApiError> {
    parse_id(raw).ok_or_else(|| {
        ApiError::bad(
            ErrorCode::InvalidField,
            format!("{what} must be a decimal id"),
        )
    })
}

pub(super) fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such group")
}

pub(super) fn forbidden(why: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, why)
}

fn conflict(why: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, why)
}

fn invalid(why: &str) -> ApiError {
    ApiError::bad(ErrorCode::InvalidField, why)
}

fn no_invite() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such invite (unknown, expired, used up or revoked)",
    )
}

/// A group as the caller may see it: any group they are in, and public ones.
pub(super) struct Seen {
    pub(super) group: GroupRow,
    pub(super) member: bool,
}

impl Seen {
    /// Only the owner may; anyone else who can see the group gets 403.
    fn owner_only(self, user: u64, what: &str) -> Result<GroupRow, ApiError> {
        if self.group.owner_id == user {
            Ok(self.group)
        } else {
            Err(forbidden(&format!("only the owner {what}")))
        }
    }
}

pub(super) async fn seen(st: &State, raw: &str, user: u64) -> Result<Seen, ApiError> {
    let group = st
        .store
        .group(id(raw, "group id")?)
        .await?
        .ok_or_else(not_found)?;
    let member = group.owner_id == user || st.store.is_member(group.id, user).await?;
    if !member && !group.public {
        return Err(not_found());
    }
    Ok(Seen { group, member })
}

fn visibility(public: bool) -> &'static str {
    if public {
        "public"
    } else {
        "private"
    }
}

fn history(all: bool) -> &'static str {
    if all {
        "all"
    } else {
        "since_join"
    }
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
        "visibility": visibility(g.public),
        "history": history(g.history_all),
    })
}

/// `"private"` / `"public"` as `public`.
fn parse_visibility(v: &str) -> Result<bool, ApiError> {
    match v {
        "private" => Ok(false),
        "public" => Ok(true),
        _ => Err(invalid("visibility: \"private\" or \"public\"")),
    }
}

/// `"since_join"` / `"all"` as `history_all`.
fn parse_history(v: &str) -> Result<bool, ApiError> {
    match v {
        "since_join" => Ok(false),
        "all" => Ok(true),
        _ => Err(invalid("history: \"since_join\" or \"all\"")),
    }
}

fn checked_description(d: &str) -> Result<&str, ApiError> {
    if d.chars().count() > DESCRIPTION_CHARS_MAX {
        return Err(invalid("description: at most 512 characters"));
    }
    // Shown beside the name: it must not reorder what follows it either.
    if super::names::has_bidi_control(d) {
        return Err(invalid(
            "description: no bidirectional formatting characters",
        ));
    }
    Ok(d)
}

#[derive(Deserialize)]
pub struct Create {
    name: String,
    description: Option<String>,
    max_members: Option<u32>,
    visibility: Option<String>,
    history: Option<String>,
}

pub async fn create(
    S(st): S<State>,
    caller: Caller,
    Body(c): Body<Create>,
) -> Result<impl IntoResponse, ApiError> {
    let name = super::names::display_name(&c.name, NAME_CHARS_MAX, "name")?;
    let description = checked_description(c.description.as_deref().unwrap_or_default())?;
    let max = c.max_members.unwrap_or(MAX_MEMBERS_DEFAULT);
    if !MAX_MEMBERS.contains(&max) {
        return Err(invalid("max_members: 2 to 10000"));
    }
    let public = c
        .visibility
        .as_deref()
        .map_or(Ok(false), parse_visibility)?;
    let history_all = c.history.as_deref().map_or(Ok(false), parse_history)?;
    let id = st
        .store
        .create_group(&NewGroup {
            owner: caller.user_id,
            name,
            description,
            max_members: max,
            public,
            history_all,
            now_ms: im_shared::unix_ms(),
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "group_id": id.to_string() })),
    ))
}

pub async fn get(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let seen = seen(&st, &gid, caller.user_id).await?;
    let mut v = group_json(&seen.group);
    v["member"] = json!(seen.member);
    Ok(Json(v))
}

#[derive(Deserialize)]
pub struct Change {
    name: Option<String>,
    description: Option<String>,
    visibility: Option<String>,
    history: Option<String>,
}

/// `PATCH /groups/{id}`: the owner changes the name, description, visibility or history
/// setting. Making a group private does not remove anyone; making the history `all` shows
/// every member the whole history from then on.
pub async fn change(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
    Body(c): Body<Change>,
) -> Result<Json<Value>, ApiError> {
    let g = seen(&st, &gid, caller.user_id)
        .await?
        .owner_only(caller.user_id, "changes the group")?;
    let name = match &c.name {
        Some(n) => Some(super::names::display_name(n, NAME_CHARS_MAX, "name")?),
        None => None,
    };
    let description = c
        .description
        .as_deref()
        .map(checked_description)
        .transpose()?;
    let change = GroupChange {
        name,
        description,
        public: c.visibility.as_deref().map(parse_visibility).transpose()?,
        history_all: c.history.as_deref().map(parse_history).transpose()?,
    };
    if !st.store.update_group(g.id, &change).await? {
        return Err(not_found());
    }
    // Who may send is unchanged, but a non-member's answer (403 or 404) is not.
    st.members_changed(g.id);
    let g = st.store.group(g.id).await?.ok_or_else(not_found)?;
    let mut v = group_json(&g);
    v["member"] = json!(true);
    Ok(Json(v))
}

async fn add(st: &State, g: u64, user: u64, by: JoinBy) -> Result<StatusCode, ApiError> {
    let join = st
        .store
        .add_member(g, user, im_shared::unix_ms(), by)
        .await?;
    joined(st, g, join)
}

fn joined(st: &State, g: u64, join: Join) -> Result<StatusCode, ApiError> {
    match join {
        Join::Added => {
            st.members_changed(g);
            Ok(StatusCode::NO_CONTENT)
        }
        Join::AlreadyMember => Ok(StatusCode::NO_CONTENT),
        Join::Full => Err(conflict("the group is full")),
        // By id: the group became private meanwhile.
        Join::NoSuchGroup => Err(not_found()),
        Join::Removed => Err(forbidden(
            "the owner removed you from this group: only the owner can add you again",
        )),
    }
}

/// Joining by id: public groups only (a member's join of a private one is a no-op; anyone
/// else's is 404, as for no group at all).
pub async fn join(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let seen = seen(&st, &gid, caller.user_id).await?;
    if seen.member {
        return Ok(StatusCode::NO_CONTENT);
    }
    add(&st, seen.group.id, caller.user_id, JoinBy::Id).await
}

pub async fn leave(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let g = seen(&st, &gid, caller.user_id).await?.group;
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
    let seen = seen(&st, &gid, caller.user_id).await?;
    if !seen.member {
        return Err(forbidden("only members see the member list"));
    }
    let after = match p.after.as_deref() {
        None | Some("") => 0,
        Some(a) => id(a, "after")?,
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=MEMBERS_PAGE_MAX).contains(&limit) {
        return Err(invalid("limit: 1 to 500"));
    }
    let rows = st.store.members(seen.group.id, after, limit).await?;
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
    let g = seen(&st, &gid, caller.user_id)
        .await?
        .owner_only(caller.user_id, "adds members")?;
    let user = id_value(&a.user_id, "user_id")?;
    if st.store.user_by_id(user).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such user",
        ));
    }
    // Someone who blocks the owner is not put in the owner's group (its messages would reach
    // them); they may still join by an invite of their own choosing.
    let blocked = st
        .blocks
        .of(user)
        .await
        .map_err(|e| ApiError::from(im_store::StoreError::Unavailable(e)))?;
    if blocked.binary_search(&caller.user_id).is_ok() {
        return Err(forbidden(crate::stage::blocks::BLOCKED_BY_THEM));
    }
    add(&st, g.id, user, JoinBy::Owner).await
}

pub async fn remove_member(
    S(st): S<State>,
    caller: Caller,
    Path((gid, uid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let g = seen(&st, &gid, caller.user_id)
        .await?
        .owner_only(caller.user_id, "removes members")?;
    let user = id(&uid, "user id")?;
    if user == g.owner_id {
        return Err(conflict("the owner cannot be removed"));
    }
    if !st
        .store
        .expel_member(g.id, user, im_shared::unix_ms())
        .await?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "not a member",
        ));
    }
    st.members_changed(g.id);
    Ok(StatusCode::NO_CONTENT)
}

fn invite_json(i: &InviteRow) -> Value {
    json!({
        "invite_id": i.id.to_string(),
        "group_id": i.group.to_string(),
        "created_by": i.created_by.to_string(),
        "created_ms": i.created_ms,
        "expires_ms": i.expires_ms,
        "max_uses": i.uses_max,
        "uses": i.uses,
    })
}

#[derive(Deserialize)]
pub struct NewInviteBody {
    expires_in_s: Option<u64>,
    max_uses: Option<u32>,
}

/// `POST /groups/{id}/invites`: the owner makes an invite link. The token is in this answer
/// only (the database keeps its hash).
pub async fn create_invite(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
    Body(b): Body<NewInviteBody>,
) -> Result<impl IntoResponse, ApiError> {
    let g = seen(&st, &gid, caller.user_id)
        .await?
        .owner_only(caller.user_id, "makes invites")?;
    let ttl_s = b.expires_in_s.unwrap_or(INVITE_TTL_S_DEFAULT);
    if !INVITE_TTL_S.contains(&ttl_s) {
        return Err(invalid("expires_in_s: 60 to 2592000 (30 days)"));
    }
    let uses_max = b.max_uses.unwrap_or(0);
    if uses_max > INVITE_USES_MAX {
        return Err(invalid("max_uses: 0 (no limit) to 10000"));
    }
    let (token, hash) = auth::new_invite_token();
    let now = im_shared::unix_ms();
    let new = NewInvite {
        group: g.id,
        token_hash: &hash,
        created_by: caller.user_id,
        created_ms: now,
        expires_ms: now + ttl_s * 1000,
        uses_max,
    };
    let Some(invite_id) = st.store.create_invite(&new, LIVE_INVITES_MAX).await? else {
        return Err(conflict(
            "the group has 100 unexpired invites: revoke some first",
        ));
    };
    let row = InviteRow {
        id: invite_id,
        group: g.id,
        created_by: caller.user_id,
        created_ms: now,
        expires_ms: new.expires_ms,
        uses_max,
        uses: 0,
    };
    let mut v = invite_json(&row);
    v["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn invites(
    S(st): S<State>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let g = seen(&st, &gid, caller.user_id)
        .await?
        .owner_only(caller.user_id, "sees invites")?;
    let rows = st.store.invites(g.id, im_shared::unix_ms()).await?;
    Ok(Json(
        json!({ "invites": rows.iter().map(invite_json).collect::<Vec<_>>() }),
    ))
}

pub async fn revoke_invite(
    S(st): S<State>,
    caller: Caller,
    Path((gid, iid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let g = seen(&st, &gid, caller.user_id)
        .await?
        .owner_only(caller.user_id, "revokes invites")?;
    if !st.store.revoke_invite(g.id, id(&iid, "invite id")?).await? {
        return Err(no_invite());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// An invite token as links carry it: 32 lowercase hex digits. Anything else is no invite,
/// found without asking the database.
fn token_hash(token: &str) -> Result<String, ApiError> {
    let well_formed = token.len() == 32
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed {
        return Err(no_invite());
    }
    Ok(auth::refresh_hash(token))
}

/// `GET /invites/{token}`: what the invite leads to, so the invitee can decide.
pub async fn invite_preview(
    S(st): S<State>,
    _caller: Caller,
    Path(token): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let hash = token_hash(&token)?;
    let invite = st
        .store
        .invite(&hash, im_shared::unix_ms())
        .await?
        .ok_or_else(no_invite)?;
    let g = st.store.group(invite.group).await?.ok_or_else(no_invite)?;
    Ok(Json(json!({
        "group": group_json(&g),
        "expires_ms": invite.expires_ms,
    })))
}

/// `POST /invites/{token}/join`: joins the invite's group (a member's use changes nothing
/// and counts no use).
pub async fn invite_join(
    S(st): S<State>,
    caller: Caller,
    Path(token): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let hash = token_hash(&token)?;
    let (group, join) = st
        .store
        .join_by_invite(&hash, caller.user_id, im_shared::unix_ms())
        .await?
        .ok_or_else(no_invite)?;
    joined(&st, group, join)?;
    Ok(Json(json!({ "group_id": group.to_string() })))
}

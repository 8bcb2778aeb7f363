//! Storage behind the logic and persist services: one trait, two real implementations on
//! sqlx — MySQL (production; MariaDB in tests) and SQLite (standalone). Both come from one
//! body of SQL (`sql/body.rs`), so they cannot drift apart; where the dialects differ, the
//! difference is named. The schema is in `migrations/<dialect>/`, applied by `Store::migrate`.
//!
//! `testing` makes a fresh MySQL database or SQLite file per test, for this crate's tests
//! and for the services' tests that need a real store.

mod sql;
pub mod testing;

pub use sql::{MySqlStore, SqlStore, SqliteStore, WalLimits};

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// Waits, at most `wait`, until the database holds `conv` up to `seq`. In the distributed
/// mode a client sees a message (and may mark it read) before persist has written it, and a
/// read position is capped at what is stored: marking it read a moment too early would
/// otherwise leave it unread.
pub async fn wait_stored(store: &dyn Store, conv: &str, seq: u64, wait: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let convs = [conv.to_string()];
    loop {
        let have = store.max_seqs(&convs).await?.first().map_or(0, |(_, s)| *s);
        if have >= seq || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        // Persist flushes every few tens of milliseconds.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A refresh token to store: its hash, whose it is, and its session.
#[derive(Clone, Debug)]
pub struct NewRefresh<'a> {
    pub token_hash: &'a str,
    pub user_id: u64,
    pub expires_ms: u64,
    /// One per login; every rotation of that login's refresh token keeps it.
    pub family: &'a str,
    /// The access token issued with this refresh token.
    pub access_jti: &'a str,
    pub access_exp_s: u64,
}

/// What using a refresh token found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Valid and now used: a new pair may be issued in its family.
    Fresh { user_id: u64, family: String },
    /// Used before (at `used_ms`): someone holds a copy, and the family must end, unless
    /// it is its own client retrying a refresh whose answer it did not get.
    Reused {
        user_id: u64,
        family: String,
        used_ms: u64,
    },
    /// Unknown or expired.
    Unknown,
}

/// A stored account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    pub id: u64,
    pub username: String,
    pub password_hash: String,
    pub nickname: String,
    pub avatar: String,
    /// The user hides their presence (docs/PROTOCOL.md, "Presence").
    pub presence_hidden: bool,
}

/// A browser a user asked to be woken in by Web Push (docs/PROTOCOL.md, "Offline push"):
/// its push service endpoint and its keys, base64url as the browser gave them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushSubscription {
    pub id: u64,
    pub user_id: u64,
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
    pub created_ms: u64,
}

/// A group with its member count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub owner_id: u64,
    pub max_members: u32,
    pub member_count: u64,
    pub created_ms: u64,
    /// Anyone may see it and join it; a private group (the default) is joined by invite and
    /// does not exist for non-members.
    pub public: bool,
    /// New members see the history from the start; otherwise from their join (the default).
    pub history_all: bool,
}

/// A group to create.
#[derive(Clone, Debug)]
pub struct NewGroup<'a> {
    pub owner: u64,
    pub name: &'a str,
    pub description: &'a str,
    pub max_members: u32,
    pub public: bool,
    pub history_all: bool,
    pub now_ms: u64,
}

/// What to change of a group (the fields given).
#[derive(Clone, Debug, Default)]
pub struct GroupChange<'a> {
    pub name: Option<&'a str>,
    pub description: Option<&'a str>,
    pub public: Option<bool>,
    pub history_all: Option<bool>,
}

/// A group's members, as sends and routing check them: sorted ids, and whether the group is
/// public (a non-member is told it exists only then).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roster {
    pub public: bool,
    pub members: Vec<u64>,
}

/// An invite link to store: the token's hash, never the token.
#[derive(Clone, Debug)]
pub struct NewInvite<'a> {
    pub group: u64,
    pub token_hash: &'a str,
    pub created_by: u64,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// 0: no limit.
    pub uses_max: u32,
}

/// A stored invite link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InviteRow {
    pub id: u64,
    pub group: u64,
    pub created_by: u64,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub uses_max: u32,
    pub uses: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRow {
    pub user_id: u64,
    pub username: String,
    pub nickname: String,
    pub joined_ms: u64,
}

/// A message to store; the store assigns its seq in the conversation.
#[derive(Clone, Debug)]
pub struct NewMessage<'a> {
    pub id: u64,
    pub conv: &'a str,
    pub sender: u64,
    pub cid: &'a str,
    pub to_user: Option<u64>,
    pub to_group: Option<u64>,
    pub content: &'a str,
    pub content_type: &'a str,
    pub ts_ms: u64,
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    pub id: u64,
    pub conv: String,
    pub seq: u64,
    pub sender: u64,
    pub to_user: Option<u64>,
    pub to_group: Option<u64>,
    pub content: String,
    pub content_type: String,
    pub ts_ms: u64,
}

/// One conversation as a user sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationRow {
    pub conv: String,
    pub max_seq: u64,
    pub read_seq: u64,
    pub muted: bool,
    pub pinned: bool,
    pub last_message: Option<MessageRow>,
    /// In a two-person conversation, how far the other party has read (their receipts).
    pub peer_read_seq: Option<u64>,
}

/// What adding a member did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Join {
    Added,
    AlreadyMember,
    /// The group has `max_members` members.
    Full,
    /// No such group, or (`JoinBy::Id`) not a public one.
    NoSuchGroup,
    /// The owner removed this user: only the owner can add them again.
    Removed,
}

/// Who lets a user into a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinBy {
    /// The owner adds them (and so lifts an earlier removal).
    Owner,
    /// They join by the group's id: public groups only.
    Id,
}

/// The part of a conversation a user sees: messages with seq > `after_seq` stamped at or after
/// `from_ms`. A group member with history from their join sees from it; everyone else sees
/// everything (`View::ALL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub after_seq: u64,
    pub from_ms: u64,
}

impl View {
    pub const ALL: View = View {
        after_seq: 0,
        from_ms: 0,
    };

    pub fn shows(&self, m: &MessageRow) -> bool {
        m.seq > self.after_seq && m.ts_ms >= self.from_ms
    }
}

/// How far before their join a new member's view starts, in message time: the clocks of the
/// process that admits the member and of the one that stamps messages may differ by this much
/// (NTP keeps them far closer) without a message sent after the join being hidden.
pub const JOIN_CLOCK_SKEW_MS: u64 = 1_000;

#[derive(Debug)]
pub enum StoreError {
    /// A unique key already holds this value (duplicate username, …).
    Conflict,
    /// The database is unreachable or failed; the request may succeed later.
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Conflict => f.write_str("conflict"),
            StoreError::Unavailable(e) => write!(f, "database unavailable: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "mysql" or "sqlite", for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Applies the embedded migrations that have not run yet.
    async fn migrate(&self) -> Result<()>;

    /// A new account; `Conflict` when the username is taken.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        nickname: &str,
        now_ms: u64,
    ) -> Result<u64>;
    async fn user_by_username(&self, username: &str) -> Result<Option<UserRow>>;
    async fn user_by_id(&self, id: u64) -> Result<Option<UserRow>>;
    /// Changes the given fields; false when the user does not exist.
    async fn update_profile(
        &self,
        id: u64,
        nickname: Option<&str>,
        avatar: Option<&str>,
    ) -> Result<bool>;

    /// Stores a refresh token's hash, with its family and the access token issued with it.
    async fn put_refresh(&self, r: &NewRefresh<'_>) -> Result<()>;
    /// Uses a refresh token (rotation: it works once). A used one is kept, marked, until it
    /// expires, so that its reuse is told from an unknown token.
    async fn take_refresh(&self, token_hash: &str, now_ms: u64) -> Result<Taken>;
    /// The access tokens (jti, exp in Unix seconds) issued in `family` that expire after
    /// `now_s`: what revoking the family must revoke.
    async fn family_access(&self, family: &str, now_s: u64) -> Result<Vec<(String, u64)>>;
    /// The family the access token `jti` was issued in, if any.
    async fn family_of_access(&self, jti: &str) -> Result<Option<String>>;
    /// Forgets every refresh token of a family (its session has ended).
    async fn drop_refresh_family(&self, family: &str) -> Result<()>;
    /// Every family of a user (for logging out everywhere).
    async fn refresh_families(&self, user_id: u64) -> Result<Vec<String>>;
    /// Forgets every refresh token of a user.
    async fn drop_refresh_tokens(&self, user_id: u64) -> Result<()>;
    /// Forgets a user's refresh tokens from before families (migration 3).
    async fn drop_refresh_without_family(&self, user_id: u64) -> Result<()>;

    /// `user` blocks `other`, unless they block `max` users already (`None` then); whether
    /// the block is new.
    async fn block(&self, user: u64, other: u64, max: u32, now_ms: u64) -> Result<Option<bool>>;
    /// Lifts a block; false when there was none.
    async fn unblock(&self, user: u64, other: u64) -> Result<bool>;
    /// Everyone `user` blocks, ascending.
    async fn blocked_by(&self, user: u64) -> Result<Vec<u64>>;
    /// The users `user` has exchanged messages with, both ways (whom their presence is
    /// told to), ascending, from at most `limit` conversations.
    async fn contacts(&self, user: u64, limit: u32) -> Result<Vec<u64>>;
    /// Whether `a` and `b` have exchanged messages, both ways (are each other's contacts).
    async fn are_contacts(&self, a: u64, b: u64) -> Result<bool>;
    /// Whether `a` and `b` are members of one group.
    async fn share_a_group(&self, a: u64, b: u64) -> Result<bool>;
    /// Hides or shows the user's presence; false when there is no such user.
    async fn set_presence_hidden(&self, user: u64, hidden: bool) -> Result<bool>;
    /// Of `users`, those who hide their presence, ascending.
    async fn hiding_presence(&self, users: &[u64]) -> Result<Vec<u64>>;
    /// Everyone who blocks `user`, ascending.
    async fn blockers_of(&self, user: u64) -> Result<Vec<u64>>;

    /// Records `s` for `s.user_id` (its id and created_ms are ignored): the endpoint moves
    /// to this user if another had it, and past `max` the user's oldest (by id) go. The new id, or
    /// `None` when there is no such user.
    async fn add_push_subscription(
        &self,
        s: &PushSubscription,
        max: u32,
        now_ms: u64,
    ) -> Result<Option<u64>>;
    /// Forgets `user`'s subscription at `endpoint`; false when they had none there.
    async fn remove_push_subscription(&self, user: u64, endpoint: &str) -> Result<bool>;
    /// Forgets a subscription its push service says is gone.
    async fn drop_push_subscription(&self, id: u64) -> Result<()>;
    /// Forgets every subscription of a user (logged out everywhere); how many there were.
    async fn drop_push_subscriptions_of(&self, user: u64) -> Result<u64>;
    /// A user's subscriptions, newest first (the order they were made in).
    async fn push_subscriptions(&self, user: u64) -> Result<Vec<PushSubscription>>;
    /// Whether `user` muted `conv` (no offline push for it).
    async fn muted(&self, user: u64, conv: &str) -> Result<bool>;

    /// A new group with its owner as the first member.
    async fn create_group(&self, g: &NewGroup<'_>) -> Result<u64>;
    async fn group(&self, id: u64) -> Result<Option<GroupRow>>;
    /// Changes the given fields; false when there is no such group.
    async fn update_group(&self, id: u64, change: &GroupChange<'_>) -> Result<bool>;
    /// Adds a member unless the group is full, or `by` does not let them in (checked under the
    /// group's row lock). The member's view starts at the conversation's last stored seq and
    /// `JOIN_CLOCK_SKEW_MS` before `now_ms`: their read position, and, unless the group shows
    /// all its history, the first message they see.
    async fn add_member(&self, group: u64, user: u64, now_ms: u64, by: JoinBy) -> Result<Join>;
    /// The member leaves; false when the user was not a member.
    async fn remove_member(&self, group: u64, user: u64) -> Result<bool>;
    /// The owner removes a member, who cannot come back by an invite or the group's id until
    /// the owner adds them again; false when the user was not a member.
    async fn expel_member(&self, group: u64, user: u64, now_ms: u64) -> Result<bool>;
    async fn is_member(&self, group: u64, user: u64) -> Result<bool>;
    /// What a member sees of the group's messages (`View::ALL` when the group shows its whole
    /// history); `None` for anyone else.
    async fn member_view(&self, group: u64, user: u64) -> Result<Option<View>>;

    /// Stores an invite unless the group has `live_max` unexpired invites already (`None`
    /// then); its id.
    async fn create_invite(&self, i: &NewInvite<'_>, live_max: u32) -> Result<Option<u64>>;
    /// The group's unexpired invites, newest first (expired ones are deleted on the way).
    async fn invites(&self, group: u64, now_ms: u64) -> Result<Vec<InviteRow>>;
    /// Deletes an invite of `group`; false when there was none with this id.
    async fn revoke_invite(&self, group: u64, invite: u64) -> Result<bool>;
    /// The invite with this token hash, if it is unexpired and not used up.
    async fn invite(&self, token_hash: &str, now_ms: u64) -> Result<Option<InviteRow>>;
    /// Joins `user` to the invite's group, counting a use when they joined (under the
    /// invite's and the group's row locks: concurrent uses cannot pass the limit). `None`
    /// when the invite is unknown, expired or used up.
    async fn join_by_invite(
        &self,
        token_hash: &str,
        user: u64,
        now_ms: u64,
    ) -> Result<Option<(u64, Join)>>;
    /// Members by user id, after `after_user`, at most `limit`.
    async fn members(&self, group: u64, after_user: u64, limit: u32) -> Result<Vec<MemberRow>>;

    /// Stores a message with the conversation's next seq, and makes it visible in the parties'
    /// conversation lists. A retry (same sender and cid) stores nothing and returns the
    /// message stored the first time.
    async fn append_message(&self, m: &NewMessage<'_>) -> Result<MessageRow>;
    /// Messages of `conv` in `view` with seq < `before_seq`, newest first, at most `limit`.
    async fn history(
        &self,
        conv: &str,
        view: View,
        before_seq: u64,
        limit: u32,
    ) -> Result<Vec<MessageRow>>;

    /// Writes a batch of sequenced messages (the `im.messages` records, seqs assigned by the
    /// pipeline) in one transaction, a multi-row INSERT per chunk. Idempotent, because the
    /// log is replayed after a crash: a row whose id, (conv, seq) or (sender, cid) is already
    /// stored is skipped. Also raises each conversation's `max_seq` (the last seq handed out)
    /// to the batch's highest seq for it, skipped rows included (never lowers it; creates the
    /// row), and puts two-person conversations
    /// (`to_user != 0`) in both users' lists, as `append_message` does. Returns the number of
    /// message rows inserted. In the same transaction, raises the fence of each
    /// `(im.messages partition, epoch)` in `fences` (never lowers one).
    async fn insert_messages(
        &self,
        batch: &[im_shared::records::Stored],
        fences: &[(i32, i32)],
    ) -> Result<u64>;
    /// The highest epoch fenced (README.md, "Fencing") in an `im.messages` partition, as far as the
    /// database has it (0: none).
    async fn fence(&self, partition: i32) -> Result<i32>;
    /// `max_seq` of each of `convs` that has a conversation row (the others are absent).
    async fn max_seqs(&self, convs: &[String]) -> Result<Vec<(String, u64)>>;
    /// Stored messages by (sender, cid), to recognise client retries; one query per chunk of
    /// keys. Returns (sender, cid, row) for the pairs that exist.
    async fn find_by_cids(&self, keys: &[(u64, String)]) -> Result<Vec<(u64, String, MessageRow)>>;
    /// Messages of `conv` with seq > `after`, oldest first, at most `limit` (for `sync`).
    async fn messages_after(&self, conv: &str, after: u64, limit: u32) -> Result<Vec<MessageRow>>;
    /// A group's members, ascending, and whether it is public (`None`: no such group).
    async fn roster(&self, group: u64) -> Result<Option<Roster>>;
    /// The user's conversations: two-person ones they are part of, and their groups' (a
    /// group's last message only if the user may see it).
    async fn conversations(&self, user: u64) -> Result<Vec<ConversationRow>>;
    /// Puts a two-person conversation in both users' lists (no message needed).
    async fn open_pair(&self, conv: &str, a: u64, b: u64) -> Result<()>;
    /// Sets what is given; the read position only moves forward, and never past the end.
    /// Returns the read position as stored now.
    async fn update_membership(
        &self,
        user: u64,
        conv: &str,
        read_seq: Option<u64>,
        muted: Option<bool>,
        pinned: Option<bool>,
    ) -> Result<u64>;
}

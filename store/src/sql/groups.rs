//! Groups, their members and invites (docs/PROTOCOL.md, "Groups", "Invites"), as inherent
//! methods of both stores; `impl_store!`'s trait methods call them, and `impl_store!` expands
//! this macro with its dialect's differences.

macro_rules! impl_groups {
    (
        $db:ty,
        for_update: $for_update:literal,
        insert_ignore: $insert_ignore:literal,
        begin_write: $begin_write:literal,
        last_insert_id: $last_id:literal
    ) => {
        impl SqlStore<$db> {
            pub(super) async fn create_group_q(&self, g: &NewGroup<'_>) -> Result<u64> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO chat_groups (name, description, owner_id, max_members, created_ms, is_public, history_all) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(g.name)
                .bind(g.description)
                .bind(to_i64(g.owner))
                .bind(g.max_members as i64)
                .bind(to_i64(g.now_ms))
                .bind(g.public)
                .bind(g.history_all)
                .execute(&mut *tx)
                .await?;
                // Same connection, same transaction: the id just inserted.
                let id: i64 = sqlx::query_scalar($last_id).fetch_one(&mut *tx).await?;
                sqlx::query("INSERT INTO group_members (group_id, user_id, joined_ms) VALUES (?, ?, ?)")
                    .bind(id)
                    .bind(to_i64(g.owner))
                    .bind(to_i64(g.now_ms))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(id as u64)
            }
            pub(super) async fn group_q(&self, id: u64) -> Result<Option<GroupRow>> {
                let row = sqlx::query(
                    "SELECT g.id, g.name, g.description, g.owner_id, g.max_members, g.created_ms, g.is_public, g.history_all, \
                     (SELECT COUNT(*) FROM group_members m WHERE m.group_id = g.id) AS member_count \
                     FROM chat_groups g WHERE g.id = ?",
                )
                .bind(to_i64(id))
                .fetch_optional(&self.pool)
                .await?;
                let Some(r) = row else { return Ok(None) };
                Ok(Some(GroupRow {
                    id: r.try_get::<i64, _>("id")? as u64,
                    name: r.try_get("name")?,
                    description: r.try_get("description")?,
                    owner_id: r.try_get::<i64, _>("owner_id")? as u64,
                    max_members: r.try_get::<i64, _>("max_members")? as u32,
                    member_count: r.try_get::<i64, _>("member_count")? as u64,
                    created_ms: r.try_get::<i64, _>("created_ms")? as u64,
                    public: r.try_get::<bool, _>("is_public")?,
                    history_all: r.try_get::<bool, _>("history_all")?,
                }))
            }
            pub(super) async fn update_group_q(&self, id: u64, c: &GroupChange<'_>) -> Result<bool> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                let found: Option<i64> = sqlx::query_scalar(concat!("SELECT id FROM chat_groups WHERE id = ?", $for_update))
                    .bind(to_i64(id))
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    return Ok(false);
                }
                sqlx::query(
                    "UPDATE chat_groups SET name = COALESCE(?, name), description = COALESCE(?, description), \
                     is_public = COALESCE(?, is_public), history_all = COALESCE(?, history_all) WHERE id = ?",
                )
                .bind(c.name)
                .bind(c.description)
                .bind(c.public)
                .bind(c.history_all)
                .bind(to_i64(id))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            }
            pub(super) async fn add_member_q(&self, group: u64, user: u64, now_ms: u64, by: JoinBy) -> Result<Join> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                let join = Self::join_in(&mut tx, group, user, now_ms, by.into()).await?;
                tx.commit().await?;
                Ok(join)
            }
            pub(super) async fn remove_member_q(&self, group: u64, user: u64) -> Result<bool> {
                let r = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
                    .bind(to_i64(group))
                    .bind(to_i64(user))
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected() > 0)
            }
            pub(super) async fn expel_member_q(&self, group: u64, user: u64, now_ms: u64) -> Result<bool> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                let r = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
                    .bind(to_i64(group))
                    .bind(to_i64(user))
                    .execute(&mut *tx)
                    .await?;
                if r.rows_affected() == 0 {
                    return Ok(false);
                }
                sqlx::query(concat!($insert_ignore, " INTO group_removals (group_id, user_id, removed_ms) VALUES (?, ?, ?)"))
                    .bind(to_i64(group))
                    .bind(to_i64(user))
                    .bind(to_i64(now_ms))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }
            pub(super) async fn is_member_q(&self, group: u64, user: u64) -> Result<bool> {
                let r: Option<i64> = sqlx::query_scalar("SELECT user_id FROM group_members WHERE group_id = ? AND user_id = ?")
                    .bind(to_i64(group))
                    .bind(to_i64(user))
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(r.is_some())
            }
            pub(super) async fn member_view_q(&self, group: u64, user: u64) -> Result<Option<View>> {
                let row = sqlx::query(
                    "SELECT g.history_all AS history_all, m.joined_seq AS joined_seq, m.visible_from_ms AS visible_from_ms \
                     FROM group_members m JOIN chat_groups g ON g.id = m.group_id WHERE m.group_id = ? AND m.user_id = ?",
                )
                .bind(to_i64(group))
                .bind(to_i64(user))
                .fetch_optional(&self.pool)
                .await?;
                let Some(r) = row else { return Ok(None) };
                if r.try_get::<bool, _>("history_all")? {
                    return Ok(Some(View::ALL));
                }
                Ok(Some(View {
                    after_seq: r.try_get::<i64, _>("joined_seq")? as u64,
                    from_ms: r.try_get::<i64, _>("visible_from_ms")? as u64,
                }))
            }
            pub(super) async fn create_invite_q(&self, i: &NewInvite<'_>, live_max: u32) -> Result<Option<u64>> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                // The group row's lock serialises creations, so two cannot both pass the count.
                let found: Option<i64> = sqlx::query_scalar(concat!("SELECT id FROM chat_groups WHERE id = ?", $for_update))
                    .bind(to_i64(i.group))
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    return Ok(None);
                }
                // Expired invites go here too, so that short-lived ones cannot pile up.
                sqlx::query("DELETE FROM group_invites WHERE group_id = ? AND expires_ms <= ?")
                    .bind(to_i64(i.group))
                    .bind(to_i64(i.created_ms))
                    .execute(&mut *tx)
                    .await?;
                let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM group_invites WHERE group_id = ?")
                    .bind(to_i64(i.group))
                    .fetch_one(&mut *tx)
                    .await?;
                if live >= live_max as i64 {
                    return Ok(None);
                }
                sqlx::query(
                    "INSERT INTO group_invites (group_id, token_hash, created_by, created_ms, expires_ms, uses_max) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(to_i64(i.group))
                .bind(i.token_hash)
                .bind(to_i64(i.created_by))
                .bind(to_i64(i.created_ms))
                .bind(to_i64(i.expires_ms))
                .bind(i.uses_max as i64)
                .execute(&mut *tx)
                .await?;
                let id: i64 = sqlx::query_scalar($last_id).fetch_one(&mut *tx).await?;
                tx.commit().await?;
                Ok(Some(id as u64))
            }
            pub(super) async fn invites_q(&self, group: u64, now_ms: u64) -> Result<Vec<InviteRow>> {
                sqlx::query("DELETE FROM group_invites WHERE group_id = ? AND expires_ms <= ?")
                    .bind(to_i64(group))
                    .bind(to_i64(now_ms))
                    .execute(&self.pool)
                    .await?;
                let rows = sqlx::query(concat!("SELECT ", invite_columns!(), " FROM group_invites WHERE group_id = ? ORDER BY id DESC"))
                    .bind(to_i64(group))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(invite_row).collect()
            }
            pub(super) async fn revoke_invite_q(&self, group: u64, invite: u64) -> Result<bool> {
                let r = sqlx::query("DELETE FROM group_invites WHERE id = ? AND group_id = ?")
                    .bind(to_i64(invite))
                    .bind(to_i64(group))
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected() > 0)
            }
            pub(super) async fn invite_q(&self, token_hash: &str, now_ms: u64) -> Result<Option<InviteRow>> {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    invite_columns!(),
                    " FROM group_invites WHERE token_hash = ? AND expires_ms > ? AND (uses_max = 0 OR uses < uses_max)"
                ))
                .bind(token_hash)
                .bind(to_i64(now_ms))
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(invite_row).transpose()
            }
            pub(super) async fn join_by_invite_q(&self, token_hash: &str, user: u64, now_ms: u64) -> Result<Option<(u64, Join)>> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                // The invite's row lock: two uses of its last seat cannot both pass.
                let row = sqlx::query(concat!("SELECT ", invite_columns!(), " FROM group_invites WHERE token_hash = ?", $for_update))
                    .bind(token_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(invite) = row.as_ref().map(invite_row).transpose()? else {
                    return Ok(None);
                };
                let used_up = invite.uses_max != 0 && invite.uses >= invite.uses_max;
                if invite.expires_ms <= now_ms || used_up {
                    return Ok(None);
                }
                let join = Self::join_in(&mut tx, invite.group, user, now_ms, Entry::Invite).await?;
                if join == Join::Added {
                    sqlx::query("UPDATE group_invites SET uses = uses + 1 WHERE id = ?")
                        .bind(to_i64(invite.id))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(Some((invite.group, join)))
            }
            pub(super) async fn roster_q(&self, group: u64) -> Result<Option<Roster>> {
                let rows = sqlx::query(
                    "SELECT g.is_public AS is_public, m.user_id AS user_id FROM chat_groups g \
                     LEFT JOIN group_members m ON m.group_id = g.id WHERE g.id = ? ORDER BY m.user_id",
                )
                .bind(to_i64(group))
                .fetch_all(&self.pool)
                .await?;
                let Some(first) = rows.first() else { return Ok(None) };
                let mut members = Vec::with_capacity(rows.len());
                for r in &rows {
                    if let Some(id) = r.try_get::<Option<i64>, _>("user_id")? {
                        members.push(id as u64);
                    }
                }
                Ok(Some(Roster { public: first.try_get::<bool, _>("is_public")?, members }))
            }
            pub(super) async fn members_q(&self, group: u64, after_user: u64, limit: u32) -> Result<Vec<MemberRow>> {
                let rows = sqlx::query(
                    "SELECT m.user_id, u.username, u.nickname, m.joined_ms FROM group_members m \
                     JOIN users u ON u.id = m.user_id WHERE m.group_id = ? AND m.user_id > ? \
                     ORDER BY m.user_id LIMIT ?",
                )
                .bind(to_i64(group))
                .bind(to_i64(after_user))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(MemberRow {
                            user_id: r.try_get::<i64, _>("user_id")? as u64,
                            username: r.try_get("username")?,
                            nickname: r.try_get("nickname")?,
                            joined_ms: r.try_get::<i64, _>("joined_ms")? as u64,
                        })
                    })
                    .collect()
            }

            /// `add_member`'s work, inside a caller's transaction.
            async fn join_in(conn: &mut <$db as sqlx::Database>::Connection, group: u64, user: u64, now_ms: u64, by: Entry) -> Result<Join> {
                // The group row's lock serialises joins, so two cannot both take the last seat,
                // and one by id cannot pass a change to private.
                let row = sqlx::query(concat!("SELECT max_members, is_public FROM chat_groups WHERE id = ?", $for_update))
                    .bind(to_i64(group))
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some(row) = row else { return Ok(Join::NoSuchGroup) };
                let max: i64 = row.try_get("max_members")?;
                if by == Entry::Id && !row.try_get::<bool, _>("is_public")? {
                    return Ok(Join::NoSuchGroup);
                }
                let already: Option<i64> = sqlx::query_scalar("SELECT user_id FROM group_members WHERE group_id = ? AND user_id = ?")
                    .bind(to_i64(group))
                    .bind(to_i64(user))
                    .fetch_optional(&mut *conn)
                    .await?;
                if already.is_some() {
                    return Ok(Join::AlreadyMember);
                }
                if by == Entry::Owner {
                    sqlx::query("DELETE FROM group_removals WHERE group_id = ? AND user_id = ?")
                        .bind(to_i64(group))
                        .bind(to_i64(user))
                        .execute(&mut *conn)
                        .await?;
                } else {
                    let removed: Option<i64> = sqlx::query_scalar("SELECT user_id FROM group_removals WHERE group_id = ? AND user_id = ?")
                        .bind(to_i64(group))
                        .bind(to_i64(user))
                        .fetch_optional(&mut *conn)
                        .await?;
                    if removed.is_some() {
                        return Ok(Join::Removed);
                    }
                }
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM group_members WHERE group_id = ?")
                    .bind(to_i64(group))
                    .fetch_one(&mut *conn)
                    .await?;
                if count >= max {
                    return Ok(Join::Full);
                }
                // The member's view starts at the last stored seq. In the distributed mode the
                // pipeline may have sequenced more that persist has not written yet (tens of
                // milliseconds' worth, or more while persist catches up): the time bound hides
                // those stamped before the join.
                let conv = format!("g:{group}");
                let seq: Option<i64> = sqlx::query_scalar("SELECT max_seq FROM conversations WHERE conv = ?")
                    .bind(&conv)
                    .fetch_optional(&mut *conn)
                    .await?;
                let seq = seq.unwrap_or(0);
                sqlx::query("INSERT INTO group_members (group_id, user_id, joined_ms, joined_seq, visible_from_ms) VALUES (?, ?, ?, ?, ?)")
                    .bind(to_i64(group))
                    .bind(to_i64(user))
                    .bind(to_i64(now_ms))
                    .bind(seq)
                    .bind(to_i64(now_ms.saturating_sub(JOIN_CLOCK_SKEW_MS)))
                    .execute(&mut *conn)
                    .await?;
                // Unread counts start at the join too (a member who left and came back keeps
                // a later position).
                sqlx::query(concat!($insert_ignore, " INTO conversation_members (user_id, conv) VALUES (?, ?)"))
                    .bind(to_i64(user))
                    .bind(&conv)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("UPDATE conversation_members SET read_seq = ? WHERE user_id = ? AND conv = ? AND read_seq < ?")
                    .bind(seq)
                    .bind(to_i64(user))
                    .bind(&conv)
                    .bind(seq)
                    .execute(&mut *conn)
                    .await?;
                Ok(Join::Added)
            }
        }
    };
}

pub(super) use impl_groups;

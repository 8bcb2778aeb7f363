//! The body of SQL both `Store` implementations are generated from (`impl_store!`, expanded
//! once per dialect in `sql/mod.rs`). Where MySQL and SQLite differ, the macro takes the
//! difference as a named argument (`bump_seq`, `insert_ignore`, ...), so one reading of this
//! file is a reading of both backends.

macro_rules! impl_store {
    (
        $db:ty,
        $name:literal,
        $migrations:expr,
        $lock:literal,
        $unlock:literal,
        last_insert_id: $last_id:literal,
        for_update: $for_update:literal,
        bump_seq: $bump_seq:literal,
        insert_ignore: $insert_ignore:literal,
        raise_max_seq: $raise_max_seq:literal,
        raise_fence: $raise_fence:literal,
        group_conv: $group_conv:literal,
        restart_log: $restart_log:literal,
        hold_hot: $hold_hot:literal,
        begin_write: $begin_write:literal,
        mark_wrote: $mark_wrote:literal
    ) => {
        #[async_trait]
        impl Store for SqlStore<$db> {
            fn backend(&self) -> &'static str {
                $name
            }

            async fn migrate(&self) -> Result<()> {
                let mut conn = self.pool.acquire().await?;
                // Several instances may start at once: one migrates, the others wait.
                sqlx::query($lock).execute(&mut *conn).await?;
                let result: Result<()> = async {
                    sqlx::query(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT NOT NULL PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                    )
                    .execute(&mut *conn)
                    .await?;
                    for &(version, sql) in $migrations {
                        let done: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                            .bind(version)
                            .fetch_optional(&mut *conn)
                            .await?;
                        if done.is_some() {
                            continue;
                        }
                        // One transaction per migration: SQLite's DDL is transactional, so a
                        // migration cut short leaves nothing half applied (MySQL commits each
                        // DDL statement by itself: its migrations are single statements where
                        // that matters).
                        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                        for stmt in statements(sql) {
                            sqlx::query(stmt).execute(&mut *tx).await?;
                        }
                        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES (?, ?)")
                            .bind(version)
                            .bind(to_i64(im_shared::unix_ms()))
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        log::info!("{} schema migration {version} applied", $name);
                    }
                    Ok(())
                }
                .await;
                sqlx::query($unlock).execute(&mut *conn).await?;
                result
            }

            async fn create_user(&self, username: &str, password_hash: &str, nickname: &str, now_ms: u64) -> Result<u64> {
                sqlx::query("INSERT INTO users (username, password_hash, nickname, avatar, created_ms) VALUES (?, ?, ?, '', ?)")
                    .bind(username)
                    .bind(password_hash)
                    .bind(nickname)
                    .bind(to_i64(now_ms))
                    .execute(&self.pool)
                    .await?;
                let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = ?")
                    .bind(username)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(id as u64)
            }

            async fn user_by_username(&self, username: &str) -> Result<Option<UserRow>> {
                let row = sqlx::query("SELECT id, username, password_hash, nickname, avatar, presence_hidden FROM users WHERE username = ?")
                    .bind(username)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| user_row(&r)).transpose()
            }

            async fn user_by_id(&self, id: u64) -> Result<Option<UserRow>> {
                let row = sqlx::query("SELECT id, username, password_hash, nickname, avatar, presence_hidden FROM users WHERE id = ?")
                    .bind(to_i64(id))
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| user_row(&r)).transpose()
            }

            async fn update_profile(&self, id: u64, nickname: Option<&str>, avatar: Option<&str>) -> Result<bool> {
                let r = sqlx::query("UPDATE users SET nickname = COALESCE(?, nickname), avatar = COALESCE(?, avatar) WHERE id = ?")
                    .bind(nickname)
                    .bind(avatar)
                    .bind(to_i64(id))
                    .execute(&self.pool)
                    .await?;
                if r.rows_affected() > 0 {
                    return Ok(true);
                }
                // MySQL reports 0 rows affected when nothing changed; tell that from "no user".
                Ok(self.user_by_id(id).await?.is_some())
            }

            async fn put_refresh(&self, r: &NewRefresh<'_>) -> Result<()> {
                let now = to_i64(im_shared::unix_ms());
                // Expired rows of this user go as new ones come: the table holds live sessions
                // and, until they expire, the used tokens that tell reuse.
                sqlx::query("DELETE FROM refresh_tokens WHERE user_id = ? AND expires_ms <= ?")
                    .bind(to_i64(r.user_id))
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                sqlx::query("INSERT INTO refresh_tokens (token_hash, user_id, expires_ms, family, access_jti, access_exp) VALUES (?, ?, ?, ?, ?, ?)")
                    .bind(r.token_hash)
                    .bind(to_i64(r.user_id))
                    .bind(to_i64(r.expires_ms))
                    .bind(r.family)
                    .bind(r.access_jti)
                    .bind(to_i64(r.access_exp_s))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn take_refresh(&self, token_hash: &str, now_ms: u64) -> Result<Taken> {
                let row = sqlx::query("SELECT user_id, expires_ms, family, used_ms FROM refresh_tokens WHERE token_hash = ?")
                    .bind(token_hash)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok(Taken::Unknown) };
                let expires: i64 = row.try_get("expires_ms")?;
                let user_id = row.try_get::<i64, _>("user_id")? as u64;
                let family: String = row.try_get("family")?;
                let used_ms = row.try_get::<i64, _>("used_ms")?.max(0) as u64;
                if expires <= to_i64(now_ms) {
                    return Ok(Taken::Unknown);
                }
                // The UPDATE decides: of two concurrent uses of one token, one marks it used
                // and the other is a reuse.
                let marked = sqlx::query("UPDATE refresh_tokens SET used_ms = ? WHERE token_hash = ? AND used_ms = 0")
                    .bind(to_i64(now_ms).max(1))
                    .bind(token_hash)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(if marked == 1 {
                    Taken::Fresh { user_id, family }
                } else {
                    Taken::Reused { user_id, family, used_ms }
                })
            }

            async fn family_access(&self, family: &str, now_s: u64) -> Result<Vec<(String, u64)>> {
                let rows = sqlx::query("SELECT access_jti, access_exp FROM refresh_tokens WHERE family = ? AND access_exp > ?")
                    .bind(family)
                    .bind(to_i64(now_s))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get::<String, _>("access_jti")?, r.try_get::<i64, _>("access_exp")? as u64)))
                    .filter(|r: &Result<(String, u64)>| r.as_ref().map_or(true, |(j, _)| !j.is_empty()))
                    .collect()
            }

            async fn family_of_access(&self, jti: &str) -> Result<Option<String>> {
                let f: Option<String> = sqlx::query_scalar("SELECT family FROM refresh_tokens WHERE access_jti = ? LIMIT 1")
                    .bind(jti)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(f.filter(|f| !f.is_empty()))
            }

            async fn drop_refresh_family(&self, family: &str) -> Result<()> {
                sqlx::query("DELETE FROM refresh_tokens WHERE family = ?").bind(family).execute(&self.pool).await?;
                Ok(())
            }

            async fn refresh_families(&self, user_id: u64) -> Result<Vec<String>> {
                let f: Vec<String> = sqlx::query_scalar("SELECT DISTINCT family FROM refresh_tokens WHERE user_id = ? AND family <> ''")
                    .bind(to_i64(user_id))
                    .fetch_all(&self.pool)
                    .await?;
                Ok(f)
            }

            async fn drop_refresh_without_family(&self, user_id: u64) -> Result<()> {
                sqlx::query("DELETE FROM refresh_tokens WHERE user_id = ? AND family = ''").bind(to_i64(user_id)).execute(&self.pool).await?;
                Ok(())
            }

            async fn drop_refresh_tokens(&self, user_id: u64) -> Result<()> {
                sqlx::query("DELETE FROM refresh_tokens WHERE user_id = ?").bind(to_i64(user_id)).execute(&self.pool).await?;
                Ok(())
            }

            async fn block(&self, user: u64, other: u64, max: u32, now_ms: u64) -> Result<Option<bool>> {
                self.block_q(user, other, max, now_ms).await
            }

            async fn unblock(&self, user: u64, other: u64) -> Result<bool> {
                self.unblock_q(user, other).await
            }

            async fn blockers_of(&self, user: u64) -> Result<Vec<u64>> {
                self.blockers_of_q(user).await
            }

            async fn contacts(&self, user: u64, limit: u32) -> Result<Vec<u64>> {
                self.contacts_of(user, limit).await
            }

            async fn are_contacts(&self, a: u64, b: u64) -> Result<bool> {
                self.pair_exists(a, b).await
            }

            async fn share_a_group(&self, a: u64, b: u64) -> Result<bool> {
                self.in_a_group_together(a, b).await
            }

            async fn set_presence_hidden(&self, user: u64, hidden: bool) -> Result<bool> {
                self.hide_presence(user, hidden).await
            }

            async fn hiding_presence(&self, users: &[u64]) -> Result<Vec<u64>> {
                self.who_hides_presence(users).await
            }

            async fn add_push_subscription(&self, s: &PushSubscription, max: u32, now_ms: u64) -> Result<Option<u64>> {
                self.subscribe_push(s, max, now_ms).await
            }

            async fn remove_push_subscription(&self, user: u64, endpoint: &str) -> Result<bool> {
                self.unsubscribe_push(user, endpoint).await
            }

            async fn drop_push_subscription(&self, id: u64) -> Result<()> {
                self.forget_push(id).await
            }

            async fn drop_push_subscriptions_of(&self, user: u64) -> Result<u64> {
                self.forget_pushes_of(user).await
            }

            async fn push_subscriptions(&self, user: u64) -> Result<Vec<PushSubscription>> {
                self.pushes_of(user).await
            }

            async fn muted(&self, user: u64, conv: &str) -> Result<bool> {
                self.has_muted(user, conv).await
            }

            async fn blocked_by(&self, user: u64) -> Result<Vec<u64>> {
                self.blocked_by_q(user).await
            }

            async fn create_group(&self, g: &NewGroup<'_>) -> Result<u64> {
                self.create_group_q(g).await
            }

            async fn group(&self, id: u64) -> Result<Option<GroupRow>> {
                self.group_q(id).await
            }

            async fn update_group(&self, id: u64, c: &GroupChange<'_>) -> Result<bool> {
                self.update_group_q(id, c).await
            }

            async fn add_member(&self, group: u64, user: u64, now_ms: u64, by: JoinBy) -> Result<Join> {
                self.add_member_q(group, user, now_ms, by).await
            }

            async fn remove_member(&self, group: u64, user: u64) -> Result<bool> {
                self.remove_member_q(group, user).await
            }

            async fn expel_member(&self, group: u64, user: u64, now_ms: u64) -> Result<bool> {
                self.expel_member_q(group, user, now_ms).await
            }

            async fn is_member(&self, group: u64, user: u64) -> Result<bool> {
                self.is_member_q(group, user).await
            }

            async fn member_view(&self, group: u64, user: u64) -> Result<Option<View>> {
                self.member_view_q(group, user).await
            }

            async fn create_invite(&self, i: &NewInvite<'_>, live_max: u32) -> Result<Option<u64>> {
                self.create_invite_q(i, live_max).await
            }

            async fn invites(&self, group: u64, now_ms: u64) -> Result<Vec<InviteRow>> {
                self.invites_q(group, now_ms).await
            }

            async fn revoke_invite(&self, group: u64, invite: u64) -> Result<bool> {
                self.revoke_invite_q(group, invite).await
            }

            async fn invite(&self, token_hash: &str, now_ms: u64) -> Result<Option<InviteRow>> {
                self.invite_q(token_hash, now_ms).await
            }

            async fn join_by_invite(&self, token_hash: &str, user: u64, now_ms: u64) -> Result<Option<(u64, Join)>> {
                self.join_by_invite_q(token_hash, user, now_ms).await
            }

            async fn append_message(&self, m: &NewMessage<'_>) -> Result<MessageRow> {
                let mut tx = self.pool.begin().await?;
                let dup = sqlx::query(concat!("SELECT ", message_columns!(), " FROM messages WHERE sender_id = ? AND cid = ?"))
                    .bind(to_i64(m.sender))
                    .bind(m.cid.as_bytes())
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(row) = dup {
                    return message_row(&row);
                }
                // The conversation row's lock orders concurrent senders: seqs are gap-free.
                sqlx::query($bump_seq).bind(m.conv).execute(&mut *tx).await?;
                let seq: i64 = sqlx::query_scalar("SELECT max_seq FROM conversations WHERE conv = ?")
                    .bind(m.conv)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO messages (id, conv, seq, sender_id, cid, to_user_id, to_group_id, content, content_type, ts_ms) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(to_i64(m.id))
                .bind(m.conv)
                .bind(seq)
                .bind(to_i64(m.sender))
                .bind(m.cid.as_bytes())
                .bind(m.to_user.map(to_i64))
                .bind(m.to_group.map(to_i64))
                .bind(m.content)
                .bind(m.content_type)
                .bind(to_i64(m.ts_ms))
                .execute(&mut *tx)
                .await?;
                if let Some(to) = m.to_user {
                    sqlx::query(concat!("INSERT INTO conversation_members (user_id, conv, wrote) VALUES (?, ?, 1)", $mark_wrote))
                        .bind(to_i64(m.sender))
                        .bind(m.conv)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(concat!($insert_ignore, " INTO conversation_members (user_id, conv) VALUES (?, ?)"))
                        .bind(to_i64(to))
                        .bind(m.conv)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(MessageRow {
                    id: m.id,
                    conv: m.conv.to_owned(),
                    seq: seq as u64,
                    sender: m.sender,
                    to_user: m.to_user,
                    to_group: m.to_group,
                    content: m.content.to_owned(),
                    content_type: m.content_type.to_owned(),
                    ts_ms: m.ts_ms,
                })
            }

            async fn history(&self, conv: &str, view: View, before_seq: u64, limit: u32) -> Result<Vec<MessageRow>> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE conv = ? AND seq > ? AND ts_ms >= ? AND seq < ? ORDER BY seq DESC LIMIT ?"
                ))
                .bind(conv)
                .bind(to_i64(view.after_seq))
                .bind(to_i64(view.from_ms))
                .bind(to_i64(before_seq))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(message_row).collect()
            }

            async fn insert_messages(&self, batch: &[Stored], fences: &[(i32, i32)]) -> Result<u64> {
                if batch.is_empty() && fences.is_empty() {
                    return Ok(0);
                }
                let mut hot = self.hot($hold_hot).await?;
                let conn = hot.conn();
                let r: Result<u64> = async {
                    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                    let mut inserted = 0;
                    // MySQL's IGNORE also turns an over-long value into a truncation warning rather
                    // than an error: one bad record cannot stall the batch forever, but the lengths
                    // (conv 48 characters, cid 64 bytes) are the pipeline's to check.
                    for chunk in message_chunks(batch) {
                        let mut q = QueryBuilder::<$db>::new(concat!(
                            $insert_ignore,
                            " INTO messages (id, conv, seq, sender_id, cid, to_user_id, to_group_id, content, content_type, ts_ms) "
                        ));
                        q.push_values(padded(chunk, shortest(chunk)), |mut row, m| {
                            row.push_bind(to_i64(m.id))
                                .push_bind(m.conv.as_str())
                                .push_bind(to_i64(m.seq))
                                .push_bind(to_i64(m.from))
                                .push_bind(m.cid.as_bytes())
                                .push_bind(nonzero(m.to_user))
                                .push_bind(nonzero(m.to_group))
                                .push_bind(m.content.as_str())
                                .push_bind(m.content_type.as_str())
                                .push_bind(to_i64(m.ts));
                        });
                        // Padded to a size class, so the statement is prepared once per size and
                        // connection; the padding repeats a row, which IGNORE skips uncounted.
                        inserted += q.build().execute(&mut *tx).await?.rows_affected();
                    }
                    for chunk in highest_seqs(batch).chunks(KEY_CHUNK) {
                        let mut q = QueryBuilder::<$db>::new("INSERT INTO conversations (conv, max_seq) ");
                        // Padding repeats the last row: raising to the same seq twice is a no-op.
                        q.push_values(padded(chunk, chunk.len() - 1), |mut row, &(conv, seq)| {
                            row.push_bind(conv).push_bind(to_i64(seq));
                        });
                        q.push($raise_max_seq);
                        q.build().execute(&mut *tx).await?;
                    }
                    let (wrote, got) = pair_members(batch);
                    for chunk in wrote.chunks(KEY_CHUNK) {
                        let mut q = QueryBuilder::<$db>::new("INSERT INTO conversation_members (user_id, conv, wrote) ");
                        q.push_values(padded(chunk, chunk.len() - 1), |mut row, &(user, conv)| {
                            row.push_bind(to_i64(user)).push_bind(conv).push_bind(1i64);
                        });
                        q.push($mark_wrote);
                        q.build().execute(&mut *tx).await?;
                    }
                    for chunk in got.chunks(KEY_CHUNK) {
                        let mut q = QueryBuilder::<$db>::new(concat!($insert_ignore, " INTO conversation_members (user_id, conv) "));
                        q.push_values(padded(chunk, chunk.len() - 1), |mut row, &(user, conv)| {
                            row.push_bind(to_i64(user)).push_bind(conv);
                        });
                        q.build().execute(&mut *tx).await?;
                    }
                    // Rare (an owner taking a partition): one statement each.
                    for &(partition, epoch) in fences {
                        sqlx::query($raise_fence).bind(partition).bind(epoch).execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    // SQLite: the checkpointer asked for the log to start over (see `checkpoints`
                    // in sql/mod.rs). A failure here loses nothing: the rows are committed.
                    if !$restart_log.is_empty() && self.log_restart.swap(false, Ordering::Relaxed) {
                        if let Err(e) = sqlx::query($restart_log).execute(&mut *conn).await {
                            log::debug!("checkpoint after commit: {e}");
                        }
                    }
                    Ok(inserted)
                }
                .await;
                hot.release(r)
            }

            async fn fence(&self, partition: i32) -> Result<i32> {
                let g: Option<i32> = sqlx::query_scalar("SELECT epoch FROM log_fences WHERE log_partition = ?")
                    .bind(partition)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(g.unwrap_or(0))
            }

            async fn max_seqs(&self, convs: &[String]) -> Result<Vec<(String, u64)>> {
                let mut out = Vec::with_capacity(convs.len());
                for chunk in convs.chunks(KEY_CHUNK) {
                    let mut q = QueryBuilder::<$db>::new("SELECT conv, max_seq FROM conversations WHERE conv IN (");
                    let mut list = q.separated(", ");
                    for conv in padded(chunk, chunk.len() - 1) {
                        list.push_bind(conv.as_str());
                    }
                    q.push(")");
                    for r in q.build().fetch_all(&self.pool).await? {
                        out.push((r.try_get("conv")?, r.try_get::<i64, _>("max_seq")? as u64));
                    }
                }
                Ok(out)
            }

            async fn find_by_cids(&self, keys: &[(u64, String)]) -> Result<Vec<(u64, String, MessageRow)>> {
                let mut out = Vec::new();
                if keys.is_empty() {
                    return Ok(out);
                }
                // On the writer's connection: its page cache holds what it just wrote.
                let mut hot = self.hot($hold_hot).await?;
                let conn = hot.conn();
                let r: Result<()> = async {
                    for chunk in keys.chunks(CID_CHUNK) {
                        // An OR of equalities on the (sender_id, cid) unique key: both engines read
                        // it as index lookups, which row-constructor IN does not promise.
                        let mut q = QueryBuilder::<$db>::new(concat!("SELECT ", message_columns!(), ", cid FROM messages WHERE "));
                        for (i, (sender, cid)) in padded(chunk, chunk.len() - 1).enumerate() {
                            q.push(if i == 0 { "(sender_id = " } else { " OR (sender_id = " })
                                .push_bind(to_i64(*sender))
                                .push(" AND cid = ")
                                .push_bind(cid.as_bytes())
                                .push(")");
                        }
                        for r in q.build().fetch_all(&mut *conn).await? {
                            let row = message_row(&r)?;
                            let cid: Vec<u8> = r.try_get("cid")?;
                            // Stored from a String, so UTF-8; lossy rather than failing the batch.
                            out.push((row.sender, String::from_utf8_lossy(&cid).into_owned(), row));
                        }
                    }
                    Ok(())
                }
                .await;
                hot.release(r).map(|()| out)
            }

            async fn messages_after(&self, conv: &str, after: u64, limit: u32) -> Result<Vec<MessageRow>> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE conv = ? AND seq > ? ORDER BY seq LIMIT ?"
                ))
                .bind(conv)
                .bind(to_i64(after))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(message_row).collect()
            }

            async fn roster(&self, group: u64) -> Result<Option<Roster>> {
                self.roster_q(group).await
            }

            async fn conversations(&self, user: u64) -> Result<Vec<ConversationRow>> {
                // Two-person conversations the user is in, then the user's groups (whose
                // conversation rows and read positions may not exist yet), each with its last
                // message: one query, whatever the number of conversations.
                let rows = sqlx::query(concat!(
                    "SELECT v.conv AS conv, v.max_seq AS max_seq, v.read_seq AS read_seq, v.muted AS muted, v.pinned AS pinned, \
                     v.peer_read_seq AS peer_read_seq, \
                     m.id AS id, m.seq AS seq, m.sender_id AS sender_id, m.to_user_id AS to_user_id, \
                     m.to_group_id AS to_group_id, m.content AS content, m.content_type AS content_type, m.ts_ms AS ts_ms \
                     FROM (\
                     SELECT cm.conv AS conv, c.max_seq AS max_seq, cm.read_seq AS read_seq, cm.muted AS muted, cm.pinned AS pinned, \
                     0 AS visible_after, 0 AS visible_from_ms, \
                     (SELECT MAX(pm.read_seq) FROM conversation_members pm WHERE pm.conv = cm.conv AND pm.user_id <> cm.user_id \
                     AND NOT EXISTS (SELECT 1 FROM user_blocks ub WHERE (ub.user_id = cm.user_id AND ub.blocked_id = pm.user_id) \
                     OR (ub.user_id = pm.user_id AND ub.blocked_id = cm.user_id))) AS peer_read_seq \
                     FROM conversation_members cm JOIN conversations c ON c.conv = cm.conv \
                     WHERE cm.user_id = ? AND cm.conv LIKE 'p:%' \
                     UNION ALL \
                     SELECT ", $group_conv, " AS conv, COALESCE(c.max_seq, 0) AS max_seq, COALESCE(cm.read_seq, 0) AS read_seq, \
                     COALESCE(cm.muted, FALSE) AS muted, COALESCE(cm.pinned, FALSE) AS pinned, \
                     CASE WHEN g.history_all THEN 0 ELSE gm.joined_seq END AS visible_after, \
                     CASE WHEN g.history_all THEN 0 ELSE gm.visible_from_ms END AS visible_from_ms, \
                     NULL AS peer_read_seq \
                     FROM group_members gm \
                     JOIN chat_groups g ON g.id = gm.group_id \
                     LEFT JOIN conversations c ON c.conv = ", $group_conv, " \
                     LEFT JOIN conversation_members cm ON cm.user_id = gm.user_id AND cm.conv = ", $group_conv, " \
                     WHERE gm.user_id = ?\
                     ) v LEFT JOIN messages m ON m.conv = v.conv AND m.seq = v.max_seq AND m.seq > v.visible_after AND m.ts_ms >= v.visible_from_ms"
                ))
                .bind(to_i64(user))
                .bind(to_i64(user))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let has_message = r.try_get::<Option<i64>, _>("id")?.is_some();
                        Ok(ConversationRow {
                            conv: r.try_get("conv")?,
                            max_seq: r.try_get::<i64, _>("max_seq")? as u64,
                            read_seq: r.try_get::<i64, _>("read_seq")? as u64,
                            muted: r.try_get::<bool, _>("muted")?,
                            pinned: r.try_get::<bool, _>("pinned")?,
                            last_message: if has_message { Some(message_row(r)?) } else { None },
                            peer_read_seq: r.try_get::<Option<i64>, _>("peer_read_seq")?.map(|s| s as u64),
                        })
                    })
                    .collect()
            }

            async fn open_pair(&self, conv: &str, a: u64, b: u64) -> Result<()> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(concat!($insert_ignore, " INTO conversations (conv, max_seq) VALUES (?, 0)"))
                    .bind(conv)
                    .execute(&mut *tx)
                    .await?;
                for user in [a, b] {
                    sqlx::query(concat!($insert_ignore, " INTO conversation_members (user_id, conv) VALUES (?, ?)"))
                        .bind(to_i64(user))
                        .bind(conv)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn update_membership(&self, user: u64, conv: &str, read_seq: Option<u64>, muted: Option<bool>, pinned: Option<bool>) -> Result<u64> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(concat!($insert_ignore, " INTO conversation_members (user_id, conv) VALUES (?, ?)"))
                    .bind(to_i64(user))
                    .bind(conv)
                    .execute(&mut *tx)
                    .await?;
                let max: Option<i64> = sqlx::query_scalar("SELECT max_seq FROM conversations WHERE conv = ?")
                    .bind(conv)
                    .fetch_optional(&mut *tx)
                    .await?;
                let read = read_seq.map(|r| to_i64(r).min(max.unwrap_or(0)));
                sqlx::query(
                    "UPDATE conversation_members SET \
                     read_seq = CASE WHEN ? IS NOT NULL AND ? > read_seq THEN ? ELSE read_seq END, \
                     muted = COALESCE(?, muted), pinned = COALESCE(?, pinned) \
                     WHERE user_id = ? AND conv = ?",
                )
                .bind(read)
                .bind(read)
                .bind(read)
                .bind(muted)
                .bind(pinned)
                .bind(to_i64(user))
                .bind(conv)
                .execute(&mut *tx)
                .await?;
                let now: i64 = sqlx::query_scalar("SELECT read_seq FROM conversation_members WHERE user_id = ? AND conv = ?")
                    .bind(to_i64(user))
                    .bind(conv)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(now as u64)
            }

            async fn members(&self, group: u64, after_user: u64, limit: u32) -> Result<Vec<MemberRow>> {
                self.members_q(group, after_user, limit).await
            }
        }

        impl_groups!($db, for_update: $for_update, insert_ignore: $insert_ignore, begin_write: $begin_write, last_insert_id: $last_id);
        impl_blocks!($db, for_update: $for_update, begin_write: $begin_write);
    };
}

pub(super) use impl_store;

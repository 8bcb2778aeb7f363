//! The queries presence needs (docs/PROTOCOL.md, "Presence"), as inherent methods of both
//! stores; `impl_store!`'s trait methods call them. The SQL is the same in both dialects.

macro_rules! impl_presence {
    ($db:ty) => {
        impl SqlStore<$db> {
            /// The users `user` has exchanged messages with, both ways, from at most
            /// `limit` conversations: a range of the (user_id, conv) primary key, and a probe
            /// of the conv index per conversation.
            pub(super) async fn contacts_of(&self, user: u64, limit: u32) -> Result<Vec<u64>> {
                let convs: Vec<String> = sqlx::query_scalar(
                    "SELECT cm.conv FROM conversation_members cm WHERE cm.user_id = ? AND cm.conv LIKE 'p:%' AND cm.wrote <> 0 \
                     AND EXISTS (SELECT 1 FROM conversation_members o WHERE o.conv = cm.conv AND o.user_id <> cm.user_id AND o.wrote <> 0) LIMIT ?",
                )
                .bind(to_i64(user))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                let mut peers: Vec<u64> = convs
                    .iter()
                    .filter_map(|c| match im_shared::Conv::parse(c)? {
                        im_shared::Conv::Pair(a, b) if a == user => Some(b),
                        im_shared::Conv::Pair(a, b) if b == user => Some(a),
                        _ => None,
                    })
                    .collect();
                peers.sort_unstable();
                peers.dedup();
                Ok(peers)
            }

            /// Whether `a` and `b` have exchanged messages, both ways.
            pub(super) async fn pair_exists(&self, a: u64, b: u64) -> Result<bool> {
                let Some(conv) = im_shared::Conv::pair(a, b) else {
                    return Ok(false);
                };
                let writers: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM conversation_members WHERE conv = ? AND wrote <> 0",
                )
                .bind(conv.to_string())
                .fetch_one(&self.pool)
                .await?;
                Ok(writers >= 2)
            }

            pub(super) async fn in_a_group_together(&self, a: u64, b: u64) -> Result<bool> {
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT x.group_id FROM group_members x \
                     JOIN group_members y ON y.group_id = x.group_id AND y.user_id = ? \
                     WHERE x.user_id = ? LIMIT 1",
                )
                .bind(to_i64(b))
                .bind(to_i64(a))
                .fetch_optional(&self.pool)
                .await?;
                Ok(found.is_some())
            }

            pub(super) async fn hide_presence(&self, user: u64, hidden: bool) -> Result<bool> {
                let r = sqlx::query("UPDATE users SET presence_hidden = ? WHERE id = ?")
                    .bind(i64::from(hidden))
                    .bind(to_i64(user))
                    .execute(&self.pool)
                    .await?;
                if r.rows_affected() > 0 {
                    return Ok(true);
                }
                // MySQL counts changed rows: setting the value it has is 0 rows.
                let found: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE id = ?")
                    .bind(to_i64(user))
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(found.is_some())
            }

            pub(super) async fn who_hides_presence(&self, users: &[u64]) -> Result<Vec<u64>> {
                let mut out = Vec::new();
                for chunk in users.chunks(KEY_CHUNK) {
                    let mut q = QueryBuilder::<$db>::new(
                        "SELECT id FROM users WHERE presence_hidden <> 0 AND id IN (",
                    );
                    let mut list = q.separated(", ");
                    for u in chunk {
                        list.push_bind(to_i64(*u));
                    }
                    q.push(")");
                    for r in q.build().fetch_all(&self.pool).await? {
                        out.push(r.try_get::<i64, _>("id")? as u64);
                    }
                }
                out.sort_unstable();
                Ok(out)
            }
        }
    };
}

pub(super) use impl_presence;

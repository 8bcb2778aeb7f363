//! What offline push reads and writes (docs/PROTOCOL.md, "Offline push"): Web Push
//! subscriptions and whether a conversation is muted, as inherent methods of both stores; `impl_store!`'s trait methods call them.

macro_rules! impl_push {
    (
        $db:ty,
        begin_write: $begin_write:literal,
        for_update: $for_update:literal,
        last_insert_id: $last_id:literal
    ) => {
        impl SqlStore<$db> {
            pub(super) async fn subscribe_push(
                &self,
                s: &PushSubscription,
                max: u32,
                now_ms: u64,
            ) -> Result<Option<u64>> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                // The user's row lock serialises their subscriptions, so the cap holds.
                let found: Option<i64> =
                    sqlx::query_scalar(concat!("SELECT id FROM users WHERE id = ?", $for_update))
                        .bind(to_i64(s.user_id))
                        .fetch_optional(&mut *tx)
                        .await?;
                if found.is_none() {
                    return Ok(None);
                }
                // An endpoint is one browser: whoever subscribed with it before loses it.
                sqlx::query("DELETE FROM push_subscriptions WHERE endpoint = ?")
                    .bind(&s.endpoint)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth, created_ms) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(to_i64(s.user_id))
                .bind(&s.endpoint)
                .bind(&s.p256dh)
                .bind(&s.auth)
                .bind(to_i64(now_ms))
                .execute(&mut *tx)
                .await?;
                let id: i64 = sqlx::query_scalar($last_id).fetch_one(&mut *tx).await?;
                let stale: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM push_subscriptions WHERE user_id = ? ORDER BY id DESC LIMIT 1000 OFFSET ?",
                )
                .bind(to_i64(s.user_id))
                .bind(i64::from(max))
                .fetch_all(&mut *tx)
                .await?;
                for old in stale {
                    sqlx::query("DELETE FROM push_subscriptions WHERE id = ?")
                        .bind(old)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(Some(id as u64))
            }

            pub(super) async fn unsubscribe_push(&self, user: u64, endpoint: &str) -> Result<bool> {
                let r = sqlx::query("DELETE FROM push_subscriptions WHERE user_id = ? AND endpoint = ?")
                    .bind(to_i64(user))
                    .bind(endpoint)
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected() > 0)
            }

            pub(super) async fn forget_pushes_of(&self, user: u64) -> Result<u64> {
                let r = sqlx::query("DELETE FROM push_subscriptions WHERE user_id = ?")
                    .bind(to_i64(user))
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected())
            }

            pub(super) async fn forget_push(&self, id: u64) -> Result<()> {
                sqlx::query("DELETE FROM push_subscriptions WHERE id = ?")
                    .bind(to_i64(id))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            pub(super) async fn has_muted(&self, user: u64, conv: &str) -> Result<bool> {
                let muted: Option<bool> = sqlx::query_scalar(
                    "SELECT muted FROM conversation_members WHERE user_id = ? AND conv = ?",
                )
                .bind(to_i64(user))
                .bind(conv)
                .fetch_optional(&self.pool)
                .await?;
                Ok(muted.unwrap_or(false))
            }

            pub(super) async fn pushes_of(&self, user: u64) -> Result<Vec<PushSubscription>> {
                let rows = sqlx::query(
                    "SELECT id, user_id, endpoint, p256dh, auth, created_ms FROM push_subscriptions WHERE user_id = ? ORDER BY id DESC",
                )
                .bind(to_i64(user))
                .fetch_all(&self.pool)
                .await?;
                // Bytes, then text: MySQL reports the ascii_bin columns as binary.
                let text = |r: &<$db as sqlx::Database>::Row, col: &str| -> Result<String> {
                    let raw: Vec<u8> = r.try_get(col)?;
                    Ok(String::from_utf8_lossy(&raw).into_owned())
                };
                rows.iter()
                    .map(|r| {
                        Ok(PushSubscription {
                            id: r.try_get::<i64, _>("id")? as u64,
                            user_id: r.try_get::<i64, _>("user_id")? as u64,
                            endpoint: text(r, "endpoint")?,
                            p256dh: text(r, "p256dh")?,
                            auth: text(r, "auth")?,
                            created_ms: r.try_get::<i64, _>("created_ms")? as u64,
                        })
                    })
                    .collect()
            }
        }
    };
}

pub(super) use impl_push;

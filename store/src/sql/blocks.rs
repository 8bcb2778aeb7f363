//! Blocks (docs/PROTOCOL.md, "Blocking"), as inherent methods of both stores;
//! `impl_store!`'s trait methods call them, and `impl_store!` expands this macro with its
//! dialect's differences.

macro_rules! impl_blocks {
    ($db:ty, for_update: $for_update:literal, begin_write: $begin_write:literal) => {
        impl SqlStore<$db> {
            pub(super) async fn block_q(
                &self,
                user: u64,
                other: u64,
                max: u32,
                now_ms: u64,
            ) -> Result<Option<bool>> {
                let mut tx = self.pool.begin_with($begin_write).await?;
                // The blocker's user row lock serialises their blocks, so the count holds.
                let found: Option<i64> =
                    sqlx::query_scalar(concat!("SELECT id FROM users WHERE id = ?", $for_update))
                        .bind(to_i64(user))
                        .fetch_optional(&mut *tx)
                        .await?;
                if found.is_none() {
                    return Ok(None);
                }
                let already: Option<i64> = sqlx::query_scalar(
                    "SELECT blocked_id FROM user_blocks WHERE user_id = ? AND blocked_id = ?",
                )
                .bind(to_i64(user))
                .bind(to_i64(other))
                .fetch_optional(&mut *tx)
                .await?;
                if already.is_some() {
                    return Ok(Some(false));
                }
                let count: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM user_blocks WHERE user_id = ?")
                        .bind(to_i64(user))
                        .fetch_one(&mut *tx)
                        .await?;
                if count >= max as i64 {
                    return Ok(None);
                }
                sqlx::query(
                    "INSERT INTO user_blocks (user_id, blocked_id, created_ms) VALUES (?, ?, ?)",
                )
                .bind(to_i64(user))
                .bind(to_i64(other))
                .bind(to_i64(now_ms))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(true))
            }
            pub(super) async fn unblock_q(&self, user: u64, other: u64) -> Result<bool> {
                let r = sqlx::query("DELETE FROM user_blocks WHERE user_id = ? AND blocked_id = ?")
                    .bind(to_i64(user))
                    .bind(to_i64(other))
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected() > 0)
            }
            pub(super) async fn blockers_of_q(&self, user: u64) -> Result<Vec<u64>> {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT user_id FROM user_blocks WHERE blocked_id = ? ORDER BY user_id",
                )
                .bind(to_i64(user))
                .fetch_all(&self.pool)
                .await?;
                Ok(ids.into_iter().map(|id| id as u64).collect())
            }
            pub(super) async fn blocked_by_q(&self, user: u64) -> Result<Vec<u64>> {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT blocked_id FROM user_blocks WHERE user_id = ? ORDER BY blocked_id",
                )
                .bind(to_i64(user))
                .fetch_all(&self.pool)
                .await?;
                Ok(ids.into_iter().map(|id| id as u64).collect())
            }
        }
    };
}

pub(super) use impl_blocks;

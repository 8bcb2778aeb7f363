//! Revoked tokens in the real Redis (127.0.0.1:6379, or IM_TEST_REDIS_URL).

use logic::auth::{RedisRevocations, Revocations};

#[tokio::test]
async fn revoked_tokens_live_in_redis_until_they_would_have_expired() {
    let url =
        std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("im:test:{}:revoked:", std::process::id());
    let r = RedisRevocations::connect(&url, &prefix)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis is required for this test at {url} ({e}); .ci/run starts it")
        });
    let now = im_shared::unix_ms() / 1000;
    assert!(!r.is_revoked("jti-1", now).await.unwrap());
    r.revoke("jti-1", now + 60).await.unwrap();
    assert!(r.is_revoked("jti-1", now).await.unwrap());
    assert!(!r.is_revoked("jti-2", now).await.unwrap());
    // A token that is about to expire is kept at least a second, then Redis forgets it.
    r.revoke("jti-3", now).await.unwrap();
    assert!(r.is_revoked("jti-3", now).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert!(
        !r.is_revoked("jti-3", now).await.unwrap(),
        "the key expired with the token"
    );
}

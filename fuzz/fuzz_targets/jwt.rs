//! Access-token verification (`im_shared::jwt::verify`): any text as a token; and a token
//! signed with the fuzzed secret verifies to its claims.
#![no_main]

use im_shared::jwt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    const NOW: u64 = 1_800_000_000;
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = jwt::verify(b"fuzz-secret", token, NOW, jwt::LIFETIME_MAX_S);
    }
    if !data.is_empty() {
        let claims = jwt::Claims::new(u64::from(data[0]) + 1, NOW, 600);
        let token = jwt::sign(data, &claims);
        let back = jwt::verify(data, &token, NOW, jwt::LIFETIME_MAX_S)
            .expect("a token we signed verifies");
        assert_eq!((back.sub, back.jti), (claims.sub, claims.jti));
    }
});

//! The client's JSON requests (`im_shared::protocol::parse_request`): any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = im_shared::protocol::parse_request(text);
    }
});

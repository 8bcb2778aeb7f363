//! The HTTP upgrade request parser (gateway-core `handshake::parse`): any bytes; a request
//! it takes never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = gateway_core::handshake::parse(data) {
        assert!(used <= data.len());
    }
});

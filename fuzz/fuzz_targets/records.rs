//! The bus records (`im_shared::records`): any bytes as each record type; one that decodes
//! encodes and decodes back to itself.
#![no_main]

use im_shared::records::{Downstream, Stored, Upstream, Versioned};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: Versioned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(r) = T::from_bytes(data) {
        let again = T::from_bytes(&r.to_bytes()).expect("an encoded record decodes");
        assert_eq!(again, r);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Upstream>(data);
    round_trip::<Stored>(data);
    round_trip::<Downstream>(data);
});

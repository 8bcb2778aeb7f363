//! Hash maps keyed by 64-bit ids (users, conversations). The ids come from our own issuers
//! (Snowflake, database sequences, authenticated tokens), so a multiply-mix hash is enough and
//! much cheaper than SipHash on the routing path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        im_shared::conv::mix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64)
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(v as u64)
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64)
    }

    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64)
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

//! Conversation ids: `p:<smaller user id>:<larger user id>` for two users, `g:<group id>` for a
//! group (docs/PROTOCOL.md). Also the Kafka record key later, so the text form is the canonical one.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conv {
    /// Two users; `.0 < .1` always (constructed through [`Conv::pair`]).
    Pair(u64, u64),
    Group(u64),
}

impl Conv {
    /// The conversation between two users, in canonical order. `None` when `a == b`: a user
    /// does not hold a conversation with themself.
    pub fn pair(a: u64, b: u64) -> Option<Conv> {
        match a.cmp(&b) {
            std::cmp::Ordering::Less => Some(Conv::Pair(a, b)),
            std::cmp::Ordering::Greater => Some(Conv::Pair(b, a)),
            std::cmp::Ordering::Equal => None,
        }
    }

    pub fn parse(s: &str) -> Option<Conv> {
        if let Some(rest) = s.strip_prefix("p:") {
            let (a, b) = rest.split_once(':')?;
            let (a, b) = (parse_id(a)?, parse_id(b)?);
            (a < b).then_some(Conv::Pair(a, b))
        } else if let Some(g) = s.strip_prefix("g:") {
            parse_id(g).map(Conv::Group)
        } else {
            None
        }
    }

    /// Whether `user` is one of the two parties (always false for groups: membership lives in
    /// the logic service).
    pub fn has_party(&self, user: u64) -> bool {
        matches!(*self, Conv::Pair(a, b) if a == user || b == user)
    }

    /// A well-mixed 64-bit hash, stable across processes (used to pick the owner shard).
    pub fn hash64(&self) -> u64 {
        match *self {
            Conv::Pair(a, b) => mix64(a ^ mix64(b)),
            Conv::Group(g) => mix64(g ^ 0x9e37_79b9_7f4a_7c15),
        }
    }
}

/// A strict decimal id: digits only, no sign, no leading `+`, from 1 to 2^63 − 1.
pub fn parse_id(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Ids are positive and fit the databases' signed 64-bit columns: above 2^63 − 1 is no id
    // (it would be stored as another one).
    s.parse().ok().filter(|&v| v != 0 && v <= i64::MAX as u64)
}

/// SplitMix64's finaliser: cheap, and good enough to spread ids over shards.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl fmt::Display for Conv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conv::Pair(a, b) => write!(f, "p:{a}:{b}"),
            Conv::Group(g) => write!(f, "g:{g}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_is_canonical_and_round_trips() {
        let c = Conv::pair(9, 3).unwrap();
        assert_eq!(c, Conv::Pair(3, 9));
        assert_eq!(c.to_string(), "p:3:9");
        assert_eq!(Conv::parse("p:3:9"), Some(c));
        assert_eq!(Conv::parse("g:42"), Some(Conv::Group(42)));
        assert!(Conv::pair(5, 5).is_none());
    }

    #[test]
    fn rejects_non_canonical_and_garbage() {
        for bad in [
            "p:9:3",
            "p:3:3",
            "p:3",
            "x:1",
            "g:",
            "g:-1",
            "g:+1",
            "g:0",
            "p:1:99999999999999999999999",
            "",
        ] {
            assert_eq!(Conv::parse(bad), None, "{bad}");
        }
    }
}

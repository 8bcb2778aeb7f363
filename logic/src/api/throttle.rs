//! Login throttling (docs/PROTOCOL.md, "Login throttling") and REST send budgets (at the
//! end).
//!
//! Login throttling: failed logins are counted per
//! (account, client address) and per client address. Past a key's free failures, each further
//! failure makes the key wait before its next attempt, twice as long each time, up to
//! `WAIT_MAX_MS`; an attempt during a wait is answered 429 with `Retry-After`, without
//! checking the password and without counting. There is no lockout by account alone: an
//! attacker elsewhere slows down their own address, never a victim's (other addresses log in
//! as before). A success clears its (account, address) count, not its address's, so an
//! attacker with one account of their own cannot reset the address's count by logging in.
//!
//! No I/O and no clock of its own (`now_ms` is an argument): tested on its own below. Each
//! map is bounded: when one is full, idle entries go first, then the one idle longest.

use std::collections::HashMap;
use std::net::IpAddr;

/// Failures a (account, address) key makes before it waits.
pub const ACCOUNT_FREE_FAILURES: u32 = 5;
/// Failures an address makes, over all accounts, before it waits: more than an account's,
/// because many people share an address (offices and carriers' NAT), and their typos add up.
pub const ADDRESS_FREE_FAILURES: u32 = 20;
/// The first wait, doubled at each further failure.
pub const FIRST_WAIT_MS: u64 = 1_000;
/// The longest wait.
pub const WAIT_MAX_MS: u64 = 15 * 60 * 1_000;
/// A key with no failure for this long is forgotten.
pub const FORGET_AFTER_MS: u64 = 60 * 60 * 1_000;
/// Keys kept per map (≈ 100 bytes each).
pub const KEYS_MAX: usize = 100_000;
/// Account names are kept to this many bytes (longer ones cannot exist).
const ACCOUNT_BYTES_MAX: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    failures: u32,
    last_failure_ms: u64,
    /// No attempt before this.
    until_ms: u64,
}

impl Entry {
    fn idle(&self, now_ms: u64) -> bool {
        now_ms >= self.until_ms && now_ms.saturating_sub(self.last_failure_ms) >= FORGET_AFTER_MS
    }

    fn fail(&mut self, free: u32, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        self.last_failure_ms = now_ms;
        if self.failures >= free {
            let doublings = (self.failures - free).min(20);
            let wait = (FIRST_WAIT_MS << doublings).min(WAIT_MAX_MS);
            self.until_ms = now_ms + wait;
        }
    }
}

/// One bounded map of keys to their failures.
struct Keys<K> {
    map: HashMap<K, Entry>,
    free: u32,
    max: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Keys<K> {
    fn new(free: u32, max: usize) -> Keys<K> {
        Keys {
            map: HashMap::new(),
            free,
            max,
        }
    }

    /// Milliseconds until `key` may try again, if it must wait.
    fn wait(&self, key: &K, now_ms: u64) -> Option<u64> {
        let e = self.map.get(key)?;
        (now_ms < e.until_ms).then(|| e.until_ms - now_ms)
    }

    fn fail(&mut self, key: &K, now_ms: u64) {
        if !self.map.contains_key(key) && self.map.len() >= self.max {
            self.make_room(now_ms);
        }
        let e = self.map.entry(key.clone()).or_default();
        if e.idle(now_ms) {
            *e = Entry::default();
        }
        e.fail(self.free, now_ms);
    }

    fn clear(&mut self, key: &K) {
        self.map.remove(key);
    }

    /// Takes back one failure counted ahead of an attempt that succeeded.
    fn undo(&mut self, key: &K) {
        if let Some(e) = self.map.get_mut(key) {
            e.failures = e.failures.saturating_sub(1);
            if e.failures < self.free {
                e.until_ms = 0;
            }
            if e.failures == 0 {
                self.map.remove(key);
            }
        }
    }

    /// Idle keys first; if none, the one whose last failure is oldest. O(n), once per
    /// insertion into a full map: only a flood of distinct keys gets here.
    fn make_room(&mut self, now_ms: u64) {
        self.map.retain(|_, e| !e.idle(now_ms));
        if self.map.len() >= self.max {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_failure_ms)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
    }
}

/// Both maps. Callers hold it behind a mutex; every operation is a few hash lookups.
pub struct LoginThrottle {
    accounts: Keys<(Box<str>, IpAddr)>,
    addresses: Keys<IpAddr>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle::with_capacity(KEYS_MAX)
    }
}

/// The address a count is kept for: IPv4 as it is (an IPv4-mapped IPv6 address as its IPv4
/// one), IPv6 by its /64, which one subscriber usually holds whole (keying single IPv6
/// addresses would give an attacker 2^64 fresh counts).
fn address_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(net.into())
        }
        v4 => v4,
    }
}

fn account_key(account: &str, addr: IpAddr) -> (Box<str>, IpAddr) {
    let addr = address_key(addr);
    let mut end = account.len().min(ACCOUNT_BYTES_MAX);
    while !account.is_char_boundary(end) {
        end -= 1;
    }
    (account[..end].to_lowercase().into_boxed_str(), addr)
}

impl LoginThrottle {
    pub fn with_capacity(keys_max: usize) -> LoginThrottle {
        LoginThrottle {
            accounts: Keys::new(ACCOUNT_FREE_FAILURES, keys_max),
            addresses: Keys::new(ADDRESS_FREE_FAILURES, keys_max),
        }
    }

    /// `None` if `account` may try from `addr` now; else how many milliseconds to wait.
    pub fn check(&self, account: &str, addr: IpAddr, now_ms: u64) -> Option<u64> {
        let a = self.accounts.wait(&account_key(account, addr), now_ms);
        let b = self.addresses.wait(&address_key(addr), now_ms);
        a.max(b)
    }

    /// A login attempt: `Some(ms)` if it must wait (it is not counted), else `None`, and it
    /// is counted as a failure at once, before its password is checked, so that attempts
    /// sent together cannot all pass the check before any of them has failed (and one whose
    /// client goes away stays counted). `succeeded` takes the count back.
    pub fn attempt(&mut self, account: &str, addr: IpAddr, now_ms: u64) -> Option<u64> {
        if let Some(wait) = self.check(account, addr, now_ms) {
            return Some(wait);
        }
        self.failed(account, addr, now_ms);
        None
    }

    /// Counts a failure.
    pub fn failed(&mut self, account: &str, addr: IpAddr, now_ms: u64) {
        self.accounts.fail(&account_key(account, addr), now_ms);
        self.addresses.fail(&address_key(addr), now_ms);
    }

    /// An attempt succeeded: its (account, address) count is cleared, and the one failure it
    /// was counted as is taken back from the address's count.
    pub fn succeeded(&mut self, account: &str, addr: IpAddr) {
        self.accounts.clear(&account_key(account, addr));
        self.addresses.undo(&address_key(addr));
    }

    /// Keys held (both maps): for tests and the metrics.
    pub fn len(&self) -> usize {
        self.accounts.map.len() + self.addresses.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// REST sends per user: a token bucket like the gateway's per-connection limit (the rate
/// per second, bursts of twice that), kept per logic instance. Bounded: a full bucket says
/// nothing a missing one does not, so when the map is full, full buckets go first.
pub struct SendBudget {
    per_s: u32,
    buckets: HashMap<u64, Bucket>,
    max: usize,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens in thousandths (integer arithmetic, no drift).
    milli: u64,
    at_ms: u64,
}

impl SendBudget {
    pub fn new(per_s: u32) -> SendBudget {
        SendBudget::with_capacity(per_s, KEYS_MAX)
    }

    pub fn with_capacity(per_s: u32, max: usize) -> SendBudget {
        SendBudget {
            per_s: per_s.max(1),
            buckets: HashMap::new(),
            max,
        }
    }

    fn burst_milli(&self) -> u64 {
        2 * u64::from(self.per_s) * 1000
    }

    fn refilled(&self, b: Bucket, now_ms: u64) -> u64 {
        // per_s tokens a second = per_s thousandths a millisecond.
        let gained = now_ms.saturating_sub(b.at_ms) * u64::from(self.per_s);
        (b.milli + gained).min(self.burst_milli())
    }

    /// Takes one send from `user`'s budget: `None` if allowed, else milliseconds until one is.
    pub fn take(&mut self, user: u64, now_ms: u64) -> Option<u64> {
        let full = self.burst_milli();
        if !self.buckets.contains_key(&user) && self.buckets.len() >= self.max {
            let per_s = u64::from(self.per_s);
            self.buckets
                .retain(|_, b| b.milli + now_ms.saturating_sub(b.at_ms) * per_s < full);
            if self.buckets.len() >= self.max {
                // Every bucket is draining: someone floods with many users' tokens. Dropping
                // one gives it a full bucket back, which is the most a user ever has.
                if let Some(&k) = self.buckets.keys().next() {
                    self.buckets.remove(&k);
                }
            }
        }
        let b = self.buckets.get(&user).copied().unwrap_or(Bucket {
            milli: full,
            at_ms: now_ms,
        });
        let milli = self.refilled(b, now_ms);
        if milli < 1000 {
            let wait = (1000 - milli).div_ceil(u64::from(self.per_s));
            self.buckets.insert(
                user,
                Bucket {
                    milli,
                    at_ms: now_ms,
                },
            );
            return Some(wait.max(1));
        }
        self.buckets.insert(
            user,
            Bucket {
                milli: milli - 1000,
                at_ms: now_ms,
            },
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_take_a_burst_then_the_rate() {
        let mut b = SendBudget::new(100);
        for i in 0..200 {
            assert_eq!(b.take(7, 1_000), None, "send {i} of the burst");
        }
        assert_eq!(b.take(7, 1_000), Some(10), "one send every 10 ms at 100/s");
        assert_eq!(b.take(8, 1_000), None, "another user has their own budget");
        assert_eq!(b.take(7, 1_010), None);
        assert_eq!(b.take(7, 1_010), Some(10));
        // A second later the burst is back, not more.
        for _ in 0..200 {
            assert_eq!(b.take(7, 10_000), None);
        }
        assert!(b.take(7, 10_000).is_some());
    }

    #[test]
    fn the_send_budgets_stay_bounded() {
        let mut b = SendBudget::with_capacity(10, 50);
        for u in 0..1_000 {
            b.take(u, 0);
        }
        assert!(b.buckets.len() <= 50);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn five_failures_are_free_then_the_wait_doubles_up_to_its_cap() {
        let mut t = LoginThrottle::default();
        let (a, now) = (ip("203.0.113.7"), 1_000_000);
        for _ in 0..ACCOUNT_FREE_FAILURES - 1 {
            assert_eq!(t.check("alice", a, now), None);
            t.failed("alice", a, now);
        }
        t.failed("alice", a, now);
        assert_eq!(t.check("alice", a, now), Some(1_000));
        assert_eq!(t.check("alice", a, now + 999), Some(1));
        assert_eq!(t.check("alice", a, now + 1_000), None);
        t.failed("alice", a, now + 1_000);
        assert_eq!(t.check("alice", a, now + 1_000), Some(2_000));
        let mut at = now + 3_000;
        for _ in 0..30 {
            t.failed("alice", a, at);
            at += WAIT_MAX_MS;
        }
        assert_eq!(t.check("ALICE", a, at - WAIT_MAX_MS), Some(WAIT_MAX_MS));
    }

    #[test]
    fn an_attacker_slows_their_own_address_not_the_victims_account() {
        let mut t = LoginThrottle::default();
        let (attacker, victim, now) = (ip("198.51.100.1"), ip("192.0.2.44"), 5_000);
        for _ in 0..50 {
            t.failed("bob", attacker, now);
        }
        assert!(t.check("bob", attacker, now).is_some());
        assert!(
            t.check("carol", attacker, now).is_some(),
            "the address waits too"
        );
        assert_eq!(t.check("bob", victim, now), None, "no lockout by account");
    }

    #[test]
    fn a_success_clears_the_account_count_but_not_the_address_count() {
        let mut t = LoginThrottle::default();
        let (a, now) = (ip("2001:db8::5"), 10_000);
        for i in 0..ADDRESS_FREE_FAILURES as u64 {
            // Many accounts, few failures each: only the address's count reaches its limit.
            t.failed(&format!("user{}", i % 5), a, now);
        }
        assert!(t.check("someone-else", a, now).is_some());
        // An attacker's own account cannot reset the address's count: while the address
        // waits, no attempt from it is even checked.
        assert!(
            t.attempt("mallory", a, now).is_some(),
            "the address still waits"
        );
        let mut t = LoginThrottle::default();
        for _ in 0..ACCOUNT_FREE_FAILURES {
            t.failed("dave", a, now);
        }
        t.succeeded("dave", a);
        t.failed("dave", a, now);
        assert_eq!(t.check("dave", a, now), None, "counting starts again");
    }

    #[test]
    fn quiet_keys_are_forgotten_and_the_maps_stay_bounded() {
        let mut t = LoginThrottle::with_capacity(100);
        for i in 0..1_000u32 {
            let a = IpAddr::from(i.to_be_bytes());
            t.failed(&format!("u{i}"), a, u64::from(i));
        }
        assert!(t.len() <= 200, "{} keys", t.len());
        let a = ip("192.0.2.1");
        for _ in 0..ACCOUNT_FREE_FAILURES {
            t.failed("erin", a, 0);
        }
        // An hour without failures after the wait: a fresh start.
        let later = WAIT_MAX_MS + FORGET_AFTER_MS;
        assert_eq!(t.check("erin", a, later), None);
        t.failed("erin", a, later);
        assert_eq!(t.check("erin", a, later), None, "one failure is free again");
    }

    #[test]
    fn attempts_sent_together_are_counted_before_their_passwords_are_checked() {
        let mut t = LoginThrottle::default();
        let (a, now) = (ip("198.51.100.9"), 50_000);
        // Ten attempts at once: five pass the check, the rest must wait.
        let passed = (0..10)
            .filter(|_| t.attempt("frank", a, now).is_none())
            .count();
        assert_eq!(passed, ACCOUNT_FREE_FAILURES as usize);
        // One of them had the right password: the account's count is cleared, and the
        // address's count loses the attempt that succeeded.
        t.succeeded("frank", a);
        assert_eq!(t.check("frank", a, now), None);
        assert_eq!(t.addresses.map[&a].failures, ACCOUNT_FREE_FAILURES - 1);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let mut t = LoginThrottle::default();
        for i in 0..ADDRESS_FREE_FAILURES {
            let a = IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, 7, 0, 0, 0, i as u16,
            ));
            t.failed(&format!("u{i}"), a, 0);
        }
        let sibling = ip("2001:db8:0:7:ffff::1");
        assert!(t.check("someone", sibling, 0).is_some(), "the same /64");
        assert_eq!(t.check("someone", ip("2001:db8:0:8::1"), 0), None);
        let mut t = LoginThrottle::default();
        for _ in 0..ACCOUNT_FREE_FAILURES {
            t.failed("gina", ip("::ffff:192.0.2.5"), 0);
        }
        assert!(t.check("gina", ip("192.0.2.5"), 0).is_some());
    }

    #[test]
    fn long_and_odd_account_names_are_keyed_safely() {
        let mut t = LoginThrottle::default();
        let a = ip("192.0.2.9");
        let long = "é".repeat(100);
        for _ in 0..ACCOUNT_FREE_FAILURES {
            t.failed(&long, a, 0);
        }
        assert!(t.check(&long, a, 0).is_some());
    }
}

//! Load under faults, and the accounting every fault test ends with (issue 14): clients that
//! behave as docs/PROTOCOL.md tells them to — resend with the same `cid` after a 5xxx or a
//! silence, reconnect to another gateway when the connection drops — and a receiving device
//! that keeps what it gets live. At the end every acknowledged message must be stored once with
//! the id and seq it was acknowledged with, each conversation's seqs must be 1..=n, the live
//! stream must be in seq order without a duplicate, and `sync` must return the rest.

use super::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Where a sender's messages go.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    User(u64),
    Group(u64),
}

impl Target {
    fn field(&self) -> (&'static str, String) {
        match self {
            Target::User(u) => ("to", u.to_string()),
            Target::Group(g) => ("group", g.to_string()),
        }
    }
}

/// A WebSocket that reports a lost connection instead of panicking, and moves to the next
/// gateway when it reconnects.
pub struct Client {
    token: String,
    gateways: Vec<SocketAddr>,
    at: usize,
    ws: Option<Ws>,
    pub reconnects: usize,
}

impl Client {
    pub fn new(token: &str, gateways: Vec<SocketAddr>, first: usize) -> Client {
        let mut c = Client {
            token: token.into(),
            gateways,
            at: first,
            ws: None,
            reconnects: 0,
        };
        c.ws = Ws::try_connect(c.gateways[c.at], &c.token).ok();
        assert!(c.ws.is_some(), "the first connection failed");
        c
    }

    /// The gateway this client is on (or last tried).
    pub fn gateway(&self) -> usize {
        self.at
    }

    /// Connects again, to the next gateway first, until one takes it or `within` passes.
    fn reconnect(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            self.at = (self.at + 1) % self.gateways.len();
            if let Ok(ws) = Ws::try_connect(self.gateways[self.at], &self.token) {
                self.ws = Some(ws);
                self.reconnects += 1;
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Sends, reconnecting first if the connection is gone; false if it is (the caller
    /// resends later).
    pub fn send(&mut self, v: &Value) -> bool {
        if self.ws.is_none() && !self.reconnect(Duration::from_secs(1)) {
            return false;
        }
        match self.ws.as_mut().unwrap().try_send(v.clone()) {
            Ok(()) => true,
            Err(_) => {
                self.ws = None;
                false
            }
        }
    }

    /// The next frame within `within`; `Err` when the connection was lost (it reconnects on
    /// the next call).
    pub fn recv(&mut self, within: Duration) -> Result<Option<Value>, ()> {
        if self.ws.is_none() && !self.reconnect(within.max(Duration::from_millis(500))) {
            return Ok(None);
        }
        match self.ws.as_mut().unwrap().try_recv(within) {
            Ok(v) => Ok(v),
            Err(_) => {
                self.ws = None;
                Err(())
            }
        }
    }
}

/// What one sender ended with: acks by cid, and the error codes it was answered with.
#[derive(Default)]
pub struct Sent {
    pub acks: HashMap<String, Value>,
    pub errors: BTreeMap<u64, usize>,
    pub reconnects: usize,
}

/// Sends `n` messages to `target` with at most `window` unacknowledged, resending (same
/// cid) after a 5xxx, a lost connection, or `patience` without an answer.
pub fn pump(
    client: &mut Client,
    target: Target,
    prefix: &str,
    n: usize,
    window: usize,
    patience: Duration,
    acked_total: &AtomicUsize,
) -> Sent {
    let mut out = Sent::default();
    let mut pending: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    let (field, to) = target.field();
    let frame = |i: usize| json!({"type": "send", "cid": format!("{prefix}-{i}"), field: to, "content": format!("{prefix} m{i}")});
    while out.acks.len() < n {
        assert!(
            Instant::now() < deadline,
            "{prefix}: {} of {n} acknowledged; errors {:?}",
            out.acks.len(),
            out.errors
        );
        while pending.len() < window && next < n {
            client.send(&frame(next));
            pending.insert(next, Instant::now());
            next += 1;
        }
        match client.recv(Duration::from_millis(50)) {
            Ok(Some(v)) => {
                let cid = v["cid"].as_str().unwrap_or_default().to_string();
                let i: usize = cid
                    .rsplit('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(usize::MAX);
                match v["type"].as_str() {
                    Some("sent") => {
                        if let Some(first) = out.acks.get(&cid) {
                            assert_eq!(
                                first["id"], v["id"],
                                "one cid, one message: {first} vs {v}"
                            );
                            assert_eq!(first["seq"], v["seq"]);
                        } else {
                            acked_total.fetch_add(1, Ordering::Relaxed);
                            out.acks.insert(cid, v);
                        }
                        pending.remove(&i);
                    }
                    Some("error") => {
                        let code = v["code"].as_u64().unwrap();
                        assert!(code >= 5000, "only retryable errors here: {v}");
                        *out.errors.entry(code).or_default() += 1;
                        if pending.contains_key(&i) {
                            // Back off a little, as a client should.
                            pending
                                .insert(i, Instant::now() - patience + Duration::from_millis(200));
                        }
                    }
                    _ => {}
                }
            }
            Ok(None) => {}
            // Lost: everything unanswered goes again (same cids) on the next connection.
            Err(()) => {
                let now = Instant::now();
                for t in pending.values_mut() {
                    *t = now - patience;
                }
            }
        }
        let now = Instant::now();
        let late: Vec<usize> = pending
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= patience)
            .map(|(i, _)| *i)
            .collect();
        for i in late {
            client.send(&frame(i));
            pending.insert(i, now);
        }
    }
    out.reconnects = client.reconnects;
    out
}

/// A receiving device: keeps every `msg` it gets live until `stop`, reconnecting when its
/// connection drops.
pub fn receive(mut client: Client, stop: Arc<AtomicBool>) -> (Client, Vec<Value>) {
    let mut got = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(v)) = client.recv(Duration::from_millis(100)) {
            if v["type"] == "msg" {
                got.push(v);
            }
        }
    }
    (client, got)
}

/// The device's `sync` of `conv` from the start: (seq, id) of each message, paging on `more`.
pub fn sync_all(client: &mut Client, conv: &str) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after = out.last().map(|m| m.0).unwrap_or(0);
        client.send(&json!({"type": "sync", "conv": conv, "after": after, "limit": 500}));
        let answer = loop {
            assert!(Instant::now() < deadline, "no sync answer for {conv}");
            if let Ok(Some(v)) = client.recv(Duration::from_millis(200)) {
                if v["type"] == "sync" && v["conv"] == conv {
                    break v;
                }
            }
        };
        for m in answer["messages"].as_array().unwrap() {
            out.push((
                m["seq"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_string(),
            ));
        }
        if answer["more"] != true {
            return out;
        }
    }
}

/// Waits until the database holds `want` messages, then a second more (a duplicate would show
/// up as a late extra row).
pub fn wait_rows(c: &Cluster, want: usize) {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let n: usize = mysql_query(&c.db, "SELECT COUNT(*) FROM messages")
            .parse()
            .unwrap();
        if n >= want {
            std::thread::sleep(Duration::from_secs(1));
            return;
        }
        assert!(Instant::now() < end, "{n} of {want} rows\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every acknowledged message is stored once, with the id and seq it was acknowledged with,
/// and each conversation's seqs are 1..=n without a gap. The stored (conv → seq → id).
pub fn check_stored(
    c: &Cluster,
    acks: &[&HashMap<String, Value>],
    total: usize,
) -> HashMap<String, BTreeMap<u64, String>> {
    assert_eq!(
        mysql_query(&c.db, "SELECT COUNT(*) FROM messages"),
        total.to_string(),
        "{}",
        c.logs()
    );
    let rows = mysql_query(
        &c.db,
        "SELECT CAST(cid AS CHAR), CAST(id AS CHAR), seq, conv FROM messages",
    );
    let mut by_cid: HashMap<&str, (&str, &str)> = HashMap::new();
    let mut convs: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for l in rows.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        by_cid.insert(f[0], (f[1], f[2]));
        let seq: u64 = f[2].parse().unwrap();
        let dup = convs
            .entry(f[3].to_string())
            .or_default()
            .insert(seq, f[1].to_string());
        assert!(dup.is_none(), "{} holds seq {seq} twice", f[3]);
    }
    for per in acks {
        for (cid, ack) in per.iter() {
            let (id, seq) = by_cid
                .get(cid.as_str())
                .unwrap_or_else(|| panic!("acknowledged {cid} is not stored"));
            assert_eq!(ack["id"].as_str().unwrap(), *id, "{cid}");
            assert_eq!(ack["seq"].as_u64().unwrap().to_string(), *seq, "{cid}");
        }
    }
    for (conv, seqs) in &convs {
        let n = seqs.len() as u64;
        assert_eq!(
            (seqs.keys().next().copied(), seqs.keys().last().copied()),
            (Some(1), Some(n)),
            "seqs of {conv} are 1..={n}"
        );
    }
    convs
}

/// The receiving device's accounting: its live stream of each conversation is in seq order
/// with no duplicate and only stored messages, and `sync` from the start returns exactly
/// what is stored. Returns how many messages it got live.
pub fn check_delivered(
    device: &mut Client,
    live: &[Value],
    stored: &HashMap<String, BTreeMap<u64, String>>,
    convs: &[String],
) -> usize {
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut n = 0;
    for m in live {
        let conv = m["conv"].as_str().unwrap();
        let seq = m["seq"].as_u64().unwrap();
        let id = m["id"].as_str().unwrap();
        let prev = last.insert(conv, seq).unwrap_or(0);
        let stored_id = stored.get(conv).and_then(|s| s.get(&seq));
        assert!(
            seq > prev,
            "{conv}: live seq {seq} after {prev} (a duplicate or out of order); its id {id}, \
             the stored one at that seq {stored_id:?}"
        );
        assert_eq!(
            stored
                .get(conv)
                .and_then(|s| s.get(&seq))
                .map(String::as_str),
            Some(id),
            "{conv}: live message {seq} is not the stored one"
        );
        n += 1;
    }
    for conv in convs {
        let synced = sync_all(device, conv);
        let want: Vec<(u64, String)> = stored
            .get(conv)
            .map(|s| s.iter().map(|(q, i)| (*q, i.clone())).collect())
            .unwrap_or_default();
        assert_eq!(
            synced.len(),
            want.len(),
            "{conv}: sync returned {} of {}",
            synced.len(),
            want.len()
        );
        assert!(synced == want, "{conv}: sync differs from storage");
    }
    n
}

/// Runs `senders` (token, target, first gateway) on threads, each pumping `per` messages, and
/// calls `midway` once `trigger` messages are acknowledged overall; what the senders ended
/// with, and what `midway` returned.
pub fn run_senders<R>(
    c: &mut Cluster,
    senders: &[(String, Target, usize)],
    per: usize,
    trigger: usize,
    patience: Duration,
    midway: impl FnOnce(&mut Cluster) -> R,
) -> (Vec<Sent>, R) {
    let acked = Arc::new(AtomicUsize::new(0));
    let gateways: Vec<SocketAddr> = c.gateways.iter().map(|g| g.1).collect();
    let handles: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(k, (token, target, first))| {
            let mut client = Client::new(token, gateways.clone(), *first);
            let (acked, target) = (acked.clone(), *target);
            std::thread::spawn(move || {
                pump(
                    &mut client,
                    target,
                    &format!("s{k}"),
                    per,
                    50,
                    patience,
                    &acked,
                )
            })
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::Relaxed) < trigger {
        assert!(
            Instant::now() < end,
            "only {} acknowledged\n{}",
            acked.load(Ordering::Relaxed),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = midway(c);
    let sent = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| panic!("a sender failed\n{}", c.logs()))
        })
        .collect();
    (sent, r)
}

/// A shared error-code tally, for assertions over all senders.
pub fn errors_of(sent: &[Sent]) -> BTreeMap<u64, usize> {
    let mut all = BTreeMap::new();
    for s in sent {
        for (c, n) in &s.errors {
            *all.entry(*c).or_default() += n;
        }
    }
    all
}

/// The error codes a service outage may answer a `send` with: 5032 (a dependency is down)
/// and 5030 (busy); anything else fails the test.
pub fn assert_only_unavailable(errors: &BTreeMap<u64, usize>) {
    assert!(
        errors.keys().all(|&code| code == 5032 || code == 5030),
        "{errors:?}"
    );
}

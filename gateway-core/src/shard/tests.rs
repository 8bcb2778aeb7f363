//! The shard driven byte by byte through a simulated driver: no sockets, no threads, a clock
//! we move by hand.

use super::*;
use crate::mesh;
use crate::msg::{ConnRef, ShardMsg, UpMsg};
use crate::waker::Waker;
use im_shared::conv::Conv;
use im_shared::jwt;
use im_shared::records::{self, UpstreamBody, Versioned};
use std::collections::{HashMap, HashSet};

const SECRET: &[u8] = b"shard-test-secret";
const NOW_UNIX_MS: u64 = 1_800_000_000_000;

fn cfg() -> GatewayConfig {
    GatewayConfig {
        jwt_secret: SECRET.to_vec(),
        heartbeat_timeout_ms: 1_000,
        handshake_timeout_ms: 500,
        outbound_bytes_max: 4096,
        frame_bytes_max: 1024,
        tick_ms: 10,
        ..GatewayConfig::default()
    }
}

fn token(user: u64) -> String {
    jwt::sign(SECRET, &jwt::Claims::new(user, NOW_UNIX_MS / 1000, 3600))
}

type Id = (usize, u32);

struct Sim {
    shards: Vec<Shard>,
    /// Bytes each connection was sent.
    out: HashMap<Id, Vec<u8>>,
    closed: HashSet<Id>,
    shut_wr: HashSet<Id>,
    /// Connections whose sends never complete (a peer that does not read).
    stalled: HashSet<Id>,
    now: Now,
    next_fd: i32,
    /// Sends the drivers would have submitted.
    sends: usize,
}

impl Sim {
    fn new(n: usize, cfg: GatewayConfig) -> Sim {
        Sim::with_revocations(n, cfg, None)
    }

    fn with_revocations(n: usize, cfg: GatewayConfig, revoked: Option<RevokedCheck>) -> Sim {
        Sim::build(n, cfg, revoked, false).0
    }

    /// Shards in pipeline mode, and the bridge's end of their rings.
    fn with_bridge(n: usize, cfg: GatewayConfig) -> (Sim, crate::bridge::BridgeEnd) {
        let (sim, end) = Sim::build(n, cfg, None, true);
        (sim, end.unwrap())
    }

    fn build(
        n: usize,
        cfg: GatewayConfig,
        revoked: Option<RevokedCheck>,
        with_bridge: bool,
    ) -> (Sim, Option<crate::bridge::BridgeEnd>) {
        let wakers: Arc<[Waker]> = (0..n)
            .map(|_| Waker::new().unwrap())
            .collect::<Vec<_>>()
            .into();
        let stats: Arc<[ShardStats]> = (0..n)
            .map(|_| ShardStats::default())
            .collect::<Vec<_>>()
            .into();
        let mut ports = mesh::build(n, 64, 1024, wakers.clone());
        let end = with_bridge.then(|| {
            let (links, end) = crate::bridge::build(n, 64, wakers).unwrap();
            for (p, l) in ports.iter_mut().zip(links) {
                p.attach_bridge(l);
            }
            end
        });
        let shards = ports
            .into_iter()
            .map(|p| Shard::with_revocations(&cfg, p, stats.clone(), "sim", revoked.clone()))
            .collect();
        let mut sim = Sim {
            shards,
            out: HashMap::new(),
            closed: HashSet::new(),
            shut_wr: HashSet::new(),
            stalled: HashSet::new(),
            now: Now {
                mono_ms: 1_000_000,
                unix_ms: NOW_UNIX_MS,
            },
            next_fd: 100,
            sends: 0,
        };
        sim.run();
        (sim, end)
    }

    fn run(&mut self) {
        for _ in 0..20 {
            let mut busy = false;
            for s in 0..self.shards.len() {
                let sh = &mut self.shards[s];
                sh.set_now(self.now);
                sh.poll_mesh();
                sh.on_tick();
                loop {
                    let mut ready = Vec::new();
                    self.shards[s].take_ready(&mut ready);
                    if ready.is_empty() {
                        break;
                    }
                    busy = true;
                    for key in ready {
                        self.apply(s, key);
                    }
                }
                self.shards[s].end_turn();
            }
            if !busy && self.shards.iter().all(|s| !s.mesh().has_inbound()) {
                return;
            }
        }
    }

    fn apply(&mut self, s: usize, key: u32) {
        let plan = self.shards[s].plan(key);
        if let Some((ptr, len)) = plan.send {
            if !self.stalled.contains(&(s, key)) {
                // As the drivers do: one vectored send when several frames are queued.
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; crate::shard::SEND_FRAMES_MAX];
                let n = if plan.send_frames > 1 {
                    self.shards[s].send_iovecs(key, &mut iov)
                } else {
                    iov[0] = libc::iovec {
                        iov_base: ptr as *mut libc::c_void,
                        iov_len: len,
                    };
                    1
                };
                assert_eq!(n, plan.send_frames.max(1));
                let out = self.out.entry((s, key)).or_default();
                let mut sent = 0;
                for v in &iov[..n] {
                    // SAFETY: the shard keeps the frames alive until on_sent.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                    out.extend_from_slice(bytes);
                    sent += v.iov_len;
                }
                self.sends += 1;
                self.shards[s].on_sent(key, sent as i32);
            }
        }
        if plan.shutdown_wr {
            self.shut_wr.insert((s, key));
        }
        if plan.cancel_recv {
            self.shards[s].recv_disarmed(key);
        }
        if plan.cancel_send {
            // The kernel completes a cancelled send with ECANCELED.
            self.stalled.remove(&(s, key));
            self.shards[s].on_sent(key, -libc::ECANCELED);
        }
        if plan.close {
            self.closed.insert((s, key));
            self.shards[s].release(key);
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now.mono_ms += ms;
        self.now.unix_ms += ms;
        self.run();
    }

    fn accept(&mut self, s: usize) -> u32 {
        self.next_fd += 1;
        let key = self.shards[s].accept(self.next_fd).unwrap();
        self.run();
        key
    }

    fn recv(&mut self, id: Id, bytes: &[u8]) {
        let mut data = bytes.to_vec();
        self.shards[id.0].on_recv(id.1, &mut data);
        self.run();
    }

    fn upgrade_request(path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    }

    /// A WebSocket connection of `user` on shard `s`, past the 101.
    fn connect(&mut self, s: usize, user: u64) -> Id {
        let key = self.accept(s);
        self.recv(
            (s, key),
            Self::upgrade_request(&format!("/ws?token={}", token(user))).as_bytes(),
        );
        let head = self.take_http((s, key));
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (s, key)
    }

    fn take_http(&mut self, id: Id) -> String {
        let out = self.out.remove(&id).unwrap_or_default();
        let end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(out.len(), |p| p + 4);
        let (head, rest) = out.split_at(end);
        if !rest.is_empty() {
            self.out.insert(id, rest.to_vec());
        }
        String::from_utf8_lossy(head).into_owned() + &String::from_utf8_lossy(rest)
    }

    fn send_text(&mut self, id: Id, text: &str) {
        self.recv(
            id,
            &codec::client_frame(true, opcode::TEXT, text.as_bytes(), [1, 2, 3, 4]),
        );
    }

    /// Server frames sent to `id` since the last call: (opcode, payload).
    fn frames(&mut self, id: Id) -> Vec<(u8, Vec<u8>)> {
        let out = self.out.remove(&id).unwrap_or_default();
        let mut frames = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let op = out[pos] & 0x0F;
            let (len, hl) = match out[pos + 1] {
                126 => (u16::from_be_bytes([out[pos + 2], out[pos + 3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(out[pos + 2..pos + 10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            frames.push((op, out[pos + hl..pos + hl + len].to_vec()));
            pos += hl + len;
        }
        frames
    }

    fn json(&mut self, id: Id) -> Vec<serde_json::Value> {
        self.frames(id)
            .into_iter()
            .filter(|(op, _)| *op == opcode::TEXT)
            .map(|(_, p)| serde_json::from_slice(&p).unwrap())
            .collect()
    }

    fn close_code(&mut self, id: Id) -> Option<u16> {
        self.frames(id)
            .into_iter()
            .find(|(op, _)| *op == opcode::CLOSE)
            .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
    }

    fn stats(&self, s: usize) -> &ShardStats {
        self.shards[s].st()
    }
}

fn send_json(to: u64, cid: &str, content: &str) -> String {
    format!(r#"{{"type":"send","cid":"{cid}","to":"{to}","content":"{content}"}}"#)
}

#[test]
fn upgrade_with_valid_token_and_refusals_without_one() {
    let mut sim = Sim::new(1, cfg());
    let a = sim.connect(0, 7);
    assert_eq!(
        sim.stats(0)
            .handshakes_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(!sim.closed.contains(&a));

    for (path, why) in [
        ("/ws".to_string(), "missing token"),
        (format!("/ws?token={}x", token(7)), "signature"),
        (
            format!(
                "/ws?token={}",
                jwt::sign(SECRET, &jwt::Claims::new(7, 1, 1))
            ),
            "expired",
        ),
        (
            format!(
                "/ws?token={}",
                jwt::sign(b"other", &jwt::Claims::new(7, NOW_UNIX_MS / 1000, 60))
            ),
            "signature",
        ),
        (
            // A token that claims to live longer than tokens may (a day by default).
            format!(
                "/ws?token={}",
                jwt::sign(
                    SECRET,
                    &jwt::Claims::new(7, NOW_UNIX_MS / 1000, jwt::LIFETIME_MAX_S + 1)
                )
            ),
            "lifetime",
        ),
        (
            // Issued in the future.
            format!(
                "/ws?token={}",
                jwt::sign(
                    SECRET,
                    &jwt::Claims::new(7, NOW_UNIX_MS / 1000 + jwt::IAT_SKEW_S + 10, 60)
                )
            ),
            "lifetime",
        ),
        (
            // A user id past i64::MAX: no user has it.
            format!(
                "/ws?token={}",
                jwt::sign(SECRET, &{
                    let mut c = jwt::Claims::new(7, NOW_UNIX_MS / 1000, 60);
                    c.sub = u64::MAX.to_string();
                    c
                })
            ),
            "claims",
        ),
    ] {
        let key = sim.accept(0);
        sim.recv((0, key), Sim::upgrade_request(&path).as_bytes());
        let answer = sim.take_http((0, key));
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains(why), "{answer}");
        assert!(sim.shut_wr.contains(&(0, key)));
    }
}

#[test]
fn ping_frames_and_application_ping() {
    let mut sim = Sim::new(1, cfg());
    let a = sim.connect(0, 7);
    sim.recv(
        a,
        &codec::client_frame(true, opcode::PING, b"abc", [9, 9, 9, 9]),
    );
    assert_eq!(sim.frames(a), vec![(opcode::PONG, b"abc".to_vec())]);
    sim.send_text(a, r#"{"type":"ping"}"#);
    assert_eq!(sim.json(a), vec![serde_json::json!({"type": "pong"})]);
}

#[test]
fn cross_shard_delivery_to_every_device_in_order() {
    let mut sim = Sim::new(3, cfg());
    let alice = sim.connect(0, 1);
    let alice_phone = sim.connect(2, 1);
    let bob = sim.connect(1, 2);
    let bob_tablet = sim.connect(1, 2);
    sim.run();
    for i in 0..50 {
        sim.send_text(alice, &send_json(2, &format!("c{i}"), &format!("m{i}")));
    }
    let acks = sim.json(alice);
    assert_eq!(acks.len(), 50, "{acks:?}");
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a["type"], "sent");
        assert_eq!(a["cid"], format!("c{i}"));
        assert_eq!(a["seq"], i as u64 + 1);
        assert_eq!(a["conv"], "p:1:2");
    }
    for dev in [bob, bob_tablet, alice_phone] {
        let msgs = sim.json(dev);
        assert_eq!(msgs.len(), 50, "device {dev:?}");
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(
                (m["type"].as_str(), m["seq"].as_u64()),
                (Some("msg"), Some(i as u64 + 1))
            );
            assert_eq!(
                (m["from"].as_str(), m["to"].as_str()),
                (Some("1"), Some("2"))
            );
            assert_eq!(m["content"], format!("m{i}"));
            assert_eq!(m["id"], acks[i]["id"], "one id per message on every device");
        }
    }
}

#[test]
fn a_user_who_leaves_stops_receiving_and_others_keep_receiving() {
    let mut sim = Sim::new(2, cfg());
    let alice = sim.connect(0, 1);
    let bob1 = sim.connect(1, 2);
    let bob2 = sim.connect(0, 2);
    sim.recv(
        bob1,
        &codec::client_frame(true, opcode::CLOSE, &1000u16.to_be_bytes(), [1, 1, 1, 1]),
    );
    assert_eq!(sim.close_code(bob1), Some(1000), "close is echoed");
    sim.send_text(alice, &send_json(2, "x", "hello"));
    assert_eq!(sim.json(bob2).len(), 1);
    assert!(sim.json(bob1).is_empty());
}

#[test]
fn fragmented_message_with_a_ping_in_between() {
    let mut sim = Sim::new(1, cfg());
    let a = sim.connect(0, 1);
    let _b = sim.connect(0, 2);
    let text = send_json(2, "f", "fragmented");
    let (p1, rest) = text.split_at(10);
    let (p2, p3) = rest.split_at(10);
    let m = [5, 6, 7, 8];
    let mut bytes = codec::client_frame(false, opcode::TEXT, p1.as_bytes(), m);
    bytes.extend(codec::client_frame(
        false,
        opcode::CONTINUATION,
        p2.as_bytes(),
        m,
    ));
    bytes.extend(codec::client_frame(true, opcode::PING, b"", m));
    bytes.extend(codec::client_frame(
        true,
        opcode::CONTINUATION,
        p3.as_bytes(),
        m,
    ));
    // Fed one byte at a time: every boundary is a partial frame.
    for b in bytes {
        sim.recv(a, &[b]);
    }
    let frames = sim.frames(a);
    assert_eq!(frames[0], (opcode::PONG, vec![]));
    let sent: serde_json::Value = serde_json::from_slice(&frames[1].1).unwrap();
    assert_eq!(sent["type"], "sent");
    assert_eq!(
        sim.shards[0].arena.bytes(),
        0,
        "nothing stays in the arena once frames complete"
    );
}

#[test]
fn protocol_violations_close_with_the_right_code() {
    let mut sim = Sim::new(1, cfg());
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            {
                let mut f = codec::client_frame(true, opcode::TEXT, b"hi", [0; 4]);
                f[1] &= 0x7F;
                f
            },
            1002,
        ),
        (
            codec::client_frame(true, opcode::TEXT, &[b'a'; 1025], [1; 4]),
            1009,
        ),
        (
            codec::client_frame(true, opcode::TEXT, &[0xff, 0xfe], [1; 4]),
            1007,
        ),
        (
            codec::client_frame(true, opcode::CONTINUATION, b"x", [1; 4]),
            1002,
        ),
        (
            {
                let mut f = codec::client_frame(false, opcode::TEXT, &[b'a'; 600], [1; 4]);
                f.extend(codec::client_frame(
                    true,
                    opcode::CONTINUATION,
                    &[b'a'; 600],
                    [1; 4],
                ));
                f
            },
            1009,
        ),
    ];
    for (bytes, code) in cases {
        let a = sim.connect(0, 3);
        sim.recv(a, &bytes);
        assert_eq!(sim.close_code(a), Some(code));
        assert!(
            sim.shut_wr.contains(&a),
            "our side is shut down after the close frame"
        );
        sim.shards[0].on_eof(a.1);
        sim.run();
        assert!(sim.closed.contains(&a));
    }
    assert_eq!(sim.shards[0].connections(), 0);
}

#[test]
fn bad_json_gets_an_error_and_the_connection_stays() {
    let mut sim = Sim::new(1, cfg());
    let a = sim.connect(0, 1);
    sim.send_text(a, "{nope");
    sim.send_text(a, r#"{"type":"send","cid":"g1","group":"5","content":"x"}"#);
    sim.send_text(a, &send_json(1, "self", "me"));
    let errs = sim.json(a);
    assert_eq!(errs[0]["code"], 4000);
    assert_eq!(
        (errs[1]["code"].as_u64(), errs[1]["cid"].as_str()),
        (Some(5031), Some("g1"))
    );
    assert_eq!(errs[2]["code"], 4003);
    sim.send_text(a, r#"{"type":"ping"}"#);
    assert_eq!(sim.json(a)[0]["type"], "pong");
}

#[test]
fn wheel_closes_idle_and_half_open_connections() {
    let mut sim = Sim::new(1, cfg());
    let idle = sim.connect(0, 1);
    let chatty = sim.connect(0, 2);
    let silent = sim.accept(0); // never sends its upgrade request
    sim.advance(600);
    assert!(sim.closed.contains(&(0, silent)), "handshake deadline");
    sim.send_text(chatty, r#"{"type":"ping"}"#);
    sim.advance(500);
    assert_eq!(sim.close_code(idle), Some(1001), "heartbeat timeout");
    assert_eq!(sim.close_code(chatty), None, "seen 500 ms ago: still alive");
    for _ in 0..30 {
        sim.advance(100); // real time moves in small steps; the wheel handles each tick
    }
    assert!(
        sim.closed.contains(&idle),
        "lingering peer is dropped after the deadline"
    );
    assert!(sim.closed.contains(&chatty), "and chatty went quiet too");
    assert_eq!(
        sim.stats(0)
            .heartbeat_timeouts_total
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_peer_that_does_not_read_is_closed_with_1013_and_memory_stays_bounded() {
    let mut sim = Sim::new(2, cfg());
    let alice = sim.connect(0, 1);
    let bob = sim.connect(1, 2);
    sim.stalled.insert(bob);
    let content = "x".repeat(500);
    for i in 0..100 {
        sim.send_text(alice, &send_json(2, &format!("c{i}"), &content));
        assert!(
            sim.shards[1].arena.bytes() <= 4096 + 1024,
            "arena {}",
            sim.shards[1].arena.bytes()
        );
    }
    sim.stalled.remove(&bob);
    sim.shards[1].on_sent(bob.1, 0); // the stalled send "completes" with nothing taken
    sim.run();
    assert_eq!(sim.close_code(bob), Some(1013));
    assert_eq!(
        sim.stats(1)
            .slow_consumer_closes_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(sim.json(alice).len(), 100, "the sender is unaffected");
}

#[test]
fn metrics_and_health_on_the_gateway_port() {
    let mut sim = Sim::new(2, cfg());
    let _ = sim.connect(1, 5);
    let key = sim.accept(0);
    sim.recv((0, key), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = sim.take_http((0, key));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("im_gateway_connections{shard=\"1\"} 1"),
        "{text}"
    );
    let key = sim.accept(0);
    sim.recv((0, key), b"GET /healthz HTTP/1.1\r\n\r\n");
    assert!(sim.take_http((0, key)).ends_with("ok\n"));
    let key = sim.accept(0);
    sim.recv((0, key), b"GET /nope HTTP/1.1\r\n\r\n");
    assert!(sim.take_http((0, key)).starts_with("HTTP/1.1 404"));
}

/// A drain tells the shard's connections to go in proportion to the time passed: a tenth of
/// the window, a tenth of them (rounded up), in connection order; at the end, all.
#[test]
fn a_drain_closes_connections_a_few_at_a_time() {
    let mut sim = Sim::new(1, cfg());
    let conns: Vec<_> = (1..=20).map(|u| sim.connect(0, u)).collect();
    sim.shards[0].shutdown();
    // Which connections have been told (1012), in connection order; frames are read once.
    let mut told = vec![false; conns.len()];
    let mut step = |sim: &mut Sim, fraction: f64| {
        sim.shards[0].drain_to(fraction);
        sim.run();
        for (i, &c) in conns.iter().enumerate() {
            if !told[i] {
                told[i] = sim.close_code(c) == Some(1012);
            }
        }
        told.clone()
    };
    let count = |t: &[bool]| t.iter().filter(|&&x| x).count();
    assert_eq!(count(&step(&mut sim, 0.0)), 0);
    let t = step(&mut sim, 0.1);
    assert_eq!(count(&t), 2);
    assert!(t[0] && t[1] && !t[2], "in order: {t:?}");
    assert_eq!(count(&step(&mut sim, 0.51)), 11);
    assert_eq!(
        count(&step(&mut sim, 0.51)),
        11,
        "no more for the same fraction"
    );
    assert_eq!(count(&step(&mut sim, 1.0)), 20);
    assert!(sim.shards[0].accept(99).is_none(), "refused while draining");
}

#[test]
fn shutdown_sends_1012_to_everyone() {
    let mut sim = Sim::new(2, cfg());
    let a = sim.connect(0, 1);
    let b = sim.connect(1, 2);
    for s in &mut sim.shards {
        s.shutdown();
        s.drain_to(1.0);
    }
    sim.run();
    assert_eq!(sim.close_code(a), Some(1012));
    assert_eq!(sim.close_code(b), Some(1012));
    assert!(
        sim.shards[0].accept(99).is_none(),
        "no new connections while shutting down"
    );
}

#[test]
fn a_released_slot_reused_by_a_new_connection_gets_no_stale_replies() {
    let mut sim = Sim::new(1, cfg());
    let a = sim.connect(0, 1);
    let gen = sim.shards[0].gen(a.1).unwrap();
    sim.shards[0].on_eof(a.1);
    sim.run();
    let b = sim.connect(0, 1);
    assert_eq!(a.1, b.1, "slab slot reused");
    assert_ne!(sim.shards[0].gen(b.1), Some(gen));
    let frame = sim.shards[0].pong.clone();
    sim.shards[0].on_shard_msg(ShardMsg::Reply {
        to: ConnRef {
            shard: 0,
            key: a.1,
            gen,
        },
        frame,
    });
    sim.run();
    assert!(sim.frames(b).is_empty());
}

#[test]
fn a_flooding_client_is_refused_then_closed_with_1008_and_a_patient_one_recovers() {
    let mut sim = Sim::new(
        1,
        GatewayConfig {
            msgs_per_sec_max: 10,
            ..cfg()
        },
    );
    let flooder = sim.connect(0, 1);
    let patient = sim.connect(0, 3);
    let _bob = sim.connect(0, 2);
    // A burst of twice the rate passes.
    for i in 0..20 {
        sim.send_text(flooder, &send_json(2, &format!("c{i}"), "x"));
    }
    let acks = sim.json(flooder);
    assert_eq!(acks.len(), 20, "{acks:?}");
    assert!(acks.iter().all(|v| v["type"] == "sent"), "{acks:?}");
    sim.send_text(flooder, &send_json(2, "over", "x"));
    let refused = sim.json(flooder);
    assert_eq!(
        (refused[0]["code"].as_u64(), refused[0]["cid"].as_str()),
        (Some(4290), Some("over"))
    );
    // It keeps going through another burst of refusals: closed.
    for i in 0..25 {
        sim.send_text(flooder, &send_json(2, &format!("d{i}"), "x"));
    }
    assert_eq!(sim.close_code(flooder), Some(1008));

    for i in 0..21 {
        sim.send_text(patient, &send_json(2, &format!("p{i}"), "x"));
    }
    assert_eq!(sim.json(patient).last().unwrap()["code"], 4290);
    sim.advance(500); // five messages' worth of credit back (under the 1 s heartbeat timeout)
    sim.send_text(patient, &send_json(2, "later", "x"));
    assert_eq!(sim.json(patient)[0]["type"], "sent");
}

#[test]
fn a_dead_connection_whose_send_never_completes_is_still_closed() {
    let mut sim = Sim::new(1, cfg());
    let alice = sim.connect(0, 1);
    let bob = sim.connect(0, 2);
    sim.stalled.insert(bob); // bob's peer stopped reading: the send in flight never finishes
    sim.send_text(alice, &send_json(2, "c", "hello"));
    // Heartbeat timeout (1 s), then the 2 s linger, in real-time steps.
    for _ in 0..40 {
        sim.send_text(alice, r#"{"type":"ping"}"#);
        sim.advance(100);
    }
    assert!(
        sim.closed.contains(&bob),
        "the stuck send was cancelled and the fd closed"
    );
    assert!(!sim.closed.contains(&alice));
    assert_eq!(sim.shards[0].connections(), 1);
}

#[test]
fn upgrade_and_a_bad_frame_in_one_segment_still_get_the_101_first() {
    let mut sim = Sim::new(1, cfg());
    let key = sim.accept(0);
    let mut bytes = Sim::upgrade_request(&format!("/ws?token={}", token(4))).into_bytes();
    let mut unmasked = codec::client_frame(true, opcode::TEXT, b"x", [0; 4]);
    unmasked[1] &= 0x7F;
    bytes.extend_from_slice(&unmasked[..3]);
    sim.recv((0, key), &bytes);
    let head = sim.take_http((0, key));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(sim.close_code((0, key)), Some(1002));
}

#[test]
fn a_revoked_token_is_refused_at_the_upgrade() {
    let revoked_jti = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let check = revoked_jti.clone();
    let hook: RevokedCheck = Arc::new(move |jti, _| match check.lock().unwrap().as_str() {
        "unreadable" => None,
        revoked => Some(revoked == jti),
    });
    let mut sim = Sim::with_revocations(1, cfg(), Some(hook));
    let claims = jwt::Claims::new(7, NOW_UNIX_MS / 1000, 600);
    let token = jwt::sign(SECRET, &claims);
    *revoked_jti.lock().unwrap() = claims.jti.clone();
    let key = sim.accept(0);
    sim.recv(
        (0, key),
        Sim::upgrade_request(&format!("/ws?token={token}")).as_bytes(),
    );
    let answer = sim.take_http((0, key));
    assert!(
        answer.starts_with("HTTP/1.1 401") && answer.contains("revoked"),
        "{answer}"
    );
    // Another token of the same user still works.
    let other = sim.connect(0, 7);
    assert!(!sim.closed.contains(&other));
    // While the revocation list cannot be read, no token gets in (fail closed), and the
    // open connection stays.
    *revoked_jti.lock().unwrap() = "unreadable".into();
    let fresh = jwt::sign(SECRET, &jwt::Claims::new(8, NOW_UNIX_MS / 1000, 600));
    let key = sim.accept(0);
    sim.recv(
        (0, key),
        Sim::upgrade_request(&format!("/ws?token={fresh}")).as_bytes(),
    );
    let answer = sim.take_http((0, key));
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("5032"),
        "{answer}"
    );
    assert!(!sim.closed.contains(&other));
}

// ---------------------------------------------------------------------------------------------
// Pipeline mode: requests go up to the bridge, answers come down from it.

fn drain_up(end: &mut crate::bridge::BridgeEnd) -> Vec<UpMsg> {
    let mut out = Vec::new();
    end.up.drain(1000, &mut out);
    out
}

fn upstream(m: &UpMsg) -> (Conv, ConnRef, records::Upstream) {
    match m {
        UpMsg::Record {
            conv,
            conn,
            payload,
        } => (
            *conv,
            *conn,
            records::Upstream::from_bytes(payload).unwrap(),
        ),
        other => panic!("expected a record, got {other:?}"),
    }
}

#[test]
fn pipeline_mode_hands_requests_and_presence_to_the_bridge() {
    let (mut sim, mut end) = Sim::with_bridge(2, cfg());
    let a = sim.connect(0, 1);
    let b = sim.connect(1, 2);
    let a2 = sim.connect(1, 1);
    let ups = drain_up(&mut end);
    let online: Vec<(u64, u16)> = ups
        .iter()
        .map(|m| match m {
            UpMsg::Online {
                user, conn, jti, ..
            } => {
                assert_eq!(jti.len(), 32, "the token's id goes up with presence");
                (*user, conn.shard)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(online.len(), 3);
    assert!(online.contains(&(1, 0)) && online.contains(&(2, 1)) && online.contains(&(1, 1)));

    sim.send_text(a, &send_json(2, "c1", "hi"));
    sim.send_text(
        a,
        r#"{"type":"send","cid":"c2","group":"9","content":"all"}"#,
    );
    sim.send_text(b, r#"{"type":"sync","conv":"p:1:2","after":3,"limit":10}"#);
    sim.send_text(b, r#"{"type":"read","conv":"p:1:2","seq":4}"#);
    sim.send_text(b, r#"{"type":"typing","conv":"g:9"}"#);
    let ups = drain_up(&mut end);
    assert_eq!(ups.len(), 5, "{ups:?} {:?}", sim.json(b));
    let (conv, origin, rec) = upstream(&ups[0]);
    assert_eq!(conv, Conv::pair(1, 2).unwrap());
    assert_eq!((origin.shard, origin.key), (0, a.1));
    assert_eq!(rec.user, 1);
    assert_eq!(rec.reply_to, "gw");
    assert_eq!(crate::msg::conn_ref(rec.conn), origin);
    assert_eq!(rec.ts, NOW_UNIX_MS);
    match rec.body {
        Some(UpstreamBody::Send(s)) => {
            assert_eq!((s.cid.as_str(), s.to_user, s.to_group), ("c1", 2, 0));
            assert_eq!(
                (s.content.as_str(), s.content_type.as_str()),
                ("hi", "text")
            );
        }
        other => panic!("{other:?}"),
    }
    let (conv, _, rec) = upstream(&ups[1]);
    assert_eq!(conv, Conv::Group(9));
    assert!(
        matches!(rec.body, Some(UpstreamBody::Send(ref s)) if s.to_group == 9 && s.to_user == 0)
    );
    let (_, _, rec) = upstream(&ups[2]);
    assert_eq!(
        rec.body,
        Some(UpstreamBody::Sync(records::Sync {
            conv: "p:1:2".into(),
            after: 3,
            limit: 10
        }))
    );
    let (_, _, rec) = upstream(&ups[3]);
    assert_eq!(
        rec.body,
        Some(UpstreamBody::Read(records::Read {
            conv: "p:1:2".into(),
            seq: 4
        }))
    );
    let (conv, _, rec) = upstream(&ups[4]);
    assert_eq!(conv, Conv::Group(9), "keyed by its conversation");
    assert_eq!(
        rec.body,
        Some(UpstreamBody::Typing(records::Typing { conv: "g:9".into() }))
    );
    // Nothing went to the local router: no reply, no delivery yet.
    assert!(sim.json(a).is_empty() && sim.json(b).is_empty() && sim.json(a2).is_empty());

    // The bridge brings logic's answers: `sent` to the origin, `msg` to every other device.
    let msg: Frame = codec::server_frame(opcode::TEXT, br#"{"type":"msg","seq":"1"}"#).into();
    let sent: Frame = codec::server_frame(opcode::TEXT, br#"{"type":"sent","cid":"c1"}"#).into();
    for user in [1u64, 2] {
        let home = crate::msg::home_shard(user, 2);
        let fan = ShardMsg::Fanout {
            user,
            frame: msg.clone(),
            except: origin,
        };
        end.down.send(home, fan).unwrap();
    }
    end.down
        .send(
            0,
            ShardMsg::Reply {
                to: origin,
                frame: sent,
            },
        )
        .unwrap();
    end.down.flush();
    sim.run();
    assert_eq!(
        sim.json(a),
        vec![serde_json::json!({"type":"sent","cid":"c1"})]
    );
    assert_eq!(
        sim.json(b),
        vec![serde_json::json!({"type":"msg","seq":"1"})]
    );
    assert_eq!(
        sim.json(a2),
        vec![serde_json::json!({"type":"msg","seq":"1"})]
    );

    // A revoked token's connection is closed with 1008; the user's others stay.
    end.down
        .send(
            1,
            ShardMsg::Kick {
                to: ConnRef {
                    shard: 1,
                    key: a2.1,
                    gen: sim.shards[1].gen(a2.1).unwrap(),
                },
            },
        )
        .unwrap();
    end.down.flush();
    sim.run();
    assert_eq!(sim.close_code(a2), Some(1008));
    sim.send_text(a, r#"{"type":"ping"}"#);
    assert_eq!(sim.json(a), vec![serde_json::json!({"type":"pong"})]);

    // Sending to oneself is refused at the gateway; closing goes up as presence.
    sim.send_text(a, &send_json(1, "c3", "me"));
    assert_eq!(sim.json(a)[0]["code"], ErrorCode::InvalidField.code());
    sim.recv(
        b,
        &codec::client_frame(true, opcode::CLOSE, &1000u16.to_be_bytes(), [0; 4]),
    );
    let ups = drain_up(&mut end);
    assert!(
        ups.iter()
            .any(|m| matches!(m, UpMsg::Offline { user: 2, conn } if conn.shard == 1)),
        "{ups:?}"
    );
}

#[test]
fn pipeline_mode_refreshes_presence_and_refuses_when_the_bridge_ring_is_full() {
    let mut c = cfg();
    c.presence_refresh_ms = 1_000;
    c.heartbeat_timeout_ms = 600_000;
    let (mut sim, mut end) = Sim::with_bridge(1, c);
    let a = sim.connect(0, 7);
    drain_up(&mut end);
    sim.advance(1_100);
    sim.advance(1_100);
    let ups = drain_up(&mut end);
    assert!(
        ups.iter()
            .any(|m| matches!(m, UpMsg::Refresh(u) if u == &vec![7])),
        "{ups:?}"
    );
    // 64 ring slots and a backlog of 1024 (the Sim's): flooding past both is refused with a
    // retryable error carrying the cid, never queued without bound.
    let mut refused = 0;
    for i in 0..1200 {
        sim.send_text(a, &send_json(8, &format!("c{i}"), "x"));
        sim.advance(20); // keeps the rate limit's bucket filled
        refused += sim
            .json(a)
            .iter()
            .filter(|v| v["code"] == ErrorCode::Busy.code())
            .count();
    }
    assert!(refused > 0, "a full bridge ring must refuse");
    assert!(drain_up(&mut end).len() <= 64 + 1024);
}

/// The shard side of a delivery allocates nothing once warm: the frame is shared, the
/// connection's outbound queue comes from the arena's spares, and the ready list keeps its
/// capacity (ARCHITECTURE.md, "Density and speed"). Counted by `crate::alloc_count`.
#[test]
fn deliveries_allocate_nothing_on_the_shard() {
    let mut sim = Sim::new(1, cfg());
    let users: Vec<u64> = (1..=64).collect();
    for &u in &users {
        sim.connect(0, u);
    }
    sim.run();
    let frame: crate::arena::Frame =
        codec::server_frame(opcode::TEXT, br#"{"type":"msg","content":"hi"}"#).into();
    let mut ready = Vec::with_capacity(256);
    let mut round = |shard: &mut Shard| {
        for &user in &users {
            let msg = ShardMsg::Deliver {
                user,
                frame: frame.clone(),
                except: ConnRef::NONE,
            };
            shard.on_shard_msg(msg);
        }
        let mut sent = 0;
        loop {
            shard.take_ready(&mut ready);
            if ready.is_empty() {
                return sent;
            }
            for key in ready.drain(..) {
                if let Some((_, len)) = shard.plan(key).send {
                    shard.on_sent(key, len as i32);
                    sent += 1;
                }
            }
        }
    };
    let shard = &mut sim.shards[0];
    assert_eq!(
        round(shard),
        users.len(),
        "warm-up: every connection got its frame"
    );
    let before = crate::alloc_count::allocations();
    let mut sent = 0;
    for _ in 0..10 {
        sent += round(shard);
    }
    let allocations = crate::alloc_count::allocations() - before;
    assert_eq!(sent, 10 * users.len());
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for {sent} deliveries"
    );
}

#[test]
fn queued_frames_leave_in_one_vectored_send() {
    let mut sim = Sim::new(1, cfg());
    let bob = sim.connect(0, 2);
    sim.frames(bob);
    let frames: Vec<crate::arena::Frame> = (0..5)
        .map(|i| {
            let text = format!(r#"{{"type":"msg","content":"m{i}"}}"#);
            codec::server_frame(opcode::TEXT, text.as_bytes()).into()
        })
        .collect();
    for f in &frames {
        sim.shards[0].on_shard_msg(ShardMsg::Deliver {
            user: 2,
            frame: f.clone(),
            except: ConnRef::NONE,
        });
    }
    let before = sim.sends;
    sim.run();
    assert_eq!(sim.sends - before, 1, "five queued frames, one send");
    let got: Vec<Vec<u8>> = sim.frames(bob).into_iter().map(|(_, p)| p).collect();
    let want: Vec<Vec<u8>> = (0..5)
        .map(|i| format!(r#"{{"type":"msg","content":"m{i}"}}"#).into_bytes())
        .collect();
    assert_eq!(got, want, "in order, whole");
}

#[test]
fn closing_keeps_every_frame_a_send_in_flight_reads() {
    let mut sim = Sim::new(1, cfg());
    let (_, key) = sim.connect(0, 2);
    let shard = &mut sim.shards[0];
    let frame: crate::arena::Frame =
        codec::server_frame(opcode::TEXT, br#"{"type":"msg","content":"x"}"#).into();
    for _ in 0..3 {
        shard.on_shard_msg(ShardMsg::Deliver {
            user: 2,
            frame: frame.clone(),
            except: ConnRef::NONE,
        });
    }
    let plan = shard.plan(key);
    assert_eq!(plan.send_frames, 3);
    // The send is in flight when the connection starts closing: its three frames stay.
    shard.begin_close(key, codec::close::GOING_AWAY, "bye");
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; crate::shard::SEND_FRAMES_MAX];
    assert_eq!(shard.send_iovecs(key, &mut iov), 3);
    for v in &iov[..3] {
        // SAFETY: the frames live until on_sent.
        let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        assert_eq!(bytes, &frame[..]);
    }
    // Part of the second frame went out: the rest of it, then the close frame, follow.
    let sent = frame.len() + 3;
    shard.on_sent(key, sent as i32);
    let plan = shard.plan(key);
    assert_eq!(
        plan.send_frames, 3,
        "the rest of frame 2, frame 3, the close frame"
    );
    let n = shard.send_iovecs(key, &mut iov);
    assert_eq!(iov[0].iov_len, frame.len() - 3);
    assert_eq!(n, 3);
}

#[test]
fn a_merge_window_sends_a_connections_deliveries_in_one_write_when_it_closes() {
    let mut sim = Sim::new(
        1,
        GatewayConfig {
            fanout_merge_ms: 10,
            ..cfg()
        },
    );
    let bob = sim.connect(0, 2);
    sim.frames(bob);
    let before = sim.sends;
    for i in 0..3 {
        let text = format!(r#"{{"type":"msg","content":"m{i}"}}"#);
        sim.shards[0].on_shard_msg(ShardMsg::Deliver {
            user: 2,
            frame: codec::server_frame(opcode::TEXT, text.as_bytes()).into(),
            except: ConnRef::NONE,
        });
        sim.advance(3);
    }
    assert_eq!(sim.sends, before, "nothing before the window closes");
    assert!(
        sim.shards[0].sleep_ms() <= 1,
        "the driver wakes for the window"
    );
    sim.advance(1);
    assert_eq!(sim.sends - before, 1, "three deliveries, one write");
    let n = sim.frames(bob).len();
    assert_eq!(n, 3, "each its own frame");
    // The next delivery opens a new window.
    sim.shards[0].on_shard_msg(ShardMsg::Deliver {
        user: 2,
        frame: codec::server_frame(opcode::TEXT, b"{}").into(),
        except: ConnRef::NONE,
    });
    sim.run();
    assert_eq!(sim.sends - before, 1);
    sim.advance(10);
    assert_eq!(sim.sends - before, 2);
    // A `sent` (a reply to the sender) never waits: alice's send is answered at once.
    let alice = sim.connect(0, 1);
    sim.frames(alice);
    sim.send_text(alice, &send_json(2, "c1", "hi"));
    assert_eq!(sim.json(alice)[0]["type"], "sent");
}

/// A group message comes from the bridge as one `FanoutMany` per home shard; the home shard
/// passes one `DeliverMany` to each other shard holding members. Several group messages in
/// one turn reach each member in order, in one send per connection.
#[test]
fn group_messages_fan_out_as_one_ring_entry_per_shard_and_leave_in_one_send() {
    let (mut sim, mut end) = Sim::with_bridge(2, cfg());
    let members: Vec<u64> = (1..=40).collect();
    let mut conns = Vec::new();
    for &u in &members {
        conns.push((u, sim.connect((u % 2) as usize, u)));
    }
    // A member with a device on each shard.
    conns.push((41, sim.connect(0, 41)));
    conns.push((41, sim.connect(1, 41)));
    drain_up(&mut end);
    let origin_id = conns[0].1;
    let origin = ConnRef {
        shard: origin_id.0 as u16,
        key: origin_id.1,
        gen: sim.shards[origin_id.0].gen(origin_id.1).unwrap(),
    };
    for (_, id) in &conns {
        sim.frames(*id);
    }
    let users: Vec<u64> = (1..=41).collect();
    for i in 0..5 {
        let text = format!(r#"{{"type":"msg","content":"g{i}"}}"#);
        let frame: Frame = codec::server_frame(opcode::TEXT, text.as_bytes()).into();
        for home in 0..2u16 {
            let mine: Vec<u64> = users
                .iter()
                .copied()
                .filter(|&u| crate::msg::home_shard(u, 2) == home)
                .collect();
            let n = mine.len();
            let msg = ShardMsg::FanoutMany {
                users: mine.into(),
                frame: frame.clone(),
                except: origin,
            };
            assert_eq!(msg.weight(), n, "a turn's budget counts deliveries");
            end.down.send(home, msg).unwrap();
        }
    }
    end.down.flush();
    let before = sim.sends;
    sim.run();
    let want: Vec<Vec<u8>> = (0..5)
        .map(|i| format!(r#"{{"type":"msg","content":"g{i}"}}"#).into_bytes())
        .collect();
    for (user, id) in &conns {
        let got: Vec<Vec<u8>> = sim.frames(*id).into_iter().map(|(_, p)| p).collect();
        if *id == origin_id {
            assert!(got.is_empty(), "the sender's own connection is skipped");
        } else {
            assert_eq!(got, want, "user {user} on shard {}", id.0);
        }
    }
    assert_eq!(
        sim.sends - before,
        conns.len() - 1,
        "five group messages, one send per receiving connection"
    );
}

/// A 1:1 message (`Fanout`, one user) and a group message (`FanoutMany`) for the same user,
/// in that order on the user's home shard: the member's connections there get them in that
/// order (the home shard's own deliveries are made at once in both cases).
#[test]
fn a_fanout_and_a_fanout_many_to_one_user_keep_their_order() {
    let (mut sim, mut end) = Sim::with_bridge(2, cfg());
    let u = (1..100u64)
        .find(|&u| crate::msg::home_shard(u, 2) == 0)
        .unwrap();
    let w = (1..100u64)
        .find(|&w| w != u && crate::msg::home_shard(w, 2) == 0)
        .unwrap();
    let a = sim.connect(0, u);
    let b = sim.connect(1, w);
    drain_up(&mut end);
    sim.frames(a);
    sim.frames(b);
    let frame = |text: &str| -> Frame { codec::server_frame(opcode::TEXT, text.as_bytes()).into() };
    end.down
        .send(
            0,
            ShardMsg::Fanout {
                user: u,
                frame: frame("first"),
                except: ConnRef::NONE,
            },
        )
        .unwrap();
    end.down
        .send(
            0,
            ShardMsg::FanoutMany {
                users: vec![u, w].into(),
                frame: frame("second"),
                except: ConnRef::NONE,
            },
        )
        .unwrap();
    end.down.flush();
    sim.run();
    let got: Vec<Vec<u8>> = sim.frames(a).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()]);
    let got: Vec<Vec<u8>> = sim.frames(b).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, vec![b"second".to_vec()]);
}

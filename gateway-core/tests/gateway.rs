//! The gateway over real sockets: a real WebSocket client (tungstenite) against a gateway on an
//! ephemeral port, on both drivers. Raw TCP where the client library would refuse to misbehave.

use gateway_core::codec::{self, opcode};
use gateway_core::GatewayConfig;
use gateway_core::{Gateway, GatewayHandle};
use im_shared::jwt;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const SECRET: &str = "integration-secret";

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn config(epoll: bool) -> GatewayConfig {
    GatewayConfig {
        ws_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        pin_first_core: None,
        jwt_secret: SECRET.as_bytes().to_vec(),
        force_epoll: epoll,
        tick_ms: 20,
        ..GatewayConfig::default()
    }
}

fn start(cfg: GatewayConfig) -> GatewayHandle {
    Gateway::start(cfg).expect("gateway starts")
}

fn token(user: u64) -> String {
    jwt::sign(
        SECRET.as_bytes(),
        &jwt::Claims::new(user, im_shared::unix_ms() / 1000, 600),
    )
}

/// Connects `user`; returns the socket and the shard that took it.
fn connect(addr: SocketAddr, user: u64) -> (Ws, u16) {
    let (ws, resp) =
        tungstenite::connect(format!("ws://{addr}/ws?token={}", token(user))).expect("upgrade");
    let shard = resp.headers()["x-im-shard"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    (ws, shard)
}

/// Connects `user` until the kernel's SO_REUSEPORT hash lands it on `shard`.
fn connect_on(addr: SocketAddr, user: u64, shard: u16) -> Ws {
    for _ in 0..200 {
        let (ws, s) = connect(addr, user);
        if s == shard {
            return ws;
        }
    }
    panic!("never landed on shard {shard}");
}

fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("a frame before the timeout") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the server's close frame; its code.
fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return u16::from(f.code),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

#[test]
fn users_on_different_shards_exchange_messages_on_both_drivers() {
    for epoll in [false, true] {
        let gw = start(config(epoll));
        let addr = gw.local_addr();
        let uring = !epoll && gateway_core::driver::uring::available().is_ok();
        assert_eq!(gw.driver().name(), if uring { "io_uring" } else { "epoll" });
        let mut alice = connect_on(addr, 1, 0);
        let mut bob = connect_on(addr, 2, 1);
        std::thread::sleep(Duration::from_millis(50)); // directory updates cross shards
        for i in 0..20 {
            send(
                &mut alice,
                serde_json::json!({"type": "send", "cid": format!("a{i}"), "to": "2", "content": format!("hi {i}")}),
            );
        }
        for i in 0..20u64 {
            let sent = recv(&mut alice);
            assert_eq!(
                (sent["type"].as_str(), sent["cid"].as_str()),
                (Some("sent"), Some(format!("a{i}").as_str()))
            );
            let msg = recv(&mut bob);
            assert_eq!(msg["type"], "msg");
            assert_eq!(msg["seq"], i + 1);
            assert_eq!(msg["from"], "1");
            assert_eq!(msg["id"], sent["id"]);
        }
        send(
            &mut bob,
            serde_json::json!({"type": "send", "cid": "b", "to": 1, "content": "back"}),
        );
        assert_eq!(
            recv(&mut bob)["seq"],
            21,
            "one sequence per conversation, both directions"
        );
        assert_eq!(recv(&mut alice)["content"], "back");
        gw.shutdown();
        assert_eq!(
            close_code(&mut alice),
            1012,
            "graceful shutdown (a drain) closes with 1012"
        );
        gw.join().unwrap();
    }
}

#[test]
fn every_device_of_both_parties_gets_the_message_except_the_sending_one() {
    let gw = start(config(false));
    let addr = gw.local_addr();
    let mut alice_laptop = connect(addr, 10).0;
    let mut alice_phone = connect(addr, 10).0;
    let mut bob_devices: Vec<Ws> = (0..3).map(|_| connect(addr, 20).0).collect();
    std::thread::sleep(Duration::from_millis(50));
    send(
        &mut alice_laptop,
        serde_json::json!({"type": "send", "cid": "m1", "to": "20", "content": "to all"}),
    );
    assert_eq!(recv(&mut alice_laptop)["type"], "sent");
    assert_eq!(recv(&mut alice_phone)["content"], "to all");
    for b in &mut bob_devices {
        assert_eq!(recv(b)["content"], "to all");
    }
    // The sending device gets only its `sent`: the next frame it sees is the pong.
    send(&mut alice_laptop, serde_json::json!({"type": "ping"}));
    assert_eq!(recv(&mut alice_laptop)["type"], "pong");
}

#[test]
fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let gw = start(config(false));
    let addr = gw.local_addr();
    let expired = jwt::sign(SECRET.as_bytes(), &jwt::Claims::new(1, 1000, 1));
    let forged = jwt::sign(
        b"not-the-secret",
        &jwt::Claims::new(1, im_shared::unix_ms() / 1000, 60),
    );
    for url in [
        format!("ws://{addr}/ws"),
        format!("ws://{addr}/ws?token=garbage"),
        format!("ws://{addr}/ws?token={expired}"),
        format!("ws://{addr}/ws?token={forged}"),
    ] {
        match tungstenite::connect(url.as_str()) {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401, "{url}"),
            other => panic!("{url}: expected 401, got {:?}", other.map(|_| ())),
        }
    }
    // The bearer subprotocol works where a URL cannot carry the token (browsers' headers).
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/ws"))
            .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("bearer.{}", token(5)).parse().unwrap(),
    );
    let (_ws, resp) = tungstenite::connect(req).expect("bearer subprotocol accepted");
    assert!(resp.headers()["sec-websocket-protocol"]
        .to_str()
        .unwrap()
        .starts_with("bearer."));
}

#[test]
fn oversize_frame_is_closed_with_1009() {
    let gw = start(GatewayConfig {
        frame_bytes_max: 1024,
        ..config(false)
    });
    let (mut ws, _) = connect(gw.local_addr(), 1);
    ws.send(Message::text("x".repeat(2000))).unwrap();
    assert_eq!(close_code(&mut ws), 1009);
}

/// A WebSocket client on a raw socket, for frames a library will not send.
fn raw_connect(addr: SocketAddr, user: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(user)
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads server frames until a close frame; its code.
fn raw_close_code(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let mut pos = 0;
        while buf.len() >= pos + 2 {
            let (len, hl) = match buf[pos + 1] & 0x7F {
                126 if buf.len() >= pos + 4 => {
                    (u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize, 4)
                }
                127 if buf.len() >= pos + 10 => (
                    u64::from_be_bytes(buf[pos + 2..pos + 10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < pos + hl + len {
                break;
            }
            if buf[pos] & 0x0F == opcode::CLOSE {
                return u16::from_be_bytes([buf[pos + hl], buf[pos + hl + 1]]);
            }
            pos += hl + len;
        }
        buf.drain(..pos);
        let n = s.read(&mut chunk).expect("read before the timeout");
        assert!(n > 0, "EOF without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn invalid_utf8_is_closed_with_1007_and_unmasked_frames_with_1002() {
    let gw = start(config(false));
    let mut s = raw_connect(gw.local_addr(), 1);
    s.write_all(&codec::client_frame(
        true,
        opcode::TEXT,
        &[0xC3, 0x28],
        [7, 7, 7, 7],
    ))
    .unwrap();
    assert_eq!(raw_close_code(&mut s), 1007);

    let mut s = raw_connect(gw.local_addr(), 1);
    let mut unmasked = codec::client_frame(true, opcode::TEXT, b"{}", [0; 4]);
    unmasked[1] &= 0x7F;
    unmasked.drain(2..6); // no mask key either
    s.write_all(&unmasked).unwrap();
    assert_eq!(raw_close_code(&mut s), 1002);
}

#[test]
fn idle_connection_is_closed_by_the_timing_wheel() {
    let gw = start(GatewayConfig {
        heartbeat_timeout_ms: 300,
        ..config(false)
    });
    let (mut idle, _) = connect(gw.local_addr(), 1);
    let (mut alive, _) = connect(gw.local_addr(), 2);
    let t0 = Instant::now();
    // Keep one alive with application pings across several timeouts.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(100));
        send(&mut alive, serde_json::json!({"type": "ping"}));
        assert_eq!(recv(&mut alive)["type"], "pong");
    }
    assert_eq!(close_code(&mut idle), 1001);
    assert!(t0.elapsed() < Duration::from_secs(3));
    send(&mut alive, serde_json::json!({"type": "ping"}));
    assert_eq!(
        recv(&mut alive)["type"],
        "pong",
        "a live connection is untouched"
    );
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn a_reader_that_never_reads_is_closed_with_1013_and_memory_stays_bounded() {
    let outbound_max = 64 * 1024;
    let gw = start(GatewayConfig {
        outbound_bytes_max: outbound_max,
        ..config(false)
    });
    let addr = gw.local_addr();
    let mut stalled = raw_connect(addr, 2); // never reads until the gateway gives up on it
    let (mut sender, _) = connect(addr, 1);
    std::thread::sleep(Duration::from_millis(50));
    let content = "y".repeat(30_000);
    let mut max_arena = 0;
    let mut sent = 0;
    while metric(addr, "im_gateway_slow_consumer_closes_total") == 0 {
        assert!(
            sent < 2_000,
            "60 MB sent and the stalled reader was never cut off"
        );
        for _ in 0..20 {
            send(
                &mut sender,
                serde_json::json!({"type": "send", "cid": format!("c{sent}"), "to": "2", "content": content}),
            );
            assert_eq!(recv(&mut sender)["type"], "sent");
            sent += 1;
        }
        max_arena = max_arena.max(metric(addr, "im_gateway_arena_bytes"));
    }
    assert!(
        max_arena <= (outbound_max + 64 * 1024) as u64,
        "arena grew to {max_arena} bytes"
    );
    // Now it reads: everything the kernel buffered, then our close frame.
    assert_eq!(raw_close_code(&mut stalled), 1013);
    // The sender never noticed.
    send(&mut sender, serde_json::json!({"type": "ping"}));
    assert_eq!(recv(&mut sender)["type"], "pong");
}

#[test]
fn health_and_metrics_on_the_gateway_port() {
    let gw = start(config(true));
    let addr = gw.local_addr();
    let _held: Vec<Ws> = (0..3).map(|u| connect(addr, 3 + u).0).collect();
    std::thread::sleep(Duration::from_millis(50));
    // The gauge counts TCP connections, so the /metrics request itself may be among them.
    let conns = metric(addr, "im_gateway_connections");
    assert!((3..=4).contains(&conns), "{conns}");
    assert!(metric(addr, "im_gateway_handshakes_total") >= 1);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n"),
        "{text}"
    );
}

/// `--metrics-listen`: the counters move to their own address, and the WebSocket port no
/// longer shows them (404, JSON body).
#[test]
fn metrics_on_their_own_address_leave_the_public_port() {
    let gw = start(GatewayConfig {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(false)
    });
    let (addr, at) = (gw.local_addr(), gw.metrics_addr().expect("bound"));
    let _held = connect(addr, 9);
    std::thread::sleep(Duration::from_millis(50));
    assert!(metric(at, "im_gateway_handshakes_total") >= 1);
    let get = |to: SocketAddr, path: &str| {
        let mut s = TcpStream::connect(to).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let public = get(addr, "/metrics");
    assert!(
        public.starts_with("HTTP/1.1 404") && public.contains("\"code\":4040"),
        "{public}"
    );
    assert!(get(at, "/healthz").ends_with("ok\n"));
    assert!(get(at, "/ws").starts_with("HTTP/1.1 404"));
    assert!(
        get(addr, "/healthz").ends_with("ok\n"),
        "health stays public"
    );
}

#[test]
fn close_code_from_client_is_echoed() {
    let gw = start(config(false));
    let (mut ws, _) = connect(gw.local_addr(), 1);
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(f.code, CloseCode::Normal);
                break;
            }
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
}

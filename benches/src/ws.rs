//! The harness's WebSocket client: the upgrade over a tokio socket bound to a chosen source
//! address, masked frames out, a small reader for server frames. Kept minimal so that a client
//! process can hold ~19,000 connections cheaply.

use gateway_core::codec::{self, opcode};
use std::io;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection from `src` to `dst`. With port 0 the kernel picks the source port at
/// connect time; a caller holding many connections from one address passes explicit ports
/// instead, because the kernel's search for a free port grows with the ports in use
/// (measured: ~90 us of system time per connect at 15,000 connections from one address).
pub async fn tcp_connect(src: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if src.port() != 0 {
        // A port left in TIME_WAIT by an earlier run may be bound again.
        sock.set_reuseaddr(true)?;
    } else {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own. IP_BIND_ADDRESS_NO_PORT defers the port choice
        // to connect(), where the 4-tuple (not the source address alone) must be unique.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
    }
    sock.bind(src)?;
    let s = sock.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Error kinds the harness counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    Connect,
    Refused,
    HandshakeTimeout,
    ClosedByServer,
    Io,
}

/// Sends the upgrade request and reads the response head; on 101, the shard that took the
/// connection (from the gateway's `X-Im-Shard` header, when present).
pub async fn upgrade(
    s: &mut TcpStream,
    host: SocketAddr,
    token: &str,
) -> Result<Option<u16>, Failure> {
    let req = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|_| Failure::Io)?;
    let mut head = [0u8; 512];
    let mut n = 0;
    loop {
        let r = s.read(&mut head[n..]).await.map_err(|_| Failure::Io)?;
        if r == 0 {
            return Err(Failure::ClosedByServer);
        }
        n += r;
        if head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if n == head.len() {
            return Err(Failure::Refused);
        }
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(Failure::Refused);
    }
    let text = String::from_utf8_lossy(&head[..n]);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("X-Im-Shard: "))
        .and_then(|v| v.trim().parse().ok()))
}

/// A masked client frame (the mask need not be secret for a benchmark).
pub fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
    codec::client_frame(true, op, payload, [0x12, 0x34, 0x56, 0x78])
}

pub fn ping() -> Vec<u8> {
    frame(opcode::PING, b"")
}

/// Splits complete server frames off the front of `buf`; calls `f(opcode, payload)` for each.
pub fn drain_frames(buf: &mut Vec<u8>, f: impl FnMut(u8, &[u8])) {
    let used = frames_in(buf, f);
    buf.drain(..used);
}

/// Calls `f(opcode, payload)` for each complete server frame at the front of `buf`; returns
/// the bytes they took (the rest is the start of an incomplete frame).
pub fn frames_in(buf: &[u8], mut f: impl FnMut(u8, &[u8])) -> usize {
    let mut pos = 0;
    loop {
        let b = &buf[pos..];
        if b.len() < 2 {
            break;
        }
        let (len, hl) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if b.len() < hl + len {
            break;
        }
        f(b[0] & 0x0F, &b[hl..hl + len]);
        pos += hl + len;
    }
    pos
}

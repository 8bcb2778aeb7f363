//! The kernel's floor for fan-out: what a server spends when a delivery is nothing but one
//! `write` of a frame built once per message. One thread, no JSON, no pipeline, no tokens, no
//! per-connection queue: each client `send` frame is unmasked, re-framed once as a server
//! text frame, and written to every other connection in a plain loop (`try_write`). The
//! harness runs against it exactly as against the baseline (`im-bench fanout --baseline`
//! counts the echoed `send` frames), so the same sockets, message sizes and rates give
//! deliveries per CPU-second with nothing of ours in them. A write the socket cannot take
//! whole is counted as `short` and abandoned (the floor does not queue); a run with short
//! writes is not a floor and says so.

use gateway_core::{codec, handshake};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args)]
pub struct RawFanoutArgs {
    #[arg(long, default_value = "127.0.0.1:18098")]
    pub listen: SocketAddr,
    /// Largest client frame payload accepted.
    #[arg(long, default_value_t = 64 * 1024)]
    pub payload_max: usize,
}

type Conns = Rc<RefCell<Vec<Rc<TcpStream>>>>;

pub fn run(a: RawFanoutArgs) {
    let nofile = gateway_core::gateway::raise_nofile();
    crate::run_local(async move {
        let listener = TcpListener::bind(a.listen).await.expect("bind");
        eprintln!("raw-fanout on ws://{}/ws, open files {nofile}", a.listen);
        let conns: Conns = Rc::default();
        let short = Rc::new(Cell::new(0u64));
        // Runs until killed.
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let c = connection(sock, conns.clone(), short.clone(), a.payload_max);
                    tokio::task::spawn_local(c);
                }
                Err(e) => {
                    eprintln!("raw-fanout: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    });
}

/// Answers the upgrade, then reads frames; a `send` goes to every other connection.
async fn connection(mut sock: TcpStream, conns: Conns, short: Rc<Cell<u64>>, payload_max: usize) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let used = loop {
        let Ok(n) = sock.read(&mut chunk).await else {
            return;
        };
        if n == 0 || buf.len() + n > handshake::REQUEST_BYTES_MAX {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        match handshake::parse(&buf) {
            Ok(None) => continue,
            Ok(Some((handshake::Request::Upgrade { accept, .. }, used))) => {
                let reply = handshake::switching_protocols(&accept, None, 0);
                if sock.write_all(&reply).await.is_err() {
                    return;
                }
                break used;
            }
            Ok(Some(_)) | Err(_) => return,
        }
    };
    buf.drain(..used);
    let sock = Rc::new(sock);
    conns.borrow_mut().push(sock.clone());
    loop {
        while let Ok(Some(h)) = codec::parse_header(&buf, payload_max) {
            if buf.len() < h.frame_len() {
                break;
            }
            let payload = &mut buf[h.header_len..h.frame_len()];
            codec::unmask(payload, h.mask);
            if h.opcode == 0x1 && payload.starts_with(b"{\"type\":\"send\"") {
                let frame = codec::server_frame(0x1, payload);
                broadcast(&conns, &sock, &frame, &short);
            }
            buf.drain(..h.frame_len());
        }
        if sock.readable().await.is_err() {
            break;
        }
        match sock.try_read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    conns.borrow_mut().retain(|c| !Rc::ptr_eq(c, &sock));
}

/// One `write` per other connection.
fn broadcast(conns: &Conns, from: &Rc<TcpStream>, frame: &[u8], short: &Cell<u64>) {
    for c in conns.borrow().iter() {
        if Rc::ptr_eq(c, from) {
            continue;
        }
        if !c.try_write(frame).is_ok_and(|n| n == frame.len()) {
            short.set(short.get() + 1);
            if short.get().is_power_of_two() {
                eprintln!(
                    "raw-fanout: {} short writes: this run is not a floor",
                    short.get()
                );
            }
        }
    }
}

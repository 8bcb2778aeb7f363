//! The baseline every gateway figure is compared with: a straightforward tokio +
//! tokio-tungstenite WebSocket server, the way most Rust chat servers start out. One task per
//! connection, the connection split into a reader and a writer, a `broadcast` channel to every
//! connection, the same HS256 token check at the upgrade. Built only for benchmarks; run it
//! in the same session as the gateway and report ratios (benches/RESULTS.md).
//!
//! Protocol, the subset the harness uses: WebSocket Ping → Pong (tungstenite answers them),
//! `{"type":"ping"}` → `{"type":"pong"}`, and any `{"type":"send",...}` text is sent to every
//! other connection as one shared frame (the `fanout` comparison).

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct BaselineArgs {
    #[arg(long, default_value = "127.0.0.1:18099")]
    pub listen: SocketAddr,
    /// HS256 secret the tokens are checked with (as the gateway's --jwt-secret).
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// Runtime worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Messages a slow connection may fall behind by before it skips (broadcast capacity).
    #[arg(long, default_value_t = 1024)]
    pub backlog: usize,
    /// tungstenite's per-connection read buffer (its default is 128 KiB, allocated at the
    /// upgrade). Unset: the default, as a straightforward server runs it.
    #[arg(long)]
    pub read_buffer_bytes: Option<usize>,
}

pub fn run(a: BaselineArgs) {
    let nofile = gateway_core::gateway::raise_nofile();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if a.threads > 0 {
        rt.worker_threads(a.threads);
    }
    let rt = rt.enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = listen(a.listen).expect("bind the baseline's port");
        eprintln!(
            "baseline (tokio-tungstenite) on ws://{}/ws, open files {nofile}",
            a.listen
        );
        let (tx, _) = broadcast::channel::<Arc<str>>(a.backlog.max(1));
        let secret: Arc<[u8]> = a.secret.as_bytes().into();
        let mut config = WebSocketConfig::default();
        if let Some(n) = a.read_buffer_bytes {
            config = config.read_buffer_size(n).write_buffer_size(0);
        }
        loop {
            let (sock, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors: wait for some to close rather than spin.
                    eprintln!("baseline: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(connection(sock, tx.clone(), secret.clone(), config));
        }
    });
}

/// SO_REUSEPORT, so several baseline processes can share a port (as gateways do).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseport(true)?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

fn token_of(req: &Request) -> Option<&str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
}

async fn connection(
    sock: tokio::net::TcpStream,
    tx: broadcast::Sender<Arc<str>>,
    secret: Arc<[u8]>,
    config: WebSocketConfig,
) {
    let _ = sock.set_nodelay(true);
    // tungstenite's callback signature: its error type is the whole HTTP response.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let now = im_shared::unix_ms() / 1000;
        match token_of(req)
            .map(|t| im_shared::jwt::verify(&secret, t, now, im_shared::jwt::LIFETIME_MAX_S))
        {
            Some(Ok(_)) => Ok(resp),
            _ => {
                let mut e = ErrorResponse::new(Some("bad token".into()));
                *e.status_mut() = StatusCode::UNAUTHORIZED;
                Err(e)
            }
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(sock, check, Some(config)).await
    else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let mut rx = tx.subscribe();
    // Frames this connection broadcast itself, so it can skip them.
    let mut own: Option<Arc<str>> = None;
    loop {
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if t.contains("\"type\":\"ping\"") {
                        if sink.send(Message::text("{\"type\":\"pong\"}")).await.is_err() {
                            break;
                        }
                    } else if t.contains("\"type\":\"send\"") {
                        let frame: Arc<str> = Arc::from(t.as_str());
                        own = Some(frame.clone());
                        let _ = tx.send(frame);
                    }
                }
                // Pings are answered by tungstenite itself; binary and pongs are ignored.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            b = rx.recv() => match b {
                Ok(frame) => {
                    if own.as_ref().is_some_and(|o| Arc::ptr_eq(o, &frame)) {
                        continue;
                    }
                    if sink.send(Message::text(&*frame)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
}

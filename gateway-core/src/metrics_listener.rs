//! `--metrics-listen`: `/metrics` (and `/healthz`) on an address of their own, for operators
//! who keep them off the public WebSocket port (the shards then answer 404 there). A plain
//! blocking thread: a scrape every few seconds needs no event loop, and it never touches the
//! shards, only their atomic counters.

use crate::handshake;
use crate::metrics::{self, ShardStats};
use crate::shard::MetricsHook;
use im_shared::metrics::CONTENT_TYPE;
use im_shared::ErrorCode;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest request read; a scrape's is a few hundred bytes.
const REQUEST_BYTES_MAX: usize = 4096;
/// How long a scraper may take to send its request, or to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the accept loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

/// What the listener renders, and when it stops.
pub struct Source {
    pub gateway_id: String,
    pub stats: Arc<[ShardStats]>,
    pub driver: &'static str,
    pub hook: Option<MetricsHook>,
    pub stop: Arc<AtomicBool>,
}

/// Binds `addr` and serves on a thread of its own until `source.stop` is set; the bound
/// address.
pub fn start(addr: SocketAddr, source: Source) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("im-metrics".into())
        .spawn(move || serve(listener, source))?;
    log::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

fn serve(listener: TcpListener, source: Source) {
    while !source.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, &source) {
                    log::debug!("metrics listener: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(STOP_POLL),
            Err(e) => {
                log::warn!("metrics listener: accept: {e}");
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}

/// One request, one answer, then the connection closes.
fn answer(mut stream: TcpStream, source: &Source) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // One deadline for the whole request: a client trickling a byte at a time must not hold
    // the (only) thread for longer than that.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut buf = [0u8; REQUEST_BYTES_MAX];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let line = buf[..n].split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let reply = match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics")) => {
            let mut text = metrics::render(&source.gateway_id, &source.stats, source.driver);
            if let Some(hook) = &source.hook {
                hook(&mut text);
            }
            handshake::response(200, CONTENT_TYPE, text.as_bytes())
        }
        (Some(b"GET"), Some(b"/healthz")) => handshake::response(200, "text/plain", b"ok\n"),
        _ => handshake::json_error(
            404,
            ErrorCode::NotFound.code(),
            "this address serves GET /metrics and GET /healthz",
        ),
    };
    stream.write_all(&reply)
}

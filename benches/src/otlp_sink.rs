//! `im-bench otlp-sink`: an OTLP/HTTP collector that keeps nothing — it reads each export
//! request, counts its spans and answers 200 — so a run with tracing on (benches/tracing.sh)
//! pays for the export itself, not for a real collector's storage. Stops at SIGTERM, or after
//! `--secs`.

use clap::Args;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct OtlpSinkArgs {
    #[arg(long, default_value = "127.0.0.1:4318")]
    pub listen: SocketAddr,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize, Default)]
pub struct SinkResult {
    pub requests: u64,
    pub spans: u64,
    pub bytes: u64,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    spans: AtomicU64,
    bytes: AtomicU64,
}

/// Set by SIGTERM or SIGINT: the sink reports and exits.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn sink(a: OtlpSinkArgs) -> SinkResult {
    let l = TcpListener::bind(a.listen).expect("binding the sink");
    l.set_nonblocking(true).expect("nonblocking");
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let counts = Arc::new(Counts::default());
    let end = Instant::now() + Duration::from_secs(a.secs);
    while Instant::now() < end && !STOP.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let c = counts.clone();
                std::thread::spawn(move || serve(s, &c));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    SinkResult {
        requests: counts.requests.load(Ordering::Relaxed),
        spans: counts.spans.load(Ordering::Relaxed),
        bytes: counts.bytes.load(Ordering::Relaxed),
    }
}

/// Requests on one connection until it closes (the exporter sends one per connection).
fn serve(mut s: TcpStream, c: &Counts) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = &buf[end + 4..end + 4 + len];
        let spans = memchr::memmem::find_iter(body, b"\"spanId\"").count() as u64;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.spans.fetch_add(spans, Ordering::Relaxed);
        c.bytes.fetch_add(len as u64, Ordering::Relaxed);
        if s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        .is_err()
        {
            return;
        }
        buf.drain(..end + 4 + len);
    }
}

pub fn print(r: &SinkResult) {
    println!(
        "otlp-sink: {} requests, {} spans, {} bytes",
        r.requests, r.spans, r.bytes
    );
}

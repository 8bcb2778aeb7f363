//! REST figures for the logic service: `logins` (logins per second and latency, with the
//! server's argon2 cost), `history` (history page latency), and `seed-messages`, which prints
//! SQL for the `mysql` client to fill a database with N messages for `history`.

use crate::run_local;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A keep-alive HTTP/1.1 connection that sends one request at a time.
pub(crate) struct Http {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    pub(crate) async fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Http {
            s,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends a request; the status and body.
    pub(crate) async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.s.write_all(req.as_bytes()).await?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.s.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return Ok((status, self.buf[end + 4..end + 4 + len].to_vec()));
            }
            let n = self.s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One keep-alive connection per worker, opened on first use and again after an error.
struct Conns {
    addr: SocketAddr,
    slots: Vec<RefCell<Option<Http>>>,
}

impl Conns {
    fn new(addr: SocketAddr, workers: usize) -> Rc<Conns> {
        Rc::new(Conns {
            addr,
            slots: (0..workers).map(|_| RefCell::new(None)).collect(),
        })
    }

    /// Whether the request answered 200.
    async fn ok(
        &self,
        worker: usize,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> bool {
        // Take the connection out first: no RefCell borrow may live across an await.
        let cached = self.slots[worker].borrow_mut().take();
        let mut conn = match cached {
            Some(c) => c,
            None => match Http::connect(self.addr).await {
                Ok(c) => c,
                Err(_) => return false,
            },
        };
        match conn.request(method, path, token, body).await {
            Ok((status, _)) => {
                *self.slots[worker].borrow_mut() = Some(conn);
                status == 200
            }
            Err(_) => false,
        }
    }
}

#[derive(Serialize)]
pub struct LatencyResult {
    requests: u64,
    errors: u64,
    per_s: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    concurrency: usize,
    secs: u64,
}

/// Runs `concurrency` loops of `op` for `secs` seconds on one thread; latency of each call.
async fn drive<F, Fut>(concurrency: usize, secs: u64, op: F) -> LatencyResult
where
    F: Fn(usize, u64) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = bool>,
{
    let hist = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    let errors = Rc::new(RefCell::new(0u64));
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (hist, errors, op) = (hist.clone(), errors.clone(), op.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut i = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                let ok = op(worker, i).await;
                let us = t.elapsed().as_micros() as u64;
                if ok {
                    let _ = hist.borrow_mut().record(us.max(1));
                } else {
                    *errors.borrow_mut() += 1;
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = hist.borrow();
    let elapsed = start.elapsed().as_secs_f64();
    let errors = *errors.borrow();
    LatencyResult {
        requests: h.len(),
        errors,
        per_s: h.len() as f64 / elapsed,
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        concurrency,
        secs,
    }
}

#[derive(clap::Args)]
pub struct LoginsArgs {
    /// The logic service's REST address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Accounts to create (once) and log in with, round robin.
    #[arg(long, default_value_t = 20)]
    pub users: u32,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn logins(a: LoginsArgs) -> LatencyResult {
    run_local(async move {
        let mut h = Http::connect(a.addr)
            .await
            .expect("connect to the REST API");
        for u in 0..a.users {
            let body = format!(r#"{{"username":"bench{u}","password":"bench password"}}"#);
            // 201 the first time, 409 on a rerun: both leave the account in place.
            let (status, _) = h
                .request("POST", "/api/v1/users/register", None, &body)
                .await
                .expect("register");
            assert!(status == 201 || status == 409, "register answered {status}");
        }
        let users = a.users;
        let conns = Conns::new(a.addr, a.concurrency);
        drive(a.concurrency, a.secs, move |worker, i| {
            let conns = conns.clone();
            async move {
                let u = (worker as u64 * 7919 + i) % users as u64;
                let body = format!(r#"{{"username":"bench{u}","password":"bench password"}}"#);
                conns
                    .ok(worker, "POST", "/api/v1/auth/login", None, &body)
                    .await
            }
        })
        .await
    })
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// The service's JWT secret (the harness mints the reader's token).
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// Conversations seeded by `seed-messages` (p:1:2, p:3:4, …) and messages in each.
    #[arg(long, default_value_t = 1000)]
    pub convs: u64,
    #[arg(long, default_value_t = 1000)]
    pub per_conv: u64,
    /// Messages per page.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn history(a: HistoryArgs) -> LatencyResult {
    run_local(async move {
        let conns = Conns::new(a.addr, a.concurrency);
        let tokens: Rc<Vec<String>> = Rc::new(
            (0..a.convs)
                .map(|c| {
                    let claims =
                        im_shared::jwt::Claims::new(2 * c + 1, im_shared::unix_ms() / 1000, 3600);
                    im_shared::jwt::sign(a.secret.as_bytes(), &claims)
                })
                .collect(),
        );
        let (convs, per_conv, limit) = (a.convs, a.per_conv, a.limit);
        drive(a.concurrency, a.secs, move |worker, i| {
            let (conns, tokens) = (conns.clone(), tokens.clone());
            async move {
                // A pseudo-random conversation and page.
                let x = im_shared::conv::mix64(worker as u64 * 1_000_003 + i);
                let c = x % convs;
                let before = 1 + (x >> 20) % per_conv;
                let path = format!(
                    "/api/v1/messages/history?conv=p:{}:{}&before_seq={before}&limit={limit}",
                    2 * c + 1,
                    2 * c + 2
                );
                conns
                    .ok(worker, "GET", &path, Some(&tokens[c as usize]), "")
                    .await
            }
        })
        .await
    })
}

#[derive(clap::Args)]
pub struct SeedArgs {
    #[arg(long, default_value_t = 1000)]
    pub convs: u64,
    #[arg(long, default_value_t = 1000)]
    pub per_conv: u64,
    /// Bytes of content per message.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

/// Prints SQL that fills the logic schema with `convs × per_conv` messages between users
/// 2c+1 and 2c+2. Pipe it into `mysql DB` after `im logic` has migrated DB.
pub fn seed(a: SeedArgs) {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let content = "x".repeat(a.size);
    let _ = writeln!(out, "SET autocommit=0;");
    for c in 0..a.convs {
        let (u, v) = (2 * c + 1, 2 * c + 2);
        let conv = format!("p:{u}:{v}");
        let _ = writeln!(
            out,
            "INSERT IGNORE INTO conversations (conv, max_seq) VALUES ('{conv}', {});",
            a.per_conv
        );
        let _ = writeln!(out, "INSERT IGNORE INTO conversation_members (user_id, conv) VALUES ({u}, '{conv}'), ({v}, '{conv}');");
        let mut seq = 1;
        while seq <= a.per_conv {
            let _ = write!(out, "INSERT IGNORE INTO messages (id, conv, seq, sender_id, cid, to_user_id, content, content_type, ts_ms) VALUES ");
            let last = (seq + 499).min(a.per_conv);
            for s in seq..=last {
                let id = 1_000_000_000 + c * a.per_conv + s;
                let sep = if s == last { ";\n" } else { "," };
                let _ = write!(
                    out,
                    "({id},'{conv}',{s},{u},'c{s}',{v},'{content}','text',{id}){sep}"
                );
            }
            seq = last + 1;
        }
        if c % 50 == 49 {
            let _ = writeln!(out, "COMMIT;");
        }
    }
    let _ = writeln!(out, "COMMIT;");
}

pub fn print(what: &str, r: &LatencyResult) {
    println!(
        "{what}: {:.0}/s over {} s ({} requests, {} errors, concurrency {})  p50 {} us  p90 {} us  p99 {} us  max {} us",
        r.per_s, r.secs, r.requests, r.errors, r.concurrency, r.p50_us, r.p90_us, r.p99_us, r.max_us
    );
}

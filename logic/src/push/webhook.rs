//! The webhook push provider: each notification is an HTTP/1.1 POST of its JSON to the
//! operator's URL, signed so the receiver can tell it came from us and is fresh:
//!
//! ```text
//! X-Im-Timestamp: <Unix seconds>
//! X-Im-Signature: sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>
//! ```
//!
//! A 2xx answer is delivery; 408, 429 and 5xx, a refused or dropped connection and a timeout
//! may pass (retried); any other status is a refusal (dropped). Plain `http://` only: this
//! build has no TLS client, so an `https://` receiver is reached through a relay on the host
//! or inside the cluster (docs/PROTOCOL.md, "Offline push").

use super::{Notification, PushError, PushProvider};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One POST, connect to answer, at most.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The answer's head read, at most (the body is not read).
const HEAD_BYTES_MAX: usize = 4096;

pub struct Webhook {
    /// host:port to connect to, the Host header, and the path.
    addr: String,
    host: String,
    path: String,
    secret: Vec<u8>,
}

impl Webhook {
    /// `url`: `http://host[:port]/path`; `secret`: the HMAC key (at least 16 bytes).
    pub fn new(url: &str, secret: &[u8]) -> Result<Webhook, String> {
        let rest = match url.strip_prefix("http://") {
            Some(r) => r,
            None if url.starts_with("https://") => {
                return Err(format!(
                    "push webhook {}: https needs TLS, which this build does not have; \
                     point it at a relay (e.g. nginx) that forwards to it",
                    shown(url)
                ))
            }
            None => return Err(format!("push webhook {url}: not an http:// URL")),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        // The path goes into the request line as it is: printable ASCII, no fragment.
        if path
            .bytes()
            .any(|b| !(0x21..=0x7e).contains(&b) || b == b'#')
        {
            return Err(format!("push webhook {}: a bad path", shown(url)));
        }
        let addr = connect_addr(host)
            .ok_or_else(|| format!("push webhook {}: a bad host or port", shown(url)))?;
        if secret.len() < 16 {
            return Err("push webhook secret: at least 16 bytes".into());
        }
        Ok(Webhook {
            addr,
            host: host.to_string(),
            path: path.to_string(),
            secret: secret.to_vec(),
        })
    }

    /// The request bytes for `body` at `ts` (Unix seconds).
    fn request(&self, body: &[u8], ts: u64) -> Vec<u8> {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             X-Im-Timestamp: {ts}\r\nX-Im-Signature: sha256={}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            body.len(),
            signature(&self.secret, ts, body)
        )
        .into_bytes();
        head.extend_from_slice(body);
        head
    }

    /// The URL without its query, for logs (a query may carry a token).
    pub fn shown(&self) -> String {
        let path = self.path.split('?').next().unwrap_or("");
        format!("http://{}{path}", self.host)
    }

    async fn post(&self, req: &[u8]) -> Result<u16, String> {
        let mut s = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        s.write_all(req).await.map_err(|e| e.to_string())?;
        let mut head = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        let line_end = loop {
            if let Some(i) = head.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 || head.len() > HEAD_BYTES_MAX {
                return Err("no answer".into());
            }
            head.extend_from_slice(&chunk[..n]);
        };
        status_of(&head[..line_end]).ok_or_else(|| "not an HTTP answer".to_string())
    }
}

/// The status of a status line, `HTTP/1.x NNN reason`.
fn status_of(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?.get(2..)?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Where to connect for `host` (`name`, `name:port`, `[v6]`, `[v6]:port`; port 80 when
/// none), or `None` for one that is not well formed.
fn connect_addr(host: &str) -> Option<String> {
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p != 0);
    if let Some(v6) = host.strip_prefix('[') {
        let (inner, after) = v6.split_once(']')?;
        let ok = !inner.is_empty() && inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
        return match after {
            "" if ok => Some(format!("[{inner}]:80")),
            p if ok && p.strip_prefix(':').is_some_and(port_ok) => Some(host.to_string()),
            _ => None,
        };
    }
    let (name, port) = match host.split_once(':') {
        Some((n, p)) if port_ok(p) => (n, Some(p)),
        Some(_) => return None,
        None => (host, None),
    };
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if name.is_empty() || !name.chars().all(ok) {
        return None;
    }
    Some(format!("{name}:{}", port.unwrap_or("80")))
}

/// A URL for an error message: without its query.
fn shown(url: &str) -> &str {
    url.split('?').next().unwrap_or("")
}

/// `hex(HMAC-SHA256(secret, "<ts>.<body>"))`: what a receiver recomputes to check a request.
pub fn signature(secret: &[u8], ts: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[async_trait]
impl PushProvider for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn push(&self, n: &Notification) -> Result<(), PushError> {
        let body = serde_json::to_vec(n).expect("a notification serialises");
        let req = self.request(&body, im_shared::unix_ms() / 1000);
        match tokio::time::timeout(TIMEOUT, self.post(&req)).await {
            Err(_) => Err(PushError::Retry(format!("no answer in {TIMEOUT:?}"))),
            Ok(Err(e)) => Err(PushError::Retry(e)),
            Ok(Ok(code)) if (200..300).contains(&code) => Ok(()),
            Ok(Ok(code)) if code == 408 || code == 429 || code >= 500 => {
                Err(PushError::Retry(format!("HTTP {code}")))
            }
            Ok(Ok(code)) => Err(PushError::Permanent(format!("HTTP {code}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const SECRET: &[u8] = b"a-webhook-secret-of-32-bytes!!!!";

    #[test]
    fn urls_are_checked() {
        let refused = |url: &str, secret: &[u8]| Webhook::new(url, secret).err();
        assert!(refused("https://push.example/hook", SECRET).is_some_and(|e| e.contains("TLS")));
        for bad in [
            "ftp://x/",
            "http://a b/",
            "http://h/a b",
            "http://h/p#frag",
            "http://h:/",
            "http://h:99999/",
            "http://h:0/",
            "http://[::1/",
            "http://::1/",
        ] {
            assert!(refused(bad, SECRET).is_some(), "{bad}");
        }
        assert!(refused("http://h/", b"short").is_some());
        let w = Webhook::new("http://[::1]:8080/h?token=x", SECRET).unwrap();
        assert_eq!(w.addr, "[::1]:8080");
        assert_eq!(w.shown(), "http://[::1]:8080/h", "no query in logs");
        assert_eq!(status_of(b"HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 503"), Some(503));
        for bad in [
            &b"SIP/2.0 200 OK"[..],
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000 x",
            b"",
        ] {
            assert_eq!(status_of(bad), None);
        }
        let w = Webhook::new("http://127.0.0.1:9/hook?x=1", SECRET).unwrap();
        assert_eq!(
            (w.addr.as_str(), w.path.as_str()),
            ("127.0.0.1:9", "/hook?x=1")
        );
        let w = Webhook::new("http://push.internal", SECRET).unwrap();
        assert_eq!(
            (w.addr.as_str(), w.path.as_str()),
            ("push.internal:80", "/")
        );
    }

    /// A receiver that answers each request with the next status; it returns the requests.
    async fn receiver(statuses: Vec<u16>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            for status in statuses {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if buf.len() >= end + 4 + len || n == 0 {
                            break;
                        }
                    }
                }
                let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                s.write_all(answer.as_bytes()).await.unwrap();
                got.push(String::from_utf8(buf).unwrap());
            }
            got
        });
        (url, task)
    }

    fn note() -> Notification {
        Notification {
            user: 2,
            conv: "p:1:2".into(),
            from: 1,
            id: 99,
            seq: 4,
            ts: 1_700_000_000_000,
            preview: "hello".into(),
        }
    }

    #[tokio::test]
    async fn a_post_is_signed_and_its_answer_classified() {
        let (url, task) = receiver(vec![204, 503, 429, 400]).await;
        let w = Webhook::new(&url, SECRET).unwrap();
        assert_eq!(w.push(&note()).await, Ok(()));
        assert!(matches!(w.push(&note()).await, Err(PushError::Retry(_))));
        assert!(matches!(w.push(&note()).await, Err(PushError::Retry(_))));
        assert!(matches!(
            w.push(&note()).await,
            Err(PushError::Permanent(_))
        ));
        let got = task.await.unwrap();
        // What a receiver checks: the signature over "<timestamp>.<body>".
        let req = &got[0];
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        let header = |name: &str| {
            req.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .to_string()
        };
        let ts: u64 = header("X-Im-Timestamp: ").parse().unwrap();
        let body = req.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["user"].as_str(), v["preview"].as_str()),
            (Some("2"), Some("hello"))
        );
        assert_eq!(
            header("X-Im-Signature: "),
            format!("sha256={}", signature(SECRET, ts, body.as_bytes()))
        );
        assert_ne!(
            signature(b"another secret, 16+", ts, body.as_bytes()),
            signature(SECRET, ts, body.as_bytes())
        );
        // Nobody listening: may pass.
        let gone = Webhook::new("http://127.0.0.1:9/hook", SECRET).unwrap();
        assert!(matches!(gone.push(&note()).await, Err(PushError::Retry(_))));
    }
}

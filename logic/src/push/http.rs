//! The HTTP/1.1 client the push providers share: one POST per connection, `http://` or
//! `https://` (rustls, with the Mozilla roots of `webpki-roots`), the answer's status line
//! read and the rest left. Push services and webhooks answer with a status that says it all;
//! a client with a connection pool is the next step when one host takes thousands a second.

use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// One POST, connect to answer, at most.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The answer's head read, at most (the body is not read).
const HEAD_BYTES_MAX: usize = 4096;

/// A URL a POST can go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    /// As the URL gives it, for the `Host` header: `name`, `name:port`, `[v6]:port`.
    pub host: String,
    /// Where to connect: `host:port`, the port filled in.
    pub addr: String,
    /// The request target: the path and query.
    pub path: String,
}

impl Url {
    /// `http[s]://host[:port][/path]`; the path printable ASCII without a fragment.
    pub fn parse(url: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{}: not an http:// or https:// URL", shown(url)));
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        // The path goes into the request line as it is.
        if path
            .bytes()
            .any(|b| !(0x21..=0x7e).contains(&b) || b == b'#')
        {
            return Err(format!("{}: a bad path", shown(url)));
        }
        // Host names are case-insensitive, and a default port is no port: the origin
        // (VAPID's audience) is what push services compare, in its normal form.
        let mut host = host.to_ascii_lowercase();
        let addr = connect_addr(&host, if tls { "443" } else { "80" })
            .ok_or_else(|| format!("{}: a bad host or port", shown(url)))?;
        let default = if tls { ":443" } else { ":80" };
        if let Some(bare) = host.strip_suffix(default) {
            host = bare.to_string();
        }
        Ok(Url {
            tls,
            host,
            addr,
            path: path.to_string(),
        })
    }

    /// `scheme://host[:port]`: the origin (VAPID's audience), the host lowercased and a
    /// default port left out.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host
        )
    }

    /// The URL without its query, for logs (a query, or a push endpoint's path, may carry a
    /// token).
    pub fn shown(&self) -> String {
        let path = self.path.split('?').next().unwrap_or("");
        format!("{}{path}", self.origin())
    }

    /// The name the server's certificate must carry: the host without port or brackets.
    fn server_name(&self) -> Result<ServerName<'static>, String> {
        let name = match self.host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => self.host.split(':').next().unwrap_or(""),
        };
        ServerName::try_from(name.to_string()).map_err(|e| format!("{name}: {e}"))
    }
}

/// Where to connect for `host` (`name`, `name:port`, `[v6]`, `[v6]:port`; `default_port`
/// when none), or `None` for one that is not well formed.
fn connect_addr(host: &str, default_port: &str) -> Option<String> {
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p != 0);
    if let Some(v6) = host.strip_prefix('[') {
        let (inner, after) = v6.split_once(']')?;
        let ok = !inner.is_empty() && inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
        return match after {
            "" if ok => Some(format!("[{inner}]:{default_port}")),
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
    Some(format!("{name}:{}", port.unwrap_or(default_port)))
}

/// A URL for an error message: without its query.
pub fn shown(url: &str) -> &str {
    url.split('?').next().unwrap_or("")
}

/// The status of a status line, `HTTP/1.x NNN reason`.
pub fn status_of(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?.get(2..)?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Posts; cheap to clone (the TLS settings are shared).
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
}

impl Client {
    /// Trusting the Mozilla roots.
    pub fn new() -> Client {
        Client::with_roots(&[])
    }

    /// Trusting the Mozilla roots and `extra` (tests' own CA).
    pub fn with_roots(extra: &[CertificateDer<'static>]) -> Client {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for c in extra {
            roots.add(c.clone()).expect("a CA certificate");
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(ring_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Client {
            tls: TlsConnector::from(Arc::new(cfg)),
        }
    }

    /// POSTs `body` with `headers` (name, value) to `url`: the answer's status, or why there
    /// is none. Bounded by `TIMEOUT`.
    pub async fn post(
        &self,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<u16, String> {
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            url.path,
            url.host,
            body.len()
        );
        for (name, value) in headers {
            // Values are ours (signatures, keys, numbers); a line break would be a bug.
            debug_assert!(!value.contains(['\r', '\n']), "{name}");
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        let mut req = req.into_bytes();
        req.extend_from_slice(body);
        tokio::time::timeout(TIMEOUT, self.exchange(url, &req))
            .await
            .unwrap_or_else(|_| Err(format!("no answer in {TIMEOUT:?}")))
    }

    async fn exchange(&self, url: &Url, req: &[u8]) -> Result<u16, String> {
        let tcp = TcpStream::connect(&url.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", url.addr))?;
        let _ = tcp.set_nodelay(true);
        if !url.tls {
            return send(tcp, req).await;
        }
        let tls = self
            .tls
            .connect(url.server_name()?, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", url.host))?;
        send(tls, req).await
    }
}

/// rustls on ring. rustls 0.23.48 deprecates it for lacking post-quantum key exchange, which
/// only aws-lc-rs has; that needs cmake and a much longer C build, for POSTs of push
/// notifications whose content is end-to-end encrypted (Web Push) or signed (webhooks).
#[allow(deprecated)]
pub(crate) fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &[u8]) -> Result<u16, String> {
    s.write_all(req).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls_are_checked() {
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
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        let u = Url::parse("http://[::1]:8080/h?token=x").unwrap();
        assert_eq!(u.addr, "[::1]:8080");
        assert_eq!(u.shown(), "http://[::1]:8080/h", "no query in logs");
        let u = Url::parse("http://127.0.0.1:9/hook?x=1").unwrap();
        assert_eq!(
            (u.addr.as_str(), u.path.as_str()),
            ("127.0.0.1:9", "/hook?x=1")
        );
        let u = Url::parse("http://push.internal").unwrap();
        assert_eq!(
            (u.addr.as_str(), u.path.as_str()),
            ("push.internal:80", "/")
        );
        let u = Url::parse("https://fcm.googleapis.com/fcm/send/abc").unwrap();
        assert!(u.tls);
        assert_eq!(u.addr, "fcm.googleapis.com:443");
        assert_eq!(u.origin(), "https://fcm.googleapis.com");
        assert!(u.server_name().is_ok());
        let u = Url::parse("https://FCM.GoogleAPIs.com:443/fcm/send/abc").unwrap();
        assert_eq!(
            u.origin(),
            "https://fcm.googleapis.com",
            "the origin in normal form"
        );
        assert_eq!(u.addr, "fcm.googleapis.com:443");
        let u = Url::parse("https://[::1]:8443/x").unwrap();
        assert_eq!(u.server_name().unwrap().to_str(), "::1");
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
    }

    /// A request as a receiver got it.
    #[derive(Debug, Clone)]
    pub(crate) struct Got {
        pub head: String,
        pub body: Vec<u8>,
    }

    impl Got {
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|l| {
                let (n, v) = l.split_once(": ")?;
                n.eq_ignore_ascii_case(name).then_some(v)
            })
        }
    }

    /// Reads one request (head and `Content-Length` body) and answers `status`.
    pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, status: u16) -> Got {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let got = loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf[..end].to_vec()).unwrap();
                let got = Got {
                    head,
                    body: Vec::new(),
                };
                let len: usize = got.header("Content-Length").unwrap().parse().unwrap();
                if buf.len() >= end + 4 + len {
                    break Got {
                        body: buf[end + 4..end + 4 + len].to_vec(),
                        ..got
                    };
                }
            }
            assert!(n > 0, "the request ended early");
        };
        let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        s.write_all(answer.as_bytes()).await.unwrap();
        let _ = s.shutdown().await;
        got
    }

    /// A receiver that answers each request with the next status; it returns the requests.
    /// With `tls`, it speaks TLS with the test CA's certificate for 127.0.0.1.
    pub(crate) async fn receiver(
        statuses: Vec<u16>,
        tls: bool,
    ) -> (String, tokio::task::JoinHandle<Vec<Got>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{}/hook", l.local_addr().unwrap());
        let acceptor = tls.then(test_tls::acceptor);
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            for status in statuses {
                let (s, _) = l.accept().await.unwrap();
                got.push(match &acceptor {
                    Some(a) => answer(a.accept(s).await.unwrap(), status).await,
                    None => answer(s, status).await,
                });
            }
            got
        });
        (url, task)
    }

    /// A CA and a certificate it signed for 127.0.0.1 (`testdata/`, made by
    /// `testdata/make.sh`; valid until 2125).
    pub(crate) mod test_tls {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::sync::Arc;

        pub(crate) fn ca() -> CertificateDer<'static> {
            CertificateDer::from(include_bytes!("testdata/ca.der").to_vec())
        }

        pub(crate) fn acceptor() -> tokio_rustls::TlsAcceptor {
            let cert = CertificateDer::from(include_bytes!("testdata/server.der").to_vec());
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                include_bytes!("testdata/server.key.der").to_vec(),
            ));
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                super::super::ring_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        }
    }

    #[tokio::test]
    async fn a_post_over_tls_is_answered_and_an_unknown_ca_refused() {
        let (url, task) = receiver(vec![201], true).await;
        let url = Url::parse(&url).unwrap();
        let trusting = Client::with_roots(&[test_tls::ca()]);
        let status = trusting
            .post(&url, &[("TTL", "60")], b"sealed")
            .await
            .unwrap();
        assert_eq!(status, 201);
        let got = task.await.unwrap();
        assert_eq!(got[0].body, b"sealed");
        assert_eq!(got[0].header("ttl"), Some("60"));
        assert!(got[0].head.starts_with("POST /hook HTTP/1.1\r\n"));
        // The Mozilla roots alone do not know the test CA.
        let (url, _task) = receiver(vec![201], true).await;
        let err = Client::new()
            .post(&Url::parse(&url).unwrap(), &[], b"x")
            .await
            .unwrap_err();
        assert!(err.contains("TLS"), "{err}");
    }
}

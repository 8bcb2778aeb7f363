//! The HTTP/1.1 side of the gateway port: the WebSocket upgrade (RFC 6455 §4) with its token,
//! and the two plain GETs operators need (`/healthz`, `/metrics`). Sans-I/O: bytes in, a
//! decision out; the shard writes the response.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha1::{Digest, Sha1};
use std::borrow::Cow;

/// Largest upgrade request we read; past it the connection gets 431 and is closed.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
const HEADERS_MAX: usize = 32;
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Upgrade {
        /// `Sec-WebSocket-Accept` value to answer with.
        accept: String,
        /// From `?token=` or a `bearer.<JWT>` subprotocol; `None` when neither was given.
        token: Option<Cow<'a, str>>,
        /// The subprotocol to echo (browsers fail the connection unless we pick an offered one).
        protocol: Option<&'a str>,
    },
    /// A plain GET of a path other than the WebSocket endpoint.
    Get { path: &'a str },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// HTTP status and a short reason for the body.
    Status(u16, &'static str),
}

/// Parses the request at the front of `buf`. `Ok(None)`: incomplete. `Ok(Some((req, n)))`: the
/// request took `n` bytes; anything after it is the client's first frames.
pub fn parse(buf: &[u8]) -> Result<Option<(Request<'_>, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= REQUEST_BYTES_MAX => {
            return Err(Refusal::Status(431, "request header too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::Status(431, "too many headers"))
        }
        Err(_) => return Err(Refusal::Status(400, "malformed HTTP request")),
    };
    if req.method != Some("GET") {
        return Err(Refusal::Status(405, "only GET is served on this port"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/ws" {
        return Ok(Some((Request::Get { path }, n)));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &str, tok: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(tok)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Refusal::Status(426, "a WebSocket upgrade is required"));
    }
    if header("sec-websocket-version") != Some(b"13") {
        return Err(Refusal::Status(426, "Sec-WebSocket-Version must be 13"));
    }
    let key =
        header("sec-websocket-key").ok_or(Refusal::Status(400, "missing Sec-WebSocket-Key"))?;
    let mut raw = [0u8; 32];
    if B64.decode_slice(key, &mut raw).ok() != Some(16) {
        return Err(Refusal::Status(
            400,
            "Sec-WebSocket-Key is not 16 bytes of base64",
        ));
    }
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    let accept = B64.encode(sha.finalize());

    let mut token = query_param(query, "token");
    let mut protocol = None;
    // Protocol offers borrow from `buf`, not from the parser's header array, so they outlive it.
    if let Some(offers) = header("sec-websocket-protocol").and_then(|v| std::str::from_utf8(v).ok())
    {
        let offers: &str = rebase(buf, offers);
        if let Some(bearer) = offers
            .split(',')
            .map(str::trim)
            .find(|p| p.starts_with("bearer."))
        {
            protocol = Some(bearer);
            if token.is_none() {
                token = Some(Cow::Borrowed(&bearer["bearer.".len()..]));
            }
        } else {
            protocol = offers.split(',').map(str::trim).find(|p| !p.is_empty());
        }
    }
    Ok(Some((
        Request::Upgrade {
            accept,
            token,
            protocol,
        },
        n,
    )))
}

/// `s` points into `buf` (httparse hands out sub-slices of it); give it `buf`'s lifetime.
fn rebase<'b>(buf: &'b [u8], s: &str) -> &'b str {
    let start = s.as_ptr() as usize - buf.as_ptr() as usize;
    std::str::from_utf8(&buf[start..start + s.len()]).expect("was UTF-8 already")
}

/// The value of `name` in a query string, percent-decoded.
fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
    if !raw.contains('%') && !raw.contains('+') {
        return Some(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The 101 answer.
pub fn switching_protocols(accept: &str, protocol: Option<&str>, shard: u16) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nX-Im-Shard: {shard}\r\n"
    );
    if let Some(p) = protocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A complete HTTP response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 426 {
        r.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A JSON error body in the REST error shape (`{"code", "message"}`).
pub fn json_error(status: u16, code: u16, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    response(status, "application/json", body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade(extra: &str, path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn rfc_example_accept_key_and_query_token() {
        let req = upgrade("", "/ws?x=1&token=abc.def.ghi");
        let (r, n) = parse(req.as_bytes()).unwrap().unwrap();
        assert_eq!(n, req.len());
        assert_eq!(
            r,
            Request::Upgrade {
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
                token: Some(Cow::Borrowed("abc.def.ghi")),
                protocol: None
            }
        );
    }

    #[test]
    fn bearer_subprotocol_carries_the_token_and_is_echoed() {
        let req = upgrade("Sec-WebSocket-Protocol: chat, bearer.t.o.k\r\n", "/ws");
        let Request::Upgrade {
            token, protocol, ..
        } = parse(req.as_bytes()).unwrap().unwrap().0
        else {
            panic!()
        };
        assert_eq!(token.as_deref(), Some("t.o.k"));
        assert_eq!(protocol, Some("bearer.t.o.k"));
    }

    #[test]
    fn percent_encoded_token() {
        let req = upgrade("", "/ws?token=a%2Eb");
        let Request::Upgrade { token, .. } = parse(req.as_bytes()).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(token.as_deref(), Some("a.b"));
    }

    #[test]
    fn partial_then_complete_with_trailing_frame_bytes() {
        let req = upgrade("", "/ws?token=t");
        assert_eq!(parse(&req.as_bytes()[..20]), Ok(None));
        let mut with_frame = req.clone().into_bytes();
        with_frame.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        assert_eq!(parse(&with_frame).unwrap().unwrap().1, req.len());
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse(b"POST /ws HTTP/1.1\r\n\r\n"),
            Err(Refusal::Status(405, "only GET is served on this port"))
        );
        assert!(matches!(
            parse(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(Refusal::Status(426, _))
        ));
        let bad_key = upgrade("", "/ws").replace(KEY, "short");
        assert!(matches!(
            parse(bad_key.as_bytes()),
            Err(Refusal::Status(400, _))
        ));
        assert!(matches!(
            parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(Refusal::Status(400, _))
        ));
        let huge = format!("GET /ws HTTP/1.1\r\nX: {}", "a".repeat(REQUEST_BYTES_MAX));
        assert!(matches!(
            parse(huge.as_bytes()),
            Err(Refusal::Status(431, _))
        ));
    }

    #[test]
    fn plain_gets() {
        let (r, _) = parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r, Request::Get { path: "/metrics" });
    }
}

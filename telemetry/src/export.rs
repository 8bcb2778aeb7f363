//! The exporter thread: batches finished spans and POSTs them to the collector as OTLP/HTTP
//! with the JSON encoding (`ExportTraceServiceRequest`, opentelemetry-proto's JSON mapping:
//! ids in hex, 64-bit integers as strings).
//!
//! Plain `http://` only, on purpose: the collector this points at is the host's own agent
//! (an OpenTelemetry Collector beside the gateway, the usual deployment), which batches
//! further and speaks TLS to whatever backend stores the traces. That keeps TLS out of the
//! gateway process and this exporter a blocking loop on one thread.

use crate::{Finished, Msg, Stats, Value};
use im_shared::metrics::count_rarely;
use im_shared::trace::hex_to;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spans per request, and how long a span waits for a batch to fill.
const BATCH_MAX: usize = 512;
const INTERVAL: Duration = Duration::from_secs(1);
/// How long a request may take (connect, write, answer): a collector that hangs costs the
/// batch, not the queue behind it for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The part of an answer read (the status line and headers; the body is not needed).
const ANSWER_MAX: usize = 16 * 1024;

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port`, as connected to and sent in `Host`.
    pub authority: String,
    /// The request path: the endpoint's path + `/v1/traces`.
    pub path: String,
}

impl Target {
    pub fn shown(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// `http://host[:port][/prefix]` → where to POST (port 4318, OTLP/HTTP's, when none).
pub fn parse_endpoint(endpoint: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("--otlp-endpoint {endpoint:?}: {why}");
    let rest = match endpoint.strip_prefix("http://") {
        Some(r) => r,
        None if endpoint.starts_with("https://") => {
            return Err(bad(
                "https is not exported directly: point this at the host's OpenTelemetry Collector over http (it forwards with TLS)",
            ))
        }
        None => return Err(bad("expected http://host:port")),
    };
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(['@', ' ', '?', '#']) {
        return Err(bad("expected http://host:port"));
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:4318")
    };
    let path = if prefix.ends_with("/v1/traces") {
        prefix.to_string()
    } else {
        format!("{prefix}/v1/traces")
    };
    Ok(Target { authority, path })
}

pub(crate) fn run(
    rx: Receiver<Msg>,
    target: Target,
    service: String,
    instance: String,
    stats: Arc<Stats>,
) {
    let mut batch: Vec<Finished> = Vec::with_capacity(BATCH_MAX);
    let mut due = Instant::now() + INTERVAL;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        let flushed = match rx.recv_timeout(wait) {
            Ok(Msg::Span(s)) => {
                batch.push(s);
                if batch.len() < BATCH_MAX {
                    continue;
                }
                None
            }
            Ok(Msg::Flush(ack)) => Some(ack),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                export(&target, &service, &instance, &mut batch, &stats);
                return;
            }
        };
        export(&target, &service, &instance, &mut batch, &stats);
        due = Instant::now() + INTERVAL;
        if let Some(ack) = flushed {
            let _ = ack.try_send(());
        }
    }
}

fn export(
    target: &Target,
    service: &str,
    instance: &str,
    batch: &mut Vec<Finished>,
    stats: &Stats,
) {
    if batch.is_empty() {
        return;
    }
    let body = encode(batch, service, instance);
    let n = batch.len() as u64;
    batch.clear();
    match post(target, body.as_bytes()) {
        Ok(status) if (200..300).contains(&status) => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
        }
        outcome => {
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            if let Some(k) = count_rarely(&stats.export_failures) {
                let why = match outcome {
                    Ok(status) => format!("answered {status}"),
                    Err(e) => e,
                };
                log::warn!(
                    "tracing: exporting {n} spans to {} failed ({why}); {k} failures so far",
                    target.shown()
                );
            }
        }
    }
}

/// One POST on a connection of its own; the answer's status.
pub(crate) fn post(target: &Target, body: &[u8]) -> Result<u16, String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    // Each address in turn (`localhost` may name ::1 first and the collector listen on
    // 127.0.0.1 only).
    let mut s = None;
    let mut why = format!("{} has no address", target.authority);
    let addrs = target
        .authority
        .to_socket_addrs()
        .map_err(|e| format!("resolving {}: {e}", target.authority))?;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()) {
            Ok(c) => {
                s = Some(c);
                break;
            }
            Err(e) => why = format!("connecting to {addr}: {e}"),
        }
    }
    let mut s = s.ok_or(why)?;
    s.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.path,
        target.authority,
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("sending: {e}"))?;
    let mut answer = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        s.set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 || answer.len() + n > ANSWER_MAX {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    status_of(&answer).ok_or_else(|| "no HTTP status in the answer".to_string())
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    let mut parts = line.split(|b| *b == b' ');
    if !parts.next()?.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.trim().parse().ok()
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding.
pub(crate) fn encode(spans: &[Finished], service: &str, instance: &str) -> String {
    let mut o = String::with_capacity(256 + spans.len() * 400);
    o.push_str(r#"{"resourceSpans":[{"resource":{"attributes":["#);
    attr(&mut o, "service.name", &Value::Str(service.into()));
    o.push(',');
    attr(&mut o, "service.instance.id", &Value::Str(instance.into()));
    o.push_str(r#"]},"scopeSpans":[{"scope":{"name":"im","version":""#);
    o.push_str(env!("CARGO_PKG_VERSION"));
    o.push_str(r#""},"spans":["#);
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str(r#"{"traceId":""#);
        hex(&mut o, &s.trace_id);
        o.push_str(r#"","spanId":""#);
        hex(&mut o, &s.span_id);
        o.push('"');
        if let Some(p) = &s.parent {
            o.push_str(r#","parentSpanId":""#);
            hex(&mut o, p);
            o.push('"');
        }
        let _ = write!(
            o,
            r#","name":{},"kind":{},"startTimeUnixNano":"{}","endTimeUnixNano":"{}","attributes":["#,
            json_str(s.name),
            s.kind as u8,
            s.start_ns,
            s.end_ns
        );
        for (j, (k, v)) in s.attrs.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            attr(&mut o, k, v);
        }
        o.push(']');
        if s.error {
            // STATUS_CODE_ERROR
            o.push_str(r#","status":{"code":2}"#);
        }
        o.push('}');
    }
    o.push_str("]}]}]}");
    o
}

fn attr(o: &mut String, key: &str, v: &Value) {
    let _ = write!(o, r#"{{"key":{},"value":"#, json_str(key));
    let _ = match v {
        Value::Str(s) => write!(o, r#"{{"stringValue":{}}}"#, json_str(s)),
        Value::Int(i) => write!(o, r#"{{"intValue":"{i}"}}"#),
        Value::Bool(b) => write!(o, r#"{{"boolValue":{b}}}"#),
        Value::F64(f) if f.is_finite() => write!(o, r#"{{"doubleValue":{f}}}"#),
        Value::F64(f) => write!(o, r#"{{"stringValue":"{f}"}}"#),
    };
    o.push('}');
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn hex(o: &mut String, bytes: &[u8]) {
    let mut buf = [0u8; 32];
    let out = &mut buf[..bytes.len() * 2];
    hex_to(bytes, out);
    o.push_str(std::str::from_utf8(out).unwrap_or_default());
}

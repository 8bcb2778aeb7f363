use super::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::Receiver;

/// A tracer of its own whose finished spans land in the returned receiver.
fn tracer() -> (tracing::Dispatch, Receiver<Msg>, Arc<Stats>) {
    let (tx, rx) = mpsc::sync_channel(16);
    let stats = Arc::new(Stats::default());
    let d = tracing::Dispatch::new(Tracer::new(tx, stats.clone()));
    (d, rx, stats)
}

fn finished(rx: &Receiver<Msg>) -> Finished {
    match rx.try_recv() {
        Ok(Msg::Span(s)) => s,
        _ => panic!("a finished span expected"),
    }
}

#[test]
fn spans_join_the_trace_their_traceparent_names_and_end_with_their_last_handle() {
    let (d, rx, _) = tracer();
    tracing::dispatcher::with_default(&d, || {
        let root = tracing::info_span!(target: TARGET, parent: None, "im.send", otel.kind = "producer", conv = "p:1:2");
        let ctx = context(&root).expect("a recorded span has a context");
        assert!(ctx.is_sampled());
        let tp = ctx.to_string();
        let child = tracing::info_span!(target: TARGET, parent: None, "im.sequence", traceparent = %tp, seq = 7u64);
        let child_ctx = context(&child).unwrap();
        assert_eq!(child_ctx.trace_id, ctx.trace_id, "one trace");
        assert_ne!(child_ctx.span_id, ctx.span_id);
        // Another subsystem's span, and a span of ours under another target: not recorded.
        let other = tracing::info_span!(target: "sqlx::query", "query");
        assert!(context(&other).is_none());

        let held = child.clone();
        drop(child);
        assert!(rx.try_recv().is_err(), "a handle is still held");
        drop(held);
        let s = finished(&rx);
        assert_eq!(
            (s.name, s.parent, s.trace_id),
            ("im.sequence", Some(ctx.span_id), ctx.trace_id)
        );
        assert_eq!(s.attrs, [("seq", Value::Int(7))]);
        assert!(s.end_ns >= s.start_ns);
        drop(root);
        let r = finished(&rx);
        assert_eq!(
            (r.name, r.parent, r.kind),
            ("im.send", None, Kind::Producer)
        );
        assert_eq!(r.attrs, [("conv", Value::Str("p:1:2".into()))]);
    });
}

#[test]
fn a_malformed_traceparent_starts_a_trace_of_its_own_and_a_full_queue_counts_what_it_loses() {
    let (tx, rx) = mpsc::sync_channel(1);
    let stats = Arc::new(Stats::default());
    let d = tracing::Dispatch::new(Tracer::new(tx, stats.clone()));
    tracing::dispatcher::with_default(&d, || {
        let a = tracing::info_span!(target: TARGET, parent: None, "a", traceparent = "nonsense", otel.status_code = "error");
        let b = tracing::info_span!(target: TARGET, parent: None, "b");
        drop(a);
        drop(b);
    });
    let a = finished(&rx);
    assert_eq!((a.parent, a.error), (None, true));
    assert_ne!(a.trace_id, [0; 16]);
    assert_eq!(
        stats.dropped.load(Ordering::Relaxed),
        1,
        "b found the queue full"
    );
}

#[test]
fn endpoints_name_a_collector_over_http() {
    let t = parse_endpoint("http://127.0.0.1:4318").unwrap();
    assert_eq!(
        (t.authority.as_str(), t.path.as_str()),
        ("127.0.0.1:4318", "/v1/traces")
    );
    let t = parse_endpoint("http://collector/otlp/").unwrap();
    assert_eq!(
        (t.authority.as_str(), t.path.as_str()),
        ("collector:4318", "/otlp/v1/traces")
    );
    let t = parse_endpoint("http://[::1]:9/v1/traces").unwrap();
    assert_eq!(
        (t.authority.as_str(), t.path.as_str()),
        ("[::1]:9", "/v1/traces")
    );
    assert_eq!(
        parse_endpoint("http://[::1]").unwrap().authority,
        "[::1]:4318"
    );
    for bad in ["https://c:4318", "c:4318", "http://", "http://u@c:1"] {
        assert!(parse_endpoint(bad).is_err(), "{bad}");
    }
}

#[test]
fn sampling_follows_the_ratio() {
    assert_eq!(threshold(0.0), 0);
    assert_eq!(threshold(1.0), u64::MAX);
    let t = threshold(0.25);
    let hits = (0..40_000).filter(|_| next_random() <= t).count();
    assert!((8_000..12_000).contains(&hits), "{hits} of 40000 at 0.25");
}

fn span(name: &'static str) -> Finished {
    Finished {
        trace_id: [0xab; 16],
        span_id: [0x01; 8],
        parent: Some([0x02; 8]),
        name,
        kind: Kind::Consumer,
        start_ns: 1_700_000_000_000_000_000,
        end_ns: 1_700_000_000_000_500_000,
        attrs: vec![
            ("conv", Value::Str("g:\"9\"".into())),
            ("seq", Value::Int(3)),
            ("retry", Value::Bool(false)),
        ],
        error: true,
    }
}

#[test]
fn the_request_is_otlp_json() {
    let body = export::encode(&[span("im.deliver")], "im-gateway", "gw-1");
    let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
    let rs = &v["resourceSpans"][0];
    assert_eq!(rs["resource"]["attributes"][0]["key"], "service.name");
    assert_eq!(
        rs["resource"]["attributes"][0]["value"]["stringValue"],
        "im-gateway"
    );
    assert_eq!(
        rs["resource"]["attributes"][1]["value"]["stringValue"],
        "gw-1"
    );
    let s = &rs["scopeSpans"][0]["spans"][0];
    assert_eq!(s["traceId"], "ab".repeat(16));
    assert_eq!(s["spanId"], "01".repeat(8));
    assert_eq!(s["parentSpanId"], "02".repeat(8));
    assert_eq!(s["name"], "im.deliver");
    assert_eq!(s["kind"], 5);
    assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
    assert_eq!(s["endTimeUnixNano"], "1700000000000500000");
    assert_eq!(s["attributes"][0]["value"]["stringValue"], "g:\"9\"");
    assert_eq!(s["attributes"][1]["value"]["intValue"], "3");
    assert_eq!(s["attributes"][2]["value"]["boolValue"], false);
    assert_eq!(s["status"]["code"], 2);
}

/// Answers one request with `status`; returns the request line and the body.
fn collector(status: u16) -> (String, std::thread::JoinHandle<(String, Vec<u8>)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            if got.len() >= end + 4 + len {
                let body = got[end + 4..end + 4 + len].to_vec();
                write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}").unwrap();
                return (head.lines().next().unwrap().to_string(), body);
            }
        }
    });
    (addr, h)
}

#[test]
fn the_exporter_posts_batches_and_counts_what_the_collector_refuses() {
    for (status, exported, dropped) in [(200, 2, 0), (503, 0, 2)] {
        let (addr, got) = collector(status);
        let (tx, rx) = mpsc::sync_channel(16);
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        let target = parse_endpoint(&format!("http://{addr}")).unwrap();
        let exporter = std::thread::spawn(move || {
            export::run(rx, target, "im-logic".into(), "logic-1".into(), s)
        });
        tx.send(Msg::Span(span("im.route"))).unwrap();
        tx.send(Msg::Span(span("im.durable"))).unwrap();
        let (ack, done) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(ack)).unwrap();
        done.recv_timeout(Duration::from_secs(10)).expect("flushed");
        let (line, body) = got.join().unwrap();
        assert_eq!(line, "POST /v1/traces HTTP/1.1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let spans = v["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(stats.exported.load(Ordering::Relaxed), exported);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), dropped);
        drop(tx);
        exporter.join().unwrap();
    }
}

/// Records what reaches the `log` crate (installed once for this test binary).
struct Logged(std::sync::Mutex<Vec<String>>);

impl log::Log for Logged {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {} {}", r.level(), r.target(), r.args());
            self.0.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

static LOGGED: Logged = Logged(std::sync::Mutex::new(Vec::new()));

#[test]
fn other_crates_events_still_reach_the_log_with_the_tracer_installed() {
    let _ = log::set_logger(&LOGGED);
    log::set_max_level(log::LevelFilter::Trace);
    let (d, rx, _) = tracer();
    tracing::dispatcher::with_default(&d, || {
        // As sqlx reports a slow statement; and an info event the log's filter leaves out.
        tracing::warn!(target: "sqlx::query", elapsed_ms = 1200u64, "slow statement");
        tracing::info!(target: "sqlx::query", "not logged");
    });
    let lines = LOGGED.0.lock().unwrap().clone();
    assert_eq!(lines, ["WARN sqlx::query slow statement elapsed_ms=1200"]);
    assert!(rx.try_recv().is_err(), "events are not spans to export");
}

#[test]
fn a_field_recorded_again_replaces_its_value() {
    let (d, rx, _) = tracer();
    tracing::dispatcher::with_default(&d, || {
        let s = tracing::info_span!(target: TARGET, parent: None, "x", im.outcome = tracing::field::Empty, big = u64::MAX);
        s.record("im.outcome", "first");
        s.record("im.outcome", "second");
    });
    let s = finished(&rx);
    assert_eq!(
        s.attrs,
        [
            ("big", Value::Str(u64::MAX.to_string())),
            ("im.outcome", Value::Str("second".into()))
        ]
    );
}

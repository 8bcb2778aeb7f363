//! Frame codec micro-benchmarks: header parse + unmask of client frames, and encoding a server
//! `msg` frame the way a shard does for fan-out.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway_core::codec::{self, opcode};
use im_shared::conv::Conv;
use im_shared::protocol::{self, Message, Target};
use std::hint::black_box;

fn parse_and_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("client frame parse+unmask");
    for size in [100usize, 1024, 16 * 1024] {
        let frame = codec::client_frame(true, opcode::TEXT, &vec![b'a'; size], [1, 2, 3, 4]);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("{size} B"), |b| {
            let mut buf = frame.clone();
            b.iter(|| {
                let h = codec::parse_header(black_box(&buf), 64 * 1024)
                    .unwrap()
                    .unwrap();
                codec::unmask(&mut buf[h.header_len..], h.mask);
                black_box(h.payload_len)
            })
        });
    }
    g.finish();
}

fn encode_msg(c: &mut Criterion) {
    let m = Message {
        id: 7_000_000_000_000_000_001,
        conv: Conv::Pair(12345, 67890),
        seq: 42,
        from: 12345,
        to: Target::User(67890),
        content: "x".repeat(100),
        content_type: "text".into(),
        ts: 1_800_000_000_000,
    };
    let mut out = Vec::with_capacity(512);
    c.bench_function("encode msg frame (100 B content)", |b| {
        b.iter(|| {
            out.clear();
            out.resize(codec::SERVER_HEADER_MAX, 0);
            protocol::encode_msg(black_box(&m), &mut out);
            let len = out.len() - codec::SERVER_HEADER_MAX;
            let hl = codec::server_header_len(len);
            codec::write_server_header(
                opcode::TEXT,
                len,
                &mut out[codec::SERVER_HEADER_MAX - hl..codec::SERVER_HEADER_MAX],
            );
            black_box(out.len())
        })
    });
    let text = r#"{"type":"send","cid":"c-123456","to":"67890","content":"hello there, this is a short chat message"}"#;
    c.bench_function("parse send request", |b| {
        b.iter(|| black_box(protocol::parse_request(black_box(text)).is_ok()))
    });
}

criterion_group!(benches, parse_and_unmask, encode_msg);
criterion_main!(benches);

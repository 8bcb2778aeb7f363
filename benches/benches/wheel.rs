//! Timing wheel micro-benchmarks: arm/cancel cost, and a heartbeat sweep over 100k timers.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gateway_core::wheel::Wheel;
use std::hint::black_box;

fn insert_cancel(c: &mut Criterion) {
    let mut w = Wheel::new(4096, 100_000);
    for id in 0..100_000u32 {
        w.insert(id, 1 + id % 900);
    }
    let mut id = 0u32;
    c.bench_function("re-arm one of 100k timers", |b| {
        b.iter(|| {
            id = (id + 7919) % 100_000;
            w.insert(black_box(id), 1 + (id * 31) % 900);
        })
    });
    c.bench_function("cancel + insert", |b| {
        b.iter(|| {
            id = (id + 7919) % 100_000;
            w.cancel(black_box(id));
            w.insert(id, 1 + (id * 17) % 900);
        })
    });
}

fn sweep(c: &mut Criterion) {
    c.bench_function("advance 900 ticks firing 100k timers", |b| {
        b.iter_batched(
            || {
                let mut w = Wheel::new(4096, 100_000);
                for id in 0..100_000u32 {
                    w.insert(id, 1 + id % 900);
                }
                (w, Vec::with_capacity(100_000))
            },
            |(mut w, mut out)| {
                w.advance(900, &mut out);
                black_box(out.len())
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, insert_cancel, sweep);
criterion_main!(benches);

//! Snowflake id micro-benchmarks: the cost of one id within a millisecond (the common case
//! under load), across millisecond changes, and with the clock read included.

use criterion::{criterion_group, criterion_main, Criterion};
use im_shared::snowflake::Snowflake;
use std::hint::black_box;

fn ids(c: &mut Criterion) {
    let mut s = Snowflake::new(7);
    let now = im_shared::unix_ms();
    c.bench_function("next id, same millisecond", |b| {
        // 4,096 ids a millisecond: past that the generator borrows the next one, so this also
        // covers the rollover path every 4,096 ids.
        b.iter(|| s.next(black_box(now)))
    });
    let mut ms = now;
    c.bench_function("next id, a new millisecond each time", |b| {
        b.iter(|| {
            ms += 1;
            s.next(black_box(ms))
        })
    });
    c.bench_function("next id with the clock read", |b| {
        b.iter(|| s.next(im_shared::unix_ms()))
    });
}

criterion_group!(benches, ids);
criterion_main!(benches);

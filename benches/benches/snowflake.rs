//! Snowflake id micro-benchmarks: the cost of one id within a millisecond (the common case
//! under load), across millisecond changes, and with the clock read included.

use criterion::{criterion_group, criterion_main, Criterion};
use im_shared::snowflake::Snowflake;
use std::hint::black_box;

fn ids(c: &mut Criterion) {
    let mut s = Snowflake::new(7);
    let now = im_shared::unix_ms();
    c.bench_function("next id, same millisecond", |b| {
        // 4,096 ids a millisecond: past that the generator borrows the next one, up to
        // BORROW_MS_MAX, and then refuses (`next` would wait for the clock, which is the
        // format's rate limit, not the generator's cost): a refusal starts a fresh generator,
        // once every ~45,000 ids.
        b.iter(|| match s.try_next(black_box(now)) {
            Ok(id) => id,
            Err(_) => {
                s = Snowflake::new(7);
                0
            }
        })
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

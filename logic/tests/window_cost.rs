//! What logic's retry window costs per entry when full, and after it has turned over
//! (logic/src/stage/state.rs), measured with this test binary's allocator (glibc malloc, which
//! `malloc_bytes` reads) in a process of its own: the measurement is process-wide, so no other
//! test may allocate meanwhile. One partition's 200,000 answers to 400 senders in 200
//! conversations, cids as clients make them.

use logic::stage::state::{Ack, Partition, SENT_MAX};

#[test]
fn a_window_entry_costs_about_110_bytes_and_keeps_it() {
    let Some((before, _)) = im_shared::metrics::malloc_bytes() else {
        return; // not glibc: nothing to measure with
    };
    let mut p = Partition::new(1, 0);
    let n = SENT_MAX as u64;
    // The i-th send: 400 senders in pairs, a new cid each.
    let send = |p: &mut Partition, i: u64| {
        let sender = 10_000_000 + i % 400;
        let conv = format!("p:{}:{}", sender - sender % 2, sender - sender % 2 + 1);
        let seq = p.next_seq(&conv, None);
        let ack = Ack {
            id: i << 22,
            conv,
            seq,
            ts: 1_700_000_000_000 + i,
        };
        p.remember(sender, &format!("c-{sender}-{i}"), ack);
    };
    for i in 0..n {
        send(&mut p, i);
    }
    let (full, _) = im_shared::metrics::malloc_bytes().unwrap();
    // Turned over twice more: the same conversations, new cids.
    for i in n..3 * n {
        send(&mut p, i);
    }
    let (after, _) = im_shared::metrics::malloc_bytes().unwrap();
    let per = full.saturating_sub(before) as f64 / n as f64;
    let turned = after.saturating_sub(before) as f64 / n as f64;
    eprintln!("retry window: {per:.1} bytes per entry full, {turned:.1} after turning over");
    assert!(per < 120.0, "{per:.1} bytes per entry");
    assert!(turned < per * 1.1, "{per:.1} → {turned:.1} bytes per entry");
    let last = format!("c-10000399-{}", 3 * n - 1);
    assert_eq!(p.ack(10_000_399, &last).map(|a| a.seq), Some(3000));
    assert!(
        p.ack(10_000_399, "c-10000399-199999").is_none(),
        "turned out"
    );
    assert_eq!(
        p.ack(10_000_399, &last).map(|a| a.conv),
        Some("p:10000398:10000399".to_string())
    );
}

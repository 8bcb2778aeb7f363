//! The in-process bus against what its callers rely on.

use super::*;
use crate::send_acked;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

async fn next(c: &mut Box<dyn Consumer>) -> Record {
    tokio::time::timeout(Duration::from_secs(1), c.recv())
        .await
        .expect("a record within 1 s")
        .expect("no error")
}

async fn nothing(c: &mut Box<dyn Consumer>) {
    assert!(
        tokio::time::timeout(Duration::from_millis(20), c.recv())
            .await
            .is_err(),
        "no record expected"
    );
}

#[test]
fn keyed_records_keep_their_order_and_partition() {
    rt().block_on(async {
        let bus = MemoryBus::new(4, 1 << 20);
        bus.ensure_topics(&[("t", 4)]).await.unwrap();
        let p = bus.producer(0, 0).unwrap();
        for i in 0..20 {
            p.send("t", None, "conv-7", format!("{i}").as_bytes(), None)
                .unwrap();
        }
        let mut c = bus.group_consumer("g", "t").unwrap();
        assert_eq!(
            c.take_rebalances(),
            vec![Rebalance::Assigned {
                partitions: vec![0, 1, 2, 3],
                generation: 1
            }]
        );
        let first = next(&mut c).await;
        assert_eq!(first.offset, 0);
        for i in 1..20 {
            let r = next(&mut c).await;
            assert_eq!(r.partition, first.partition);
            assert_eq!((r.offset, r.payload), (i, format!("{i}").into_bytes()));
        }
        nothing(&mut c).await;
    });
}

#[test]
fn acknowledged_only_after_the_group_commits_and_replayed_after_a_restart() {
    rt().block_on(async {
        let bus = MemoryBus::new(1, 1 << 20).ack_after_commit("m", "persist");
        bus.ensure_topics(&[("m", 1)]).await.unwrap();
        let p = bus.producer(0, 0).unwrap();
        let p2 = p.clone();
        let acked = tokio::spawn(async move { send_acked(&*p2, "m", Some(0), "k", b"a").await });
        tokio::task::yield_now().await;
        assert_eq!(p.in_flight(), 1);
        assert!(!acked.is_finished());
        let mut c = bus.group_consumer("persist", "m").unwrap();
        assert!(
            bus.group_consumer("persist", "m").is_err(),
            "one member per group"
        );
        assert_eq!(next(&mut c).await.payload, b"a");
        // Read but not committed: not acknowledged, and a new member reads it again.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!acked.is_finished());
        drop(c);
        let mut c = bus.group_consumer("persist", "m").unwrap();
        let r = next(&mut c).await;
        assert_eq!((r.offset, &r.payload[..]), (0, &b"a"[..]));
        c.commit(&[(0, 1)], true).unwrap();
        assert_eq!(acked.await.unwrap(), Ok(()));
        assert_eq!(p.in_flight(), 0);
        assert_eq!(bus.committed("persist", "m", 0).await.unwrap(), Some(1));
        assert_eq!(
            bus.watermarks("m", 0).await.unwrap(),
            (1, 1),
            "trimmed once committed"
        );
    });
}

#[test]
fn a_full_partition_refuses_until_its_readers_catch_up() {
    rt().block_on(async {
        let bus = MemoryBus::new(1, 10);
        bus.ensure_topics(&[("d", 1)]).await.unwrap();
        let p = bus.producer(0, 0).unwrap();
        // Nobody reads yet: kept for a reader to come.
        p.send("d", None, "k", b"0123456789", None).unwrap();
        assert_eq!(bus.held_bytes("d"), 10);
        let mut c = bus
            .partition_consumer("d", &[(0, Start::End)])
            .await
            .unwrap();
        p.send("d", None, "k", b"0123456789", None).unwrap();
        assert_eq!(
            p.send("d", None, "k", b"x", None),
            Err(SendError::QueueFull)
        );
        assert_eq!(next(&mut c).await.offset, 1);
        p.send("d", None, "k", b"x", None).unwrap();
        assert_eq!(next(&mut c).await.payload, b"x");
        assert!(c.commit(&[(0, 3)], true).is_err(), "no group, no commit");
        drop(c);
        p.send("d", None, "k", b"y", None).unwrap();
        assert_eq!(bus.held_bytes("d"), 2, "x and y, for a reader to come");
        // Full with nobody reading: the oldest go, as retention would drop them.
        p.send("d", None, "k", b"abcdefghi", None).unwrap();
        assert_eq!(bus.held_bytes("d"), 10);
        assert_eq!(bus.watermarks("d", 0).await.unwrap(), (3, 5));
        // A topic acknowledged after commit keeps everything for its group.
        let acked = MemoryBus::new(1, 10).ack_after_commit("m", "persist");
        acked.ensure_topics(&[("m", 1)]).await.unwrap();
        let p = acked.producer(0, 0).unwrap();
        p.send("m", None, "k", b"0123456789", None).unwrap();
        assert_eq!(
            p.send("m", None, "k", b"x", None),
            Err(SendError::QueueFull)
        );
    });
}

#[test]
fn a_partition_consumer_starts_where_told_and_wakes_on_appends() {
    rt().block_on(async {
        let bus = MemoryBus::new(2, 1 << 20);
        bus.ensure_topics(&[("t", 2)]).await.unwrap();
        let mut g = bus.group_consumer("g", "t").unwrap();
        let p = bus.producer(0, 0).unwrap();
        for i in 0..3u8 {
            p.send("t", Some(1), "", &[i], None).unwrap();
        }
        let mut tail = bus
            .partition_consumer("t", &[(1, Start::Offset(1))])
            .await
            .unwrap();
        assert_eq!(next(&mut tail).await.payload, [1]);
        assert_eq!(next(&mut tail).await.payload, [2]);
        let bus2 = bus.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let p = bus2.producer(0, 0).unwrap();
            p.send("t", Some(1), "", &[3], None).unwrap();
        });
        assert_eq!(next(&mut tail).await.payload, [3]);
        late.await.unwrap();
        for _ in 0..4 {
            next(&mut g).await;
        }
        assert_eq!(
            bus.watermarks("t", 1).await.unwrap(),
            (0, 4),
            "uncommitted: kept"
        );
        g.commit(&[(1, 4)], true).unwrap();
        drop(tail);
        p.send("t", Some(1), "", &[4], None).unwrap();
        assert_eq!(bus.watermarks("t", 1).await.unwrap().0, 4);
        assert!(p.send("nope", None, "", b"", None).is_err());
    });
}

#[test]
fn a_trace_context_travels_with_its_record_only() {
    rt().block_on(async {
        let bus = MemoryBus::new(1, 1 << 20);
        bus.ensure_topics(&[("t", 1)]).await.unwrap();
        let p = bus.producer(0, 0).unwrap();
        let t = TraceParent::sampled([7; 16], [9; 8]).unwrap();
        p.send_traced("t", None, "k", b"traced", Some(&t), None)
            .unwrap();
        p.send("t", None, "k", b"plain", None).unwrap();
        let mut c = bus
            .partition_consumer("t", &[(0, Start::Offset(0))])
            .await
            .unwrap();
        let (a, b) = (next(&mut c).await, next(&mut c).await);
        assert_eq!((a.payload.as_slice(), a.trace), (&b"traced"[..], Some(t)));
        assert_eq!((b.payload.as_slice(), b.trace), (&b"plain"[..], None));
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    });
}

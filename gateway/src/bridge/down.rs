//! The down thread: this gateway's downstream topic → the shard rings.

use super::order::{LiveOrder, CAP};
use super::trace::{self, Roots};
use super::{frame, BridgeStats};
use gateway_core::arena::Frame;
use gateway_core::bridge::DownEnd;
use gateway_core::msg::{conn_ref, home_shard, ConnRef, ShardMsg};
use im_bus::Consumer;
use im_shared::records::{self, DownstreamBody, Versioned};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the down thread waits for room in a shard ring before dropping a frame (the
/// client's sync recovers it); meanwhile the bus holds the rest.
const RING_WAIT: Duration = Duration::from_secs(1);
/// How long one poll of the bus may take, so a stop is noticed in time.
const POLL: Duration = Duration::from_millis(100);
/// The pause after a consume error, and between looks at a full ring.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
const RING_RETRY: Duration = Duration::from_micros(200);

pub(super) fn run(
    rt: tokio::runtime::Runtime,
    mut consumer: Box<dyn Consumer>,
    down: Arc<Mutex<DownEnd>>,
    stop: Arc<AtomicBool>,
    stats: Arc<BridgeStats>,
    roots: Arc<Roots>,
) {
    let mut order = LiveOrder::new(CAP);
    while !stop.load(Ordering::Acquire) {
        let Ok(next) = rt.block_on(async { tokio::time::timeout(POLL, consumer.recv()).await })
        else {
            continue;
        };
        let m = match next {
            Ok(m) => m,
            Err(e) => {
                log::warn!("bridge: downstream consume error: {e}");
                std::thread::sleep(ERROR_PAUSE);
                continue;
            }
        };
        stats
            .downstream_records_total
            .fetch_add(1, Ordering::Relaxed);
        if let Some(ts) = m.timestamp_ms {
            let age = (im_shared::unix_ms() as i64).saturating_sub(ts).max(0) as u64;
            stats.downstream_age.observe(age);
        }
        match records::Downstream::from_bytes(&m.payload) {
            Ok(rec) => {
                // Held while the record goes to the shard rings.
                let _span = match &m.trace {
                    Some(t) if t.is_sampled() && im_telemetry::on() => {
                        Some(traced(&rec, t, &roots))
                    }
                    _ => None,
                };
                dispatch(
                    rec,
                    &mut down.lock().expect("not poisoned"),
                    &mut order,
                    &stats,
                )
            }
            Err(e) => {
                stats
                    .downstream_bad_records_total
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "bridge: skipping downstream record at offset {}: {e}",
                    m.offset
                );
            }
        }
    }
}

/// A traced record: its `im.deliver` span, and the end of its trace's root if it answers a
/// send this gateway started.
fn traced(
    rec: &records::Downstream,
    t: &im_shared::trace::TraceParent,
    roots: &Roots,
) -> tracing::Span {
    match &rec.body {
        Some(DownstreamBody::Deliver(d)) => trace::deliver(t, "deliver", d.users.len()),
        Some(DownstreamBody::Reply(r)) => {
            roots.answered(t, error_code(&r.json).is_some());
            trace::deliver(t, "reply", 1)
        }
        _ => trace::deliver(t, "other", 0),
    }
}

/// Puts one downstream record on the shard rings.
fn dispatch(rec: records::Downstream, d: &mut DownEnd, order: &mut LiveOrder, stats: &BridgeStats) {
    let shards = d.shards();
    // A connection of this process, or none (a record for a shard this process lacks).
    let conn = |token: u64| {
        Some(conn_ref(token)).filter(|c| *c != ConnRef::NONE && (c.shard as usize) < shards)
    };
    match rec.body {
        Some(DownstreamBody::Deliver(del)) if !order.admit(&del.conv, del.seq) => {
            stats
                .downstream_out_of_order_total
                .fetch_add(1, Ordering::Relaxed);
        }
        Some(DownstreamBody::Deliver(del)) => {
            // One frame, shared by every recipient on every shard, and one ring entry per
            // home shard listing its users (not one per user: a shard then takes many group
            // messages a turn, and a member's frames leave in one send).
            let f = frame(&del.json);
            let except = conn_ref(del.except_conn);
            if shards == 1 {
                fan_out(d, 0, del.users, f, except, stats);
            } else {
                let mut by_home = vec![Vec::new(); shards];
                for user in del.users {
                    by_home[home_shard(user, shards) as usize].push(user);
                }
                for (home, users) in by_home.into_iter().enumerate() {
                    fan_out(d, home as u16, users, f.clone(), except, stats);
                }
            }
        }
        Some(DownstreamBody::Reply(r)) => {
            if let Some(code) = error_code(&r.json) {
                stats.error_replies.count(code);
            }
            if let Some(to) = conn(r.conn) {
                let frame = frame(&r.json);
                push(d, to.shard, ShardMsg::Reply { to, frame }, stats);
            }
        }
        Some(DownstreamBody::Close(c)) => {
            if let Some(to) = conn(c.conn) {
                push(d, to.shard, ShardMsg::Kick { to }, stats);
            }
        }
        None => {}
    }
    d.flush();
}

/// The code of an `error` frame (`{"type":"error","code":N,...}`, as `protocol::encode_error`
/// writes it), without parsing the rest; `None` for any other frame.
fn error_code(json: &[u8]) -> Option<im_shared::ErrorCode> {
    let rest = json.strip_prefix(br#"{"type":"error","code":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    im_shared::ErrorCode::from_code(n)
}

/// `frame` to `users`, all of whose home is `shard`.
fn fan_out(
    d: &mut DownEnd,
    shard: u16,
    users: Vec<u64>,
    frame: Frame,
    except: ConnRef,
    stats: &BridgeStats,
) {
    let msg = match users[..] {
        [] => return,
        [user] => ShardMsg::Fanout {
            user,
            frame,
            except,
        },
        _ => ShardMsg::FanoutMany {
            users: users.into_boxed_slice(),
            frame,
            except,
        },
    };
    push(d, shard, msg, stats);
}

/// Puts `msg` on a shard ring, waiting (bounded) while the shard catches up.
fn push(d: &mut DownEnd, shard: u16, mut msg: ShardMsg, stats: &BridgeStats) {
    let deadline = Instant::now() + RING_WAIT;
    loop {
        match d.send(shard, msg) {
            Ok(()) => return,
            Err(m) if Instant::now() < deadline => {
                msg = m;
                d.flush();
                std::thread::sleep(RING_RETRY);
            }
            Err(m) => {
                stats
                    .downstream_dropped_total
                    .fetch_add(m.weight() as u64, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_code;
    use im_shared::{protocol, ErrorCode};

    #[test]
    fn error_answers_are_told_by_their_code() {
        for code in ErrorCode::ALL {
            let mut json = Vec::new();
            protocol::encode_error(code, "why", Some("c1"), &mut json);
            assert_eq!(
                error_code(&json),
                Some(code),
                "{}",
                String::from_utf8_lossy(&json)
            );
        }
        let mut sent = Vec::new();
        let conv = im_shared::Conv::pair(1, 2).unwrap();
        protocol::encode_sent("c1", 9, conv, 1, 1, &mut sent);
        assert_eq!(error_code(&sent), None);
        assert_eq!(error_code(br#"{"type":"error","code":9999}"#), None);
    }
}

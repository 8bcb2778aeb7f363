//! Read positions, told: when a user's read position moves, their other devices get a `read`
//! event (their unread counts follow) and, in a two-person conversation, the peer gets a
//! `receipt` (✓✓ up to that seq). Best effort, like live delivery: a device that misses one
//! finds the positions in `GET /conversations` (`read_seq`, `peer_read_seq`).
//!
//! Shared by the stage (a WebSocket `read`) and the REST API (`PUT /conversations/{conv}`),
//! which send the records their own ways.

use im_bus::presence::Presence;
use im_shared::protocol;
use im_shared::records::{Deliver, DownstreamBody};
use im_shared::Conv;

/// The device that read, when it is a WebSocket connection: it is not told its own read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reader<'a> {
    pub gateway: &'a str,
    pub conn: u64,
}

/// A stored read position, to tell.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reading<'a> {
    pub user: u64,
    pub reader: Option<Reader<'a>>,
    pub conv: Conv,
    pub seq: u64,
    /// Whether a two-person conversation's peer gets a receipt (not when either blocks the
    /// other).
    pub peer_told: bool,
}

/// Tells `r.user`'s other devices and the peer that they read `r.conv` up to `r.seq`; `send`
/// queues one downstream record (gateway, key, body).
pub(crate) async fn tell_read(
    presence: &dyn Presence,
    send: impl Fn(&str, &str, DownstreamBody),
    r: Reading<'_>,
) {
    let Reading {
        user,
        reader,
        conv,
        seq,
        peer_told,
    } = r;
    if seq == 0 {
        return;
    }
    // Only devices other than the reading one: most users have one, and then nothing is
    // sent.
    match presence.connections(user).await {
        Ok(conns) => {
            let mut json = Vec::with_capacity(64);
            protocol::encode_read_event(conv, seq, &mut json);
            let reading =
                |gw: &str, conn: u64| reader.is_some_and(|r| r.gateway == gw && r.conn == conn);
            let mut gateways: Vec<&str> = conns
                .iter()
                .filter(|c| !reading(&c.gateway, c.conn))
                .map(|c| c.gateway.as_str())
                .collect();
            gateways.sort_unstable();
            gateways.dedup();
            for gw in gateways {
                let except_conn = match reader {
                    Some(r) if r.gateway == gw => r.conn,
                    _ => 0,
                };
                let body = DownstreamBody::Deliver(Deliver {
                    users: vec![user],
                    json: json.clone(),
                    except_conn,
                    ..Default::default()
                });
                send(gw, &user.to_string(), body);
            }
        }
        Err(e) => log::debug!("logic: no read event for user {user}: {e}"),
    }
    let Conv::Pair(a, b) = conv else { return };
    if !peer_told {
        return;
    }
    let peer = if a == user { b } else { a };
    match presence.gateways(&[peer]).await {
        Ok(online) => {
            let mut json = Vec::with_capacity(80);
            protocol::encode_receipt(conv, user, seq, &mut json);
            for gw in online.get(&peer).into_iter().flatten() {
                let body = DownstreamBody::Deliver(Deliver {
                    users: vec![peer],
                    json: json.clone(),
                    except_conn: 0,
                    ..Default::default()
                });
                send(gw, &peer.to_string(), body);
            }
        }
        Err(e) => log::debug!("logic: no receipt for user {peer}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_bus::presence::{Change, MemoryPresence};
    use std::sync::Mutex;

    fn online(user: u64, conn: u64) -> Change {
        Change::Online {
            user,
            conn,
            jti: "j".into(),
            device: None,
        }
    }

    /// What `tell_read` sends: (gateway, users, json, except_conn) in order.
    async fn told(
        p: &MemoryPresence,
        user: u64,
        reader: Option<Reader<'_>>,
        conv: Conv,
        seq: u64,
    ) -> Vec<(String, Vec<u64>, String, u64)> {
        let out = Mutex::new(Vec::new());
        let r = Reading {
            user,
            reader,
            conv,
            seq,
            peer_told: true,
        };
        tell_read(
            p,
            |gw, _key, body| {
                let DownstreamBody::Deliver(d) = body else {
                    panic!("a delivery")
                };
                let json = String::from_utf8(d.json).unwrap();
                out.lock()
                    .unwrap()
                    .push((gw.to_owned(), d.users, json, d.except_conn));
            },
            r,
        )
        .await;
        out.into_inner().unwrap()
    }

    #[tokio::test]
    async fn other_devices_and_the_peer_are_told_the_reading_one_is_not() {
        let p = MemoryPresence::default();
        p.apply("gw-a", &[online(1, 10), online(2, 20)])
            .await
            .unwrap();
        let reader = Some(Reader {
            gateway: "gw-a",
            conn: 10,
        });
        let pair = Conv::Pair(1, 2);
        // One device, the reading one: only the peer hears of it.
        assert_eq!(
            told(&p, 1, reader, pair, 7).await,
            [(
                "gw-a".to_owned(),
                vec![2],
                r#"{"type":"receipt","conv":"p:1:2","from":"1","seq":7}"#.to_owned(),
                0
            )]
        );
        // A second device on another gateway, and a third beside the reading one.
        p.apply("gw-b", &[online(1, 11)]).await.unwrap();
        p.apply("gw-a", &[online(1, 12)]).await.unwrap();
        let read = r#"{"type":"read","conv":"p:1:2","seq":8}"#.to_owned();
        let sent = told(&p, 1, reader, pair, 8).await;
        assert_eq!(
            sent[..2],
            [
                ("gw-a".to_owned(), vec![1], read.clone(), 10),
                ("gw-b".to_owned(), vec![1], read.clone(), 0),
            ]
        );
        assert_eq!(sent.len(), 3, "and the receipt");
        // A group: no receipts; REST (no reading connection): every device.
        let sent = told(&p, 1, None, Conv::Group(5), 3).await;
        let gws: Vec<(&str, u64)> = sent.iter().map(|s| (s.0.as_str(), s.3)).collect();
        assert_eq!(gws, [("gw-a", 0), ("gw-b", 0)]);
        assert!(told(&p, 1, None, pair, 0).await.is_empty(), "nothing read");
    }
}

//! Per-shard counters and gauges, and their Prometheus text rendering.
//!
//! Each shard writes only its own `ShardStats` (a load and a store, no atomic read-modify-write,
//! on its own cache lines); `/metrics` reads them all with relaxed loads. Nothing on the hot
//! path takes a lock or crosses a core.

use im_shared::metrics::{ErrorCounts, Kind, Prom};
use im_shared::ErrorCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Close codes counted separately.
pub const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1007, 1008, 1009, 1011, 1012, 1013];

macro_rules! stats {
    ($( $name:ident : $kind:expr, $help:literal ),* $(,)?) => {
        #[derive(Default)]
        #[repr(align(128))]
        pub struct ShardStats {
            $( #[doc = $help] pub $name: AtomicU64, )*
            /// Close frames sent, by code (index into `CLOSE_CODES`).
            pub closes: [AtomicU64; CLOSE_CODES.len()],
            /// `error` frames this shard made, by code (single writer: `ShardStats::add`).
            pub errors: ErrorCounts,
        }

        const FIELDS: &[(&str, Kind, &str)] = &[ $( (stringify!($name), $kind, $help) ),* ];

        impl ShardStats {
            fn values(&self) -> Vec<u64> {
                vec![ $( self.$name.load(Relaxed) ),* ]
            }
        }
    };
}

stats! {
    connections: Kind::Gauge, "Connections held now.",
    accepted_total: Kind::Counter, "TCP connections accepted.",
    handshakes_total: Kind::Counter, "WebSocket upgrades completed.",
    refused_token_total: Kind::Counter, "Upgrades refused for a missing or invalid token (HTTP 401).",
    refused_http_total: Kind::Counter, "Requests refused for bad HTTP (400/405/426/431) or an unknown path.",
    refused_full_total: Kind::Counter, "Connections closed at accept because the shard is full.",
    handshake_timeouts_total: Kind::Counter, "Connections that did not finish the upgrade in time.",
    heartbeat_timeouts_total: Kind::Counter, "Connections closed for showing no life within the heartbeat timeout.",
    slow_consumer_closes_total: Kind::Counter, "Connections closed because their outbound queue passed its bound.",
    peer_resets_total: Kind::Counter, "Peers that went away without a close handshake.",
    frames_in_total: Kind::Counter, "WebSocket frames received.",
    frames_out_total: Kind::Counter, "WebSocket frames queued for sending.",
    bytes_in_total: Kind::Counter, "Bytes received.",
    bytes_out_total: Kind::Counter, "Bytes sent.",
    messages_routed_total: Kind::Counter, "Messages sequenced by this shard (as a conversation owner).",
    deliveries_total: Kind::Counter, "Message copies written to connections.",
    ring_backlog: Kind::Gauge, "Cross-shard messages waiting because a ring was full.",
    ring_dropped_total: Kind::Counter, "Cross-shard messages dropped because ring and backlog were full.",
    timers_armed: Kind::Gauge, "Timers armed in the wheel.",
    arena_bytes: Kind::Gauge, "Bytes held in the buffer arena (partial frames, pending writes).",
    recv_buffer_exhausted_total: Kind::Counter, "Receive buffers the kernel ran out of (multishot receive re-armed).",
}

impl ShardStats {
    /// Adds to a counter this shard owns (single writer: no read-modify-write atomics).
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }

    /// An `error` frame this shard made.
    pub fn count_error(&self, code: ErrorCode) {
        Self::add(self.errors.of(code), 1);
    }

    pub fn count_close(&self, code: u16) {
        if let Some(i) = CLOSE_CODES.iter().position(|&c| c == code) {
            Self::add(&self.closes[i], 1);
        }
    }
}

/// Renders all shards of this process in the Prometheus text format.
pub fn render(gateway_id: &str, shards: &[ShardStats], driver: &str) -> String {
    let mut out = String::with_capacity(4096);
    let per: Vec<Vec<u64>> = shards.iter().map(|s| s.values()).collect();
    let mut p = Prom::new(&mut out);
    let n = shards.len().to_string();
    p.single(
        "im_gateway_info",
        Kind::Gauge,
        "The gateway process.",
        &[("gateway", gateway_id), ("driver", driver), ("shards", &n)],
        1,
    );
    let ids: Vec<String> = (0..shards.len()).map(|i| i.to_string()).collect();
    for (i, (name, kind, help)) in FIELDS.iter().enumerate() {
        let name = format!("im_gateway_{name}");
        p.family(&name, *kind, help);
        for (shard, vals) in per.iter().enumerate() {
            p.sample(&name, &[("shard", &ids[shard])], vals[i]);
        }
    }
    let name = "im_gateway_closes_total";
    p.family(name, Kind::Counter, "Close frames sent, by code.");
    for (shard, s) in shards.iter().enumerate() {
        for (i, code) in CLOSE_CODES.iter().enumerate() {
            let code = code.to_string();
            let labels = [("shard", ids[shard].as_str()), ("code", code.as_str())];
            p.sample(name, &labels, s.closes[i].load(Relaxed));
        }
    }
    let name = "im_gateway_error_frames_total";
    p.family(
        name,
        Kind::Counter,
        "error frames the shards made (refused frames, rate limits, a full gateway), by code; \
         those logic or the bridge answered are im_bridge_error_replies_total",
    );
    for (shard, s) in shards.iter().enumerate() {
        s.errors
            .samples(&mut p, name, &[("shard", ids[shard].as_str())]);
    }
    im_shared::metrics::render_heap(&mut p);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_per_shard() {
        let s: Vec<ShardStats> = (0..2).map(|_| ShardStats::default()).collect();
        ShardStats::add(&s[1].connections, 5);
        s[0].count_close(1013);
        s[1].count_error(ErrorCode::RateLimited);
        let text = render("gw-1", &s, "io_uring");
        assert!(text.contains("im_gateway_connections{shard=\"1\"} 5\n"));
        assert!(text.contains("# TYPE im_gateway_accepted_total counter"));
        assert!(text.contains("# HELP im_gateway_connections Connections held now."));
        assert!(text.contains("im_gateway_closes_total{shard=\"0\",code=\"1013\"} 1"));
        assert!(text.contains("im_gateway_error_frames_total{shard=\"1\",code=\"4290\"} 1\n"));
        assert!(text.contains("im_gateway_error_frames_total{shard=\"0\",code=\"4290\"} 0\n"));
        assert!(text.contains("driver=\"io_uring\""));
    }
}

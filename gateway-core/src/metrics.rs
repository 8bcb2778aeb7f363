//! Per-shard counters and gauges, and their Prometheus text rendering.
//!
//! Each shard writes only its own `ShardStats` (a load and a store, no atomic read-modify-write,
//! on its own cache lines); `/metrics` reads them all with relaxed loads. Nothing on the hot
//! path takes a lock or crosses a core.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Close codes counted separately.
pub const CLOSE_CODES: [u16; 8] = [1000, 1001, 1002, 1007, 1008, 1009, 1011, 1013];

macro_rules! stats {
    ($( $name:ident : $kind:literal, $help:literal ),* $(,)?) => {
        #[derive(Default)]
        #[repr(align(128))]
        pub struct ShardStats {
            $( #[doc = $help] pub $name: AtomicU64, )*
            /// Close frames sent, by code (index into `CLOSE_CODES`).
            pub closes: [AtomicU64; CLOSE_CODES.len()],
        }

        const FIELDS: &[(&str, &str, &str)] = &[ $( (stringify!($name), $kind, $help) ),* ];

        impl ShardStats {
            fn values(&self) -> Vec<u64> {
                vec![ $( self.$name.load(Relaxed) ),* ]
            }
        }
    };
}

stats! {
    connections: "gauge", "Connections held now.",
    accepted_total: "counter", "TCP connections accepted.",
    handshakes_total: "counter", "WebSocket upgrades completed.",
    refused_token_total: "counter", "Upgrades refused for a missing or invalid token (HTTP 401).",
    refused_http_total: "counter", "Requests refused for bad HTTP (400/405/426/431) or an unknown path.",
    refused_full_total: "counter", "Connections closed at accept because the shard is full.",
    handshake_timeouts_total: "counter", "Connections that did not finish the upgrade in time.",
    heartbeat_timeouts_total: "counter", "Connections closed for showing no life within the heartbeat timeout.",
    slow_consumer_closes_total: "counter", "Connections closed because their outbound queue passed its bound.",
    peer_resets_total: "counter", "Peers that went away without a close handshake.",
    frames_in_total: "counter", "WebSocket frames received.",
    frames_out_total: "counter", "WebSocket frames queued for sending.",
    bytes_in_total: "counter", "Bytes received.",
    bytes_out_total: "counter", "Bytes sent.",
    messages_routed_total: "counter", "Messages sequenced by this shard (as a conversation owner).",
    deliveries_total: "counter", "Message copies written to connections.",
    ring_backlog: "gauge", "Cross-shard messages waiting because a ring was full.",
    ring_dropped_total: "counter", "Cross-shard messages dropped because ring and backlog were full.",
    timers_armed: "gauge", "Timers armed in the wheel.",
    arena_bytes: "gauge", "Bytes held in the buffer arena (partial frames, pending writes).",
    recv_buffer_exhausted_total: "counter", "Receive buffers the kernel ran out of (multishot receive re-armed).",
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
    let _ = writeln!(
        out,
        "# HELP im_gateway_info The gateway process.\n# TYPE im_gateway_info gauge"
    );
    let _ = writeln!(
        out,
        "im_gateway_info{{gateway=\"{gateway_id}\",driver=\"{driver}\",shards=\"{}\"}} 1",
        shards.len()
    );
    for (i, (name, kind, help)) in FIELDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "# HELP im_gateway_{name} {}\n# TYPE im_gateway_{name} {kind}",
            help.trim()
        );
        for (shard, vals) in per.iter().enumerate() {
            let _ = writeln!(out, "im_gateway_{name}{{shard=\"{shard}\"}} {}", vals[i]);
        }
    }
    let _ = writeln!(
        out,
        "# HELP im_gateway_closes_total Close frames sent, by code.\n# TYPE im_gateway_closes_total counter"
    );
    for (shard, s) in shards.iter().enumerate() {
        for (i, code) in CLOSE_CODES.iter().enumerate() {
            let _ = writeln!(
                out,
                "im_gateway_closes_total{{shard=\"{shard}\",code=\"{code}\"}} {}",
                s.closes[i].load(Relaxed)
            );
        }
    }
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
        let text = render("gw-1", &s, "io_uring");
        assert!(text.contains("im_gateway_connections{shard=\"1\"} 5\n"));
        assert!(text.contains("# TYPE im_gateway_accepted_total counter"));
        assert!(text.contains("# HELP im_gateway_connections Connections held now."));
        assert!(text.contains("im_gateway_closes_total{shard=\"0\",code=\"1013\"} 1"));
        assert!(text.contains("driver=\"io_uring\""));
    }
}

//! Gateway configuration. Every field has a default; the `im` binary maps each to a flag and an
//! `IM_`-prefixed environment variable (README.md, "Commands").
//!
//! Names carry their unit last (`heartbeat_timeout_ms`, `frame_bytes_max`).

use std::net::SocketAddr;

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where WebSocket clients connect (and `/healthz`, `/metrics` are served).
    pub ws_listen: SocketAddr,
    /// Shards (threads, one per core) in this process.
    pub shards: usize,
    /// Pin shard `i` to core `(first_core + i) % cores`; `None` leaves placement to the kernel.
    pub pin_first_core: Option<usize>,
    /// HS256 secret shared with whoever issues tokens.
    pub jwt_secret: Vec<u8>,
    /// The longest lifetime (`exp − iat`) a token may claim (`--token-lifetime-max-s`).
    pub token_lifetime_max_s: u64,
    /// This gateway's id (presence, downstream topic name).
    pub gateway_id: String,
    /// Snowflake worker id base for this process's shards.
    pub worker_id: u16,
    /// Largest WebSocket message (after reassembly of fragments), in bytes; past it: close 1009.
    pub frame_bytes_max: usize,
    /// A connection that shows no life for this long is closed.
    pub heartbeat_timeout_ms: u64,
    /// Time from TCP accept to a complete upgrade request.
    pub handshake_timeout_ms: u64,
    /// Per-connection bound on queued outbound bytes; past it: close 1013.
    pub outbound_bytes_max: usize,
    /// Messages (and pings) a connection may send per second, with bursts of twice that;
    /// past it `error` 4290, and close 1008 for a client that keeps going.
    pub msgs_per_sec_max: u32,
    /// Connections one shard holds; further accepts are closed at once.
    pub conns_per_shard_max: usize,
    /// Capacity (entries) of each cross-shard ring.
    pub ring_capacity: usize,
    /// Entries a shard keeps queued for a peer whose ring is full, before dropping.
    pub ring_backlog_max: usize,
    /// Receive buffers in each shard's provided-buffer ring, and their size. The ring is the
    /// only receive memory a shard has; a frame larger than a buffer continues in the arena.
    pub recv_buffers: usize,
    pub recv_buffer_bytes: usize,
    /// Bytes of partial frames and pending writes the shard's arena may hold across connections.
    pub arena_bytes_max: usize,
    /// Resolution of the timing wheel.
    pub tick_ms: u64,
    /// Fan-out merge window (goim's room batching): deliveries to a connection within this
    /// many milliseconds leave in one write, each still its own frame. 0: off (each goes at
    /// once). Applies to `msg` deliveries, not to `sent` or other replies.
    pub fanout_merge_ms: u64,
    /// How often each shard sends its users up for a presence refresh (pipeline mode); the
    /// presence TTL is three times this.
    pub presence_refresh_ms: u64,
    /// Force the epoll driver even where io_uring works (for comparison and tests).
    pub force_epoll: bool,
    /// Serve `/metrics` (and `/healthz`) here instead of on the WebSocket port
    /// (`--metrics-listen`); `None`: on the WebSocket port, as by default.
    pub metrics_listen: Option<SocketAddr>,
    /// On shutdown, the open connections are closed with 1012 spread evenly over this many
    /// milliseconds (`--drain-window-s`), so their clients reconnect elsewhere a few at a
    /// time instead of all at once; 0: all at once.
    pub drain_window_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            ws_listen: "127.0.0.1:8090".parse().expect("valid literal"),
            shards: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            pin_first_core: Some(0),
            jwt_secret: Vec::new(),
            token_lifetime_max_s: im_shared::jwt::LIFETIME_MAX_S,
            gateway_id: String::from("gw"),
            worker_id: 0,
            frame_bytes_max: 64 * 1024,
            heartbeat_timeout_ms: 90_000,
            handshake_timeout_ms: 10_000,
            outbound_bytes_max: 256 * 1024,
            msgs_per_sec_max: 100,
            conns_per_shard_max: 1 << 20,
            ring_capacity: 4096,
            ring_backlog_max: 65_536,
            recv_buffers: 256,
            recv_buffer_bytes: 1024,
            arena_bytes_max: 256 << 20,
            tick_ms: 100,
            fanout_merge_ms: 0,
            presence_refresh_ms: 60_000,
            force_epoll: false,
            metrics_listen: None,
            drain_window_ms: 0,
        }
    }
}

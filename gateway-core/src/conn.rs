//! The per-connection state a shard keeps in its slab: about 40 bytes, multiplied by every
//! connection the host holds, so every field earns its place (ARCHITECTURE.md, "Density").
//! Buffers are not here: they are borrowed from the arena only while needed (`rx`, `tx`).
//! The timer link lives in the timing wheel, indexed by the same slab key.

use crate::arena::NONE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Accepted; waiting for the HTTP upgrade request.
    Handshake,
    /// A WebSocket connection of `user`.
    Open,
    /// A close frame or an HTTP answer is queued; once it is flushed we shut down our side.
    Closing,
    /// Our side is shut down; waiting for the peer's FIN (or the deadline) before closing.
    Linger,
    /// To be closed now; the driver closes the fd once no I/O is in flight.
    Dead,
}

/// I/O bookkeeping the driver and the shard share: bit flags in `Conn::io`. (Not `std::io`.)
pub mod flags {
    /// In the shard's ready list.
    pub const READY: u8 = 1;
    /// A (multishot) receive is armed in the kernel.
    pub const RECV_ARMED: u8 = 2;
    /// A send is in flight.
    pub const SEND_INFLIGHT: u8 = 4;
    /// Our write side is shut down.
    pub const SHUT_WR: u8 = 8;
    /// A cancel for the armed receive has been submitted.
    pub const CANCELING: u8 = 16;
    /// The peer sent EOF: do not re-arm the receive.
    pub const EOF: u8 = 32;
    /// A cancel for the in-flight send has been submitted (the connection is dead).
    pub const CANCELING_SEND: u8 = 64;
    /// The front queued frame is the 101 answer: a close must not drop it, or the client
    /// would get a close frame without ever having been upgraded.
    pub const UPGRADE_UNSENT: u8 = 128;
}

#[derive(Debug)]
pub struct Conn {
    /// Authenticated user (0 until the upgrade succeeds).
    pub user: u64,
    pub fd: i32,
    /// Bumped each time the slab slot is reused, so a late message for an old connection
    /// cannot reach a new one.
    pub gen: u32,
    /// Other connections of the same user on this shard (intrusive list; `NONE` ends it).
    pub dev_next: u32,
    pub dev_prev: u32,
    /// Arena slots, `NONE` when idle.
    pub rx: u32,
    pub tx: u32,
    /// Wheel tick when bytes last arrived.
    pub last_seen: u32,
    /// Rate-limit credit in sixteenths of a message (refilled from `last_seen`); negative is
    /// debt run up by refused messages. Lives in what would be padding.
    pub credit: i16,
    pub state: State,
    pub io: u8,
}

impl Conn {
    pub fn new(fd: i32, gen: u32, now: u32) -> Conn {
        Conn {
            user: 0,
            fd,
            gen,
            dev_next: NONE,
            dev_prev: NONE,
            rx: NONE,
            tx: NONE,
            last_seen: now,
            credit: 0,
            state: State::Handshake,
            io: 0,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.io & flag != 0
    }

    pub fn alive(&self) -> bool {
        !matches!(self.state, State::Dead)
    }
}

/// The budget: a test asserts it, and a compile-time check keeps it honest.
pub const CONN_BYTES_MAX: usize = 48;
const _: () = assert!(std::mem::size_of::<Conn>() <= CONN_BYTES_MAX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_state_stays_small() {
        assert_eq!(std::mem::size_of::<Conn>(), 40);
        // What the slab stores per connection, including its vacancy tag.
        assert!(std::mem::size_of::<slab::Slab<Conn>>() > 0);
        let entry = std::mem::size_of::<Conn>() + std::mem::size_of::<usize>();
        assert!(entry <= 48, "slab entry {entry} bytes");
    }
}

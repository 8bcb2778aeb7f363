//! Closing: the WebSocket close handshake (our close frame, shut down our side, linger for the
//! peer), HTTP answers that close after they are flushed, hard kills, and shutdown of the
//! whole shard: a drain (1012 to every connection, spread over the drain window), then a kill
//! of what is left after the grace period.

use super::Shard;
use crate::arena::NONE;
use crate::codec::{self, close, FrameError};
use crate::conn::{flags, State};

impl Shard {
    /// Answers an HTTP request and closes after the answer is flushed.
    pub(super) fn http_answer(&mut self, key: u32, response: Vec<u8>) {
        let linger = self.tick() + self.limits.linger_ticks;
        let c = &mut self.conns[key as usize];
        self.arena.push_tx(&mut c.tx, response.into());
        c.state = State::Closing;
        self.wheel.insert(key, linger);
        self.mark_ready(key);
    }

    pub(super) fn fail(&mut self, key: u32, e: FrameError) {
        self.begin_close(key, e.close_code(), e.reason());
    }

    /// Starts the close handshake: drop what is queued (but a frame already partly on the
    /// wire), send a close frame, shut down our side once it is out, and wait for the peer.
    pub(super) fn begin_close(&mut self, key: u32, code: u16, reason: &str) {
        let linger = self.tick() + self.limits.linger_ticks;
        let Some(c) = self.conns.get(key as usize) else {
            return;
        };
        match c.state {
            State::Closing | State::Linger | State::Dead => return,
            State::Open => self.leave(key),
            State::Handshake => {}
        }
        let c = &mut self.conns[key as usize];
        // Keep what a send in flight reads, and a frame already partly on the wire.
        let (in_flight, partly_sent) = self
            .arena
            .tx(c.tx)
            .map_or((0, false), |t| (t.in_flight, t.head_sent > 0));
        let keep_front = c.has(flags::UPGRADE_UNSENT) || partly_sent;
        self.arena
            .truncate_tx(&mut c.tx, in_flight.max(usize::from(keep_front)));
        self.arena
            .push_tx(&mut c.tx, codec::close_frame(code, reason).into());
        c.state = State::Closing;
        self.wheel.insert(key, linger);
        self.st().count_close(code);
        self.mark_ready(key);
    }

    /// Closes without ceremony; the driver closes the fd once no I/O is in flight.
    pub(super) fn kill(&mut self, key: u32) {
        let Some(c) = self.conns.get(key as usize) else {
            return;
        };
        match c.state {
            State::Dead => return,
            State::Open => self.leave(key),
            _ => {}
        }
        let c = &mut self.conns[key as usize];
        c.state = State::Dead;
        let rx = std::mem::replace(&mut c.rx, NONE);
        self.arena.release(rx, NONE);
        self.wheel.cancel(key);
        self.mark_ready(key);
    }

    /// Starts a graceful shutdown (a drain): refuse new connections, drop those still in
    /// their handshake, and line up the open ones to be closed with 1012 by `drain_to`.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        let mut open = Vec::with_capacity(keys.len());
        for key in keys {
            match self.conns[key as usize].state {
                State::Open => open.push(key),
                State::Handshake => self.kill(key),
                _ => {}
            }
        }
        // Popped from the end: in key order.
        open.reverse();
        self.drain_total = open.len();
        self.drain = open;
    }

    /// Closes the lined-up connections with 1012 ("service restart") until `fraction` (of 1)
    /// of them have been told; the driver raises it with the time since the shutdown began
    /// over the drain window, so clients come back elsewhere a few at a time. A connection
    /// that closed by itself meanwhile counts as told.
    pub fn drain_to(&mut self, fraction: f64) {
        let want = (self.drain_total as f64 * fraction.clamp(0.0, 1.0)).ceil() as usize;
        while self.drain_total - self.drain.len() < want {
            let Some(key) = self.drain.pop() else { break };
            if matches!(self.conns.get(key as usize), Some(c) if c.state == State::Open) {
                self.begin_close(key, close::SERVICE_RESTART, "service restart");
            }
        }
        if self.drain.is_empty() && self.drain.capacity() > 0 {
            self.drain = Vec::new();
        }
    }

    /// The drain window (`GatewayConfig::drain_window_ms`).
    pub fn drain_window_ms(&self) -> u64 {
        self.drain_window_ms
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Hard-closes every connection still open (the shutdown deadline passed).
    pub fn kill_all(&mut self) {
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            self.kill(key);
        }
    }
}

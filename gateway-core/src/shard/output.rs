//! Output: frames encoded once into shared allocations, and queued on a connection within its
//! outbound bound (past it the connection is closed with 1013: a client that does not read).

use super::Shard;
use crate::arena::Frame;
use crate::codec::{self, close, opcode};
use crate::conn::{flags, State};
use crate::metrics::ShardStats;
use im_shared::protocol;
use im_shared::ErrorCode;

impl Shard {
    pub(super) fn mark_ready(&mut self, key: u32) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            if !c.has(flags::READY) {
                c.io |= flags::READY;
                self.ready.push(key);
            }
        }
    }

    /// Encodes a text frame with `f` writing the JSON payload, into one shared allocation.
    pub(super) fn text_frame(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> Frame {
        const H: usize = codec::SERVER_HEADER_MAX;
        self.scratch.clear();
        self.scratch.resize(H, 0);
        f(&mut self.scratch);
        let len = self.scratch.len() - H;
        let hl = codec::server_header_len(len);
        codec::write_server_header(opcode::TEXT, len, &mut self.scratch[H - hl..H]);
        Frame::from(&self.scratch[H - hl..])
    }

    pub(super) fn error_frame(
        &mut self,
        code: ErrorCode,
        message: &str,
        cid: Option<&str>,
    ) -> Frame {
        self.st().count_error(code);
        self.text_frame(|out| protocol::encode_error(code, message, cid, out))
    }

    pub(super) fn reply_error(
        &mut self,
        key: u32,
        code: ErrorCode,
        message: &str,
        cid: Option<&str>,
    ) {
        let frame = self.error_frame(code, message, cid);
        self.enqueue(key, frame);
    }

    /// Queues a frame for an open connection, enforcing the per-connection bound.
    pub(super) fn enqueue(&mut self, key: u32, frame: Frame) {
        if self.queue_frame(key, frame).is_some() {
            self.mark_ready(key);
        }
    }

    /// Queues a delivery; with a merge window (`--fanout-merge-ms`) its send waits for the
    /// window to close, so that the deliveries of several group messages to one connection
    /// leave in one write (each still its own frame).
    pub(super) fn enqueue_delivery(&mut self, key: u32, frame: Frame) {
        if self.limits.merge_ms == 0 {
            return self.enqueue(key, frame);
        }
        // A connection whose queue was not empty is already held, ready or sending.
        if self.queue_frame(key, frame) == Some(true) {
            if self.held.is_empty() {
                self.held_until = self.now.mono_ms + self.limits.merge_ms;
            }
            self.held.push(key);
            // A connection is held again only after a reply emptied its queue; bounded all
            // the same: past one entry per connection, the window closes early.
            if self.held.len() > self.conns.len() {
                self.held_until = self.now.mono_ms;
            }
        }
    }

    /// Once the merge window has closed, its connections' sends go out.
    pub(super) fn release_held(&mut self) {
        if self.held.is_empty() || self.now.mono_ms < self.held_until {
            return;
        }
        for i in 0..self.held.len() {
            self.mark_ready(self.held[i]);
        }
        self.held.clear();
    }

    /// Queues `frame` within the bounds: `Some(was_empty)` when queued, `None` when the
    /// connection is not open or was closed for falling behind.
    fn queue_frame(&mut self, key: u32, frame: Frame) -> Option<bool> {
        let c = self.conns.get_mut(key as usize)?;
        if c.state != State::Open {
            return None;
        }
        let queued = self.arena.tx_bytes(c.tx);
        if queued + frame.len() > self.limits.outbound_bytes_max || !self.arena.fits(frame.len()) {
            ShardStats::add(&self.st().slow_consumer_closes_total, 1);
            self.begin_close(
                key,
                close::TRY_AGAIN,
                "outbound queue full: read your messages",
            );
            return None;
        }
        let was_empty = queued == 0;
        self.arena.push_tx(&mut c.tx, frame);
        ShardStats::add(&self.st().frames_out_total, 1);
        Some(was_empty)
    }
}

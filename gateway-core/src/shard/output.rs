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
        let Some(c) = self.conns.get_mut(key as usize) else {
            return;
        };
        if c.state != State::Open {
            return;
        }
        let queued = self.arena.tx_bytes(c.tx);
        if queued + frame.len() > self.limits.outbound_bytes_max || !self.arena.fits(frame.len()) {
            ShardStats::add(&self.st().slow_consumer_closes_total, 1);
            return self.begin_close(
                key,
                close::TRY_AGAIN,
                "outbound queue full: read your messages",
            );
        }
        self.arena.push_tx(&mut c.tx, frame);
        ShardStats::add(&self.st().frames_out_total, 1);
        self.mark_ready(key);
    }
}

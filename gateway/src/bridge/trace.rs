//! Where a message's trace starts (README.md, "Tracing"): for a sampled `send`, the up thread
//! opens `im.send`, the root, which lasts until the sender's answer (`sent` or `error`)
//! passes the down thread, and `im.upstream`, its child, which lasts until the broker holds
//! the record. The record carries `im.upstream`'s context to logic; the downstream records
//! logic produces for it come back with logic's, and the down thread opens `im.deliver` under
//! that for each.
//!
//! The shards never see any of it: tracing happens on the bridge's threads. Off (no
//! `--otlp-endpoint`), `im_telemetry::sample()` says no and nothing here runs.

use im_telemetry::{context, TraceParent, TARGET};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::Span;

/// Roots waiting for their answer, at most; and how long one waits before it is ended
/// unanswered (logic was down, or the answer was dropped: the client's retry is a new trace).
const PENDING_MAX: usize = 10_000;
const UNANSWERED_AFTER: Duration = Duration::from_secs(60);

/// The roots of traced sends that have not been answered yet, by trace id.
pub(crate) struct Roots {
    gateway: String,
    pending: Mutex<HashMap<[u8; 16], (Instant, Span)>>,
}

/// A traced send as it leaves: the span the broker's acknowledgement ends, and the context
/// its record carries.
pub(crate) struct Started {
    pub upstream: Span,
    pub context: TraceParent,
}

impl Roots {
    pub(crate) fn new(gateway: &str) -> Roots {
        Roots {
            gateway: gateway.to_string(),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], (Instant, Span)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens `im.send` and `im.upstream` for a send to `conv` (client id `cid`).
    pub(crate) fn start(&self, conv: &str, cid: &str, now: Instant) -> Option<Started> {
        let root = tracing::info_span!(
            target: TARGET,
            parent: None,
            "im.send",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            im.outcome = tracing::field::Empty,
            im.conv = conv,
            im.cid = cid,
            im.gateway = %self.gateway,
        );
        let root_ctx = context(&root)?;
        let upstream = tracing::info_span!(
            target: TARGET,
            parent: None,
            "im.upstream",
            traceparent = %root_ctx,
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "kafka",
            messaging.destination.name = im_shared::records::topics::UPSTREAM,
        );
        let context = im_telemetry::context(&upstream)?;
        let mut pending = self.pending();
        if pending.len() >= PENDING_MAX {
            pending.retain(|_, (at, root)| {
                let keep = now.duration_since(*at) < UNANSWERED_AFTER;
                if !keep {
                    root.record("im.outcome", "unanswered");
                }
                keep
            });
        }
        if pending.len() < PENDING_MAX {
            pending.insert(root_ctx.trace_id, (now, root));
        }
        Some(Started { upstream, context })
    }

    /// The sender was answered: `error` says how. Ends the root of `trace`, if this
    /// gateway started it.
    pub(crate) fn answered(&self, trace: &TraceParent, error: bool) {
        let Some((_, root)) = self.pending().remove(&trace.trace_id) else {
            return;
        };
        if error {
            root.record("otel.status_code", "error");
        }
        root.record("im.outcome", if error { "error" } else { "sent" });
    }

    /// The bridge answered the sender itself (5031/5032: the broker refused or lost it).
    pub(crate) fn refused(&self, trace_id: &[u8; 16]) {
        if let Some((_, root)) = self.pending().remove(trace_id) {
            root.record("otel.status_code", "error");
            root.record("im.outcome", "refused by the bridge");
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending().len()
    }
}

/// `im.deliver` for a downstream record logic traced: `what` it is, for whom.
pub(crate) fn deliver(parent: &TraceParent, what: &'static str, recipients: usize) -> Span {
    tracing::info_span!(
        target: TARGET,
        parent: None,
        "im.deliver",
        traceparent = %parent,
        otel.kind = "consumer",
        im.record = what,
        im.recipients = recipients as u64,
    )
}

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
/// How often the roots are looked over for unanswered ones (not on every send: with answers
/// not coming, a full map would be walked per send).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The roots of traced sends that have not been answered yet, by trace id.
pub(crate) struct Roots {
    gateway: String,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    roots: HashMap<[u8; 16], (Instant, Span)>,
    /// When roots left unanswered are next looked for.
    sweep_at: Option<Instant>,
}

impl Pending {
    /// Ends the roots that waited longer than `UNANSWERED_AFTER`, at most every
    /// `SWEEP_EVERY`.
    fn sweep(&mut self, now: Instant) {
        if self.sweep_at.is_some_and(|at| now < at) {
            return;
        }
        self.sweep_at = Some(now + SWEEP_EVERY);
        self.roots.retain(|_, (at, root)| {
            let keep = now.duration_since(*at) < UNANSWERED_AFTER;
            if !keep {
                root.record("im.outcome", "unanswered");
            }
            keep
        });
    }
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
            pending: Mutex::new(Pending::default()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
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
        pending.sweep(now);
        // Full of roots younger than a minute: this one ends now, unanswered (its spans
        // after it are still exported).
        if pending.roots.len() < PENDING_MAX {
            pending.roots.insert(root_ctx.trace_id, (now, root));
        }
        Some(Started { upstream, context })
    }

    /// The sender was answered: `error` says how. Ends the root of `trace`, if this
    /// gateway started it.
    pub(crate) fn answered(&self, trace: &TraceParent, error: bool) {
        let Some((_, root)) = self.pending().roots.remove(&trace.trace_id) else {
            return;
        };
        if error {
            root.record("otel.status_code", "error");
        }
        root.record("im.outcome", if error { "error" } else { "sent" });
    }

    /// The bridge answered the sender itself (5031/5032: the broker refused or lost it).
    pub(crate) fn refused(&self, trace_id: &[u8; 16]) {
        if let Some((_, root)) = self.pending().roots.remove(trace_id) {
            root.record("otel.status_code", "error");
            root.record("im.outcome", "refused by the bridge");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use im_telemetry::testing::capture;

    #[test]
    fn a_root_ends_at_its_answer_or_its_refusal_and_its_upstream_span_at_the_broker() {
        let (d, spans) = capture();
        tracing::dispatcher::with_default(&d, || {
            let roots = Roots::new("gw-1");
            let now = Instant::now();
            let a = roots.start("p:1:2", "c1", now).expect("traced");
            let b = roots.start("p:1:2", "c2", now).expect("traced");
            assert_ne!(a.context.trace_id, b.context.trace_id, "a trace per send");
            drop(a.upstream); // the broker acknowledged the record
            let up = spans.take();
            assert_eq!(up.len(), 1);
            assert_eq!(
                (up[0].name, up[0].trace_id),
                ("im.upstream", a.context.trace_id)
            );
            assert_eq!(
                up[0].span_id, a.context.span_id,
                "the record carries its context"
            );

            // Logic's answer (its context: same trace, another span) ends the root.
            let answer = TraceParent::sampled(a.context.trace_id, [5; 8]).unwrap();
            roots.answered(&answer, false);
            let root = spans.take();
            assert_eq!(root.len(), 1);
            assert_eq!((root[0].name, root[0].parent), ("im.send", None));
            assert_eq!(up[0].parent, Some(root[0].span_id));
            assert_eq!(root[0].attr("im.outcome"), Some("sent"));
            assert_eq!(root[0].attr("im.cid"), Some("c1"));
            roots.answered(&answer, false); // again: nothing left to end
            assert!(spans.take().is_empty());

            // The bridge answered b's sender 5032 itself.
            roots.refused(&b.context.trace_id);
            let root = spans.take();
            assert_eq!(root[0].attr("im.outcome"), Some("refused by the bridge"));
            assert!(root[0].error);
            drop(b.upstream);

            // A root nobody answers ends unanswered at the next sweep after a minute.
            let c = roots.start("p:1:2", "c3", now).expect("traced");
            drop(c.upstream);
            spans.take();
            let later = now + UNANSWERED_AFTER + Duration::from_secs(1);
            let d = roots.start("p:1:2", "c4", later).expect("traced");
            let ended = spans.take();
            assert_eq!(ended.len(), 1);
            assert_eq!(ended[0].attr("im.cid"), Some("c3"));
            assert_eq!(ended[0].attr("im.outcome"), Some("unanswered"));
            drop(d);
        });
    }
}

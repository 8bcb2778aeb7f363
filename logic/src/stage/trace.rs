//! The stage's spans of a traced send (README.md, "Tracing"): a record of `im.upstream` that
//! arrives with a sampled `traceparent` gets `im.sequence` (taken → its message handed to
//! the producer), under it `im.durable` (produce → the broker's acknowledgement; each retry
//! is one) and `im.route` (once released: the records to the gateways and the sender's
//! `sent`, which carry its context on to the gateways' `im.deliver`).
//!
//! Nothing here runs for an untraced record, nor when this process exports no spans
//! (`im_telemetry::on()`): a traced record then passes its context on untouched, so the
//! gateways still join the trace.

use super::sequencer::{Admitted, Decision};
use im_shared::records::{topics, Stored};
use im_shared::trace::TraceParent;
use im_telemetry::{context, TARGET};
use tracing::field::Empty;
use tracing::Span;

fn traced(parent: &TraceParent) -> bool {
    parent.is_sampled() && im_telemetry::on()
}

/// `im.sequence` for a send whose upstream record carried `parent`.
pub(super) fn sequence(parent: &TraceParent) -> Option<Span> {
    traced(parent).then(|| {
        tracing::info_span!(
            target: TARGET,
            parent: None,
            "im.sequence",
            traceparent = %parent,
            otel.kind = "consumer",
            otel.status_code = Empty,
            messaging.system = "kafka",
            messaging.destination.name = topics::UPSTREAM,
            im.conv = Empty,
            im.seq = Empty,
            im.decision = Empty,
        )
    })
}

/// A send refused before sequencing: its span marked, and the context its `error` carries.
pub(super) fn refused(span: &Span) -> Option<TraceParent> {
    span.record("otel.status_code", "error");
    span.record("im.decision", "refused");
    context(span)
}

/// Each decision's `im.sequence` context, with what was decided recorded on the span
/// (`spans` is beside the batch's admitted sends, as `decisions` is). Empty when none is
/// traced.
pub(super) fn contexts(
    spans: &[Option<Span>],
    decisions: &[(Decision, Admitted)],
) -> Vec<Option<TraceParent>> {
    if spans.iter().all(Option::is_none) {
        return Vec::new();
    }
    spans
        .iter()
        .zip(decisions)
        .map(|(span, (d, _))| {
            let span = span.as_ref()?;
            match d {
                Decision::Assigned(rec) => {
                    span.record("im.conv", rec.conv.as_str());
                    span.record("im.seq", rec.seq);
                    span.record("im.decision", "assigned");
                }
                Decision::RetryOf(ack) => {
                    span.record("im.conv", ack.conv.as_str());
                    span.record("im.seq", ack.seq);
                    span.record("im.decision", "retry");
                }
                Decision::Refused(..) => {
                    span.record("otel.status_code", "error");
                    span.record("im.decision", "refused");
                }
            }
            context(span)
        })
        .collect()
}

/// `im.durable`: one produce of a message to `im.messages`.
pub(super) fn durable(parent: &TraceParent, partition: i32) -> Option<Span> {
    traced(parent).then(|| {
        tracing::info_span!(
            target: TARGET,
            parent: None,
            "im.durable",
            traceparent = %parent,
            otel.kind = "producer",
            otel.status_code = Empty,
            messaging.system = "kafka",
            messaging.destination.name = topics::MESSAGES,
            messaging.destination.partition.id = partition as i64,
        )
    })
}

/// `im.route`: a durable message to its recipients' gateways.
pub(super) fn route(parent: &TraceParent, rec: &Stored) -> Option<Span> {
    traced(parent).then(|| {
        tracing::info_span!(
            target: TARGET,
            parent: None,
            "im.route",
            traceparent = %parent,
            otel.kind = "producer",
            im.conv = rec.conv.as_str(),
            im.seq = rec.seq,
        )
    })
}

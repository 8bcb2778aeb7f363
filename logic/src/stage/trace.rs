//! The stage's spans of a traced send (README.md, "Tracing"): a record of `im.upstream` that
//! arrives with a sampled `traceparent` gets `im.sequence` (taken → its message handed to
//! the producer), under it `im.durable` (produce → the broker's acknowledgement; each retry
//! is one) and `im.route` (once released: the records to the gateways and the sender's
//! `sent`, which carry its context on to the gateways' `im.deliver`).
//!
//! Nothing here runs for an untraced record. When this process exports no spans
//! (`im_telemetry::on()` is false) a traced record passes its context on untouched, so the
//! gateways still join the trace and the sender's gateway still ends its root.

use super::sequencer::{Admitted, Decision};
use im_shared::records::{topics, Stored};
use im_shared::trace::TraceParent;
use im_telemetry::{context, TARGET};
use tracing::field::Empty;
use tracing::Span;

fn traced(parent: &TraceParent) -> bool {
    parent.is_sampled() && im_telemetry::on()
}

/// A traced send while it is sequenced: its `im.sequence` span (none when this process
/// records nothing) and the context it arrived with.
pub(super) struct Sequencing {
    span: Option<Span>,
    incoming: TraceParent,
}

impl Sequencing {
    pub(super) fn start(incoming: &TraceParent) -> Sequencing {
        Sequencing {
            span: sequence(incoming),
            incoming: *incoming,
        }
    }

    /// The context what follows carries: the span's, or the incoming one passed on.
    fn context(&self) -> TraceParent {
        self.span
            .as_ref()
            .and_then(context)
            .unwrap_or(self.incoming)
    }

    /// Refused before sequencing: the span marked, and the context its `error` carries.
    pub(super) fn refused(&self) -> TraceParent {
        if let Some(span) = &self.span {
            span.record("otel.status_code", "error");
            span.record("im.decision", "refused");
        }
        self.context()
    }
}

/// `im.sequence` for a send whose upstream record carried `parent`.
fn sequence(parent: &TraceParent) -> Option<Span> {
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

/// Each decision's context (`Sequencing::context`), with what was decided recorded on the
/// span (`open` is beside the batch's admitted sends, as `decisions` is, or empty when the
/// batch has no traced record). Empty when none is traced.
pub(super) fn contexts(
    open: &[Option<Sequencing>],
    decisions: &[(Decision, Admitted)],
) -> Vec<Option<TraceParent>> {
    if open.iter().all(Option::is_none) {
        return Vec::new();
    }
    open.iter()
        .zip(decisions)
        .map(|(s, (d, _))| {
            let s = s.as_ref()?;
            let Some(span) = &s.span else {
                return Some(s.incoming);
            };
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
            Some(s.context())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::sequencer::{tests::send, Sequencer};
    use crate::stage::state::Partition;
    use im_telemetry::testing::capture;
    use std::collections::HashMap;

    #[test]
    fn a_traced_send_gets_sequence_durable_and_route_under_the_gateway_s_span() {
        let upstream = TraceParent::sampled([3; 16], [4; 8]).unwrap();
        // Off (no tracer on this thread): nothing is recorded, the context passes on as is.
        assert!(sequence(&upstream).is_none());
        let passed = Sequencing::start(&upstream);
        assert_eq!(passed.refused(), upstream);

        let (d, spans) = capture();
        tracing::dispatcher::with_default(&d, || {
            let mut seq = Sequencer::new(std::sync::Arc::new(
                im_shared::snowflake::WorkerLease::fixed(1),
            ));
            seq.recovered(0, Partition::default());
            let sends = [send(1, "a", 2, 0, 0), send(1, "b", 2, 0, 0)];
            let decisions = seq.decide(&sends, &HashMap::new(), &HashMap::new(), 1_000);
            let decisions: Vec<_> = decisions.into_iter().zip(sends).collect();
            // The first send is traced, the second is not.
            let open = vec![Some(Sequencing::start(&upstream)), None];
            let traces = contexts(&open, &decisions);
            assert_eq!(traces.len(), 2);
            let ctx = traces[0].expect("the traced one");
            assert_eq!((ctx.trace_id, traces[1]), (upstream.trace_id, None));
            let Decision::Assigned(rec) = &decisions[0].0 else {
                panic!("assigned")
            };
            let dur = durable(&ctx, 0).unwrap();
            let r = route(&ctx, rec).unwrap();
            drop((open, dur, r));
            let got = spans.take();
            let names: Vec<&str> = got.iter().map(|s| s.name).collect();
            assert_eq!(names, ["im.sequence", "im.durable", "im.route"]);
            assert_eq!(
                got[0].parent,
                Some(upstream.span_id),
                "under the gateway's span"
            );
            assert!(got[1..].iter().all(|s| s.parent == Some(got[0].span_id)));
            assert!(got.iter().all(|s| s.trace_id == upstream.trace_id));
            assert_eq!(got[0].attr("im.decision"), Some("assigned"));
            assert_eq!(got[0].attr("im.seq"), Some("1"));
            assert_eq!(got[2].attr("im.conv"), Some(rec.conv.as_str()));
            // A batch with nothing traced allocates nothing for it.
            assert!(contexts(&[None, None], &decisions).is_empty());
            assert!(contexts(&[], &decisions).is_empty());
        });
        // Off, the incoming context is what the message's records carry on.
        let (_, decisions) = {
            let mut seq = Sequencer::new(std::sync::Arc::new(
                im_shared::snowflake::WorkerLease::fixed(1),
            ));
            seq.recovered(0, Partition::default());
            let sends = [send(1, "c", 2, 0, 0)];
            let d = seq.decide(&sends, &HashMap::new(), &HashMap::new(), 1_000);
            ((), d.into_iter().zip(sends).collect::<Vec<_>>())
        };
        let open = vec![Some(Sequencing::start(&upstream))];
        assert_eq!(contexts(&open, &decisions), [Some(upstream)]);
    }
}

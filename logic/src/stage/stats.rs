//! The stage's counters, served on logic's `/metrics`.

use im_shared::metrics::{Kind, MillisHistogram, Prom};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct StageStats {
    pub messages_total: AtomicU64,
    pub retries_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub deliveries_total: AtomicU64,
    pub bad_records_total: AtomicU64,
    pub syncs_total: AtomicU64,
    /// `typing` frames relayed, and those dropped (more than one per interval, not a member,
    /// a group too large to tell).
    pub typing_relayed_total: AtomicU64,
    pub typing_dropped_total: AtomicU64,
    /// Presence events from gateways (a connection opened or closed), the changes told to
    /// contacts (a first connection, a last one after its debounce), and the events dropped
    /// (too many relays at once, or the tables full).
    pub presence_events_total: AtomicU64,
    pub presence_told_total: AtomicU64,
    pub presence_dropped_total: AtomicU64,
    /// Offline push (`crate::push`): its counters.
    pub push: std::sync::Arc<crate::push::PushStats>,
    /// Batches released, and microseconds they spent being checked and sequenced (first
    /// record taken → last record handed to the producer) and then waiting to be durable
    /// (→ released): their ratio to the batches is where a send's time in logic goes.
    pub batches_total: AtomicU64,
    pub sequencing_us_total: AtomicU64,
    pub durable_wait_us_total: AtomicU64,
    /// How old `im.upstream` records are when the stage takes them (the broker's hop from
    /// the gateway, and any queueing here), from their CreateTime.
    pub upstream_age: MillisHistogram,
    /// Per batch, from taking its first record to handing its answers to the producer.
    pub batch_time: MillisHistogram,
    /// Per record, from its produce to `im.messages` to its acknowledgement as durable (the
    /// broker's acks=all; in standalone, persist's commit): the part of `batch_time` that is
    /// the log's, beside what the stage adds (checks, in-order release, answers).
    pub ack_time: MillisHistogram,
    /// Per release of durable batches, the waiting offset commit that confirms this instance
    /// still owns their partitions (README.md, "Fencing"): what fencing adds to a message.
    pub confirm_time: MillisHistogram,
    /// Downstream records (deliveries, replies) the broker acknowledged, per record from
    /// produce to ack; and those it never took (dropped: the client's sync recovers them).
    pub downstream_ack_time: MillisHistogram,
    pub downstream_failed_total: AtomicU64,
    /// Batches delivered by nobody live because presence could not be read (Redis down).
    pub presence_failed_total: AtomicU64,
    /// Batches left unanswered because this instance could not confirm it still owned their
    /// partitions, or abandoned at a rebalance (README.md, "Fencing").
    pub unconfirmed_batches_total: AtomicU64,
    /// Partitions this instance found fenced off by a newer owner while recovering them.
    pub fenced_total: AtomicU64,
}

impl StageStats {
    pub fn render(&self, out: &mut String) {
        let mut p = Prom::new(out);
        for (name, help, v) in [
            (
                "im_logic_messages_total",
                "messages sequenced and logged to im.messages",
                &self.messages_total,
            ),
            (
                "im_logic_retries_total",
                "sends recognised as retries (answered with the first ack)",
                &self.retries_total,
            ),
            (
                "im_logic_refused_total",
                "sends refused (not a member, unknown user)",
                &self.refused_total,
            ),
            (
                "im_logic_typing_relayed_total",
                "typing frames relayed to a conversation's online members",
                &self.typing_relayed_total,
            ),
            (
                "im_logic_typing_dropped_total",
                "typing frames dropped (too frequent, not a member, a group too large)",
                &self.typing_dropped_total,
            ),
            (
                "im_logic_presence_events_total",
                "presence events from gateways (a user's connection opened or closed)",
                &self.presence_events_total,
            ),
            (
                "im_logic_presence_told_total",
                "presence changes told to contacts (a first connection; a last one, after its debounce)",
                &self.presence_told_total,
            ),
            (
                "im_logic_presence_dropped_total",
                "presence events dropped (too many at once)",
                &self.presence_dropped_total,
            ),
            (
                "im_logic_push_offered_total",
                "notifications offered for recipients with no device online",
                &self.push.offered_total,
            ),
            (
                "im_logic_push_delivered_total",
                "push deliveries a provider's receiver took (one per webhook POST or browser)",
                &self.push.delivered_total,
            ),
            (
                "im_logic_push_retried_total",
                "push attempts that failed for a reason that may pass, and were tried again",
                &self.push.retried_total,
            ),
            (
                "im_logic_push_dropped_total",
                "push deliveries dropped (queue full, refused, or out of attempts)",
                &self.push.dropped_total,
            ),
            (
                "im_logic_push_muted_total",
                "notifications not pushed: the recipient muted the conversation",
                &self.push.muted_total,
            ),
            (
                "im_logic_push_gone_total",
                "web push subscriptions forgotten: their push service said they are gone",
                &self.push.gone_total,
            ),
            (
                "im_logic_downstream_records_total",
                "records produced to gateways",
                &self.deliveries_total,
            ),
            (
                "im_logic_downstream_failed_total",
                "records for gateways the broker never took (live deliveries dropped)",
                &self.downstream_failed_total,
            ),
            (
                "im_logic_presence_failed_total",
                "batches not delivered live: presence could not be read (sync recovers them)",
                &self.presence_failed_total,
            ),
            (
                "im_logic_unconfirmed_batches_total",
                "batches left unanswered to the partitions' next owner: ownership not confirmed, or a rebalance",
                &self.unconfirmed_batches_total,
            ),
            (
                "im_logic_fenced_total",
                "partitions found fenced off by a newer owner while recovering them",
                &self.fenced_total,
            ),
            (
                "im_logic_bad_records_total",
                "upstream records skipped as unreadable",
                &self.bad_records_total,
            ),
            (
                "im_logic_syncs_total",
                "sync requests answered",
                &self.syncs_total,
            ),
            (
                "im_logic_batches_total",
                "batches answered",
                &self.batches_total,
            ),
            (
                "im_logic_sequencing_microseconds_total",
                "time batches spent checked and sequenced, until produced",
                &self.sequencing_us_total,
            ),
            (
                "im_logic_durable_wait_microseconds_total",
                "time batches waited after producing, until durable and in their turn",
                &self.durable_wait_us_total,
            ),
        ] {
            p.single(name, Kind::Counter, help, &[], v.load(Ordering::Relaxed));
        }
        self.upstream_age.render(
            &mut p,
            "im_logic_upstream_age_milliseconds",
            "age of im.upstream records (since produced) when the stage takes them",
            &[],
        );
        self.batch_time.render(
            &mut p,
            "im_logic_batch_milliseconds",
            "per batch: first record taken to answers produced (checks, sequencing, durable wait)",
            &[],
        );
        self.ack_time.render(
            &mut p,
            "im_logic_messages_ack_milliseconds",
            "per record: produced to im.messages until acknowledged as durable",
            &[],
        );
        self.confirm_time.render(
            &mut p,
            "im_logic_confirm_milliseconds",
            "per release of durable batches: the waiting offset commit that confirms ownership",
            &[],
        );
        self.downstream_ack_time.render(
            &mut p,
            "im_logic_downstream_ack_milliseconds",
            "per record: produced to a gateway's topic until the broker acknowledged it",
            &[],
        );
    }
}

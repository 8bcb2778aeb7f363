//! Releasing durable batches (README.md, "Fencing"): a batch is answered and routed only
//! once a waiting offset commit has confirmed that this instance still owns its partitions;
//! `answer` is what answering it means (`sent`, errors, live delivery).

use super::pipeline::Pipeline;
use super::sequencer::{Admitted, Decision};
use super::state::Ack;
use super::{trace, Produced, Stage};
use im_bus::{Consumer, TraceParent};
use im_shared::records::Stored;
use std::sync::atomic::Ordering;

impl Stage {
    /// Answers the batches that are durable, oldest first, once this instance has confirmed
    /// that it still owns their partitions: a waiting commit of their offsets, which the
    /// group's coordinator accepts only from a current member (one commit confirms every
    /// batch that became durable before it was sent; while it waits, later acknowledgements
    /// pile up for the next). Unconfirmed batches are not answered, nor is anything in flight
    /// after them (`unconfirmed`); then the state of every partition is forgotten: their
    /// owner, this instance or another, recovers and answers their senders' requests
    /// (sequenced again, or recognised as retries).
    pub(super) async fn release(
        &mut self,
        pipe: &mut Pipeline<Produced>,
        consumer: &mut dyn Consumer,
    ) {
        if self.unconfirmed {
            while pipe.pop_ready().is_some() {
                self.stats
                    .unconfirmed_batches_total
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.end_unconfirmed(pipe);
            return;
        }
        let mut ready = Vec::new();
        while let Some(b) = pipe.pop_ready() {
            for &(p, o) in &b.offsets {
                let next = self.uncommitted.entry(p).or_insert(o);
                *next = (*next).max(o);
            }
            ready.push(b);
        }
        if ready.is_empty() {
            return;
        }
        if let Err(e) = self.confirm(consumer) {
            self.stats
                .unconfirmed_batches_total
                .fetch_add(ready.len() as u64, Ordering::Relaxed);
            log::warn!(
                "logic: {} durable batches left unanswered, and the {} still in flight: ownership not confirmed: {e}",
                ready.len(),
                pipe.len()
            );
            self.unconfirmed = true;
            self.end_unconfirmed(pipe);
            return;
        }
        for b in ready {
            let waited = b.produced.elapsed().as_micros() as u64;
            self.stats.batches_total.fetch_add(1, Ordering::Relaxed);
            self.stats
                .durable_wait_us_total
                .fetch_add(waited, Ordering::Relaxed);
            if !b.decisions.is_empty() {
                self.answer(&b.decisions, &b.traces).await;
            }
            let ms = b.taken.elapsed().as_millis() as u64;
            self.stats.batch_time.observe(ms);
        }
    }

    /// Once nothing is in flight after a failed confirmation: every partition is recovered
    /// again before its next record.
    fn end_unconfirmed(&mut self, pipe: &Pipeline<Produced>) {
        if pipe.is_empty() {
            self.unconfirmed = false;
            self.seq.forget_all();
        }
    }

    /// Commits the offsets released so far and waits: `Ok` when the group's coordinator took
    /// them from this member in the generation its partitions were assigned in.
    fn confirm(&mut self, consumer: &mut dyn Consumer) -> Result<(), String> {
        let offsets: Vec<(i32, i64)> = std::mem::take(&mut self.uncommitted).into_iter().collect();
        if !offsets.is_empty() {
            let started = std::time::Instant::now();
            consumer.commit(&offsets, true)?;
            let ms = started.elapsed().as_millis() as u64;
            self.stats.confirm_time.observe(ms);
        }
        // A member that was expelled and has rejoined commits in its new generation: its
        // batches of the old one are not confirmed by that.
        let now = consumer.generation();
        if now != self.generation {
            return Err(format!(
                "the group moved from generation {} to {now}",
                self.generation
            ));
        }
        Ok(())
    }

    /// Once durable: `sent` to each sender (retries first, as before the batch's new
    /// messages), and the new messages routed to their recipients' gateways. `traces` is
    /// the batch's (`Produced::traces`).
    pub(super) async fn answer(
        &self,
        decisions: &[(Decision, Admitted)],
        traces: &[Option<TraceParent>],
    ) {
        let mut fresh: Vec<(&Stored, &Admitted)> = Vec::new();
        // Beside `fresh`, when any send of the batch is traced (else nothing is allocated):
        // what each message's records carry (its `im.route` span's context, or, this
        // process recording nothing, the context it came with), and the span.
        let traced = !traces.is_empty();
        let mut route_traces: Vec<Option<TraceParent>> = Vec::new();
        let mut routes: Vec<Option<tracing::Span>> = Vec::new();
        for (i, (d, s)) in decisions.iter().enumerate() {
            let t = traces.get(i).copied().flatten();
            match d {
                Decision::RetryOf(ack) => {
                    self.stats.retries_total.fetch_add(1, Ordering::Relaxed);
                    self.down.reply_sent(&s.up, &s.send.cid, ack, t.as_ref());
                }
                Decision::Assigned(rec) => {
                    fresh.push((rec, s));
                    if traced {
                        let span = t.as_ref().and_then(|t| trace::route(t, rec));
                        route_traces.push(span.as_ref().and_then(im_telemetry::context).or(t));
                        routes.push(span);
                    }
                }
                Decision::Refused(code, msg) => {
                    self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                    let cid = Some(s.send.cid.as_str());
                    self.down
                        .reply_error_traced(&s.up, *code, msg, cid, t.as_ref());
                }
            }
        }
        self.stats
            .messages_total
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.route(&fresh, &route_traces).await;
        for (i, (rec, s)) in fresh.into_iter().enumerate() {
            let ack = Ack {
                id: rec.id,
                conv: rec.conv.clone(),
                seq: rec.seq,
                ts: rec.ts,
            };
            let t = route_traces.get(i).and_then(Option::as_ref);
            self.down.reply_sent(&s.up, &rec.cid, &ack, t);
        }
        // The route spans end once the records are queued for the gateways.
        drop(routes);
    }
}

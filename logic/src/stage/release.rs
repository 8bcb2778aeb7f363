//! Releasing durable batches (README.md, "Fencing"): a batch is answered and routed only
//! once a waiting offset commit has confirmed that this instance still owns its partitions.

use super::pipeline::Pipeline;
use super::{Produced, Stage};
use im_bus::Consumer;
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
}

//! Counters of the persist service, and their Prometheus text form.

use im_shared::metrics::{Kind, Prom};
use std::sync::atomic::{AtomicU64, Ordering};

/// Updated by the writer, read by whoever serves metrics; all counters only grow.
#[derive(Debug, Default)]
pub struct PersistStats {
    /// Message rows inserted.
    pub rows_total: AtomicU64,
    /// Rows of written batches that were already stored (replays after a crash or rebalance).
    pub duplicates_total: AtomicU64,
    /// Batches written.
    pub batches_total: AtomicU64,
    /// Failed batch writes (each is retried).
    pub retries_total: AtomicU64,
    /// Records that could not be decoded, skipped.
    pub skipped_total: AtomicU64,
    /// Buffered rows dropped because their partition moved to another consumer.
    pub revoked_rows_total: AtomicU64,
    /// Messages not stored because their writer had been fenced off (README.md,
    /// "Fencing"): a logic instance that lost its partitions without knowing it yet.
    pub fenced_total: AtomicU64,
    /// Offset commits the broker refused (retried with the next).
    pub commit_failures_total: AtomicU64,
    /// How long the last batch took to write, failed attempts and waits included.
    pub last_batch_us: AtomicU64,
}

/// `stats` in the Prometheus text exposition format.
pub fn render_metrics(stats: &PersistStats) -> String {
    let counters = [
        (
            "im_persist_rows_total",
            "Message rows inserted into the database.",
            &stats.rows_total,
        ),
        (
            "im_persist_duplicates_total",
            "Rows of written batches that were already stored.",
            &stats.duplicates_total,
        ),
        (
            "im_persist_batches_total",
            "Batches written.",
            &stats.batches_total,
        ),
        (
            "im_persist_retries_total",
            "Failed batch writes, each retried.",
            &stats.retries_total,
        ),
        (
            "im_persist_skipped_total",
            "Records that could not be decoded, skipped.",
            &stats.skipped_total,
        ),
        (
            "im_persist_revoked_rows_total",
            "Buffered rows dropped when their partition was revoked.",
            &stats.revoked_rows_total,
        ),
        (
            "im_persist_fenced_total",
            "Messages not stored because a newer owner of their partition had fenced their writer off.",
            &stats.fenced_total,
        ),
        (
            "im_persist_commit_failures_total",
            "Offset commits that failed.",
            &stats.commit_failures_total,
        ),
    ];
    let mut out = String::with_capacity(1024);
    let mut p = Prom::new(&mut out);
    for (name, help, value) in counters {
        p.single(
            name,
            Kind::Counter,
            help,
            &[],
            value.load(Ordering::Relaxed),
        );
    }
    let seconds = stats.last_batch_us.load(Ordering::Relaxed) as f64 / 1e6;
    p.single(
        "im_persist_last_batch_seconds",
        Kind::Gauge,
        "Time to write the last batch.",
        &[],
        format_args!("{seconds:.6}"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prometheus_text() {
        let s = PersistStats::default();
        s.rows_total.store(1500, Ordering::Relaxed);
        s.batches_total.store(3, Ordering::Relaxed);
        s.retries_total.store(2, Ordering::Relaxed);
        s.skipped_total.store(1, Ordering::Relaxed);
        s.last_batch_us.store(12_500, Ordering::Relaxed);
        let text = render_metrics(&s);
        for line in [
            "# TYPE im_persist_rows_total counter",
            "\nim_persist_rows_total 1500\n",
            "\nim_persist_batches_total 3\n",
            "\nim_persist_retries_total 2\n",
            "\nim_persist_skipped_total 1\n",
            "\nim_persist_commit_failures_total 0\n",
            "\nim_persist_last_batch_seconds 0.012500\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Every sample line is `name value`, each name described once.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.split_once(' ').unwrap();
            assert!(name.starts_with("im_persist_") && value.parse::<f64>().is_ok());
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1);
        }
        assert!(text.ends_with('\n'));
    }
}

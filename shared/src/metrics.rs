//! A small writer of the Prometheus text format (version 0.0.4), used by every service's
//! `/metrics`: the gateway's shards and bridge, logic's stage, persist.
//!
//! A metric family is its `# HELP` and `# TYPE` lines followed by its samples; label values
//! are escaped as the format asks (backslash, double quote, newline). Writing into a `String`
//! cannot fail, so nothing here returns an error.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The content type of what `Prom` writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Adds one to `counter`; the new total for the first and then every 1,000th, `None`
/// otherwise. For a failure that comes in floods (every record while a broker is down): it is
/// counted each time and logged now and then.
pub fn count_rarely(counter: &AtomicU64) -> Option<u64> {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    (n % 1000 == 0).then_some(n + 1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Appends metric families to a text buffer.
pub struct Prom<'a> {
    out: &'a mut String,
}

impl<'a> Prom<'a> {
    pub fn new(out: &'a mut String) -> Prom<'a> {
        Prom { out }
    }

    /// The `# HELP` and `# TYPE` lines of family `name`; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            help.trim(),
            kind.as_str()
        );
        self
    }

    /// One sample, `name{label="value",...} value`.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_into(v, self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single sample.
    pub fn single(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.family(name, kind, help).sample(name, labels, value)
    }
}

/// Counters by error code (`ErrorCode::ALL`'s order): the `error` answers a process gave
/// its clients, for the dashboards' error panels.
#[derive(Debug, Default)]
pub struct ErrorCounts([AtomicU64; crate::ErrorCode::ALL.len()]);

impl ErrorCounts {
    /// All zero (for a `static`).
    pub const fn new() -> ErrorCounts {
        ErrorCounts([const { AtomicU64::new(0) }; crate::ErrorCode::ALL.len()])
    }

    /// The counter of `code`.
    pub fn of(&self, code: crate::ErrorCode) -> &AtomicU64 {
        let i = crate::ErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .expect("every code is in ALL");
        &self.0[i]
    }

    /// Counts one answer with `code` (from any thread).
    pub fn count(&self, code: crate::ErrorCode) {
        self.of(code).fetch_add(1, Ordering::Relaxed);
    }

    /// The samples of family `name` (the caller writes its `family` line), one per code,
    /// `code` added to `labels`.
    pub fn samples(&self, p: &mut Prom<'_>, name: &str, labels: &[(&str, &str)]) {
        for (c, n) in crate::ErrorCode::ALL.iter().zip(&self.0) {
            let code = c.code().to_string();
            let mut l = labels.to_vec();
            l.push(("code", &code));
            p.sample(name, &l, n.load(Ordering::Relaxed));
        }
    }

    /// A whole family: `samples` after its `# HELP` and `# TYPE` lines.
    pub fn render(&self, p: &mut Prom<'_>, name: &str, help: &str, labels: &[(&str, &str)]) {
        p.family(name, Kind::Counter, help);
        self.samples(p, name, labels);
    }
}

/// Upper bounds (ms) of `MillisHistogram`'s buckets: 1 ms to a minute, about three a decade.
pub const MILLIS_BUCKETS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000,
];

/// A Prometheus histogram of milliseconds with fixed buckets (`MILLIS_BUCKETS`, then +Inf),
/// lock-free: `observe` is a few relaxed atomic adds, cheap enough for every record.
#[derive(Debug, Default)]
pub struct MillisHistogram {
    /// Per bucket, not cumulative (the +Inf bucket last); cumulated when rendered.
    buckets: [AtomicU64; MILLIS_BUCKETS.len() + 1],
    sum_ms: AtomicU64,
}

impl MillisHistogram {
    pub fn observe(&self, ms: u64) {
        let i = MILLIS_BUCKETS.partition_point(|&le| le < ms);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The family, its cumulative `_bucket` samples, `_sum` and `_count`.
    pub fn render(&self, prom: &mut Prom<'_>, name: &str, help: &str, labels: &[(&str, &str)]) {
        prom.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut total = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            let le = MILLIS_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |v| v.to_string());
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            prom.sample(&bucket, &with_le, total);
        }
        prom.sample(
            &format!("{name}_sum"),
            labels,
            self.sum_ms.load(Ordering::Relaxed),
        );
        prom.sample(&format!("{name}_count"), labels, total);
    }
}

/// The C libraries' heap, as glibc's malloc counts it: bytes handed out and not yet freed,
/// and bytes freed but kept by the allocator. In `im` that is SQLite's page cache and
/// librdkafka's buffers; Rust's own heap is the allocator the binary chose (`set_allocator_probe`).
/// RSS alone cannot tell a growing structure (in use grows) from fragmentation (free grows).
/// `mallinfo2` walks every arena under its lock: fine once per scrape, nothing on the hot
/// path. `None` off glibc.
pub fn malloc_bytes() -> Option<(u64, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
        let m = unsafe { libc::mallinfo2() };
        // uordblks: in use from the arenas; hblkhd: large blocks served by mmap (in use).
        Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The Rust allocator's name and a probe of the memory it has committed from the OS (in use
/// or cached for reuse), set once by the binary that chose the allocator.
static ALLOCATOR_PROBE: OnceLock<AllocatorProbe> = OnceLock::new();

/// An allocator's name and how to read its committed bytes.
type AllocatorProbe = (&'static str, fn() -> u64);

/// Registers the process's global allocator for `render_heap` (the first call wins).
pub fn set_allocator_probe(name: &'static str, committed_bytes: fn() -> u64) {
    let _ = ALLOCATOR_PROBE.set((name, committed_bytes));
}

/// The heap gauges: `im_allocator_committed_bytes` (Rust's heap, when the binary registered
/// its allocator), `im_malloc_in_use_bytes` and `im_malloc_free_bytes` (the C libraries').
pub fn render_heap(prom: &mut Prom<'_>) {
    if let Some((name, committed)) = ALLOCATOR_PROBE.get() {
        prom.single(
            "im_allocator_committed_bytes",
            Kind::Gauge,
            "Memory the Rust allocator has committed from the OS (in use or cached for reuse).",
            &[("allocator", name)],
            committed(),
        );
    }
    if let Some((in_use, free)) = malloc_bytes() {
        prom.single(
            "im_malloc_in_use_bytes",
            Kind::Gauge,
            "The C libraries' heap (glibc malloc: SQLite's page cache, librdkafka): allocated, not freed.",
            &[],
            in_use,
        );
        prom.single(
            "im_malloc_free_bytes",
            Kind::Gauge,
            "The C libraries' heap: freed but still held by malloc (fragmentation, arena slack).",
            &[],
            free,
        );
    }
}

fn escape_into(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_rarely_answers_the_first_and_every_thousandth() {
        let c = AtomicU64::new(0);
        let said: Vec<u64> = (0..2_500).filter_map(|_| count_rarely(&c)).collect();
        assert_eq!(said, [1, 1001, 2001]);
        assert_eq!(c.load(Ordering::Relaxed), 2_500);
    }

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut out = String::new();
        Prom::new(&mut out)
            .family("im_x_total", Kind::Counter, " Things. ")
            .sample("im_x_total", &[("shard", "0")], 5)
            .sample("im_x_total", &[("shard", "1"), ("gw", "a\"b\\c\nd")], 7)
            .single("im_y", Kind::Gauge, "Now.", &[], format_args!("{:.3}", 0.5));
        assert_eq!(
            out,
            "# HELP im_x_total Things.\n# TYPE im_x_total counter\n\
             im_x_total{shard=\"0\"} 5\n\
             im_x_total{shard=\"1\",gw=\"a\\\"b\\\\c\\nd\"} 7\n\
             # HELP im_y Now.\n# TYPE im_y gauge\nim_y 0.500\n"
        );
    }

    #[test]
    fn the_c_heap_counts_what_malloc_hands_out() {
        let Some((before, _)) = malloc_bytes() else {
            return; // not glibc: nothing to count
        };
        // SAFETY: a plain malloc and free of our own block.
        let block = unsafe { libc::malloc(64 << 20) };
        assert!(!block.is_null());
        let (during, _) = malloc_bytes().unwrap();
        unsafe { libc::free(block) };
        assert!(during >= before + (60 << 20), "{before} → {during}");
        set_allocator_probe("test", || 42);
        let mut out = String::new();
        render_heap(&mut Prom::new(&mut out));
        assert!(out.contains("\nim_allocator_committed_bytes{allocator=\"test\"} 42\n"));
        assert!(out.contains("# TYPE im_malloc_in_use_bytes gauge\nim_malloc_in_use_bytes "));
        assert!(out.contains("\nim_malloc_free_bytes "));
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let h = MillisHistogram::default();
        for ms in [0, 1, 3, 7, 70_000] {
            h.observe(ms);
        }
        assert_eq!(h.count(), 5);
        let mut out = String::new();
        h.render(
            &mut Prom::new(&mut out),
            "im_age_milliseconds",
            "Age.",
            &[("t", "x")],
        );
        assert!(out.starts_with(
            "# HELP im_age_milliseconds Age.\n# TYPE im_age_milliseconds histogram\n\
             im_age_milliseconds_bucket{t=\"x\",le=\"1\"} 2\n\
             im_age_milliseconds_bucket{t=\"x\",le=\"2\"} 2\n\
             im_age_milliseconds_bucket{t=\"x\",le=\"5\"} 3\n\
             im_age_milliseconds_bucket{t=\"x\",le=\"10\"} 4\n"
        ));
        assert!(out.contains("im_age_milliseconds_bucket{t=\"x\",le=\"60000\"} 4\n"));
        assert!(out.ends_with(
            "im_age_milliseconds_bucket{t=\"x\",le=\"+Inf\"} 5\n\
             im_age_milliseconds_sum{t=\"x\"} 70011\n\
             im_age_milliseconds_count{t=\"x\"} 5\n"
        ));
    }
}

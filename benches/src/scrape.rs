//! Where a message's time goes, from the services' own `/metrics`: the harness scrapes each
//! address before and after its window and reports, for every millisecond histogram it finds
//! (`*_milliseconds`: the age of records as each consumer takes them, logic's time per
//! batch), what was observed in between — count, mean, and the p50 and p99 as the upper
//! bound of the bucket they fall in. Histograms only; a plain HTTP/1.0 GET, so a service
//! needs nothing but its `/metrics`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The most of one `/metrics` page read.
const METRICS_BYTES_MAX: u64 = 16 << 20;

/// One histogram's cumulative buckets (upper bound ms, `f64::INFINITY` last), sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
struct Hist {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

/// Every `*_milliseconds` histogram of one scrape, by name and labels (without `le`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot(BTreeMap<String, Hist>);

/// What a histogram observed between two snapshots.
#[derive(Clone, Debug, Serialize)]
pub struct Observed {
    pub name: String,
    pub count: u64,
    pub mean_ms: f64,
    /// The upper bounds of the buckets holding the p50 and p99 (`None`: past the last bound).
    pub p50_le_ms: Option<f64>,
    pub p99_le_ms: Option<f64>,
}

/// Scrapes `addrs` (host:port serving `/metrics`); an address that does not answer is skipped
/// with a warning, so a missing service costs its rows, not the run.
pub fn snapshot(addrs: &[SocketAddr]) -> Snapshot {
    let mut all = Snapshot::default();
    for addr in addrs {
        match get_metrics(*addr) {
            Ok(text) => parse_into(&text, &mut all),
            Err(e) => eprintln!("scrape {addr}: {e}"),
        }
    }
    all
}

fn get_metrics(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = Vec::new();
    // Bounded: a /metrics page is kilobytes.
    s.take(METRICS_BYTES_MAX).read_to_end(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Adds the `*_milliseconds` histograms of one exposition to `into`.
fn parse_into(text: &str, into: &mut Snapshot) {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut le = None;
        let others: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .filter(|l| match l.strip_prefix("le=") {
                Some(v) => {
                    le = Some(v.trim_matches('"').to_string());
                    false
                }
                None => true,
            })
            .collect();
        let key = |base: &str| format!("{base}{{{}}}", others.join(","));
        if let Some(base) = name.strip_suffix("_milliseconds_bucket") {
            let bound = match le.as_deref() {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().unwrap_or(f64::INFINITY),
                None => continue,
            };
            let h = into.0.entry(key(base)).or_default();
            h.buckets.push((bound, value as u64));
        } else if let Some(base) = name.strip_suffix("_milliseconds_sum") {
            into.0.entry(key(base)).or_default().sum = value;
        } else if let Some(base) = name.strip_suffix("_milliseconds_count") {
            into.0.entry(key(base)).or_default().count = value as u64;
        }
    }
}

/// What each histogram in `after` observed since `before` (histograms that saw nothing are
/// left out).
pub fn between(before: &Snapshot, after: &Snapshot) -> Vec<Observed> {
    let mut out = Vec::new();
    for (name, a) in &after.0 {
        let b = before.0.get(name).cloned().unwrap_or_default();
        let count = a.count.saturating_sub(b.count);
        if count == 0 {
            continue;
        }
        let below = |bound: f64| {
            b.buckets
                .iter()
                .find(|(le, _)| *le == bound)
                .map_or(0, |(_, n)| *n)
        };
        let deltas: Vec<(f64, u64)> = a
            .buckets
            .iter()
            .map(|&(le, n)| (le, n.saturating_sub(below(le))))
            .collect();
        let quantile = |q: f64| {
            let rank = (q * count as f64).ceil().max(1.0) as u64;
            deltas
                .iter()
                .find(|(_, n)| *n >= rank)
                .map(|(le, _)| *le)
                .filter(|le| le.is_finite())
        };
        out.push(Observed {
            name: name.clone(),
            count,
            mean_ms: (a.sum - b.sum) / count as f64,
            p50_le_ms: quantile(0.5),
            p99_le_ms: quantile(0.99),
        });
    }
    out
}

pub fn print(observed: &[Observed]) {
    if observed.is_empty() {
        return;
    }
    println!("  from the services' /metrics over the window:");
    for o in observed {
        let le = |v: Option<f64>| v.map_or("> last bucket".to_string(), |v| format!("≤ {v} ms"));
        println!(
            "    {:<70} n {:>7}  mean {:>7.1} ms  p50 {:<10} p99 {}",
            o.name,
            o.count,
            o.mean_ms,
            le(o.p50_le_ms),
            le(o.p99_le_ms)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE im_a_age_milliseconds histogram\n\
        im_a_age_milliseconds_bucket{gateway=\"g\",le=\"1\"} 1\n\
        im_a_age_milliseconds_bucket{gateway=\"g\",le=\"10\"} 1\n\
        im_a_age_milliseconds_bucket{gateway=\"g\",le=\"+Inf\"} 1\n\
        im_a_age_milliseconds_sum{gateway=\"g\"} 1\n\
        im_a_age_milliseconds_count{gateway=\"g\"} 1\n\
        im_other_total 5\n";

    #[test]
    fn observations_between_two_scrapes() {
        let after = BEFORE
            .replace("le=\"10\"} 1", "le=\"10\"} 99")
            .replace("le=\"+Inf\"} 1", "le=\"+Inf\"} 101")
            .replace("_sum{gateway=\"g\"} 1", "_sum{gateway=\"g\"} 1001")
            .replace("_count{gateway=\"g\"} 1", "_count{gateway=\"g\"} 101");
        let (mut b, mut a) = (Snapshot::default(), Snapshot::default());
        parse_into(BEFORE, &mut b);
        parse_into(&after, &mut a);
        let got = between(&b, &a);
        assert_eq!(got.len(), 1);
        let o = &got[0];
        assert_eq!(o.name, "im_a_age{gateway=\"g\"}");
        assert_eq!(o.count, 100);
        assert_eq!(o.mean_ms, 10.0);
        // 98 of the 100 new observations are ≤ 10 ms, two past the last bound.
        assert_eq!(o.p50_le_ms, Some(10.0));
        assert_eq!(o.p99_le_ms, None);
        assert!(between(&a, &a).is_empty(), "nothing new, nothing reported");
    }
}

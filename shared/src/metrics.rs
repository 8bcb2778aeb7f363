//! A small writer of the Prometheus text format (version 0.0.4), used by every service's
//! `/metrics`: the gateway's shards and bridge, logic's stage, persist.
//!
//! A metric family is its `# HELP` and `# TYPE` lines followed by its samples; label values
//! are escaped as the format asks (backslash, double quote, newline). Writing into a `String`
//! cannot fail, so nothing here returns an error.

use std::fmt::{Display, Write};

/// The content type of what `Prom` writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
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
}

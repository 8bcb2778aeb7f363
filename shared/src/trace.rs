//! W3C Trace Context (`traceparent`, https://www.w3.org/TR/trace-context/): the trace a
//! sampled message belongs to and the span that handed it on. It travels in the `traceparent`
//! header of the bus's records (`im.upstream` → `im.messages` → `im.downstream.<gateway>`), so
//! each process's spans join the gateway's trace (im-telemetry exports them).
//!
//! Plain data with no I/O: 25 bytes, copied, never allocated for a record that carries none.

/// The record header (and HTTP header) name.
pub const HEADER: &str = "traceparent";
/// `00-` + 32 hex + `-` + 16 hex + `-` + 2 hex.
pub const LEN: usize = 55;
/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The span the next one is a child of.
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// A sampled context; `None` if either id is all zeros (invalid in W3C).
    pub fn sampled(trace_id: [u8; 16], span_id: [u8; 8]) -> Option<TraceParent> {
        let t = TraceParent {
            trace_id,
            span_id,
            flags: SAMPLED,
        };
        t.is_valid().then_some(t)
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }

    /// Parses a `traceparent` value. Versions above 00 are read as 00 (the spec says a
    /// reader takes the first four fields of a future version); anything malformed is `None`,
    /// and the record is then simply untraced.
    pub fn parse(s: &[u8]) -> Option<TraceParent> {
        if s.len() < LEN || (s.len() > LEN && (s[..2] == *b"00" || s[LEN] != b'-')) {
            return None;
        }
        if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' || s[..2] == *b"ff" {
            return None;
        }
        let mut version = [0u8; 1];
        hex_into(&s[..2], &mut version)?;
        let mut t = TraceParent {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex_into(&s[3..35], &mut t.trace_id)?;
        hex_into(&s[36..52], &mut t.span_id)?;
        let mut flags = [0u8; 1];
        hex_into(&s[53..55], &mut flags)?;
        t.flags = flags[0];
        t.is_valid().then_some(t)
    }

    /// The header value, lowercase hex as the spec writes it.
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [b'-'; LEN];
        out[..2].copy_from_slice(b"00");
        hex_to(&self.trace_id, &mut out[3..35]);
        hex_to(&self.span_id, &mut out[36..52]);
        hex_to(&[self.flags], &mut out[53..55]);
        out
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.encode();
        // encode() writes ASCII only.
        f.write_str(std::str::from_utf8(&e).map_err(|_| std::fmt::Error)?)
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long).
pub fn hex_to(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
}

/// Lowercase hex only (W3C forbids uppercase).
fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(hex[2 * i])? << 4 | digit(hex[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the W3C recommendation, section 3.2.
    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_round_trips() {
        let t = TraceParent::parse(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(t.trace_id[..4], [0x4b, 0xf9, 0x2f, 0x35]);
        assert_eq!(t.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(t.is_sampled());
        assert_eq!(t.to_string(), EXAMPLE);
        assert_eq!(std::mem::size_of::<TraceParent>(), 25);
    }

    #[test]
    fn malformed_values_are_refused() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b:?}");
        }
        // A later version may append fields after a dash.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        let t = TraceParent::parse(future.as_bytes()).expect("future version");
        assert!(!t.is_sampled());
    }
}

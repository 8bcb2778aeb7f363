//! RFC 6455 framing over borrowed bytes: parse a header, unmask a payload in place, write a
//! server frame. No buffering lives here; the shard decides where partial frames go (the arena),
//! so an idle connection owns no buffer at all.

/// Why a frame is refused; each maps to the close code docs/PROTOCOL.md names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// RSV bits, unknown opcode, unmasked client frame, bad control frame, bad fragmentation.
    Protocol(&'static str),
    /// Payload (or reassembled message) larger than the configured limit.
    TooLarge,
    /// A text message or close reason that is not UTF-8.
    InvalidUtf8,
}

impl FrameError {
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol(_) => close::PROTOCOL,
            FrameError::TooLarge => close::TOO_LARGE,
            FrameError::InvalidUtf8 => close::INVALID_DATA,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            FrameError::Protocol(r) => r,
            FrameError::TooLarge => "frame too large",
            FrameError::InvalidUtf8 => "invalid UTF-8",
        }
    }
}

/// Close codes we send (docs/PROTOCOL.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_LARGE: u16 = 1009;
    /// The server restarts (a drain): reconnect, to another gateway if login names one.
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TRY_AGAIN: u16 = 1013;
}

pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// The largest header a server writes (2 + 8 bytes of length, no mask).
pub const SERVER_HEADER_MAX: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    /// Bytes of header, including the mask key.
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a client frame header. `Ok(None)`: not enough bytes yet.
/// A payload longer than `payload_max` is refused here, before any of it is buffered.
pub fn parse_header(buf: &[u8], payload_max: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    if !matches!(
        op,
        opcode::CONTINUATION
            | opcode::TEXT
            | opcode::BINARY
            | opcode::CLOSE
            | opcode::PING
            | opcode::PONG
    ) {
        return Err(FrameError::Protocol("unknown opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frame not masked"));
    }
    let len7 = (b1 & 0x7F) as usize;
    let is_control = op & 0x8 != 0;
    if is_control && (!fin || len7 > 125) {
        return Err(FrameError::Protocol(
            "control frame fragmented or longer than 125 bytes",
        ));
    }
    let (len, at) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let v = u64::from_be_bytes(b);
            if v >> 63 != 0 {
                return Err(FrameError::Protocol("64-bit length with the top bit set"));
            }
            (v, 10)
        }
        n => (n as u64, 2),
    };
    if len > payload_max as u64 {
        return Err(FrameError::TooLarge);
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    Ok(Some(Header {
        fin,
        opcode: op,
        mask,
        header_len: at + 4,
        payload_len: len as usize,
    }))
}

/// XORs `payload` with the mask key, eight bytes at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let m32 = u32::from_ne_bytes(mask);
    let m64 = ((m32 as u64) << 32) | m32 as u64;
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("chunk of 8")) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Length of the header a server frame with `payload_len` bytes needs.
pub fn server_header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes an unmasked, final server frame header into `out[..n]` and returns `n`.
pub fn write_server_header(opcode: u8, payload_len: usize, out: &mut [u8]) -> usize {
    out[0] = 0x80 | opcode;
    match payload_len {
        0..=125 => {
            out[1] = payload_len as u8;
            2
        }
        126..=65535 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        }
    }
}

/// A complete server frame in a fresh buffer (control frames, tests).
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; server_header_len(payload.len()) + payload.len()];
    let n = write_server_header(opcode, payload.len(), &mut out);
    out[n..].copy_from_slice(payload);
    out
}

/// A close frame with a status code and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    server_frame(opcode::CLOSE, &p)
}

/// Validates a received close payload; returns the code to echo back.
pub fn check_close_payload(payload: &[u8]) -> Result<u16, FrameError> {
    match payload.len() {
        0 => Ok(close::NORMAL),
        1 => Err(FrameError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            // 1004-1006 and 1015 are reserved: never sent on the wire.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(FrameError::Protocol("invalid close code"));
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(code)
        }
    }
}

/// Builds a masked client frame (tests and the benchmark harness speak as clients).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + payload.len());
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    #[test]
    fn round_trips_all_length_forms() {
        for len in [0usize, 1, 125, 126, 1000, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut f = client_frame(true, opcode::BINARY, &payload, [1, 2, 3, 4]);
            let h = parse_header(&f, MAX + 1).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.payload_len),
                (true, opcode::BINARY, len)
            );
            assert_eq!(h.frame_len(), f.len());
            let body = &mut f[h.header_len..];
            unmask(body, h.mask);
            assert_eq!(body, &payload[..]);
            // Every strict prefix of the header is "need more", never an error.
            for cut in 0..h.header_len {
                assert_eq!(
                    parse_header(&f[..cut], MAX + 1),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn refuses_what_rfc_6455_forbids() {
        let mut unmasked = client_frame(true, opcode::TEXT, b"hi", [0; 4]);
        unmasked[1] &= 0x7F;
        assert!(matches!(
            parse_header(&unmasked, MAX),
            Err(FrameError::Protocol(_))
        ));
        let mut rsv = client_frame(true, opcode::TEXT, b"hi", [9; 4]);
        rsv[0] |= 0x40;
        assert!(matches!(
            parse_header(&rsv, MAX),
            Err(FrameError::Protocol(_))
        ));
        let bad_op = client_frame(true, 0x3, b"", [9; 4]);
        assert!(matches!(
            parse_header(&bad_op, MAX),
            Err(FrameError::Protocol(_))
        ));
        let frag_ping = client_frame(false, opcode::PING, b"", [9; 4]);
        assert!(matches!(
            parse_header(&frag_ping, MAX),
            Err(FrameError::Protocol(_))
        ));
        let long_ping = client_frame(true, opcode::PING, &[0; 126], [9; 4]);
        assert!(matches!(
            parse_header(&long_ping, MAX),
            Err(FrameError::Protocol(_))
        ));
        let big = client_frame(true, opcode::TEXT, &[b'a'; 100], [9; 4]);
        assert_eq!(parse_header(&big, 99), Err(FrameError::TooLarge));
        // The size is refused from the header alone, before the payload has arrived.
        let huge_header = [0x81u8, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse_header(&huge_header, MAX), Err(FrameError::TooLarge));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(check_close_payload(&[]), Ok(1000));
        assert!(check_close_payload(&[3]).is_err());
        assert_eq!(check_close_payload(&[0x03, 0xE9]), Ok(1001));
        assert!(
            check_close_payload(&[0x03, 0xED]).is_err(),
            "1005 may not be sent"
        );
        assert_eq!(
            check_close_payload(&[0x03, 0xE8, 0xFF]),
            Err(FrameError::InvalidUtf8)
        );
    }

    #[test]
    fn server_headers() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut h = [0u8; SERVER_HEADER_MAX];
            assert_eq!(
                write_server_header(opcode::TEXT, len, &mut h),
                server_header_len(len)
            );
        }
        assert_eq!(close_frame(1009, "x"), vec![0x88, 3, 0x03, 0xF1, b'x']);
    }
}

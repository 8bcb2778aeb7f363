//! WebSocket framing (gateway-core `codec`): any bytes as a client frame header, and the
//! payload that follows unmasked and, for a close frame, checked; a frame built by
//! `client_frame` parses back to its own opcode and length.
#![no_main]

use gateway_core::codec::{check_close_payload, client_frame, parse_header, unmask};
use libfuzzer_sys::fuzz_target;

const PAYLOAD_MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = parse_header(data, PAYLOAD_MAX) {
        let len = h.frame_len();
        assert!(len >= h.header_len && len - h.header_len == h.payload_len);
        assert!(h.payload_len <= PAYLOAD_MAX);
        if len <= data.len() {
            let mut payload = data[h.header_len..len].to_vec();
            unmask(&mut payload, h.mask);
            if h.opcode == 0x8 {
                let _ = check_close_payload(&payload);
            }
        }
    }
    // Round trip: the first bytes choose the frame, the rest is its payload.
    if data.len() >= 6 {
        let (fin, opcode) = (data[0] & 1 == 1, data[1] & 0x0f);
        let mask = [data[2], data[3], data[4], data[5]];
        let payload = &data[6..];
        let frame = client_frame(fin, opcode, payload, mask);
        match parse_header(&frame, PAYLOAD_MAX) {
            Ok(Some(h)) => {
                assert_eq!((h.opcode, h.payload_len), (opcode, payload.len()));
                let mut p = frame[h.header_len..].to_vec();
                unmask(&mut p, h.mask);
                assert_eq!(p, payload);
            }
            // Refused (a reserved opcode, a fragmented or oversize control frame): fine.
            Ok(None) => panic!("a whole frame parsed as incomplete"),
            Err(_) => {}
        }
    }
});

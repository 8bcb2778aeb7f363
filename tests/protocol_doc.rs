//! docs/PROTOCOL.md is the client authors' contract; this holds it to the code where the code
//! can say: the REST routes (against the OpenAPI document, which `logic/tests/openapi.rs`
//! holds to the router), every error code, every close code the gateway sends, the limits,
//! and the example client frames (they must parse).

use gateway_core::codec::close;
use im_shared::protocol::{self, parse_request};
use im_shared::ErrorCode;
use serde_json::Value;
use std::collections::BTreeSet;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md exists")
}

/// The table rows of the section that starts with `heading`.
fn rows<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("no section {heading}"));
    let rest = &doc[start + heading.len()..];
    // The section ends at the next heading of any level.
    let end = rest.find("\n#").unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
        .collect()
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let spec: Value = serde_json::from_str(logic::api::OPENAPI_JSON).unwrap();
    let mut routed = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            routed.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let doc = doc();
    let documented: BTreeSet<String> = rows(&doc, "## REST")
        .iter()
        .filter_map(|r| r.strip_prefix("| `")?.split('`').next().map(str::to_owned))
        .filter(|r| r.contains(' '))
        .collect();
    assert_eq!(
        documented, routed,
        "docs/PROTOCOL.md's REST table against openapi.json"
    );
}

#[test]
fn every_error_code_is_documented() {
    let doc = doc();
    let table = rows(&doc, "## Error codes");
    for c in ErrorCode::ALL {
        let row = format!("| {} |", c.code());
        assert!(
            table.iter().any(|r| r.starts_with(&row)),
            "error code {c:?} ({}) missing",
            c.code()
        );
    }
    assert_eq!(
        table.len() - 1,
        ErrorCode::ALL.len(),
        "a documented code the server lacks"
    );
}

#[test]
fn every_close_code_the_gateway_sends_is_documented() {
    let doc = doc();
    let table = rows(&doc, "### Close codes");
    let sent = [
        close::NORMAL,
        close::GOING_AWAY,
        close::PROTOCOL,
        close::INVALID_DATA,
        close::POLICY,
        close::TOO_LARGE,
        close::SERVICE_RESTART,
        close::TRY_AGAIN,
    ];
    for code in sent {
        assert!(
            table.iter().any(|r| r.starts_with(&format!("| {code} |"))),
            "close {code} missing"
        );
    }
    assert_eq!(
        table.len() - 1,
        sent.len(),
        "a documented close code the gateway never sends"
    );
}

#[test]
fn the_limits_are_the_codes_limits() {
    let doc = doc();
    let frame = gateway_core::GatewayConfig::default().frame_bytes_max;
    for line in [
        format!(
            "| `content` | {} bytes (UTF-8) |",
            protocol::CONTENT_BYTES_MAX
        ),
        format!("| `cid` | {} bytes |", protocol::CID_BYTES_MAX),
        format!(
            "| `content_type` | {} bytes |",
            protocol::CONTENT_TYPE_BYTES_MAX
        ),
        format!(
            "| `sync` `limit` | {} messages (default {}) |",
            protocol::SYNC_LIMIT_MAX,
            protocol::SYNC_LIMIT_DEFAULT
        ),
        format!("fragments | {frame} bytes (`--frame-bytes-max`) |"),
        format!(
            "| access token | {} bytes |",
            im_shared::jwt::TOKEN_BYTES_MAX
        ),
    ] {
        assert!(doc.contains(&line), "docs/PROTOCOL.md lacks {line:?}");
    }
}

#[test]
fn the_example_client_frames_parse() {
    let doc = doc();
    let start = doc.find("### Client → server").unwrap();
    let section = &doc[start..doc[start..].find("### Server → client").unwrap() + start];
    let examples: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("{\"type\""))
        .collect();
    assert_eq!(examples.len(), 6);
    for e in examples {
        assert!(parse_request(e).is_ok(), "{e} does not parse");
    }
}

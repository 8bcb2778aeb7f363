//! The client protocol's parsing and encoding, byte for byte.

use super::*;

fn err(text: &str) -> RequestError {
    parse_request(text).unwrap_err()
}

#[test]
fn parses_send_to_user_with_string_or_number_id() {
    let r = parse_request(r#"{"type":"send","cid":"c1","to":"17","content":"hi"}"#).unwrap();
    assert_eq!(
        r,
        Request::Send {
            cid: "c1".into(),
            target: Target::User(17),
            content: "hi".into(),
            content_type: "text".into()
        }
    );
    let r = parse_request(
        r#"{"type":"send","cid":"c1","group":5,"content":"x","content_type":"image"}"#,
    )
    .unwrap();
    assert!(matches!(
        r,
        Request::Send {
            target: Target::Group(5),
            ..
        }
    ));
}

#[test]
fn borrows_when_there_are_no_escapes() {
    let text = r#"{"type":"send","cid":"c","to":"2","content":"plain"}"#;
    let Request::Send { content, .. } = parse_request(text).unwrap() else {
        panic!()
    };
    assert!(matches!(content, Cow::Borrowed(_)));
    let Request::Send { content, .. } =
        parse_request(r#"{"type":"send","cid":"c","to":"2","content":"a\"b"}"#).unwrap()
    else {
        panic!()
    };
    assert_eq!(content, "a\"b");
}

#[test]
fn every_bad_input_has_a_code() {
    assert_eq!(err("not json").code, ErrorCode::BadRequest);
    assert_eq!(err("[1,2]").code, ErrorCode::BadRequest);
    assert_eq!(err(r#"{"cid":"x"}"#).code, ErrorCode::UnknownType);
    assert_eq!(err(r#"{"type":"dance"}"#).code, ErrorCode::UnknownType);
    assert_eq!(
        err(r#"{"type":"send","to":"1","content":"x"}"#).code,
        ErrorCode::MissingField
    );
    let e = err(r#"{"type":"send","cid":"k","content":"x"}"#);
    assert_eq!(
        (e.code, e.cid.as_deref()),
        (ErrorCode::MissingField, Some("k"))
    );
    assert_eq!(
        err(r#"{"type":"send","cid":"k","to":"1","group":"2","content":"x"}"#).code,
        ErrorCode::InvalidField
    );
    assert_eq!(
        err(r#"{"type":"send","cid":"k","to":"abc","content":"x"}"#).code,
        ErrorCode::BadRequest
    );
    assert_eq!(
        err(r#"{"type":"send","cid":"k","to":"0","content":"x"}"#).code,
        ErrorCode::BadRequest
    );
    assert_eq!(
        err(r#"{"type":"send","cid":"k","to":"1","content":""}"#).code,
        ErrorCode::MissingField
    );
    let big = format!(
        r#"{{"type":"send","cid":"k","to":"1","content":"{}"}}"#,
        "x".repeat(CONTENT_BYTES_MAX + 1)
    );
    assert_eq!(err(&big).code, ErrorCode::TooLarge);
    let long_cid = format!(
        r#"{{"type":"send","cid":"{}","to":"1","content":"x"}}"#,
        "c".repeat(65)
    );
    assert_eq!(err(&long_cid).code, ErrorCode::InvalidField);
    assert_eq!(
        err(r#"{"type":"sync","conv":"p:2:1"}"#).code,
        ErrorCode::InvalidField
    );
    assert_eq!(
        err(r#"{"type":"sync","conv":"g:1","limit":501}"#).code,
        ErrorCode::InvalidField
    );
    assert_eq!(
        err(r#"{"type":"read","conv":"g:1"}"#).code,
        ErrorCode::MissingField
    );
}

#[test]
fn sync_read_ping() {
    assert_eq!(
        parse_request(r#"{"type":"sync","conv":"p:1:2","after":5}"#).unwrap(),
        Request::Sync {
            conv: Conv::Pair(1, 2),
            after: 5,
            limit: SYNC_LIMIT_DEFAULT
        }
    );
    assert_eq!(
        parse_request(r#"{"type":"read","conv":"g:9","seq":3}"#).unwrap(),
        Request::Read {
            conv: Conv::Group(9),
            seq: 3
        }
    );
    assert_eq!(parse_request(r#"{"type":"ping"}"#).unwrap(), Request::Ping);
    assert_eq!(
        parse_request(r#"{"type":"typing","conv":"g:7"}"#).unwrap(),
        Request::Typing {
            conv: Conv::Group(7)
        }
    );
    assert_eq!(
        parse_request(r#"{"type":"typing"}"#).unwrap_err().code,
        ErrorCode::MissingField
    );
}

#[test]
fn encodes_ids_as_strings_and_escapes_content() {
    let m = Message {
        id: u64::MAX,
        conv: Conv::Pair(1, 2),
        seq: 7,
        from: 1,
        to: Target::User(2),
        content: "<img onerror=\"x\">".into(),
        content_type: "text".into(),
        ts: 5,
    };
    let mut out = Vec::new();
    encode_msg(&m, &mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["id"], "18446744073709551615");
    assert_eq!(v["conv"], "p:1:2");
    assert_eq!(v["to"], "2");
    assert!(v.get("group").is_none());
    assert_eq!(v["content"], "<img onerror=\"x\">");
    out.clear();
    encode_sent("c1", 9, Conv::Group(3), 1, 2, &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"sent","cid":"c1","id":"9","conv":"g:3","seq":1,"ts":2}"#
    );
    out.clear();
    encode_error(ErrorCode::Busy, "later", Some("c"), &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"error","code":5030,"message":"later","cid":"c"}"#
    );
    out.clear();
    encode_read_event(Conv::Group(3), 12, &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"read","conv":"g:3","seq":12}"#
    );
    out.clear();
    encode_receipt(Conv::Pair(1, 2), 2, 40, &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"receipt","conv":"p:1:2","from":"2","seq":40}"#
    );
    out.clear();
    encode_typing(Conv::Group(3), 2, &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"typing","conv":"g:3","from":"2"}"#
    );
    out.clear();
    encode_presence(5, true, None, &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"presence","user":"5","online":true}"#
    );
    out.clear();
    encode_presence(5, true, Some(&["phone", ""]), &mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"type":"presence","user":"5","online":true,"devices":["phone",""]}"#
    );
}

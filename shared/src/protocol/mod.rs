//! The WebSocket client protocol of docs/PROTOCOL.md: parsing client frames and encoding server ones.
//!
//! Parsing borrows from the frame (no allocation unless a string has JSON escapes), and checks
//! every field, so the gateway can answer a clear `error` without touching anything else.
//! Encoding writes JSON straight into a caller-owned buffer; ids are decimal strings because
//! JavaScript numbers cannot hold 64 bits.

use crate::conv::{parse_id, Conv};
use crate::error::ErrorCode;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;

/// Longest `content` accepted, in bytes.
pub const CONTENT_BYTES_MAX: usize = 32 * 1024;
/// Longest client message id, in bytes.
pub const CID_BYTES_MAX: usize = 64;
/// Longest `content_type`, in bytes.
pub const CONTENT_TYPE_BYTES_MAX: usize = 32;
/// Largest `limit` of a `sync`.
pub const SYNC_LIMIT_MAX: u32 = 500;
pub const SYNC_LIMIT_DEFAULT: u32 = 100;

/// Who a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    User(u64),
    Group(u64),
}

/// A validated client request, borrowing from the frame it came in.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Send {
        cid: Cow<'a, str>,
        target: Target,
        content: Cow<'a, str>,
        content_type: Cow<'a, str>,
    },
    Sync {
        conv: Conv,
        after: u64,
        limit: u32,
    },
    Read {
        conv: Conv,
        seq: u64,
    },
    /// The user is typing in `conv`: relayed to its other online members, never stored.
    Typing {
        conv: Conv,
    },
    Ping,
}

/// Why a client frame was refused; the connection stays open.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
    pub cid: Option<String>,
}

impl RequestError {
    fn new(code: ErrorCode, message: impl Into<String>, cid: Option<&str>) -> RequestError {
        RequestError {
            code,
            message: message.into(),
            cid: cid.map(str::to_owned),
        }
    }
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "de_opt_cow")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "de_opt_cow")]
    cid: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "de_opt_id")]
    to: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_id")]
    group: Option<u64>,
    #[serde(borrow, default, deserialize_with = "de_opt_cow")]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "de_opt_cow")]
    content_type: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "de_opt_cow")]
    conv: Option<Cow<'a, str>>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    seq: Option<u64>,
}

/// Parses and validates one text frame.
pub fn parse_request(text: &str) -> Result<Request<'_>, RequestError> {
    let raw: RawRequest = serde_json::from_str(text).map_err(|e| {
        RequestError::new(
            ErrorCode::BadRequest,
            format!("malformed request: {e}"),
            None,
        )
    })?;
    let kind = match raw.kind.as_deref() {
        Some(k) => k,
        None => {
            return Err(RequestError::new(
                ErrorCode::UnknownType,
                "missing `type`",
                raw.cid.as_deref(),
            ))
        }
    };
    match kind {
        "send" => parse_send(raw),
        "sync" => parse_sync(raw),
        "read" => {
            let conv = parse_conv(raw.conv.as_deref())?;
            let seq = raw.seq.ok_or_else(|| {
                RequestError::new(ErrorCode::MissingField, "`read` needs `seq`", None)
            })?;
            Ok(Request::Read { conv, seq })
        }
        "typing" => Ok(Request::Typing {
            conv: parse_conv(raw.conv.as_deref())?,
        }),
        "ping" => Ok(Request::Ping),
        other => Err(RequestError::new(
            ErrorCode::UnknownType,
            format!("unknown type `{}`", truncate(other, 32)),
            raw.cid.as_deref(),
        )),
    }
}

fn parse_send(raw: RawRequest<'_>) -> Result<Request<'_>, RequestError> {
    let cid = match raw.cid {
        Some(c) if !c.is_empty() && c.len() <= CID_BYTES_MAX => c,
        Some(c) if !c.is_empty() => {
            let msg = format!("`cid` is longer than {CID_BYTES_MAX} bytes");
            return Err(RequestError::new(ErrorCode::InvalidField, msg, None));
        }
        _ => {
            let msg = "`send` needs a `cid`";
            return Err(RequestError::new(ErrorCode::MissingField, msg, None));
        }
    };
    // Every refusal from here on names the cid, so the client knows which send failed.
    let refuse = |code, msg: &str| Err(RequestError::new(code, msg, Some(&cid)));
    let target = match (raw.to, raw.group) {
        (Some(u), None) => Target::User(u),
        (None, Some(g)) => Target::Group(g),
        (None, None) => return refuse(ErrorCode::MissingField, "`send` needs `to` or `group`"),
        (Some(_), Some(_)) => {
            return refuse(ErrorCode::InvalidField, "give `to` or `group`, not both")
        }
    };
    let content = match raw.content {
        Some(x) if x.is_empty() => return refuse(ErrorCode::MissingField, "`content` is empty"),
        Some(x) if x.len() > CONTENT_BYTES_MAX => {
            let msg = format!("`content` is longer than {CONTENT_BYTES_MAX} bytes");
            return refuse(ErrorCode::TooLarge, &msg);
        }
        Some(x) => x,
        None => return refuse(ErrorCode::MissingField, "`send` needs `content`"),
    };
    let content_type = match raw.content_type {
        None => Cow::Borrowed("text"),
        Some(t) if !t.is_empty() && t.len() <= CONTENT_TYPE_BYTES_MAX => t,
        Some(_) => {
            return refuse(
                ErrorCode::InvalidField,
                "`content_type` is empty or too long",
            )
        }
    };
    Ok(Request::Send {
        cid,
        target,
        content,
        content_type,
    })
}

fn parse_sync(raw: RawRequest<'_>) -> Result<Request<'_>, RequestError> {
    let conv = parse_conv(raw.conv.as_deref())?;
    let limit = raw.limit.unwrap_or(SYNC_LIMIT_DEFAULT);
    if limit == 0 || limit > SYNC_LIMIT_MAX {
        return Err(RequestError::new(
            ErrorCode::InvalidField,
            format!("`limit` must be 1..={SYNC_LIMIT_MAX}"),
            None,
        ));
    }
    Ok(Request::Sync {
        conv,
        after: raw.after.unwrap_or(0),
        limit,
    })
}

fn parse_conv(conv: Option<&str>) -> Result<Conv, RequestError> {
    let conv =
        conv.ok_or_else(|| RequestError::new(ErrorCode::MissingField, "missing `conv`", None))?;
    Conv::parse(conv).ok_or_else(|| {
        RequestError::new(
            ErrorCode::InvalidField,
            format!("`conv` is not a conversation id: {}", truncate(conv, 48)),
            None,
        )
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// serde never borrows through `Option<Cow<str>>`; this does, whenever the string has no escapes.
fn de_opt_cow<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    struct CowVisitor;
    impl<'de> Visitor<'de> for CowVisitor {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(CowVisitor)
}

/// Accepts an id as a decimal string (the protocol's form) or a JSON number (lenient input).
fn de_opt_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct IdVisitor;
    impl Visitor<'_> for IdVisitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a user or group id as a decimal string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            parse_id(v)
                .map(Some)
                .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            // The same range as a decimal string's (`parse_id`): 1 to 2^63 − 1.
            (v != 0 && v <= i64::MAX as u64)
                .then_some(Some(v))
                .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(IdVisitor)
}

// ---------------------------------------------------------------------------------------------
// Server → client.

/// A stored, sequenced message as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub conv: Conv,
    pub seq: u64,
    pub from: u64,
    pub to: Target,
    pub content: String,
    pub content_type: String,
    /// Unix milliseconds when the server accepted it.
    pub ts: u64,
}

fn as_decimal<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn as_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Serialize)]
struct MsgOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(serialize_with = "as_decimal")]
    id: u64,
    #[serde(serialize_with = "as_display")]
    conv: Conv,
    seq: u64,
    #[serde(serialize_with = "as_decimal")]
    from: u64,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_decimal"
    )]
    to: Option<u64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_decimal"
    )]
    group: Option<u64>,
    content: &'a str,
    content_type: &'a str,
    ts: u64,
}

fn opt_decimal<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

impl<'a> MsgOut<'a> {
    fn of(m: &'a Message) -> MsgOut<'a> {
        let (to, group) = match m.to {
            Target::User(u) => (Some(u), None),
            Target::Group(g) => (None, Some(g)),
        };
        MsgOut {
            kind: "msg",
            id: m.id,
            conv: m.conv,
            seq: m.seq,
            from: m.from,
            to,
            group,
            content: &m.content,
            content_type: &m.content_type,
            ts: m.ts,
        }
    }
}

/// Appends a `msg` frame's JSON to `out`.
pub fn encode_msg(m: &Message, out: &mut Vec<u8>) {
    serde_json::to_writer(out, &MsgOut::of(m)).expect("writing to a Vec cannot fail");
}

/// Appends a `sent` acknowledgement's JSON to `out`.
pub fn encode_sent(cid: &str, id: u64, conv: Conv, seq: u64, ts: u64, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Sent<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        cid: &'a str,
        #[serde(serialize_with = "as_decimal")]
        id: u64,
        #[serde(serialize_with = "as_display")]
        conv: Conv,
        seq: u64,
        ts: u64,
    }
    serde_json::to_writer(
        out,
        &Sent {
            kind: "sent",
            cid,
            id,
            conv,
            seq,
            ts,
        },
    )
    .expect("writing to a Vec cannot fail");
}

/// Appends an `error` frame's JSON to `out`.
pub fn encode_error(code: ErrorCode, message: &str, cid: Option<&str>, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Error<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        code: u16,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cid: Option<&'a str>,
    }
    serde_json::to_writer(
        out,
        &Error {
            kind: "error",
            code: code.code(),
            message,
            cid,
        },
    )
    .expect("writing to a Vec cannot fail");
}

/// Appends a `read` event's JSON to `out`: the user read `conv` up to `seq` on another device
/// (their unread count there is `max_seq − seq`).
pub fn encode_read_event(conv: Conv, seq: u64, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Read {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(serialize_with = "as_display")]
        conv: Conv,
        seq: u64,
    }
    serde_json::to_writer(
        out,
        &Read {
            kind: "read",
            conv,
            seq,
        },
    )
    .expect("writing to a Vec cannot fail");
}

/// Appends a `presence` event's JSON to `out`: `{"type":"presence","user","online"}`, and
/// for the user's own devices `devices`: the device ids of their open connections ("" where
/// the token named none).
pub fn encode_presence(user: u64, online: bool, devices: Option<&[&str]>, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(serialize_with = "as_decimal")]
        user: u64,
        online: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        devices: Option<&'a [&'a str]>,
    }
    let p = Presence {
        kind: "presence",
        user,
        online,
        devices,
    };
    serde_json::to_writer(out, &p).expect("writing to a Vec cannot fail");
}

/// Appends a `typing` event's JSON to `out`: `from` is typing in `conv`.
pub fn encode_typing(conv: Conv, from: u64, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Typing {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(serialize_with = "as_display")]
        conv: Conv,
        #[serde(serialize_with = "as_decimal")]
        from: u64,
    }
    serde_json::to_writer(
        out,
        &Typing {
            kind: "typing",
            conv,
            from,
        },
    )
    .expect("writing to a Vec cannot fail");
}

/// Appends a `receipt`'s JSON to `out`: in a two-person conversation, the peer `from` has read
/// up to `seq`.
pub fn encode_receipt(conv: Conv, from: u64, seq: u64, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Receipt {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(serialize_with = "as_display")]
        conv: Conv,
        #[serde(serialize_with = "as_decimal")]
        from: u64,
        seq: u64,
    }
    serde_json::to_writer(
        out,
        &Receipt {
            kind: "receipt",
            conv,
            from,
            seq,
        },
    )
    .expect("writing to a Vec cannot fail");
}

/// Appends a `sync` answer's JSON to `out`.
pub fn encode_sync(conv: Conv, messages: &[Message], more: bool, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Sync<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(serialize_with = "as_display")]
        conv: Conv,
        messages: Vec<MsgOut<'a>>,
        more: bool,
    }
    let messages = messages.iter().map(MsgOut::of).collect();
    serde_json::to_writer(
        out,
        &Sync {
            kind: "sync",
            conv,
            messages,
            more,
        },
    )
    .expect("writing to a Vec cannot fail");
}

pub const PONG_JSON: &[u8] = br#"{"type":"pong"}"#;

#[cfg(test)]
mod tests;

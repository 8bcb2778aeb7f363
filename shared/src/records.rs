//! The Kafka record schema: the Rust form of `shared/proto/im.proto` (read that file for what
//! each field means). The prost derives are written out instead of generated so that building
//! needs no `protoc`; `tests::field_numbers_match_the_proto_file` keeps the two in step.

/// The schema version this build writes and reads.
pub const VERSION: u32 = 1;

/// Topic names.
pub mod topics {
    /// Gateway → logic: client requests.
    pub const UPSTREAM: &str = "im.upstream";
    /// Logic → persist: sequenced messages (the durable message log).
    pub const MESSAGES: &str = "im.messages";
    /// Logic → one gateway.
    pub fn downstream(gateway_id: &str) -> String {
        format!("im.downstream.{gateway_id}")
    }
}

/// Consumer groups. Logic reads persist's committed offset in `im.messages` to learn where
/// the database ends, so both name it from here.
pub mod groups {
    /// The logic stage, on `im.upstream`.
    pub const LOGIC: &str = "logic";
    /// The persist service, on `im.messages`.
    pub const PERSIST: &str = "persist";
}

/// A gateway id usable in a topic name: Kafka allows `[a-zA-Z0-9._-]`, 249 characters at most.
pub fn topic_safe_id(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(200);
    s
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Upstream {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub reply_to: String,
    #[prost(uint64, tag = "3")]
    pub conn: u64,
    #[prost(uint64, tag = "4")]
    pub user: u64,
    #[prost(uint64, tag = "5")]
    pub ts: u64,
    #[prost(oneof = "UpstreamBody", tags = "10, 11, 12, 13, 14")]
    pub body: Option<UpstreamBody>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum UpstreamBody {
    #[prost(message, tag = "10")]
    Send(Send),
    #[prost(message, tag = "11")]
    Sync(Sync),
    #[prost(message, tag = "12")]
    Read(Read),
    #[prost(message, tag = "13")]
    Typing(Typing),
    #[prost(message, tag = "14")]
    Presence(PresenceEvent),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Send {
    #[prost(string, tag = "1")]
    pub cid: String,
    #[prost(uint64, tag = "2")]
    pub to_user: u64,
    #[prost(uint64, tag = "3")]
    pub to_group: u64,
    #[prost(string, tag = "4")]
    pub content: String,
    #[prost(string, tag = "5")]
    pub content_type: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sync {
    #[prost(string, tag = "1")]
    pub conv: String,
    #[prost(uint64, tag = "2")]
    pub after: u64,
    #[prost(uint32, tag = "3")]
    pub limit: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Read {
    #[prost(string, tag = "1")]
    pub conv: String,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Typing {
    #[prost(string, tag = "1")]
    pub conv: String,
}

/// A connection of the record's user opened or closed (im.proto says what logic does).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PresenceEvent {
    #[prost(bool, tag = "1")]
    pub online: bool,
    #[prost(uint32, tag = "2")]
    pub connections: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Stored {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(uint64, tag = "2")]
    pub id: u64,
    #[prost(string, tag = "3")]
    pub conv: String,
    #[prost(uint64, tag = "4")]
    pub seq: u64,
    #[prost(uint64, tag = "5")]
    pub from: u64,
    #[prost(uint64, tag = "6")]
    pub to_user: u64,
    #[prost(uint64, tag = "7")]
    pub to_group: u64,
    #[prost(string, tag = "8")]
    pub content: String,
    #[prost(string, tag = "9")]
    pub content_type: String,
    #[prost(uint64, tag = "10")]
    pub ts: u64,
    #[prost(string, tag = "11")]
    pub cid: String,
    /// The epoch of its writer's ownership of the partition: the logic group generation + 1
    /// (`epoch_of`); 0 from a build without fencing. im.proto says what a fence does with it.
    #[prost(int32, tag = "12")]
    pub epoch: i32,
    /// A fence record (no message): the partition's new owner, at `epoch`.
    #[prost(bool, tag = "13")]
    pub fence: bool,
}

/// The epoch of an owner assigned its partitions in consumer group generation `generation`
/// (Kafka's start at 0 on some brokers; 0 is kept for records of builds without fencing).
pub fn epoch_of(generation: i32) -> i32 {
    generation.saturating_add(1).max(1)
}

impl Stored {
    /// The fence an owner writes on taking a partition at `epoch`.
    pub fn fence(epoch: i32) -> Stored {
        Stored {
            version: VERSION,
            epoch,
            fence: true,
            ..Default::default()
        }
    }
}

/// What a reader of one `im.messages` partition, in log order, makes of each record: the
/// latest fence seen so far decides whether a message's writer still owned the partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fencing {
    /// The highest epoch fenced so far (0: none seen).
    pub fence: i32,
}

/// One record, judged by `Fencing::judge`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// A message from the partition's current owner.
    Current,
    /// A fence; `raised` when it moved the fence up.
    Fence { raised: bool },
    /// A message from an owner fenced off before it was written: not to be stored.
    Stale { fence: i32 },
}

impl Fencing {
    pub fn judge(&mut self, r: &Stored) -> Judged {
        if r.fence {
            let raised = r.epoch > self.fence;
            self.fence = self.fence.max(r.epoch);
            Judged::Fence { raised }
        } else if r.epoch != 0 && r.epoch < self.fence {
            // (Epoch 0: a build without fencing wrote it; that build had no way to be
            // fenced, and dropping its records during a rolling upgrade would lose them.)
            Judged::Stale { fence: self.fence }
        } else {
            Judged::Current
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Downstream {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(oneof = "DownstreamBody", tags = "10, 11, 12")]
    pub body: Option<DownstreamBody>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum DownstreamBody {
    #[prost(message, tag = "10")]
    Deliver(Deliver),
    #[prost(message, tag = "11")]
    Reply(Reply),
    #[prost(message, tag = "12")]
    Close(Close),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Close {
    #[prost(uint64, tag = "1")]
    pub conn: u64,
    #[prost(string, tag = "2")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Deliver {
    #[prost(uint64, repeated, tag = "1")]
    pub users: Vec<u64>,
    #[prost(bytes = "vec", tag = "2")]
    pub json: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub except_conn: u64,
    /// A `msg`'s conversation and seq (im.proto: the gateway's order check); empty and 0
    /// for frames that are not messages.
    #[prost(string, tag = "4")]
    pub conv: String,
    #[prost(uint64, tag = "5")]
    pub seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(uint64, tag = "1")]
    pub conn: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub json: Vec<u8>,
}

/// Why a record could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Malformed(String),
    /// Written by a newer schema version than this build knows.
    Version(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed record: {e}"),
            DecodeError::Version(v) => {
                write!(f, "record schema version {v} (this build reads {VERSION})")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Records with a `version` field.
pub trait Versioned: prost::Message + Default + Sized {
    fn version(&self) -> u32;

    fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes and checks the version (0 counts as 1: a writer that left it unset).
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = Self::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        match r.version() {
            0 | VERSION => Ok(r),
            v => Err(DecodeError::Version(v)),
        }
    }
}

impl Versioned for Upstream {
    fn version(&self) -> u32 {
        self.version
    }
}
impl Versioned for Stored {
    fn version(&self) -> u32 {
        self.version
    }
}
impl Versioned for Downstream {
    fn version(&self) -> u32 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn records_round_trip() {
        let up = Upstream {
            version: VERSION,
            reply_to: "gw-1".into(),
            conn: u64::MAX - 1,
            user: 42,
            ts: 1_700_000_000_000,
            body: Some(UpstreamBody::Send(Send {
                cid: "c-1".into(),
                to_user: 7,
                to_group: 0,
                content: "héllo".into(),
                content_type: "text".into(),
            })),
        };
        assert_eq!(Upstream::from_bytes(&up.to_bytes()).unwrap(), up);
        let down = Downstream {
            version: VERSION,
            body: Some(DownstreamBody::Deliver(Deliver {
                users: vec![1, 2, 3],
                json: b"{}".to_vec(),
                except_conn: 9,
                conv: "g:7".into(),
                seq: 41,
            })),
        };
        assert_eq!(Downstream::from_bytes(&down.to_bytes()).unwrap(), down);
    }

    #[test]
    fn newer_versions_and_garbage_are_refused() {
        let s = Stored {
            version: 2,
            ..Default::default()
        };
        assert_eq!(
            Stored::from_bytes(&s.to_bytes()),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            Stored::from_bytes(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// The wire bytes of a known record, written by hand from the .proto numbers: a changed tag
    /// or type in either file breaks this.
    #[test]
    fn field_numbers_match_the_proto_file() {
        let proto = include_str!("../proto/im.proto");
        for line in [
            "string reply_to = 2;",
            "uint64 conn = 3;",
            "Send send = 10;",
            "uint64 to_group = 3;",
            "string cid = 11;",
            "int32 epoch = 12;",
            "bool fence = 13;",
            "repeated uint64 users = 1;",
            "bytes json = 2;",
            "Reply reply = 11;",
            "Close close = 12;",
            "Typing typing = 13;",
            "PresenceEvent presence = 14;",
            "uint32 connections = 2;",
            "string conv = 4;",
            "uint64 seq = 5;",
        ] {
            assert!(proto.contains(line), "im.proto lost `{line}`");
        }
        let r = Reply {
            conn: 1,
            json: b"x".to_vec(),
        };
        assert_eq!(r.encode_to_vec(), [0x08, 1, 0x12, 1, b'x']);
        let up = Upstream {
            version: 1,
            body: Some(UpstreamBody::Read(Read {
                conv: "g:1".into(),
                seq: 5,
            })),
            ..Default::default()
        };
        // version=1 (tag 1 varint), read (tag 12, length-delimited) { conv (1), seq (2) }.
        assert_eq!(
            up.encode_to_vec(),
            [0x08, 1, 0x62, 7, 0x0a, 3, b'g', b':', b'1', 0x10, 5]
        );
    }

    #[test]
    fn a_fence_stales_earlier_epochs_after_it_and_only_those() {
        let msg = |epoch| Stored {
            id: 1,
            conv: "p:1:2".into(),
            seq: 1,
            epoch,
            ..Default::default()
        };
        let mut f = Fencing::default();
        // Before any fence, every epoch is current.
        assert_eq!(f.judge(&msg(1)), Judged::Current);
        assert_eq!(f.judge(&Stored::fence(3)), Judged::Fence { raised: true });
        assert_eq!(f.judge(&msg(3)), Judged::Current);
        assert_eq!(f.judge(&msg(4)), Judged::Current);
        assert_eq!(f.judge(&msg(2)), Judged::Stale { fence: 3 });
        // A late fence of an older owner lowers nothing.
        assert_eq!(f.judge(&Stored::fence(2)), Judged::Fence { raised: false });
        assert_eq!(f.judge(&msg(2)), Judged::Stale { fence: 3 });
        // Records of a build without fencing are never stale.
        assert_eq!(f.judge(&msg(0)), Judged::Current);
        assert_eq!((epoch_of(0), epoch_of(-1), epoch_of(6)), (1, 1, 7));
        let back = Stored::from_bytes(&Stored::fence(7).to_bytes()).unwrap();
        assert!(back.fence && back.epoch == 7 && back.id == 0);
    }

    #[test]
    fn topic_ids_are_sanitized() {
        assert_eq!(topic_safe_id("host:8090/p0"), "host-8090-p0");
        assert_eq!(topics::downstream("a.b"), "im.downstream.a.b");
    }
}

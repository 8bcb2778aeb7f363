//! Error codes carried in WebSocket `error` frames and REST error bodies.
//!
//! The number tells a client what to do: 4xxx is the client's fault (do not retry as is),
//! 5xxx is ours or a dependency's (retry later with the same `cid`; duplicates are dropped).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame is not a JSON object, or a field has the wrong type.
    BadRequest = 4000,
    /// `type` is missing or not one the server knows.
    UnknownType = 4001,
    /// A required field is missing or empty.
    MissingField = 4002,
    /// A field is present but its value is invalid (an id that is not a decimal, a bad conv).
    InvalidField = 4003,
    /// `content` is longer than the server accepts.
    TooLarge = 4004,
    /// No token, or a bad one (HTTP 401); also wrong username or password, without saying which.
    Unauthorized = 4010,
    /// Not allowed: for example a conversation the user does not belong to.
    Forbidden = 4030,
    /// No such user, group or conversation (HTTP 404).
    NotFound = 4040,
    /// The route exists, but not with this HTTP method (HTTP 405; REST only).
    MethodNotAllowed = 4050,
    /// The name is taken, or the state does not allow it (HTTP 409).
    Conflict = 4090,
    /// Too many requests; the connection is closed with 1008 if it goes on.
    RateLimited = 4290,
    /// The gateway is overloaded or a peer queue is full; retry with the same `cid`.
    Busy = 5030,
    /// The feature needs a service this deployment does not run (groups need `im logic`).
    Unavailable = 5031,
    /// A dependency (database, broker) is down; retry later.
    DependencyDown = 5032,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::RateLimited,
        ErrorCode::Busy,
        ErrorCode::Unavailable,
        ErrorCode::DependencyDown,
    ];

    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code a number names (as read back from an `error` frame).
    pub fn from_code(code: u64) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() as u64 == code)
    }

    /// Whether retrying the same request later can succeed.
    pub fn retryable(self) -> bool {
        self.code() >= 5000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code() as u64), Some(c));
        }
        assert_eq!(ErrorCode::from_code(1234), None);
        assert!(ErrorCode::ALL.windows(2).all(|w| w[0].code() < w[1].code()));
    }
}

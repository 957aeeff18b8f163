//! Error codes of the client protocol and the reasons a connection ends.
//!
//! Owns the mapping to the wire: [`ErrorCode`] is the `code` of an error reply,
//! [`CloseReason`] the close code and the advice a client acts on. Both are the
//! ones in `docs/protocol.md`, defined once here. Also [`RoomError`], the one
//! refusal of the room state, which the rooms return and the broker carries.

use std::borrow::Cow;

/// The `code` of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    RateLimited,
    TooLarge,
    LimitExceeded,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::LimitExceeded => "limit_exceeded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Why a room operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("the node holds too many rooms")]
    TooManyRooms,
}

/// An error reply: code, a human-readable message, and for `rate_limited`
/// how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub retry_after_ms: Option<u64>,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self {
            code: ErrorCode::RateLimited,
            message: Cow::Borrowed("rate limit exceeded"),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

/// Why a connection ended; decides the close code sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The socket failed or ended without a close frame: nothing is sent.
    ClientGone,
    /// The client sent a close frame (with this code): it is answered.
    ClientClosed(Option<u16>),
    /// A frame over the size limit (1009).
    TooLarge,
    /// The node is draining or restarting (1012): reconnect with backoff and `since`.
    NodeDraining,
    /// No valid `connect` (4001).
    Unauthorized,
    /// Repeated bad frames or rate-limit abuse (4008).
    PolicyViolation,
    /// The client did not read fast enough (4009): reconnect with `since`.
    SlowConsumer,
    /// The token expired without a refresh (4010).
    TokenExpired,
    /// Too many connections on the node, for the user or for the address (4029).
    TooManyConnections,
    /// Nothing heard from the client within the idle timeout (1001).
    IdleTimeout,
    /// A WebSocket protocol error by the client (1002).
    ProtocolError,
    /// A text frame that is not valid UTF-8 (1007).
    BadPayload,
    /// Closed through the server API's `disconnect` with this code (1000,
    /// 1008, 1012 or 4000-4999); `reconnect` is the advice in the reason.
    Disconnected { code: u16, reconnect: bool },
    /// The connection's token was revoked through the server API (4001).
    Revoked,
}

impl CloseReason {
    /// The close code, or `None` when no close frame is sent.
    pub fn code(self) -> Option<u16> {
        match self {
            Self::ClientGone => None,
            // Echo the client's code (RFC 6455 section 5.5.1).
            Self::ClientClosed(code) => Some(code.unwrap_or(1000)),
            Self::TooLarge => Some(1009),
            Self::NodeDraining => Some(1012),
            Self::Unauthorized => Some(4001),
            Self::PolicyViolation => Some(4008),
            Self::SlowConsumer => Some(4009),
            Self::TokenExpired => Some(4010),
            Self::TooManyConnections => Some(4029),
            Self::IdleTimeout => Some(1001),
            Self::ProtocolError => Some(1002),
            Self::BadPayload => Some(1007),
            Self::Disconnected { code, .. } => Some(code),
            Self::Revoked => Some(4001),
        }
    }

    /// The close frame's reason text (short: a close reason is at most 123 bytes).
    pub fn text(self) -> &'static str {
        match self {
            Self::ClientGone | Self::ClientClosed(_) => "",
            Self::TooLarge => "frame too large",
            Self::NodeDraining => "node draining, reconnect",
            Self::Unauthorized => "unauthorized",
            Self::PolicyViolation => "policy violation",
            Self::SlowConsumer => "slow consumer, reconnect with since",
            Self::TokenExpired => "token expired",
            Self::TooManyConnections => "too many connections",
            Self::IdleTimeout => "idle timeout",
            Self::ProtocolError => "protocol error",
            Self::BadPayload => "invalid UTF-8",
            Self::Disconnected { reconnect: true, .. } => "disconnected by the server, reconnect",
            Self::Disconnected { reconnect: false, .. } => "disconnected by the server, do not reconnect",
            Self::Revoked => "token revoked",
        }
    }

    /// A label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientGone => "client_gone",
            Self::ClientClosed(_) => "client_closed",
            Self::TooLarge => "too_large",
            Self::NodeDraining => "draining",
            Self::Unauthorized => "unauthorized",
            Self::PolicyViolation => "policy",
            Self::SlowConsumer => "slow",
            Self::TokenExpired => "token_expired",
            Self::TooManyConnections => "too_many",
            Self::IdleTimeout => "idle",
            Self::ProtocolError => "protocol",
            Self::BadPayload => "bad_payload",
            Self::Disconnected { .. } => "server_disconnect",
            Self::Revoked => "revoked",
        }
    }
}

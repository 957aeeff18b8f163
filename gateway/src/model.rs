//! The gateway's vocabulary: the ids every layer shares.
//!
//! A leaf: depends on nothing else in the crate.

use std::fmt;
use std::sync::Arc;

/// A validated room name: 1 to 128 characters from `A-Z a-z 0-9 _ - :`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

impl RoomId {
    /// Longest room name, in characters.
    pub const MAX_LEN: usize = 128;

    /// Validates `name`. Wildcards and subject separators never pass, so a
    /// room name is always safe to put in a bus subject.
    pub fn parse(name: &str) -> Option<Self> {
        Self::is_valid(name).then(|| Self(Arc::from(name)))
    }

    /// Whether `name` is a valid room name (what [`RoomId::parse`] checks),
    /// without allocating.
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by `RoomId` be searched by name (hashing and equality
/// are those of the name).
impl std::borrow::Borrow<str> for RoomId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest user id (a token's `sub`, the server API's `from`), bytes.
pub const MAX_USER_LEN: usize = 256;

/// Whether `s` may be a user id, which other clients are shown as `from`:
/// 1 to [`MAX_USER_LEN`] bytes, no control character (C0 and C1: NUL,
/// newlines, terminal escapes), no line or paragraph separator (U+2028,
/// U+2029) and no Unicode bidirectional formatting character (U+061C,
/// U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069), which would reorder
/// what a client displays around the name (a name that reads as another, or
/// as part of the message).
pub fn is_valid_user(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_USER_LEN
        && !s.chars().any(|c| {
            c.is_control()
                || matches!(
                    c,
                    '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
                )
        })
}

/// A connection's id, unique within the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One stored room message, typed: what every codec encodes a `message`
/// push (and a `history` entry) from.
///
/// Shape on the wire: `{"op":"message","room":..,"offset":..,"ts":..,
/// "from":..,"data":<JSON value>}` in `gw.v1.json`, `Message` of
/// `proto/proto/client.proto` in `gw.v1.proto`.
///
/// Sources: a publish on this node (`rooms`, embedded broker) or the NATS
/// envelope of a stored or ephemeral message (`broker::nats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub room: RoomId,
    /// The room's offset (0 for an ephemeral message, which has none).
    pub offset: u64,
    /// When the publishing node accepted it, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The publisher's `sub`, set by the server.
    pub from: String,
    /// The client's JSON value as UTF-8 text, never re-encoded.
    pub data: bytes::Bytes,
}

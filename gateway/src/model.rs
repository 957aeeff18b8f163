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

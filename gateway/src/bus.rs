//! The message bus between gateway nodes.
//!
//! Owns how a published message gets its offset and reaches every node with
//! members in the room. The embedded bus (the default, no NATS) is this node
//! alone: the room's log on this node assigns offsets and fans out locally.
//! Cluster mode adds a NATS implementation with the same semantics; callers
//! only see [`Bus::publish`].

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::rooms::{Published, RoomError, RoomId, RoomIndex};

/// A message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub room: &'a RoomId,
    /// The publisher's `sub` as a JSON string literal.
    pub from_json: &'a str,
    /// The `data` value, JSON text.
    pub data: &'a [u8],
    /// The idempotency key.
    pub key: Option<&'a str>,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("room state limit reached")]
    Room(#[source] RoomError),
}

/// The bus of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// Single node: the local room log is the source of truth.
    Embedded,
}

impl Bus {
    /// Stores and distributes a message; the returned offset is the one every
    /// member sees.
    pub async fn publish(&self, rooms: &RoomIndex, msg: Outgoing<'_>) -> Result<Published, BusError> {
        match self {
            Bus::Embedded => rooms
                .publish(msg.room, msg.from_json, msg.data, msg.key, now_ms(), Instant::now())
                .map_err(BusError::Room),
        }
    }

    /// A label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Bus::Embedded => "embedded",
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

//! The message bus between gateway nodes.
//!
//! Owns how a published message gets its offset and reaches every node with
//! members in the room, and where history older than a node's cache comes
//! from. Two implementations, one set of semantics:
//! - [`Bus::Embedded`] (the default, no NATS): this node alone. The room log
//!   on this node assigns offsets and is the whole history.
//! - [`Bus::Nats`] (cluster mode): durable rooms are stored in JetStream and
//!   every node with members receives each stored message once, with its
//!   offset, on the room's fan-out subject. See `docs/cluster.md`.

pub mod nats;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::rooms::{Published, RoomError, RoomId, RoomIndex, SharedMessage};

pub use nats::{ClusterConfig, NatsBus};

/// A message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub room: &'a RoomId,
    /// The publisher's `sub`.
    pub from: &'a str,
    /// The `data` value, JSON text (shared, not copied, by the embedded bus).
    pub data: &'a Bytes,
    /// The idempotency key.
    pub key: Option<&'a str>,
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("room state limit reached")]
    Room(#[source] RoomError),
    #[error("the message bus is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the message bus did not answer in time")]
    Timeout,
}

impl BusError {
    pub(crate) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(e))
    }
}

/// Messages read from the stream for a catch-up.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Oldest first.
    pub messages: Vec<SharedMessage>,
    /// False when some messages after `since` are gone from the stream.
    pub recovered: bool,
}

/// The bus of this node.
#[derive(Clone)]
pub enum Bus {
    /// Single node: the local room log is the source of truth.
    Embedded,
    /// Cluster mode over NATS and JetStream.
    Nats(Arc<NatsBus>),
}

impl Bus {
    /// Stores and distributes a message; the returned offset is the one every
    /// member sees.
    pub async fn publish(&self, rooms: &RoomIndex, msg: Outgoing<'_>) -> Result<Published, BusError> {
        match self {
            Bus::Embedded => rooms
                .publish(msg.room, msg.from, msg.data, msg.key, now_ms(), Instant::now())
                .map_err(BusError::Room),
            Bus::Nats(n) => n.publish(msg).await,
        }
    }

    /// Makes sure `room` receives its messages on this node (cluster mode:
    /// subscribes and syncs, once per room however many joiners wait).
    pub async fn ensure_live(&self, room: &RoomId) -> Result<(), BusError> {
        match self {
            Bus::Embedded => Ok(()),
            Bus::Nats(n) => n.ensure_live(room).await,
        }
    }

    /// Brings a live room up to at least `offset` (a client saw it on another
    /// node) before a joiner is added.
    pub async fn sync_to(&self, room: &RoomId, offset: u64) {
        if let Bus::Nats(n) = self {
            n.sync_to(room, offset).await;
        }
    }

    /// The last local member left `room`.
    pub fn room_left(&self, room: &RoomId) {
        if let Bus::Nats(n) = self {
            n.room_left(room);
        }
    }

    /// The messages of `room` in `(since, upto]` from the stream, for a
    /// joiner whose `since` is older than this node's cache. Reading stops
    /// once their encoded frames would pass `max_bytes`: then, as when some
    /// message after `since` is gone, `recovered` is false and there are no
    /// messages. See [`NatsBus::catchup`].
    pub async fn catchup(&self, room: &RoomId, since: u64, upto: u64, max_bytes: usize) -> Result<Fetched, BusError> {
        match self {
            Bus::Embedded => Ok(Fetched::default()),
            Bus::Nats(n) => n.catchup(room, since, upto, max_bytes).await,
        }
    }

    /// A history page that this node's cache cannot serve.
    pub async fn history(
        &self,
        room: &RoomId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<SharedMessage>, bool), BusError> {
        match self {
            Bus::Embedded => Ok((Vec::new(), false)),
            Bus::Nats(n) => n.history(room, before, limit).await,
        }
    }

    /// Whether the bus can take publishes now.
    pub fn is_connected(&self) -> bool {
        match self {
            Bus::Embedded => true,
            Bus::Nats(n) => n.is_connected(),
        }
    }

    /// Whether `room` is ephemeral (no storage, no history).
    pub fn is_ephemeral(&self, room: &RoomId) -> bool {
        match self {
            Bus::Embedded => false,
            Bus::Nats(n) => n.is_ephemeral(room),
        }
    }

    /// A label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Bus::Embedded => "embedded",
            Bus::Nats(_) => "nats",
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

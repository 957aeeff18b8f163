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
//!
//! The bus never reaches into the rooms: it reports to them and asks them
//! through the traits of [`events`] ([`RoomEvents`], [`RoomCache`]), which
//! `rooms` implements. This module does not depend on `rooms`.

pub mod events;
pub mod nats;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::error::RoomError;
use crate::model::RoomId;
use crate::protocol::SharedMessage;

pub use events::{Catchup, Delivered, Gap, Published, RoomCache, RoomEvents, Rooms};
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
    Unavailable(#[source] Unavailable),
    #[error("the message bus did not answer in time")]
    Timeout,
}

impl BusError {
    /// An [`Unavailable`] of `kind` without an underlying error.
    pub(crate) fn unavailable(kind: UnavailableKind) -> Self {
        Self::Unavailable(Unavailable { kind, source: None })
    }

    /// Maps an error of the NATS client to an [`Unavailable`] of `kind`.
    pub(crate) fn nats<E>(kind: UnavailableKind) -> impl FnOnce(E) -> Self
    where
        E: Into<async_nats::Error>,
    {
        move |e| {
            Self::Unavailable(Unavailable {
                kind,
                source: Some(e.into()),
            })
        }
    }
}

/// The bus could not serve a request: what failed (the kind, matchable) and
/// the NATS client's error when there is one (async-nats' `Error<Kind>`
/// pattern, without strings built to carry the reason).
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct Unavailable {
    kind: UnavailableKind,
    #[source]
    source: Option<async_nats::Error>,
}

impl Unavailable {
    /// What failed.
    pub fn kind(&self) -> UnavailableKind {
        self.kind
    }
}

/// What part of a bus operation failed. Every kind is answered to clients
/// the same way ("unavailable; retry"); the kinds are for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnavailableKind {
    /// The node is not connected to NATS now.
    #[error("not connected to NATS")]
    NotConnected,
    /// Sending a publish, or its acknowledgement, failed.
    #[error("publish failed")]
    Publish,
    /// Subscribing to a subject failed.
    #[error("subscribe failed")]
    Subscribe,
    /// Flushing the connection failed.
    #[error("flush failed")]
    Flush,
    /// Creating a read consumer or fetching from it failed.
    #[error("reading the stream failed")]
    Read,
    /// A read consumer skipped deliveries: the read is incomplete.
    #[error("a stream read skipped deliveries")]
    SkippedDeliveries,
    /// A direct get request failed.
    #[error("direct get failed")]
    DirectGet,
    /// Asking the stream's leader for a room's last message failed.
    #[error("reading the room's last message failed")]
    LastMessage,
    /// A direct get answered an unexpected status.
    #[error("direct get answered status {0}")]
    DirectGetStatus(u16),
    /// A direct get answer lacked its sequence or subject.
    #[error("a direct get answer lacked its sequence or subject")]
    DirectGetMalformed,
    /// The inbox of a direct get ended before the answer did.
    #[error("the direct get inbox ended early")]
    DirectGetEnded,
    /// Asking the stream's leader for a room's next message failed.
    #[error("reading from the stream's leader failed")]
    LeaderRead,
    /// A history page found the room's oldest messages leaving the stream on
    /// every attempt.
    #[error("the room's oldest messages kept leaving the stream while it was read")]
    HistoryMoving,
    /// A catch-up read found the room's cache moving on every attempt.
    #[error("the room's cache kept moving while it was read")]
    CacheMoving,
    /// A room could not be brought up to an offset a client saw on another
    /// node (its tail unreadable, or the repair not there in time).
    #[error("the room could not be brought up to the client's offset")]
    BehindClient,
}

/// Messages read from the stream for a catch-up.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Oldest first.
    pub messages: Vec<SharedMessage>,
    /// False when some messages after `since` are gone from the stream.
    pub recovered: bool,
    /// Bytes read from the stream for this answer, kept or not: what the
    /// read cost, charged to the connection's history byte budget.
    pub read_bytes: usize,
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
    /// member sees. The embedded bus hands it to `rooms`
    /// ([`RoomEvents::publish`]); the NATS bus stores it in its stream and
    /// this node's members get it from the fan-out subject like every
    /// node's.
    pub async fn publish<R>(&self, rooms: &R, msg: Outgoing<'_>) -> Result<Published, BusError>
    where
        R: RoomEvents + ?Sized,
    {
        match self {
            Bus::Embedded => {
                // Arrival on this node: `gateway_fanout_seconds` counts from here.
                let (arrived, ts) = (Instant::now(), now_ms());
                let p = rooms
                    .publish(msg.room, msg.from, msg.data, msg.key, ts, arrived)
                    .map_err(BusError::Room)?;
                if p.fresh {
                    crate::metrics::fanned_out(arrived.elapsed(), ts);
                }
                Ok(p)
            }
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
    ///
    /// Errors: [`UnavailableKind::BehindClient`] when the room is still
    /// behind `offset` although the stream holds it (NATS unreachable or
    /// slow): the joiner must retry, not be told its messages are gone.
    pub async fn sync_to(&self, room: &RoomId, offset: u64) -> Result<(), BusError> {
        match self {
            Bus::Nats(n) => n.sync_to(room, offset).await,
            Bus::Embedded => Ok(()),
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

    /// Closes the bus at the end of a drain, after its tasks were stopped
    /// (cluster mode: drains the NATS connection, which sends the UNSUBs of
    /// every room and ends the connection's tasks). True if it closed
    /// within `within`.
    pub async fn close(&self, within: std::time::Duration) -> bool {
        match self {
            Bus::Embedded => true,
            Bus::Nats(n) => n.close(within).await,
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn bus_errors_keep_their_kind_and_the_nats_error() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = BusError::nats(UnavailableKind::Publish)(refused);
        let BusError::Unavailable(u) = &e else { panic!("{e:?}") };
        assert_eq!(u.kind(), UnavailableKind::Publish);
        let io = u.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        let status = BusError::unavailable(UnavailableKind::DirectGetStatus(503));
        assert_eq!(status.source().unwrap().to_string(), "direct get answered status 503");
    }
}

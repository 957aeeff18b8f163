//! The broker's one interface to the rooms of this node: what the broker
//! reports ([`RoomEvents`]) and what it asks ([`RoomCache`]). The broker
//! depends on these traits only and never on `rooms`; `rooms` implements
//! them (`rooms/events.rs`). The model is centrifuge's `Broker` and its
//! `BrokerEventHandler`: the broker turns what NATS delivers into events,
//! the handler owns every room's state.
//!
//! Who calls: the embedded bus ([`super::Bus::publish`] without NATS) calls
//! [`RoomEvents::publish`] from the publishing connection's task; the NATS
//! bus calls the rest from its own tasks: a room's subscriber task
//! ([`RoomEvents::deliver`], [`RoomEvents::broadcast_unstored`]), the task
//! that made a room live ([`RoomEvents::go_live`]), the one task that holds
//! a room's [`Gap`] (the repair), the linger pool, and the reads of
//! `subscribe` and `history` ([`RoomCache`]).
//!
//! Cost: the NATS bus holds the rooms as one `Arc<dyn Rooms>`, so an
//! incoming message costs one dynamic call; the fan-out to the room's members
//! happens behind it. The embedded bus is generic over its rooms (static
//! dispatch).
//!
//! Ordering: within a room, the implementation applies messages in offset
//! order whatever order they are reported in, and reports a hole in the
//! sequence as a [`Gap`] that exactly one caller holds at a time: the holder
//! reads it from the stream and reports [`RoomEvents::repaired`] (which may
//! hand it the next gap) or [`RoomEvents::repair_failed`]. No method waits:
//! each takes the room's lock briefly and never across an `.await`.

use std::time::Instant;

use bytes::Bytes;

use crate::error::RoomError;
use crate::model::RoomId;
use crate::protocol::SharedMessage;

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The offset every member sees (0: an ephemeral room, not stored).
    pub offset: u64,
    /// False when the `key` was seen before: nothing was stored or sent.
    pub fresh: bool,
    /// Local members the message was queued for (embedded bus; the NATS bus
    /// answers 0: its members get the message from the fan-out subject).
    pub delivered: usize,
}

/// What happened to a message the broker reported with
/// [`RoomEvents::deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Appended and offered to `members` (and any buffered messages it
    /// unblocked with it).
    Applied { members: usize },
    /// Seen before (offset not above the room's last one): ignored.
    Duplicate,
    /// Kept until the room is live or a repair under way ends.
    Buffered,
    /// Kept; the messages in the gap must be read first. The caller now
    /// holds the gap (see the module doc).
    Gap(Gap),
    /// The room has no state on this node (its last member left and the
    /// linger ended): dropped.
    NoRoom,
}

/// A hole in a room's sequence: read offsets in `(after, upto]`. `upto` is an
/// offset known to be stored (a message's previous offset, the stream's
/// tail, an acknowledged publish), so a read that does not reach it is
/// incomplete, not proof that the messages are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub after: u64,
    pub upto: u64,
}

/// The messages a joiner with `since` missed, as far as this node's log has
/// them.
#[derive(Debug)]
pub enum Catchup {
    /// Served from the log, oldest first; `recovered` is false when some
    /// are gone for good.
    Messages {
        messages: Vec<SharedMessage>,
        recovered: bool,
    },
    /// Older than this node's cache: read the stream (then try again).
    NeedsBackend,
}

/// What the broker reports to the rooms: messages to apply and the
/// transitions of a room's sequence (live, gap, repaired, lost).
pub trait RoomEvents: Send + Sync {
    /// Embedded bus only: a message published on this node by `from` (the
    /// publisher's `sub`) at `ts_ms` (Unix milliseconds), which arrived at
    /// `arrived`. The room's log is the source of truth: it assigns the next
    /// offset, de-duplicates `key` per user and room, stores the message and
    /// offers it to every member, all under the room's lock (so concurrent
    /// publishers of one room are ordered by it).
    ///
    /// Errors: [`RoomError::TooManyRooms`] when the room is new and the node
    /// holds its most rooms.
    fn publish(
        &self,
        room: &RoomId,
        from: &str,
        data: &Bytes,
        key: Option<&str>,
        ts_ms: u64,
        arrived: Instant,
    ) -> Result<Published, RoomError>;

    /// A stored message arrived on the room's fan-out subject with its stream
    /// offset `seq` and the room's previous offset `prev` (0: unknown).
    /// Called by the room's subscriber task only, one message at a time in
    /// the order NATS delivers them. Applied at once if it follows the last
    /// offset; kept while the room is not live or a repair runs; a `prev`
    /// newer than the last offset (or unknown) is a [`Delivered::Gap`] for
    /// the caller to repair.
    fn deliver(&self, room: &RoomId, seq: u64, prev: u64, msg: SharedMessage) -> Delivered;

    /// A message of an ephemeral room (not stored, offset 0) arrived on the
    /// fan-out subject: offered to the current members, not kept. Same caller
    /// and order as [`RoomEvents::deliver`]. Returns the members reached
    /// (notify-mode members included).
    fn broadcast_unstored(&self, room: &RoomId, msg: &SharedMessage) -> usize;

    /// The room's subscription is up (every later message arrives through
    /// [`RoomEvents::deliver`]) and the stream's last offset, asked after
    /// subscribing, is `last`. Called once per subscription, by the task that
    /// subscribed; before it, delivered messages are only buffered. Applies
    /// what was buffered that follows `last`; returns the gap to read if
    /// something in between is missing (the caller then holds it).
    fn go_live(&self, room: &RoomId, last: u64) -> Option<Gap>;

    /// The broker learnt that the room's stream holds messages up to `tail`
    /// (the tail after a reconnect or a settle check, a publish acknowledged
    /// here but not yet delivered, an offset a client saw on another node).
    /// Any task may call it. Returns the gap to read now (the caller then
    /// holds it), or `None` if there is nothing to read or the holder of a
    /// gap under way will also read up to `tail`.
    fn request_repair(&self, room: &RoomId, tail: u64) -> Option<Gap>;

    /// The holder of a gap read it: `fetched` are the messages of the room in
    /// `(gap.after, upto]` the stream still has, in offset order. They are
    /// applied, the offsets the stream no longer has are skipped, then what
    /// was buffered behind the gap is applied. Returns the next gap, which
    /// the same caller keeps holding; `None` ends the repair.
    fn repaired(&self, room: &RoomId, fetched: Vec<(u64, SharedMessage)>, upto: u64) -> Option<Gap>;

    /// The holder of a gap gives up (NATS unreachable): the repair ends and
    /// the next message or reconnect starts another.
    fn repair_failed(&self, room: &RoomId);

    /// Messages of the room up to `gone_upto` left the stream before this node
    /// read them. Called by the holder of a gap before its
    /// [`RoomEvents::repaired`]. Every local member is closed so that it
    /// resumes with `since` and learns `recovered:false`; the cache restarts
    /// after the hole. Returns the members closed.
    fn lost_messages(&self, room: &RoomId, gone_upto: u64) -> usize;

    /// A gap of the room up to `upto` could not be read from the stream
    /// (the holder gave up after its attempts). Called before its
    /// [`RoomEvents::repaired`]. Every local member is closed so that it
    /// resumes with `since`; the cache restarts after the gap, but nothing
    /// is taken as gone (a resume is read from the stream). Returns the
    /// members closed.
    fn gap_unread(&self, room: &RoomId, upto: u64) -> usize;

    /// The linger of a room whose last local member left has passed (called
    /// by the linger pool, or at once when the pool is full). Drops the
    /// room's state if it still has no member and returns whether it did;
    /// only then does the broker unsubscribe.
    fn forget_if_empty(&self, room: &RoomId) -> bool;
}

/// What the broker asks of the rooms: where a room's sequence and cache
/// stand, and the cache's part of a catch-up or history read from the
/// stream (the messages read are put in front of the cache as far as its
/// caps allow, so the next reader finds them). Called by any task.
pub trait RoomCache: Send + Sync {
    /// Whether the room is live here (subscribed and synced).
    fn is_live(&self, room: &RoomId) -> bool;

    /// The room's last applied offset (0 if it has none or no state).
    fn last_offset(&self, room: &RoomId) -> u64;

    /// Every live room with its last applied offset, to check against the
    /// streams after a reconnect.
    fn live_rooms(&self) -> Vec<(RoomId, u64)>;

    /// The messages of the room in `(since, upto]` as far as the cache has
    /// them, or [`Catchup::NeedsBackend`].
    fn catchup(&self, room: &RoomId, since: u64, upto: u64) -> Catchup;

    /// Where the live cache of the room starts: it holds every message in
    /// `(start, last]`. Also the encoded bytes of its messages in
    /// `(start, upto]`. `None` if the room is not live.
    fn cache_start(&self, room: &RoomId, upto: u64) -> Option<(u64, usize)>;

    /// Completes a catch-up for `since` up to `upto` with `read`, every
    /// message of the room in `(since, read_upto]` read from the stream
    /// (oldest first), and the cache; keeps what was read in front of the
    /// cache. `None` when the read does not reach the cache's start (read on
    /// from there) or, with no live cache, stops short of `upto`.
    fn catchup_from_stream(
        &self,
        room: &RoomId,
        since: u64,
        upto: u64,
        read: &[(u64, SharedMessage)],
        read_upto: u64,
    ) -> Option<Vec<SharedMessage>>;

    /// Messages read from the stream for a history page: `entries` (oldest
    /// first) are every message of the room in `(covers_from, read_upto]`.
    /// Kept in front of the cache if they reach its start.
    fn prepend(&self, room: &RoomId, covers_from: u64, entries: &[(u64, SharedMessage)], read_upto: u64);
}

/// Both sides of the interface: what the NATS bus is given.
pub trait Rooms: RoomEvents + RoomCache {}

impl<T: RoomEvents + RoomCache + ?Sized> Rooms for T {}

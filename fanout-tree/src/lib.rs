//! The fan-out engine (the tiered fan-out planner arrives with the tiered
//! fan-out work).
//!
//! - [`outbox`]: a connection's byte-bounded queue; producers never wait.
//! - [`group`]: a room's local members and the encode-once broadcast.
//! - [`flush`]: the flushers that write broadcast frames to sockets.
//!
//! Nothing here owns a socket: the gateway owns sockets and the bus, and
//! hands each outbox a [`DirectWrite`] sink that flushers write through.

pub mod flush;
pub mod group;
pub mod outbox;

pub use flush::{FlushStats, Flusher, Flushers};
pub use group::{MemberSet, Slot};
pub use outbox::{DirectWrite, Drained, Flushed, Outbox, OutboxLimits, PushError, Pushed, Weighted, Wire};

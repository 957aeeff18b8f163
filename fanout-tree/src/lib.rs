//! The fan-out engine and the tiered fan-out planner.
//!
//! - [`outbox`]: a connection's byte-bounded queue; producers never wait.
//! - [`group`]: a room's local members and the encode-once broadcast.
//! - [`flush`]: the flushers that write broadcast frames to sockets.
//! - [`plan`]: which gateway forwards a room's messages to which (pure).
//!
//! Nothing here owns a socket: the gateway owns sockets and the bus, and
//! hands each outbox a [`DirectWrite`] sink that flushers write through.

pub mod flush;
pub mod group;
pub mod outbox;
pub mod plan;

pub use flush::{FlushStats, Flusher, Flushers};
pub use group::MemberSet;
pub use outbox::{DirectWrite, Drained, Flushed, Outbox, OutboxLimits, PushError, Pushed, Weighted, Wire};
pub use plan::{FanoutPlan, PlanError};

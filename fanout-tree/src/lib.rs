//! The fan-out engine and the tiered fan-out planner.
//!
//! - [`outbox`]: a connection's byte-bounded queue; producers never wait.
//! - [`group`]: a room's local members and the encode-once broadcast.
//! - [`plan`]: which gateway forwards a room's messages to which (pure).
//!
//! Nothing here does I/O: the gateway owns sockets and the bus.

pub mod group;
pub mod outbox;
pub mod plan;

pub use group::MemberSet;
pub use outbox::{Drained, Outbox, OutboxLimits, PushError, Weighted};
pub use plan::{FanoutPlan, PlanError};

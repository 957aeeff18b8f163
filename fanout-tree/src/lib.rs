//! The fan-out engine and the tiered fan-out.
//!
//! - [`outbox`]: a connection's byte-bounded queue; producers never wait.
//! - [`group`]: a room's local members and the encode-once broadcast; above
//!   the tree threshold it hands the broadcast to [`tree`].
//! - [`tree`]: the node tier: a big room's members in bounded shards, each a
//!   FIFO of messages that runs on any worker thread.
//! - [`flush`]: the flushers that write broadcast frames to sockets.
//! - [`plan`]: the pure planner shared by the node and the simulator
//!   (`examples/simulate.rs`): shard sizes, copies per NATS server, leaf
//!   link, gateway and core.
//!
//! Nothing here owns a socket: the gateway owns sockets and the bus, and
//! hands each outbox a [`DirectWrite`] sink that flushers write through.

pub mod flush;
pub mod group;
pub mod outbox;
pub mod plan;
pub mod tree;

pub use flush::{FlushStats, Flusher, Flushers};
pub use group::{MemberSet, Slot};
pub use outbox::{DirectWrite, Drained, Flushed, Outbox, OutboxLimits, PushError, Pushed, Weighted, Wire};
pub use tree::{TreeConfig, TreeStats, TreeTier};

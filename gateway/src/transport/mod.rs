//! The transport under the client protocol: RFC 6455 framing (`ws`) and its
//! `permessage-deflate` extension (RFC 7692, `deflate`), the
//! plain TCP socket shared by a connection's task and its flusher (`tcp`),
//! and TLS with certificate reloads (`tls`).
//!
//! Knows bytes, frames and sockets only: nothing of commands, replies,
//! rooms or codecs (those are `protocol` and above).

pub mod deflate;
pub mod tcp;
pub mod tls;
pub mod ws;

//! A plain-TCP socket shared by its connection's task (which reads, and
//! writes when the socket is slow) and a flusher (which writes fan-out
//! frames without waiting).
//!
//! Only one of them writes at a time: the outbox's state says which (see
//! `fanout_tree::outbox`). Reads and writes go through `&TcpStream`
//! (readiness plus `try_*`), so the socket needs no lock.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use fanout_tree::DirectWrite;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One handle of a shared socket; clone it for each user.
#[derive(Clone)]
pub struct SharedTcp(Arc<Socket>);

/// The socket itself (one allocation, shared by every handle and the sink).
pub struct Socket(TcpStream);

impl SharedTcp {
    pub fn new(tcp: TcpStream) -> Self {
        Self(Arc::new(Socket(tcp)))
    }

    /// The same socket as a flusher's sink.
    pub fn sink(&self) -> Arc<dyn DirectWrite> {
        self.0.clone()
    }
}

impl DirectWrite for Socket {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.0.poll_read_ready(cx))?;
            // Into the unfilled part as it is: `initialize_unfilled` zeroed
            // it first, a memset of the reader's whole chunk on every read
            // (its buffers are uninitialized each time).
            match self.0.0.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
                // Readiness was stale: polling again registers for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.0.poll_write_ready(cx))?;
            match self.0.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The socket closes when its last handle is dropped (the outbox lets go
    /// of its handle when it is closed).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

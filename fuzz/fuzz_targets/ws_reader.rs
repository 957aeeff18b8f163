//! A client's byte stream into the RFC 6455 frame reader
//! (`gateway::transport::ws::Reader`, message limit 4 KiB), handed over in
//! reads of 1 to 256 bytes (the first input byte picks the size). The reader
//! must only decode or refuse: no panic, no message over the limit, no
//! control frame over 125 bytes.
#![no_main]
use std::pin::Pin;
use std::task::{Context, Poll};

use gateway::transport::ws::{Incoming, Reader};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

const LIMIT: usize = 4096;

/// Hands out `data` `step` bytes per read, then end of stream.
struct Chunked<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // Half the inputs arrive with the upgrade (all pre-read), half by reads.
    let (pre, stream) = if first & 1 == 0 {
        (rest, &[][..])
    } else {
        (&[][..], rest)
    };
    let step = usize::from(first >> 1).max(1);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = Reader::new(Chunked { data: stream, step }, LIMIT, pre);
        for _ in 0..10_000 {
            match r.next().await {
                Ok(Incoming::Text(b) | Incoming::Binary(b)) => assert!(b.len() <= LIMIT),
                Ok(Incoming::Ping(b)) => assert!(b.len() <= 125),
                Ok(Incoming::Pong | Incoming::Close(_)) => {}
                Err(_) => break,
            }
        }
    });
});

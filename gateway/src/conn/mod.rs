//! One WebSocket connection: its task, its session state and its outbox.
//!
//! Owns everything per connection. The task races two futures:
//! - the **reader** (`session`) decodes client frames, checks rights and
//!   limits, runs each command (`commands`, one file per command), queues replies (and pings, from its
//!   one deadline timer) in the outbox;
//! - the **writer** (`writer`) drains the outbox in batches, one vectored write each,
//!   whenever the outbox makes the task its writer: for the connection's own
//!   frames, and for room messages a flusher could not write because the
//!   socket was full; it notices a client that stopped reading. Room messages
//!   to a socket with room are written by a flusher (`fanout_tree::flush`)
//!   without waking this task.
//!
//! Whichever ends first decides the [`CloseReason`]; cleanup (leaving every
//! room, the final close frame) always runs, bounded in time.
//!
//! Replies and pushes share one queue, so a client sees them in the order the
//! node produced them. A `subscribe` holds the outbox while it joins rooms, so
//! its reply precedes the catch-up and live messages of those rooms.

mod commands;
mod session;
mod shared;
mod writer;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fanout_tree::{DirectWrite, Outbox, OutboxLimits};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep, timeout};

use crate::auth::Identity;
use crate::error::CloseReason;
use crate::limits::Admit;
use crate::node::Node;
use crate::rooms::{ConnOutbox, Frame};
use crate::transport::deflate::Deflate;
use crate::transport::ws::{self, Incoming, Reader};
use session::Session;
use writer::{WriterTimes, write_loop};

/// How long the client's answering close frame is waited for (while its
/// unread frames are discarded).
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// How long the final close frame may take to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// The same for a slow consumer: its close frame waits behind what its socket
/// already holds, until the client reads again (memory stays bounded: the
/// outbox is closed and the socket buffer is the kernel's).
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// What the upgrade request settled about a connection.
pub struct Upgrade {
    pub peer: SocketAddr,
    /// From admission control; held until the connection ends.
    pub admit: Admit,
    /// Set when the request carried a verified `Authorization: Bearer`
    /// token: then no `connect` frame is needed.
    pub identity: Option<Identity>,
    /// `gw.v1.proto` (binary frames) instead of `gw.v1.json`.
    pub proto: bool,
    /// `permessage-deflate` was negotiated with these parameters: [`run`]
    /// makes the reader accept compressed frames ([`Reader::set_deflate`]).
    pub deflate: Option<Deflate>,
}

/// Runs one upgraded connection to its end, given the two halves of its
/// socket, and `sink` when a flusher may write room messages to the socket
/// directly.
pub async fn run<R, W>(
    node: Arc<Node>,
    mut reader: Reader<R>,
    mut writer: W,
    sink: Option<Arc<dyn DirectWrite>>,
    upgrade: Upgrade,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Upgrade {
        peer,
        admit,
        identity,
        proto,
        deflate,
    } = upgrade;
    reader.set_deflate(deflate.is_some());
    let cfg = &node.cfg;
    let id = node.next_conn_id();
    let _count = node.count_conn();
    let limits = OutboxLimits {
        max_bytes: cfg.outbox_max_bytes,
        max_frames: cfg.outbox_max_frames,
    };
    let shard = node.rooms.flushers().shard_for(id.0);
    let outbox: ConnOutbox = Arc::new(Outbox::with_sink(limits, sink, shard));
    let mut batch = VecDeque::new();

    if node.conns_active() > cfg.max_connections {
        tracing::debug!(%peer, "refusing connection: node is full");
        finish(
            &mut writer,
            &mut reader,
            &outbox,
            &mut batch,
            CloseReason::TooManyConnections,
        )
        .await;
        node.metrics.closed(CloseReason::TooManyConnections);
        return;
    }

    // Created by the first notify-mode subscription: most connections never need it.
    let activity = OnceLock::new();
    let mut session = Session::new(node.clone(), id, outbox.clone(), &activity, admit);
    session.proto = proto;
    session.deflate = deflate;
    let reason = {
        let times = WriterTimes {
            write_timeout: cfg.write_timeout,
            activity_interval: cfg.activity_interval,
            codec: session.codec(),
            deflate,
        };
        let reading = session.read_loop(&mut reader, identity);
        let writing = write_loop(&mut writer, &outbox, &activity, &mut batch, times);
        let drain = async {
            node.draining().await;
            // Spread the 1012s so clients do not all reconnect at once.
            let spread = cfg.drain_spread.min(cfg.drain_timeout / 2);
            if !spread.is_zero() {
                sleep(spread.mul_f64(rand::random::<f64>())).await;
            }
        };
        tokio::select! {
            r = reading => r,
            r = writing => r,
            () = drain => CloseReason::NodeDraining,
        }
    };
    session.leave_all();
    if reason == CloseReason::SlowConsumer {
        node.metrics.slow_closes_total.increment(1);
        tracing::debug!(conn = id.0, %peer, "closing slow consumer");
    }
    node.record_outbox_peak(outbox.peak_bytes());
    finish(&mut writer, &mut reader, &outbox, &mut batch, reason).await;
    node.metrics.closed(reason);
}

/// Sends what is still queued (unless the client is the reason it could not be
/// sent) and the close frame, then completes the closing handshake, within
/// [`CLOSE_GRACE`].
///
/// Reading until the client's own close frame matters: dropping a socket that
/// still holds unread client frames (a flooder's backlog) makes the kernel
/// reset the connection, and the reset destroys the close frame we just sent.
async fn finish<R, W>(
    writer: &mut W,
    reader: &mut Reader<R>,
    outbox: &ConnOutbox,
    batch: &mut VecDeque<Frame>,
    reason: CloseReason,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    outbox.close();
    let Some(code) = reason.code() else {
        return;
    };
    let work = async {
        let client_closed = matches!(reason, CloseReason::ClientClosed(_));
        // Takes the queue from a flusher, if one was writing it.
        outbox.try_drain(batch);
        if reason == CloseReason::SlowConsumer || client_closed {
            // Only the rest of a frame already partly on the wire: the close
            // frame must not land inside it.
            let partial = batch.front().is_some_and(Frame::is_partly_written);
            batch.truncate(usize::from(partial));
        }
        ws::write_all(writer, batch).await?;
        ws::write_frame(writer, Frame::close(code, reason.text())).await?;
        if !client_closed {
            // Bounded on its own: a client that never answers must not hold a drain.
            let _ = timeout(CLOSE_LINGER, async {
                while let Ok(msg) = reader.next().await {
                    if matches!(msg, Incoming::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        tokio::io::AsyncWriteExt::shutdown(writer).await
    };
    let grace = if reason == CloseReason::SlowConsumer {
        SLOW_CLOSE_GRACE
    } else {
        CLOSE_GRACE
    };
    let _ = timeout(grace, work).await;
}

impl<'a> Session<'a> {}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::model::{ConnId, RoomId};
    use crate::rooms::Member;
    use session::RoomSub;

    /// Issue 18: a panic in a connection task (an `exp` overflow did it)
    /// skipped the cleanup after `select!`, and the room kept a zombie member
    /// whose socket still got room messages. The session leaves its rooms
    /// when it is dropped, unwinding included.
    #[tokio::test]
    async fn a_panicking_connection_task_still_leaves_its_rooms() {
        let node = crate::Node::new(crate::Config::default()).await.unwrap();
        let room = RoomId::parse("z").unwrap();
        let (task_node, task_room) = (node.clone(), room.clone());
        let ended = tokio::spawn(async move {
            let activity = OnceLock::new();
            let outbox: ConnOutbox = Arc::new(Outbox::new(OutboxLimits::default()));
            let mut s = Session::new(task_node.clone(), ConnId(7), outbox.clone(), &activity, Admit::none());
            let joined = task_node
                .rooms
                .join(&task_room, ConnId(7), Member::Full(&outbox), None, None)
                .unwrap();
            s.set_room(
                &task_room,
                RoomSub {
                    member: joined.slot,
                    ..RoomSub::BY_CONNECTION
                },
            );
            assert_eq!(task_node.rooms.members(&task_room), 1);
            panic!("a bug in a command handler");
        })
        .await;
        assert!(ended.unwrap_err().is_panic());
        assert_eq!(node.rooms.members(&room), 0);
    }

    /// Every idle connection holds one `run` future: its size is part of the
    /// per-connection memory budget (issue 3: at most 4 KiB of RSS per idle
    /// connection). Command handlers are boxed so their state is only on the
    /// heap while they run; this keeps that from regressing.
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let node = crate::Node::new(crate::Config::default()).await.unwrap();
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        let fut = run(
            node,
            Reader::new(r, 1024, &[]),
            w,
            None,
            Upgrade {
                peer: "127.0.0.1:1".parse().unwrap(),
                admit: crate::limits::Admit::none(),
                identity: None,
                proto: false,
                deflate: None,
            },
        );
        // Every subscribed room of a connection holds one (a user in 2,000
        // rooms, 100K users): as small as the room id's neighbour allows.
        assert!(
            std::mem::size_of::<RoomSub>() <= 8,
            "{}",
            std::mem::size_of::<RoomSub>()
        );
        let size = std::mem::size_of_val(&fut);
        // 2,048 before issue 13; +88 for the server API: the wait for its
        // orders (a pointer to a future boxed once per connection, and its
        // branch of the reader's select), the registry handle in the session
        // and the token's `iat` in each copy of the identity.
        assert!(size <= 2_176, "conn::run future is {size} bytes");
        // 560 before the room-token timers (8 bytes) and the history byte
        // budget and per-limit retry times (72 bytes, in ConnLimits).
        assert!(
            std::mem::size_of::<Session>() <= 640,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}

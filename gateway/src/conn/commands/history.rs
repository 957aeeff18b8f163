//! `history`: a page of a room's messages, bounded by the page size, the
//! connection's outbox and its history byte budget.

use tokio::time::Instant;

use super::room_for;
use crate::conn::session::Session;
use crate::conn::shared::bus_error;
use crate::error::{CloseReason, ProtoError};
use crate::metrics;
use crate::protocol::{Codec, ReplyBody, ServerMsg};
use crate::rooms::HistoryPage;

impl Session<'_> {
    pub(in crate::conn) async fn history(
        &mut self,
        id: Option<u32>,
        name: &str,
        limit: Option<u32>,
        before: Option<u64>,
    ) -> Result<(), CloseReason> {
        // The room's own name when the node has it: no allocation.
        let Some((room, _)) = self.node.rooms.intern(name) else {
            return self.bad_frame(id, &ProtoError::bad_request("invalid room name"));
        };
        // Authorization first (see `publish`), then the limits.
        let now = Instant::now();
        let granted = self.identity().grants.can_subscribe(room.as_str())
            || self.rooms.get(&room).is_some_and(|s| s.grant_holds(now));
        if !granted {
            return self.reply_err(id, &ProtoError::forbidden("the token does not grant this room"));
        }
        if let Err(r) = self.limits.check_history() {
            return self.rate_limited(id, r);
        }
        // Without an `id` nobody would see the page: read nothing.
        let Some(id) = id else {
            return Ok(());
        };
        let limit = (limit.unwrap_or(50) as usize).min(self.node.cfg.history_page_max);
        let (messages, more) = match self.node.rooms.history(&room, before, limit) {
            HistoryPage::Messages { messages, more } => {
                metrics::history_page("cache");
                (messages, more)
            }
            HistoryPage::NeedsBackend => match self.node.bus.history(&room, before, limit).await {
                Ok(page) => {
                    metrics::history_page("stream");
                    page
                }
                Err(e) => return self.reply_err(Some(id), &bus_error(&e)),
            },
        };
        // The page counts against the connection's one outbox bound and its
        // history byte budget: keep the newest messages that fit (the client
        // pages on with `before`), at least one. Sizes are those of the
        // JSON pushes, whichever codec the page goes out in.
        let replay = self.limits.replay_available();
        let fits = room_for(&self.outbox).1.min(replay);
        let mut start = messages.len();
        let mut size = 0;
        while start > 0 {
            let weight = messages[start - 1].frame(Codec::Json).as_bytes().len() + 1;
            if size + weight > fits && start < messages.len() {
                break;
            }
            size += weight;
            start -= 1;
        }
        if size > replay {
            // Not even the newest message fits the budget now.
            let r = self.limits.replay_limited(size);
            return self.rate_limited(Some(id), r);
        }
        self.limits.spend_replay(size);
        let more = more || start > 0;
        // Past the bound (the client does not read) this overflows the
        // outbox: the connection is closed as a slow consumer.
        self.send(&ServerMsg::Reply {
            id,
            ok: ReplyBody::History {
                messages: &messages[start..],
                more,
            },
        })
    }
}

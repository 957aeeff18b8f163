//! `presence`: a room's cluster-wide member count, and its users when few.

use tokio::time::Instant;

use crate::conn::session::Session;
use crate::error::{CloseReason, ProtoError};
use crate::model::RoomId;
use crate::protocol::ReplyBody;

impl Session<'_> {
    pub(in crate::conn) async fn presence(&mut self, id: Option<u32>, name: &str) -> Result<(), CloseReason> {
        let Some(room) = RoomId::parse(name) else {
            return self.bad_frame(id, &ProtoError::bad_request("invalid room name"));
        };
        // Any room the client may read: its grants or a live room token.
        let granted = self.identity().grants.can_subscribe(room.as_str())
            || self.rooms.get(&room).is_some_and(|s| s.grant_holds(Instant::now()));
        if !granted {
            return self.reply_err(id, &ProtoError::forbidden("the token does not grant this room"));
        }
        // Memory, or for a small room whose list the view lacks one NATS
        // round trip (at most presence::GATHER_WAIT); no budget of its own
        // beyond the connection's byte rate.
        let p = self.node.presence.room(&room).await;
        self.reply_ok(
            id,
            ReplyBody::Presence {
                count: p.count,
                age_ms: p.age_ms,
                users: p.users.as_deref(),
            },
        )
    }
}

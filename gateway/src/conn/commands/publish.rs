//! `publish`: authorization, then the limits, then the broker.

use bytes::Bytes;
use tokio::time::Instant;

use crate::broker::Outgoing;
use crate::conn::session::{MAX_KEY_LEN, Session};
use crate::conn::shared::bus_error;
use crate::error::{CloseReason, ProtoError};
use crate::protocol::ReplyBody;

impl Session<'_> {
    pub(in crate::conn) async fn publish(
        &mut self,
        id: Option<u32>,
        name: &str,
        data: &Bytes,
        key: Option<&str>,
    ) -> Result<(), CloseReason> {
        // The room's own name when the node has it: no allocation.
        let Some((room, _)) = self.node.rooms.intern(name) else {
            return self.bad_frame(id, &ProtoError::bad_request("invalid room name"));
        };
        // Authorization before any limiter: a command the token forbids
        // must not spend a budget shared with other users (nor tell by the
        // answer whether someone else just spent it).
        let now = Instant::now();
        let allowed = self.identity().grants.can_publish(room.as_str())
            || self.rooms.get(&room).is_some_and(|s| s.may_publish(now));
        if !allowed {
            return self.reply_err(
                id,
                &ProtoError::forbidden("the token does not grant publishing to this room"),
            );
        }
        if key.is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN || k.starts_with(crate::control::API_KEY_MARK)) {
            return self.reply_err(
                id,
                &ProtoError::bad_request("key must be 1 to 256 bytes, not starting with U+0000"),
            );
        }
        if let Err(e) = crate::protocol::check_data(data) {
            return self.bad_frame(id, &e);
        }
        if let Err(r) = self
            .node
            .limits
            .check_publish(&self.limits, &self.identity().sub, &room)
        {
            return self.rate_limited(id, r);
        }
        let node = self.node.clone();
        let out = Outgoing {
            room: &room,
            from: &self.identity().sub,
            data,
            key,
        };
        match node.publish(out).await {
            Ok(p) => self.reply_ok(id, ReplyBody::Publish { offset: p.offset }),
            Err(e) => {
                tracing::debug!(%room, error = %e, "publish failed");
                self.reply_err(id, &bus_error(&e))
            }
        }
    }
}

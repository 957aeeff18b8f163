//! `refresh`: a new connection token for the same user; rooms its grants no
//! longer cover are left with an `unsubscribed` push.

use crate::conn::session::Session;
use crate::error::{CloseReason, ErrorCode, ProtoError};
use crate::model::RoomId;
use crate::protocol::{ReplyBody, ServerMsg};

impl Session<'_> {
    pub(in crate::conn) async fn refresh(&mut self, id: Option<u32>, token: &str) -> Result<(), CloseReason> {
        let identity = match self.node.verifier.verify_connect(token).await {
            Ok(i) => i,
            Err(e) => {
                self.node.metrics.auth_failed(e.label());
                return self.reply_err(id, &ProtoError::new(ErrorCode::Unauthorized, e.to_string()));
            }
        };
        if self.node.control.revocations.is_revoked(&identity.sub, identity.iat) {
            self.node.metrics.auth_failed("revoked");
            return self.reply_err(id, &ProtoError::new(ErrorCode::Unauthorized, "the token was revoked"));
        }
        if identity.sub != self.identity().sub {
            self.node.metrics.auth_failed("wrong_sub");
            return self.reply_err(
                id,
                &ProtoError::new(ErrorCode::Unauthorized, "token is for another user"),
            );
        }
        // Rooms the new grants no longer cover are left, with a push that says so.
        let revoked: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(room, sub)| !sub.by_token() && !identity.grants.can_subscribe(room.as_str()))
            .map(|(room, _)| room.clone())
            .collect();
        for room in revoked {
            self.drop_room(&room);
            let error = ProtoError::forbidden("the refreshed token does not grant this room");
            self.send(&ServerMsg::Unsubscribed {
                room: &room,
                error: &error,
            })?;
        }
        if let Some(c) = &self.control {
            c.set_iat(identity.iat);
        }
        let expires_in = self.set_expiry(identity.exp);
        self.identity = Some(identity);
        self.reply_ok(id, ReplyBody::Refresh { expires_in })
    }
}

//! `unsubscribe`: leaves the named rooms; names not subscribed (or not
//! valid) are ignored.

use crate::conn::session::Session;
use crate::error::CloseReason;
use crate::model::RoomId;
use crate::protocol::ReplyBody;

impl Session<'_> {
    pub(in crate::conn) fn unsubscribe(&mut self, id: Option<u32>, rooms: Vec<String>) -> Result<(), CloseReason> {
        for name in rooms {
            if let Some(room) = RoomId::parse(&name) {
                self.drop_room(&room);
            }
        }
        self.reply_ok(id, ReplyBody::Empty)
    }
}

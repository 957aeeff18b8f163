//! `unsubscribe`: leaves the named rooms; names not subscribed (or not
//! valid) are ignored.

use crate::conn::session::Session;
use crate::error::CloseReason;
use crate::protocol::ReplyBody;

impl Session<'_> {
    pub(in crate::conn) fn unsubscribe(&mut self, id: Option<u32>, rooms: Vec<String>) -> Result<(), CloseReason> {
        for name in rooms {
            // Only a subscribed room has anything to leave (and a valid name).
            if let Some(room) = self.rooms.get_key_value(name.as_str()).map(|(r, _)| r.clone()) {
                self.drop_room(&room);
            }
        }
        self.reply_ok(id, ReplyBody::Empty)
    }
}

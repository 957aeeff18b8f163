//! One file per command a connection executes, each an `impl Session`
//! block; `Session::handle` dispatches to them from one `match`.

mod history;
mod presence;
mod publish;
mod refresh;
mod subscribe;
mod unsubscribe;

use crate::rooms::ConnOutbox;

/// Share of the outbox a catch-up or history page leaves free for the live
/// messages that may arrive while it is queued (1/8 of the caps).
pub(super) const OUTBOX_RESERVE_SHIFT: u32 = 3;

/// Room for a catch-up or a history page in `outbox`: (frames, bytes) left
/// under its caps, less a reserve for live messages that arrive meanwhile.
pub(super) fn room_for(outbox: &ConnOutbox) -> (usize, usize) {
    let (frames, bytes) = outbox.room_left();
    let caps = outbox.limits();
    (
        frames.saturating_sub(caps.max_frames >> OUTBOX_RESERVE_SHIFT),
        bytes.saturating_sub(caps.max_bytes >> OUTBOX_RESERVE_SHIFT),
    )
}

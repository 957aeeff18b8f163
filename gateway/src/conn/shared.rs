//! What the connection's files share: leaving a room (the last local member
//! tells the broker) and turning broker, room and read errors into what the
//! client sees. A leaf of `conn`, so its files never depend on each other in
//! a circle.

use crate::broker::BusError;
use crate::error::{CloseReason, ErrorCode, ProtoError};
use crate::model::{ConnId, RoomId};
use crate::node::Node;
use crate::rooms::{MemberSlot, RoomError, Transition};
use crate::transport::ws::ReadError;

/// Leaves `room`; the last local member tells the bus.
pub(super) fn leave(node: &Node, room: &RoomId, conn: ConnId, held: Option<MemberSlot>) {
    if node.rooms.leave(room, conn, held) == Transition::LastLocal {
        node.bus.room_left(room);
    }
}

pub(super) fn bus_error(e: &BusError) -> ProtoError {
    match e {
        BusError::Room(r) => room_error(*r),
        BusError::Unavailable(_) | BusError::Timeout => {
            ProtoError::new(ErrorCode::Unavailable, "the message bus is unavailable; retry")
        }
    }
}

pub(super) fn room_error(e: RoomError) -> ProtoError {
    match e {
        RoomError::TooManyRooms => ProtoError::new(ErrorCode::LimitExceeded, "the node holds too many rooms"),
    }
}

pub(super) fn read_error_reason(e: &ReadError) -> CloseReason {
    match e {
        ReadError::TooLarge => CloseReason::TooLarge,
        ReadError::BadUtf8 => CloseReason::BadPayload,
        ReadError::Protocol(_) => CloseReason::ProtocolError,
        ReadError::Eof | ReadError::Io(_) => CloseReason::ClientGone,
    }
}

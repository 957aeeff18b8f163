//! The protobuf client protocol (`gw.v1.proto`): binary frames carrying the
//! messages of `proto/proto/client.proto`, with the same ops and fields as
//! `gw.v1.json`; `data` is the UTF-8 JSON text of the value, as bytes.
//!
//! Owns the translation only. Commands are decoded into the same
//! [`Command`] the JSON parser produces, so everything after parsing is
//! shared. Server frames are encoded from the typed [`ServerMsg`], never
//! from another codec's text. A `message` push is encoded once per message
//! per node ([`super::SharedMessage`]); a `history` page splices those
//! encodings into its reply instead of encoding the messages again.

use bytes::Bytes;
use proto::Message as _;
use proto::client::{self as pb, command::Op, server_frame::Body};
use serde_json::value::RawValue;

use super::{Codec, Command, Parsed, ReplyBody, ServerMsg, SharedMessage, SubscribeEntry, SubscribeResult};
use crate::error::{ErrorCode, ProtoError};
use crate::model::Message;
use crate::transport::ws::Frame;

/// Parses one binary frame. `data` of a publish is a zero-copy slice of it.
pub fn parse(frame: &Bytes) -> Parsed {
    let cmd = match pb::Command::decode(frame.clone()) {
        Ok(c) => c,
        Err(e) => {
            return Parsed {
                id: None,
                command: Err(ProtoError::bad_request(format!("malformed protobuf: {e}"))),
            };
        }
    };
    let command = match cmd.op {
        None => Err(ProtoError::bad_request("missing op")),
        Some(Op::Connect(c)) if c.token.is_empty() => {
            Err(ProtoError::new(ErrorCode::Unauthorized, "connect needs a token"))
        }
        Some(Op::Connect(c)) => Ok(Command::Connect { token: c.token }),
        Some(Op::Refresh(r)) if r.token.is_empty() => Err(ProtoError::bad_request("refresh needs a token")),
        Some(Op::Refresh(r)) => Ok(Command::Refresh { token: r.token }),
        Some(Op::Subscribe(s)) => Ok(Command::Subscribe {
            rooms: s
                .rooms
                .into_iter()
                .map(|e| SubscribeEntry {
                    room: Some(e.room),
                    since: e.since,
                    mode: non_empty(e.mode),
                    token: non_empty(e.token),
                    presence: e.presence,
                })
                .collect(),
        }),
        Some(Op::Unsubscribe(u)) => Ok(Command::Unsubscribe { rooms: u.rooms }),
        Some(Op::Publish(p)) if p.room.is_empty() => Err(ProtoError::bad_request("publish needs room")),
        Some(Op::Publish(p)) => match serde_json::from_slice::<&RawValue>(&p.data) {
            Ok(v) => Ok(Command::Publish {
                data: p.data.slice_ref(v.get().as_bytes()),
                room: p.room,
                key: p.key,
            }),
            Err(_) => Err(ProtoError::bad_request("data must be the UTF-8 JSON text of a value")),
        },
        Some(Op::History(h)) if h.room.is_empty() => Err(ProtoError::bad_request("history needs room")),
        Some(Op::History(h)) => Ok(Command::History {
            room: h.room,
            limit: h.limit,
            before: h.before,
        }),
        Some(Op::Presence(p)) if p.room.is_empty() => Err(ProtoError::bad_request("presence needs room")),
        Some(Op::Presence(p)) => Ok(Command::Presence { room: p.room }),
        Some(Op::Ping(_)) => Ok(Command::Ping),
    };
    Parsed { id: cmd.id, command }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Encodes `msg` as one binary frame, a `ServerFrame` (see
/// [`super::Codec::encode`] for which frames are coalesced).
pub fn encode(msg: &ServerMsg<'_>) -> Frame {
    let payload = match msg {
        ServerMsg::Reply {
            id,
            ok: ReplyBody::History { messages, more },
        } => history_frame(*id, messages, *more),
        _ => frame_of(msg).encode_to_vec(),
    };
    if msg.is_room_push() {
        Frame::binary(&payload)
    } else {
        Frame::binary_reply(&payload)
    }
}

/// `msg` as the generated `ServerFrame` (a `history` page is spliced from
/// its messages' frames by [`encode`] instead).
fn frame_of(msg: &ServerMsg<'_>) -> pb::ServerFrame {
    let (id, body) = match msg {
        ServerMsg::Reply { id, ok } => (Some(*id), reply_body(ok)),
        ServerMsg::Error { id, error } => (*id, Body::Error(error_of(error))),
        ServerMsg::Message(m) => (None, Body::Message(message_of(m))),
        ServerMsg::Activity { room, offset, count } => (
            None,
            Body::Activity(pb::Activity {
                room: room.as_str().to_owned(),
                offset: *offset,
                count: *count,
            }),
        ),
        ServerMsg::Pong => (None, Body::Pong(pb::Empty {})),
        ServerMsg::Unsubscribed { room, error } => (
            None,
            Body::Unsubscribed(pb::Unsubscribed {
                room: room.as_str().to_owned(),
                error: Some(error_of(error)),
            }),
        ),
        ServerMsg::Presence {
            room,
            count,
            join,
            leave,
        } => (
            None,
            Body::Presence(pb::PresenceEvent {
                room: room.as_str().to_owned(),
                count: *count,
                join: join.to_vec(),
                leave: leave.to_vec(),
            }),
        ),
    };
    pb::ServerFrame { id, body: Some(body) }
}

fn reply_body(ok: &ReplyBody<'_>) -> Body {
    match ok {
        ReplyBody::Connect {
            client,
            node,
            expires_in,
            max_frame_bytes,
        } => Body::ConnectOk(pb::ConnectOk {
            client: (*client).to_owned(),
            node: (*node).to_owned(),
            expires_in: *expires_in,
            max_frame_bytes: Some(*max_frame_bytes),
        }),
        ReplyBody::Subscribe { rooms } => Body::SubscribeOk(pb::SubscribeOk {
            rooms: rooms
                .iter()
                .map(|r| match r {
                    SubscribeResult::Joined {
                        room,
                        offset,
                        recovered,
                    } => pb::SubscribeResult {
                        room: room.as_str().to_owned(),
                        offset: *offset,
                        recovered: *recovered,
                        error: None,
                    },
                    SubscribeResult::Failed { room, error } => pb::SubscribeResult {
                        room: (*room).to_owned(),
                        offset: 0,
                        recovered: None,
                        error: Some(error_of(error)),
                    },
                })
                .collect(),
        }),
        ReplyBody::Publish { offset } => Body::PublishOk(pb::PublishOk { offset: *offset }),
        ReplyBody::History { messages, more } => Body::HistoryOk(pb::HistoryOk {
            messages: messages.iter().map(|m| message_of(m.message())).collect(),
            more: *more,
        }),
        ReplyBody::Refresh { expires_in } => Body::RefreshOk(pb::RefreshOk {
            expires_in: *expires_in,
        }),
        ReplyBody::Presence { count, age_ms, users } => Body::PresenceOk(pb::PresenceOk {
            count: *count,
            age_ms: *age_ms,
            listed: users.is_some(),
            users: users.map(<[String]>::to_vec).unwrap_or_default(),
        }),
        ReplyBody::Empty => Body::Ok(pb::Empty {}),
    }
}

fn error_of(e: &ProtoError) -> pb::Error {
    pb::Error {
        code: e.code.as_str().to_owned(),
        message: e.message.to_string(),
        retry_after_ms: e.retry_after_ms,
    }
}

fn message_of(m: &Message) -> pb::Message {
    #[cfg(test)]
    tests::MESSAGE_ENCODES.with(|n| n.set(n.get() + 1));
    pb::Message {
        room: m.room.as_str().to_owned(),
        offset: m.offset,
        ts: m.ts,
        from: m.from.clone(),
        data: m.data.clone(),
    }
}

/// Field keys (number << 3 | wire type) of the messages spliced by hand.
const SERVER_FRAME_ID: u8 = 1 << 3;
const SERVER_FRAME_MESSAGE: u8 = (9 << 3) | 2;
const SERVER_FRAME_HISTORY_OK: u8 = (7 << 3) | 2;
const HISTORY_OK_MESSAGES: u8 = (1 << 3) | 2;
const HISTORY_OK_MORE: u8 = 2 << 3;

/// The `ServerFrame{id, history_ok: HistoryOk{messages, more}}` that prost
/// would encode, byte for byte, with each `Message` copied from the
/// message's cached push (`ServerFrame{message}`) instead of encoded again.
fn history_frame(id: u32, messages: &[SharedMessage], more: bool) -> Vec<u8> {
    let bodies: Vec<&[u8]> = messages
        .iter()
        .map(|m| message_field(m.frame(Codec::Proto).as_bytes()))
        .collect();
    let mut inner_len: usize = bodies.iter().map(|b| 1 + varint_len(b.len() as u64) + b.len()).sum();
    if more {
        inner_len += 2;
    }
    let mut out = Vec::with_capacity(16 + inner_len);
    out.push(SERVER_FRAME_ID);
    put_varint(&mut out, u64::from(id));
    out.push(SERVER_FRAME_HISTORY_OK);
    put_varint(&mut out, inner_len as u64);
    for b in bodies {
        out.push(HISTORY_OK_MESSAGES);
        put_varint(&mut out, b.len() as u64);
        out.extend_from_slice(b);
    }
    if more {
        out.extend_from_slice(&[HISTORY_OK_MORE, 1]);
    }
    out
}

/// The encoded `Message` inside an encoded `ServerFrame{message}` (no id):
/// its key, its length, then the message.
fn message_field(push: &[u8]) -> &[u8] {
    debug_assert_eq!(push.first(), Some(&SERVER_FRAME_MESSAGE));
    let mut i = 1;
    while push.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    push.get(i + 1..).unwrap_or_default()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::model::RoomId;

    thread_local! {
        /// `Message`s encoded to protobuf on this thread (a test's own count).
        pub(in crate::protocol) static MESSAGE_ENCODES: Cell<usize> = const { Cell::new(0) };
    }

    /// How many room messages this thread has encoded to protobuf so far.
    pub(crate) fn message_encodes() -> usize {
        MESSAGE_ENCODES.with(Cell::get)
    }

    #[test]
    fn commands_decode_like_their_json_twins() {
        let cmd = pb::Command {
            id: Some(7),
            op: Some(Op::Publish(pb::Publish {
                room: "general".into(),
                data: Bytes::from_static(br#" {"text":"hi"} "#),
                key: Some("k1".into()),
            })),
        };
        let parsed = parse(&Bytes::from(cmd.encode_to_vec()));
        assert_eq!(parsed.id, Some(7));
        match parsed.command.unwrap() {
            Command::Publish { room, data, key } => {
                assert_eq!(room, "general");
                assert_eq!(&data[..], br#"{"text":"hi"}"#);
                assert_eq!(key.as_deref(), Some("k1"));
            }
            other => panic!("{other:?}"),
        }
        let sub = pb::Command {
            id: Some(2),
            op: Some(Op::Subscribe(pb::Subscribe {
                rooms: vec![pb::RoomEntry {
                    room: "random".into(),
                    since: Some(5),
                    mode: "notify".into(),
                    token: String::new(),
                    presence: None,
                }],
            })),
        };
        match parse(&Bytes::from(sub.encode_to_vec())).command.unwrap() {
            Command::Subscribe { rooms } => {
                assert_eq!(rooms[0].room.as_deref(), Some("random"));
                assert_eq!(rooms[0].since, Some(5));
                assert_eq!(rooms[0].mode.as_deref(), Some("notify"));
                assert_eq!(rooms[0].token, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_commands_are_bad_requests() {
        let garbage = parse(&Bytes::from_static(b"\xff\xff\xff"));
        assert_eq!(garbage.command.unwrap_err().code, ErrorCode::BadRequest);
        let no_op = parse(&Bytes::from(pb::Command { id: Some(3), op: None }.encode_to_vec()));
        assert_eq!(no_op.id, Some(3));
        assert_eq!(no_op.command.unwrap_err().code, ErrorCode::BadRequest);
        let not_json = pb::Command {
            id: Some(4),
            op: Some(Op::Publish(pb::Publish {
                room: "r".into(),
                data: Bytes::from_static(b"{not json"),
                key: None,
            })),
        };
        assert_eq!(
            parse(&Bytes::from(not_json.encode_to_vec())).command.unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    fn stored(offset: u64, data: &'static [u8]) -> SharedMessage {
        SharedMessage::new(Message {
            room: RoomId::parse("general").unwrap(),
            offset,
            ts: 1_764_201_234_567,
            from: "al\"ice".into(),
            data: Bytes::from_static(data),
        })
    }

    /// The spliced `history` page is exactly what prost makes of the same
    /// typed value, and it reuses each message's cached encoding.
    #[test]
    fn a_history_page_is_spliced_from_the_cached_pushes_byte_for_byte() {
        let long = Box::leak(format!("\"{}\"", "x".repeat(300)).into_boxed_str());
        let messages = vec![
            stored(1, br#"{"t":1}"#),
            stored(0, long.as_bytes()),
            stored(300, b"null"),
        ];
        for m in &messages {
            m.frame(Codec::Proto);
        }
        for (id, more) in [(5, true), (0, false), (u32::MAX, true)] {
            let before = message_encodes();
            let spliced = history_frame(id, &messages, more);
            assert_eq!(message_encodes(), before, "no message is encoded again");
            let typed = pb::ServerFrame {
                id: Some(id),
                body: Some(reply_body(&ReplyBody::History {
                    messages: &messages,
                    more,
                })),
            };
            assert_eq!(spliced, typed.encode_to_vec());
        }
        assert_eq!(
            history_frame(1, &[], false),
            pb::ServerFrame {
                id: Some(1),
                body: Some(Body::HistoryOk(pb::HistoryOk::default())),
            }
            .encode_to_vec()
        );
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}

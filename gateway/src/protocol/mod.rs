//! The client protocol: commands in, typed server messages out, and the two
//! codecs that carry them (`gw.v1.json` in [`json`], `gw.v1.proto` in
//! [`proto`]).
//!
//! Owns the wire format only; what a command does lives in `conn`.
//!
//! Every server frame starts as one typed [`ServerMsg`] and each codec encodes
//! it straight from that value: no codec parses text another one built. A room
//! message is a [`SharedMessage`]: its JSON frame is made once when it is
//! stored, its protobuf frame at most once, on first use, and both are shared
//! by reference count by the room's log, every member of that codec, catch-up
//! and history pages.
//!
//! A room message's `permessage-deflate` frames (RFC 7692, compressed with
//! `server_no_context_takeover` and the full window) are made the same way:
//! at most once per codec per node, on first use, and shared by every member
//! that negotiated compression, catch-up included. A push below
//! [`crate::transport::deflate::MIN_COMPRESS`] bytes is never compressed.
//!
//! Concurrency: a [`SharedMessage`] is immutable but for its lazily made
//! frames, each set once through a `OnceLock` (whoever needs it first encodes
//! it, under the room's lock during a broadcast; later readers take no lock).

mod ijson;
pub mod json;
pub mod proto;

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fanout_tree::Weighted;
use serde::Deserialize;

use crate::error::ProtoError;
use crate::model::{Message, RoomId};
use crate::transport::deflate::{Deflate, MIN_COMPRESS};
use crate::transport::ws::Frame;

/// One client command, validated (from either codec's parser).
#[derive(Debug)]
pub enum Command {
    Connect {
        token: String,
    },
    Subscribe {
        rooms: Vec<SubscribeEntry>,
    },
    Unsubscribe {
        rooms: Vec<String>,
    },
    Publish {
        room: String,
        data: Bytes,
        key: Option<String>,
    },
    History {
        room: String,
        limit: Option<u32>,
        before: Option<u64>,
    },
    Refresh {
        token: String,
    },
    /// The room's cluster-wide member count (and users, when few).
    Presence {
        room: String,
    },
    Ping,
}

/// One room of a `subscribe` command.
#[derive(Debug, Deserialize)]
pub struct SubscribeEntry {
    #[serde(default)]
    pub room: Option<String>,
    #[serde(default)]
    pub since: Option<u64>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// `true`: `presence` pushes (joins and leaves) for this room.
    #[serde(default)]
    pub presence: Option<bool>,
}

/// A parsed frame: the command's `id` (if any) and the command or why it is bad.
/// Made by [`json::parse`] and [`proto::parse`] alike.
#[derive(Debug)]
pub struct Parsed {
    pub id: Option<u32>,
    pub command: Result<Command, ProtoError>,
}

/// The sub-protocol a connection speaks, chosen at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// `gw.v1.json`: text frames (the default).
    #[default]
    Json,
    /// `gw.v1.proto`: binary frames of `proto/proto/client.proto`.
    Proto,
}

impl Codec {
    /// Parses one client frame of this codec.
    pub fn parse(self, frame: &Bytes) -> Parsed {
        match self {
            Codec::Json => json::parse(frame),
            Codec::Proto => proto::parse(frame),
        }
    }

    /// Encodes `msg` as one frame of this codec: replies and the
    /// connection's own pushes (`pong`, `unsubscribed`) are written without
    /// coalescing, room pushes (`message`, `activity`) may wait out the
    /// writer's short window.
    pub fn encode(self, msg: &ServerMsg<'_>) -> Frame {
        match self {
            Codec::Json => json::encode(msg),
            Codec::Proto => proto::encode(msg),
        }
    }
}

/// One server frame, typed: a reply to a command or a push. Both codecs
/// encode it field for field (`docs/protocol.md`, `proto/proto/client.proto`).
#[derive(Debug)]
pub enum ServerMsg<'a> {
    /// `{"id":N,"ok":{..}}`: a command succeeded. Source: `conn::commands`.
    Reply { id: u32, ok: ReplyBody<'a> },
    /// `{"id":N,"error":{..}}`, or `{"error":{..}}` for a frame without a
    /// (readable) id. Source: any command, the reader, authentication.
    Error { id: Option<u32>, error: &'a ProtoError },
    /// `{"op":"message",..}`: a room message. Rooms push the frames of a
    /// [`SharedMessage`] instead of encoding this per member.
    Message(&'a Message),
    /// `{"op":"activity","room":..,"offset":..,"count":..}`: `count` messages
    /// of a notify-mode room since the previous push, the latest at `offset`.
    /// Source: the connection's writer.
    Activity { room: &'a RoomId, offset: u64, count: u64 },
    /// `{"op":"pong"}`: the answer to `ping`.
    Pong,
    /// `{"op":"unsubscribed","room":..,"error":{..}}`: the server ended the
    /// subscription (an expired room token, a refresh that no longer grants
    /// the room).
    Unsubscribed { room: &'a RoomId, error: &'a ProtoError },
    /// `{"op":"presence","room":..,"count":N,"join":[..],"leave":[..]}`:
    /// users who joined and left a room whose subscription asked for
    /// presence (`"presence":true`), since the previous such push (at most
    /// one per room per presence interval). Source: `presence`, through
    /// the connection's orders.
    Presence {
        room: &'a RoomId,
        count: u64,
        join: &'a [String],
        leave: &'a [String],
    },
}

impl ServerMsg<'_> {
    /// A push that a room causes (not an answer to this connection's own
    /// frames): written with the writer's coalescing.
    pub fn is_room_push(&self) -> bool {
        matches!(self, ServerMsg::Message(_) | ServerMsg::Activity { .. })
    }
}

/// The `ok` body of a reply, one variant per command.
#[derive(Debug)]
pub enum ReplyBody<'a> {
    /// `{"client":..,"node":..,"expires_in":<seconds or null>,"max_frame_bytes":..}`.
    Connect {
        client: &'a str,
        node: &'a str,
        expires_in: Option<u64>,
        max_frame_bytes: u64,
    },
    /// `{"rooms":[..]}`, one entry per room of the command, in its order.
    Subscribe { rooms: Vec<SubscribeResult<'a>> },
    /// `{"offset":N}`.
    Publish { offset: u64 },
    /// `{"messages":[<message objects, oldest first>],"more":bool}`; the
    /// messages' frames are the ones the room already made.
    History { messages: &'a [SharedMessage], more: bool },
    /// `{"expires_in":<seconds or null>}`.
    Refresh { expires_in: Option<u64> },
    /// `{"count":N,"age_ms":N[,"users":[..]]}`: `users` only for a room
    /// within the presence-list bound.
    Presence {
        count: u64,
        age_ms: u64,
        users: Option<&'a [String]>,
    },
    /// `{}` (`unsubscribe`, `ping`).
    Empty,
}

/// One room of a `subscribe` reply.
#[derive(Debug)]
pub enum SubscribeResult<'a> {
    /// `{"room":..,"offset":N[,"recovered":bool]}`: `recovered` only when
    /// the entry asked for catch-up (`since`).
    Joined {
        room: RoomId,
        offset: u64,
        recovered: Option<bool>,
    },
    /// `{"room":..,"error":{..}}`: `room` is the name as the client sent it
    /// (the caller cuts it to a sane length).
    Failed { room: &'a str, error: ProtoError },
}

/// A room message with its frame per codec, each made at most once per node
/// and shared by the room's log, every member of that codec, catch-up and
/// history. Cloning is a reference-count increment.
///
/// The JSON frame is made by [`SharedMessage::new`]; the protobuf frame on
/// the first [`SharedMessage::frame`] for [`Codec::Proto`] (most rooms have
/// no protobuf member and never pay for it), the compressed frames on the
/// first [`SharedMessage::deflated_frame`] of their codec. The message's
/// `data` is kept as a slice of the JSON frame, so its bytes are stored once.
#[derive(Clone)]
pub struct SharedMessage(Arc<Encoded>);

struct Encoded {
    msg: Message,
    json: Frame,
    /// The frames made on first use; boxed, so a message nobody asks them
    /// of (JSON-only rooms without compression) pays one pointer.
    lazy: OnceLock<Box<Lazy>>,
}

#[derive(Default)]
struct Lazy {
    proto: OnceLock<Frame>,
    /// The `permessage-deflate` frames, by codec (JSON, protobuf): the
    /// compressed frame, or the plain one when compression did not pay.
    deflated: [OnceLock<Frame>; 2],
}

impl SharedMessage {
    /// Stores `msg`, encoding its JSON `message` push now.
    pub fn new(mut msg: Message) -> Self {
        let json = json::encode(&ServerMsg::Message(&msg));
        // The push ends with `data` verbatim and the closing brace: keep
        // `data` as that slice of the frame (not when it was written as `null`).
        let payload = json.payload();
        let end = payload.len().saturating_sub(1);
        if let Some(start) = end.checked_sub(msg.data.len())
            && payload[start..end] == msg.data[..]
        {
            msg.data = payload.slice(start..end);
        }
        Self(Arc::new(Encoded {
            msg,
            json,
            lazy: OnceLock::new(),
        }))
    }

    fn lazy(&self) -> &Lazy {
        self.0.lazy.get_or_init(Box::default)
    }

    /// The typed message.
    pub fn message(&self) -> &Message {
        &self.0.msg
    }

    /// The room's offset of this message.
    pub fn offset(&self) -> u64 {
        self.0.msg.offset
    }

    /// The `message` push in `codec`, encoded at most once per node.
    pub fn frame(&self, codec: Codec) -> &Frame {
        match codec {
            Codec::Json => &self.0.json,
            Codec::Proto => self
                .lazy()
                .proto
                .get_or_init(|| proto::encode(&ServerMsg::Message(&self.0.msg))),
        }
    }

    /// The `message` push in `codec` for members that negotiated
    /// `permessage-deflate` with the full window: compressed at most once
    /// per node, or the plain frame when it is below
    /// [`MIN_COMPRESS`] bytes or does not get smaller.
    pub fn deflated_frame(&self, codec: Codec) -> &Frame {
        let plain = self.frame(codec);
        if plain.as_bytes().len() < MIN_COMPRESS {
            return plain;
        }
        let slot = match codec {
            Codec::Json => 0,
            Codec::Proto => 1,
        };
        self.lazy().deflated[slot].get_or_init(|| plain.deflated_or_plain(Some(Deflate::DEFAULT)))
    }
}

/// What the message counts against a room's log and a catch-up budget: the
/// bytes of its JSON frame (the one always made).
impl Weighted for SharedMessage {
    fn weight(&self) -> usize {
        self.0.json.weight()
    }
}

impl fmt::Debug for SharedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMessage")
            .field("msg", &self.0.msg)
            .field(
                "proto_encoded",
                &self.0.lazy.get().is_some_and(|l| l.proto.get().is_some()),
            )
            .finish()
    }
}

/// `s` cut to at most `max` characters (for echoing client text in errors).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serializes")
}

/// Deepest nesting of arrays and objects accepted in `data`.
pub const MAX_DATA_DEPTH: usize = 64;

/// Checks a publish's `data` (JSON text) is a value every client can read:
/// JSON that parses into a value (RFC 7493 I-JSON: no number outside the
/// range of a double, no unpaired UTF-16 surrogate escape, no object with
/// two members of the same name; `ijson`) nested at most
/// [`MAX_DATA_DEPTH`] deep. The gateway relays `data` byte for byte to
/// every member, so a value that breaks one client's parser would break it
/// for everybody in the room.
///
/// # Errors
/// `bad_request` naming the rule that failed.
pub fn check_data(data: &[u8]) -> Result<(), ProtoError> {
    if nesting(data) > MAX_DATA_DEPTH {
        return Err(ProtoError::bad_request(format!(
            "data is nested deeper than {MAX_DATA_DEPTH} levels"
        )));
    }
    serde_json::from_slice::<ijson::Interoperable>(data)
        .map(|_| ())
        .map_err(|e| ProtoError::bad_request(format!("data is not interoperable JSON: {e}")))
}

/// The deepest nesting of `[` and `{` in JSON text, outside strings.
fn nesting(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use ::proto::Message as _;
    use ::proto::client::{self as pb, server_frame::Body};
    use serde_json::{Value, json};

    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn data_every_client_can_read_is_accepted_and_the_rest_refused() {
        for ok in [
            &b"null"[..],
            b"0",
            b"\"\\ud83d\\ude00\"",
            b"{\"a\":[1,2,{\"b\":\"]]]\"}]}",
            b"1e308",
        ] {
            assert!(check_data(ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let bad: [&[u8]; 6] = [
            b"1e999999",
            b"\"\\ud800\"",
            b"[1,",
            deep.as_bytes(),
            b"{\"a\":1,\"a\":2}",
            // The same name once escaped, nested in an array.
            b"[{\"b\":{},\"x\":0,\"\\u0062\":[]}]",
        ];
        for b in bad {
            let e = check_data(b).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{}", String::from_utf8_lossy(b));
        }
        assert!(check_data(format!("{}{}", "[".repeat(64), "]".repeat(64)).as_bytes()).is_ok());
    }

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    fn message(offset: u64, data: &'static str) -> Message {
        Message {
            room: room("general"),
            offset,
            ts: 1_764_201_234_567,
            from: "al\"ice".into(),
            data: Bytes::from_static(data.as_bytes()),
        }
    }

    /// Both encodings of one typed value.
    fn both(msg: &ServerMsg<'_>) -> (Value, pb::ServerFrame) {
        let json = Codec::Json.encode(msg);
        let proto = Codec::Proto.encode(msg);
        assert_eq!(json.is_reply(), !msg.is_room_push());
        assert_eq!(proto.is_reply(), json.is_reply());
        (
            serde_json::from_slice(json.as_bytes()).unwrap(),
            pb::ServerFrame::decode(proto.as_bytes()).unwrap(),
        )
    }

    fn pb_error(code: &str, message: &str, retry_after_ms: Option<u64>) -> pb::Error {
        pb::Error {
            code: code.into(),
            message: message.into(),
            retry_after_ms,
        }
    }

    fn pb_message(m: &Message) -> pb::Message {
        pb::Message {
            room: m.room.as_str().into(),
            offset: m.offset,
            ts: m.ts,
            from: m.from.clone(),
            data: m.data.clone(),
        }
    }

    fn message_json(m: &Message) -> Value {
        json!({
            "op": "message",
            "room": m.room.as_str(),
            "offset": m.offset,
            "ts": m.ts,
            "from": m.from,
            "data": serde_json::from_slice::<Value>(&m.data).unwrap(),
        })
    }

    #[test]
    fn every_server_message_round_trips_through_both_codecs() {
        let general = room("general");
        let msg = message(131, r#"{"text":"hi","n":[1,2]}"#);
        let limited = ProtoError::rate_limited(250);
        let forbidden = ProtoError::forbidden("the refreshed token does not grant this room");
        let names = vec!["alice".to_string(), "bob \"b\"".to_string()];
        let history = [
            SharedMessage::new(message(7, "1")),
            SharedMessage::new(message(9, r#""x""#)),
        ];
        let cases: Vec<(ServerMsg<'_>, Value, pb::ServerFrame)> = vec![
            (
                ServerMsg::Reply {
                    id: 1,
                    ok: ReplyBody::Connect {
                        client: "n1-2a",
                        node: "n1",
                        expires_in: Some(300),
                        max_frame_bytes: 1 << 20,
                    },
                },
                json!({"id": 1, "ok": {"client": "n1-2a", "node": "n1", "expires_in": 300, "max_frame_bytes": 1 << 20}}),
                pb::ServerFrame {
                    id: Some(1),
                    body: Some(Body::ConnectOk(pb::ConnectOk {
                        client: "n1-2a".into(),
                        node: "n1".into(),
                        expires_in: Some(300),
                        max_frame_bytes: Some(1 << 20),
                    })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 1,
                    ok: ReplyBody::Connect {
                        client: "n1-2a",
                        node: "n1",
                        expires_in: None,
                        max_frame_bytes: 64,
                    },
                },
                json!({"id": 1, "ok": {"client": "n1-2a", "node": "n1", "expires_in": null, "max_frame_bytes": 64}}),
                pb::ServerFrame {
                    id: Some(1),
                    body: Some(Body::ConnectOk(pb::ConnectOk {
                        client: "n1-2a".into(),
                        node: "n1".into(),
                        expires_in: None,
                        max_frame_bytes: Some(64),
                    })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 2,
                    ok: ReplyBody::Subscribe {
                        rooms: vec![
                            SubscribeResult::Joined {
                                room: general.clone(),
                                offset: 130,
                                recovered: Some(true),
                            },
                            SubscribeResult::Joined {
                                room: room("random"),
                                offset: 7,
                                recovered: None,
                            },
                            SubscribeResult::Failed {
                                room: "team-7",
                                error: ProtoError::forbidden("no"),
                            },
                        ],
                    },
                },
                json!({"id": 2, "ok": {"rooms": [
                    {"room": "general", "offset": 130, "recovered": true},
                    {"room": "random", "offset": 7},
                    {"room": "team-7", "error": {"code": "forbidden", "message": "no"}},
                ]}}),
                pb::ServerFrame {
                    id: Some(2),
                    body: Some(Body::SubscribeOk(pb::SubscribeOk {
                        rooms: vec![
                            pb::SubscribeResult {
                                room: "general".into(),
                                offset: 130,
                                recovered: Some(true),
                                error: None,
                            },
                            pb::SubscribeResult {
                                room: "random".into(),
                                offset: 7,
                                recovered: None,
                                error: None,
                            },
                            pb::SubscribeResult {
                                room: "team-7".into(),
                                offset: 0,
                                recovered: None,
                                error: Some(pb_error("forbidden", "no", None)),
                            },
                        ],
                    })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 4,
                    ok: ReplyBody::Publish { offset: 131 },
                },
                json!({"id": 4, "ok": {"offset": 131}}),
                pb::ServerFrame {
                    id: Some(4),
                    body: Some(Body::PublishOk(pb::PublishOk { offset: 131 })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 5,
                    ok: ReplyBody::History {
                        messages: &history,
                        more: true,
                    },
                },
                json!({"id": 5, "ok": {"messages": [
                    message_json(history[0].message()),
                    message_json(history[1].message()),
                ], "more": true}}),
                pb::ServerFrame {
                    id: Some(5),
                    body: Some(Body::HistoryOk(pb::HistoryOk {
                        messages: history.iter().map(|m| pb_message(m.message())).collect(),
                        more: true,
                    })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 5,
                    ok: ReplyBody::History {
                        messages: &[],
                        more: false,
                    },
                },
                json!({"id": 5, "ok": {"messages": [], "more": false}}),
                pb::ServerFrame {
                    id: Some(5),
                    body: Some(Body::HistoryOk(pb::HistoryOk::default())),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 6,
                    ok: ReplyBody::Refresh { expires_in: Some(300) },
                },
                json!({"id": 6, "ok": {"expires_in": 300}}),
                pb::ServerFrame {
                    id: Some(6),
                    body: Some(Body::RefreshOk(pb::RefreshOk { expires_in: Some(300) })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 6,
                    ok: ReplyBody::Refresh { expires_in: None },
                },
                json!({"id": 6, "ok": {"expires_in": null}}),
                pb::ServerFrame {
                    id: Some(6),
                    body: Some(Body::RefreshOk(pb::RefreshOk { expires_in: None })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 3,
                    ok: ReplyBody::Empty,
                },
                json!({"id": 3, "ok": {}}),
                pb::ServerFrame {
                    id: Some(3),
                    body: Some(Body::Ok(pb::Empty {})),
                },
            ),
            (
                ServerMsg::Error {
                    id: Some(8),
                    error: &limited,
                },
                json!({"id": 8, "error": {"code": "rate_limited", "message": "rate limit exceeded", "retry_after_ms": 250}}),
                pb::ServerFrame {
                    id: Some(8),
                    body: Some(Body::Error(pb_error("rate_limited", "rate limit exceeded", Some(250)))),
                },
            ),
            (
                ServerMsg::Error {
                    id: None,
                    error: &forbidden,
                },
                json!({"error": {"code": "forbidden", "message": forbidden.message}}),
                pb::ServerFrame {
                    id: None,
                    body: Some(Body::Error(pb_error("forbidden", &forbidden.message, None))),
                },
            ),
            (
                ServerMsg::Message(&msg),
                message_json(&msg),
                pb::ServerFrame {
                    id: None,
                    body: Some(Body::Message(pb_message(&msg))),
                },
            ),
            (
                ServerMsg::Activity {
                    room: &general,
                    offset: 140,
                    count: 12,
                },
                json!({"op": "activity", "room": "general", "offset": 140, "count": 12}),
                pb::ServerFrame {
                    id: None,
                    body: Some(Body::Activity(pb::Activity {
                        room: "general".into(),
                        offset: 140,
                        count: 12,
                    })),
                },
            ),
            (
                ServerMsg::Pong,
                json!({"op": "pong"}),
                pb::ServerFrame {
                    id: None,
                    body: Some(Body::Pong(pb::Empty {})),
                },
            ),
            (
                ServerMsg::Unsubscribed {
                    room: &general,
                    error: &forbidden,
                },
                json!({"op": "unsubscribed", "room": "general", "error": {"code": "forbidden", "message": forbidden.message}}),
                pb::ServerFrame {
                    id: None,
                    body: Some(Body::Unsubscribed(pb::Unsubscribed {
                        room: "general".into(),
                        error: Some(pb_error("forbidden", &forbidden.message, None)),
                    })),
                },
            ),
            (
                ServerMsg::Presence {
                    room: &general,
                    count: 3,
                    join: &names[..1],
                    leave: &names[1..],
                },
                json!({"op": "presence", "room": "general", "count": 3, "join": ["alice"], "leave": ["bob \"b\""]}),
                pb::ServerFrame {
                    id: None,
                    body: Some(Body::Presence(pb::PresenceEvent {
                        room: "general".into(),
                        count: 3,
                        join: vec!["alice".into()],
                        leave: vec!["bob \"b\"".into()],
                    })),
                },
            ),
            (
                ServerMsg::Reply {
                    id: 9,
                    ok: ReplyBody::Presence {
                        count: 2,
                        age_ms: 40,
                        users: Some(&names),
                    },
                },
                json!({"id": 9, "ok": {"count": 2, "age_ms": 40, "users": ["alice", "bob \"b\""]}}),
                pb::ServerFrame {
                    id: Some(9),
                    body: Some(Body::PresenceOk(pb::PresenceOk {
                        count: 2,
                        age_ms: 40,
                        users: names.clone(),
                        listed: true,
                    })),
                },
            ),
        ];
        let mut kinds = std::collections::HashSet::new();
        for (msg, want_json, want_proto) in &cases {
            let (json, proto) = both(msg);
            assert_eq!(&json, want_json, "{msg:?}");
            assert_eq!(&proto, want_proto, "{msg:?}");
            kinds.insert(std::mem::discriminant(&proto.body.unwrap()));
        }
        assert_eq!(kinds.len(), 13, "every ServerFrame body kind is covered");
    }

    /// What a room's log pays per message beside the frames' bytes (the
    /// `Arc` adds two counters): the typed fields, the JSON frame and the
    /// slot of the protobuf one.
    #[test]
    fn a_stored_message_stays_small() {
        let size = std::mem::size_of::<Encoded>();
        assert!(size <= 176, "{size} bytes");
    }

    #[test]
    fn a_stored_message_keeps_its_data_once_and_encodes_protobuf_once() {
        let data = Bytes::from(r#"{"text":"hi"}"#.to_string());
        let stored = SharedMessage::new(Message {
            data: data.clone(),
            ..message(3, "")
        });
        let json = stored.frame(Codec::Json);
        assert_eq!(&stored.message().data[..], &data[..]);
        assert!(
            json.as_bytes().as_ptr_range().contains(&stored.message().data.as_ptr()),
            "data is a slice of the JSON frame"
        );
        let before = proto::tests::message_encodes();
        let first = stored.frame(Codec::Proto).as_bytes().as_ptr();
        let copy = stored.clone();
        assert_eq!(copy.frame(Codec::Proto).as_bytes().as_ptr(), first);
        assert_eq!(proto::tests::message_encodes(), before + 1);
        // Data that is not UTF-8 is written as `null` and kept as it came.
        let odd = SharedMessage::new(Message {
            data: Bytes::from_static(b"\xff"),
            ..message(4, "")
        });
        let v: Value = serde_json::from_slice(odd.frame(Codec::Json).as_bytes()).unwrap();
        assert_eq!(v["data"], Value::Null);
        assert_eq!(&odd.message().data[..], b"\xff");
        assert_eq!(ErrorCode::Forbidden.as_str(), "forbidden");
    }
}

//! `gw.v1.json`: the JSON parser of client commands and the JSON encoder of
//! [`ServerMsg`].
//!
//! Parsing is zero-copy for a publish's `data` (a slice of the frame). The
//! encoder writes each frame straight into one `String`, field order fixed by
//! `docs/protocol.md` (clients and tests compare the text); `data` is the
//! client's JSON text, copied as is.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Command, Parsed, ReplyBody, ServerMsg, SubscribeEntry, SubscribeResult, json_string, truncate};
use crate::error::{ErrorCode, ProtoError};
use crate::model::Message;
use crate::transport::ws::Frame;

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default, borrow)]
    rooms: Option<&'a RawValue>,
    #[serde(default)]
    room: Option<String>,
    /// `Some` for every present value, `null` included ("any JSON value").
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    before: Option<u64>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A `subscribe` entry: an object, or (leniently) just the room name.
/// Deserialized by hand: serde's untagged enums buffer every entry before
/// trying each form, which was a visible part of a 2,000-room login.
enum EntryForm {
    Object(SubscribeEntry),
    Name(String),
}

impl<'de> Deserialize<'de> for EntryForm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Form;
        impl<'de> serde::de::Visitor<'de> for Form {
            type Value = EntryForm;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a room name or a {\"room\":...} object")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EntryForm, E> {
                Ok(EntryForm::Name(v.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EntryForm, A::Error> {
                SubscribeEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(EntryForm::Object)
            }
        }
        d.deserialize_any(Form)
    }
}

#[derive(Deserialize)]
struct IdProbe {
    #[serde(default)]
    id: Option<u32>,
}

/// Parses one text frame. `frame` is the frame's bytes; `data` of a publish is
/// returned as a zero-copy slice of it.
pub fn parse(frame: &Bytes) -> Parsed {
    let text = match std::str::from_utf8(frame) {
        Ok(t) => t,
        Err(_) => return bad(None, "frame is not UTF-8"),
    };
    let raw: Raw<'_> = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            // Keep the id of a well-formed object with one bad field, so the
            // client can match the error to its command.
            let id = serde_json::from_str::<IdProbe>(text).ok().and_then(|p| p.id);
            let msg = if e.is_data() {
                format!("invalid field: {e}")
            } else {
                format!("malformed JSON: {e}")
            };
            return bad(id, msg);
        }
    };
    let id = raw.id;
    let command = match raw.op.as_deref() {
        None => Err(ProtoError::bad_request("missing op")),
        Some("connect") => raw
            .token
            .map(|token| Command::Connect { token })
            .ok_or_else(|| ProtoError::new(ErrorCode::Unauthorized, "connect needs a token")),
        Some("refresh") => raw
            .token
            .map(|token| Command::Refresh { token })
            .ok_or_else(|| ProtoError::bad_request("refresh needs a token")),
        Some("subscribe") => match raw.rooms {
            None => Err(ProtoError::bad_request("subscribe needs rooms")),
            Some(r) => serde_json::from_str::<Vec<EntryForm>>(r.get())
                .map(|forms| Command::Subscribe {
                    rooms: forms
                        .into_iter()
                        .map(|f| match f {
                            EntryForm::Object(e) => e,
                            EntryForm::Name(room) => SubscribeEntry {
                                room: Some(room),
                                since: None,
                                mode: None,
                                token: None,
                                presence: None,
                            },
                        })
                        .collect(),
                })
                .map_err(|e| ProtoError::bad_request(format!("rooms: {e}"))),
        },
        Some("unsubscribe") => match raw.rooms {
            None => Err(ProtoError::bad_request("unsubscribe needs rooms")),
            Some(r) => serde_json::from_str::<Vec<String>>(r.get())
                .map(|rooms| Command::Unsubscribe { rooms })
                .map_err(|e| ProtoError::bad_request(format!("rooms: {e}"))),
        },
        Some("publish") => match (raw.room, raw.data) {
            (Some(room), Some(data)) => Ok(Command::Publish {
                room,
                data: frame.slice_ref(data.get().as_bytes()),
                key: raw.key,
            }),
            (None, _) => Err(ProtoError::bad_request("publish needs room")),
            (_, None) => Err(ProtoError::bad_request("publish needs data")),
        },
        Some("history") => match raw.room {
            Some(room) => Ok(Command::History {
                room,
                limit: raw.limit,
                before: raw.before,
            }),
            None => Err(ProtoError::bad_request("history needs room")),
        },
        Some("presence") => match raw.room {
            Some(room) => Ok(Command::Presence { room }),
            None => Err(ProtoError::bad_request("presence needs room")),
        },
        Some("ping") => Ok(Command::Ping),
        Some(other) => Err(ProtoError::bad_request(format!(
            "unknown op {}",
            json_string(truncate(other, 32))
        ))),
    };
    Parsed { id, command }
}

fn bad(id: Option<u32>, msg: impl Into<std::borrow::Cow<'static, str>>) -> Parsed {
    Parsed {
        id,
        command: Err(ProtoError::bad_request(msg)),
    }
}

/// Encodes `msg` as one text frame (see [`super::Codec::encode`] for which
/// frames are coalesced).
pub fn encode(msg: &ServerMsg<'_>) -> Frame {
    let text = text(msg);
    if msg.is_room_push() {
        Frame::text(text)
    } else {
        Frame::reply(text)
    }
}

/// The JSON text of `msg`.
pub fn text(msg: &ServerMsg<'_>) -> String {
    match msg {
        ServerMsg::Reply { id, ok } => {
            let mut out = String::with_capacity(24 + body_size_hint(ok));
            let _ = write!(out, "{{\"id\":{id},\"ok\":");
            write_body(&mut out, ok);
            out.push('}');
            out
        }
        ServerMsg::Error { id, error } => {
            let mut out = String::with_capacity(96 + error.message.len());
            out.push('{');
            if let Some(id) = id {
                let _ = write!(out, "\"id\":{id},");
            }
            out.push_str("\"error\":");
            write_error(&mut out, error);
            out.push('}');
            out
        }
        ServerMsg::Message(m) => message_text(m),
        ServerMsg::Activity { room, offset, count } => {
            format!("{{\"op\":\"activity\",\"room\":\"{room}\",\"offset\":{offset},\"count\":{count}}}")
        }
        ServerMsg::Pong => "{\"op\":\"pong\"}".to_string(),
        ServerMsg::Presence {
            room,
            count,
            join,
            leave,
        } => {
            let list = |names: &[String]| names.iter().map(|n| json_string(n)).collect::<Vec<_>>().join(",");
            format!(
                "{{\"op\":\"presence\",\"room\":\"{room}\",\"count\":{count},\"join\":[{}],\"leave\":[{}]}}",
                list(join),
                list(leave)
            )
        }
        ServerMsg::Unsubscribed { room, error } => {
            let mut out = String::with_capacity(96 + room.as_str().len() + error.message.len());
            let _ = write!(out, "{{\"op\":\"unsubscribed\",\"room\":\"{room}\",\"error\":");
            write_error(&mut out, error);
            out.push('}');
            out
        }
    }
}

fn body_size_hint(body: &ReplyBody<'_>) -> usize {
    match body {
        ReplyBody::Subscribe { rooms } => 16 + rooms.len() * 40,
        ReplyBody::Presence { users: Some(u), .. } => 48 + u.iter().map(|s| s.len() + 3).sum::<usize>(),
        ReplyBody::History { messages, .. } => {
            40 + messages
                .iter()
                .map(|m| m.frame(super::Codec::Json).as_bytes().len() + 1)
                .sum::<usize>()
        }
        _ => 96,
    }
}

fn write_body(out: &mut String, body: &ReplyBody<'_>) {
    match body {
        ReplyBody::Connect {
            client,
            node,
            expires_in,
            max_frame_bytes,
        } => {
            let _ = write!(
                out,
                "{{\"client\":{},\"node\":{},\"expires_in\":",
                json_string(client),
                json_string(node)
            );
            write_opt(out, *expires_in);
            let _ = write!(out, ",\"max_frame_bytes\":{max_frame_bytes}}}");
        }
        ReplyBody::Subscribe { rooms } => {
            out.push_str("{\"rooms\":[");
            for (i, r) in rooms.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match r {
                    SubscribeResult::Joined {
                        room,
                        offset,
                        recovered,
                    } => {
                        let _ = write!(out, "{{\"room\":\"{room}\",\"offset\":{offset}");
                        if let Some(r) = recovered {
                            let _ = write!(out, ",\"recovered\":{r}");
                        }
                        out.push('}');
                    }
                    SubscribeResult::Failed { room, error } => {
                        let _ = write!(out, "{{\"room\":{},\"error\":", json_string(room));
                        write_error(out, error);
                        out.push('}');
                    }
                }
            }
            out.push_str("]}");
        }
        ReplyBody::Publish { offset } => {
            let _ = write!(out, "{{\"offset\":{offset}}}");
        }
        ReplyBody::History { messages, more } => {
            out.push_str("{\"messages\":[");
            for (i, m) in messages.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let push = m.frame(super::Codec::Json).as_bytes();
                out.push_str(std::str::from_utf8(push).unwrap_or("null"));
            }
            let _ = write!(out, "],\"more\":{more}}}");
        }
        ReplyBody::Refresh { expires_in } => {
            out.push_str("{\"expires_in\":");
            write_opt(out, *expires_in);
            out.push('}');
        }
        ReplyBody::Presence { count, age_ms, users } => {
            let _ = write!(out, "{{\"count\":{count},\"age_ms\":{age_ms}");
            if let Some(users) = users {
                out.push_str(",\"users\":[");
                for (i, u) in users.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&json_string(u));
                }
                out.push(']');
            }
            out.push('}');
        }
        ReplyBody::Empty => out.push_str("{}"),
    }
}

/// A number, or `null`.
fn write_opt(out: &mut String, v: Option<u64>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("null"),
    }
}

/// `{"code":..,"message":..[,"retry_after_ms":..]}`
fn write_error(out: &mut String, err: &ProtoError) {
    let _ = write!(
        out,
        "{{\"code\":\"{}\",\"message\":{}",
        err.code.as_str(),
        json_string(&err.message)
    );
    if let Some(ms) = err.retry_after_ms {
        let _ = write!(out, ",\"retry_after_ms\":{ms}");
    }
    out.push('}');
}

/// The `message` push; `data` is written as is (`null` if it is not UTF-8,
/// which a client's JSON never is).
fn message_text(m: &Message) -> String {
    let data = std::str::from_utf8(&m.data).unwrap_or("null");
    let from = json_string(&m.from);
    let mut out = String::with_capacity(64 + m.room.as_str().len() + from.len() + data.len());
    let _ = write!(
        out,
        "{{\"op\":\"message\",\"room\":\"{}\",\"offset\":{},\"ts\":{},\"from\":{from},\"data\":{data}}}",
        m.room, m.offset, m.ts
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RoomId;

    fn p(s: &str) -> Parsed {
        parse(&Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn publish_data_is_a_slice_of_the_frame() {
        let parsed =
            p(r#"{"id":4,"op":"publish","room":"general","data":{"text":"hi","n":[1,2]},"key":"k1","extra":true}"#);
        assert_eq!(parsed.id, Some(4));
        match parsed.command.unwrap() {
            Command::Publish { room, data, key } => {
                assert_eq!(room, "general");
                assert_eq!(&data[..], br#"{"text":"hi","n":[1,2]}"#);
                assert_eq!(key.as_deref(), Some("k1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_data_is_a_value_and_missing_data_is_an_error() {
        match p(r#"{"id":1,"op":"publish","room":"r","data":null}"#).command.unwrap() {
            Command::Publish { data, .. } => assert_eq!(&data[..], b"null"),
            other => panic!("{other:?}"),
        }
        assert!(p(r#"{"id":1,"op":"publish","room":"r"}"#).command.is_err());
    }

    #[test]
    fn subscribe_entries_may_be_plain_names() {
        match p(r#"{"id":2,"op":"subscribe","rooms":["a",{"room":"b","since":1}]}"#)
            .command
            .unwrap()
        {
            Command::Subscribe { rooms } => {
                assert_eq!(rooms[0].room.as_deref(), Some("a"));
                assert_eq!(rooms[1].since, Some(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_json_is_bad_request_without_id() {
        let parsed = p("{not json");
        assert_eq!(parsed.id, None);
        assert_eq!(parsed.command.unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_bad_field_keeps_the_id() {
        let parsed = p(r#"{"id":9,"op":"history","room":"r","limit":"ten"}"#);
        assert_eq!(parsed.id, Some(9));
        assert_eq!(parsed.command.unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_op_is_bad_request() {
        let parsed = p(r#"{"id":1,"op":"explode"}"#);
        let err = parsed.command.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("explode"));
    }

    #[test]
    fn subscribe_entries_parse() {
        let parsed = p(
            r#"{"id":2,"op":"subscribe","rooms":[{"room":"a","since":3},{"room":"b","mode":"notify"},{"room":"c","token":"t"}]}"#,
        );
        match parsed.command.unwrap() {
            Command::Subscribe { rooms } => {
                assert_eq!(rooms.len(), 3);
                assert_eq!(rooms[0].since, Some(3));
                assert_eq!(rooms[1].mode.as_deref(), Some("notify"));
                assert_eq!(rooms[2].token.as_deref(), Some("t"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replies_encode() {
        let reply = |ok| text(&ServerMsg::Reply { id: 3, ok });
        assert_eq!(reply(ReplyBody::Empty), r#"{"id":3,"ok":{}}"#);
        let err = ProtoError::rate_limited(250);
        assert_eq!(
            text(&ServerMsg::Error {
                id: Some(1),
                error: &err
            }),
            r#"{"id":1,"error":{"code":"rate_limited","message":"rate limit exceeded","retry_after_ms":250}}"#
        );
        let msg = Message {
            room: RoomId::parse("g").unwrap(),
            offset: 7,
            ts: 11,
            from: "al\"ice".into(),
            data: Bytes::from_static(b"[1]"),
        };
        let push = text(&ServerMsg::Message(&msg));
        assert_eq!(
            push,
            r#"{"op":"message","room":"g","offset":7,"ts":11,"from":"al\"ice","data":[1]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&push).unwrap();
        assert_eq!(v["from"], "al\"ice");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["data"][0], 1);
    }

    /// The text of every reply and push, as the hand-built JSON had it.
    #[test]
    fn the_text_is_what_the_hand_built_json_was() {
        let room = RoomId::parse("general").unwrap();
        let forbidden = ProtoError::forbidden("no");
        let cases: Vec<(ServerMsg<'_>, &str)> = vec![
            (
                ServerMsg::Reply {
                    id: 1,
                    ok: ReplyBody::Connect {
                        client: "n-1",
                        node: "n",
                        expires_in: None,
                        max_frame_bytes: 1024,
                    },
                },
                r#"{"id":1,"ok":{"client":"n-1","node":"n","expires_in":null,"max_frame_bytes":1024}}"#,
            ),
            (
                ServerMsg::Reply {
                    id: 2,
                    ok: ReplyBody::Subscribe {
                        rooms: vec![
                            SubscribeResult::Joined {
                                room: room.clone(),
                                offset: 130,
                                recovered: Some(true),
                            },
                            SubscribeResult::Joined {
                                room: room.clone(),
                                offset: 7,
                                recovered: None,
                            },
                            SubscribeResult::Failed {
                                room: "a b\"",
                                error: ProtoError::bad_request("invalid room name"),
                            },
                        ],
                    },
                },
                r#"{"id":2,"ok":{"rooms":[{"room":"general","offset":130,"recovered":true},{"room":"general","offset":7},{"room":"a b\"","error":{"code":"bad_request","message":"invalid room name"}}]}}"#,
            ),
            (
                ServerMsg::Reply {
                    id: 4,
                    ok: ReplyBody::Publish { offset: 131 },
                },
                r#"{"id":4,"ok":{"offset":131}}"#,
            ),
            (
                ServerMsg::Reply {
                    id: 6,
                    ok: ReplyBody::Refresh { expires_in: Some(300) },
                },
                r#"{"id":6,"ok":{"expires_in":300}}"#,
            ),
            (
                ServerMsg::Reply {
                    id: 6,
                    ok: ReplyBody::Refresh { expires_in: None },
                },
                r#"{"id":6,"ok":{"expires_in":null}}"#,
            ),
            (
                ServerMsg::Error {
                    id: None,
                    error: &forbidden,
                },
                r#"{"error":{"code":"forbidden","message":"no"}}"#,
            ),
            (
                ServerMsg::Activity {
                    room: &room,
                    offset: 140,
                    count: 12,
                },
                r#"{"op":"activity","room":"general","offset":140,"count":12}"#,
            ),
            (ServerMsg::Pong, r#"{"op":"pong"}"#),
            (
                ServerMsg::Unsubscribed {
                    room: &room,
                    error: &forbidden,
                },
                r#"{"op":"unsubscribed","room":"general","error":{"code":"forbidden","message":"no"}}"#,
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(text(&msg), want);
        }
    }
}

//! The JSON client protocol (`gw.v1.json`): parsing commands and encoding
//! replies and pushes.
//!
//! Owns the wire format only; what a command does lives in `conn`. Encoding
//! writes straight into one `String` per frame; a message push is encoded once
//! per node and shared by every member (see `rooms`).

pub mod proto;

use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ErrorCode, ProtoError};
use crate::model::RoomId;

/// One client command, validated.
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
}

/// A parsed frame: the command's `id` (if any) and the command or why it is bad.
#[derive(Debug)]
pub struct Parsed {
    pub id: Option<u32>,
    pub command: Result<Command, ProtoError>,
}

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

/// Deserializes a present value, `null` included, as `Some` (serde turns a
/// `null` into `None` for an `Option` otherwise).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A `subscribe` entry: an object, or (leniently) just the room name.
#[derive(Deserialize)]
#[serde(untagged)]
enum EntryForm {
    Object(SubscribeEntry),
    Name(String),
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

/// `s` cut to at most `max` characters (for echoing client text in errors).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Deepest nesting of arrays and objects accepted in `data`.
pub const MAX_DATA_DEPTH: usize = 64;

/// Checks a publish's `data` (JSON text) is a value every client can read:
/// JSON that parses into a value (no number outside the range of a double,
/// no unpaired UTF-16 surrogate escape, RFC 7493 I-JSON) nested at most
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
    serde_json::from_slice::<serde_json::Value>(data)
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

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serializes")
}

/// `{"id":N,"ok":` + body + `}`; `body` is a JSON object.
pub fn ok_reply(id: u32, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 24);
    let _ = write!(out, "{{\"id\":{id},\"ok\":{body}}}");
    out
}

/// An error reply, or an error frame without `id` for commands that had none.
pub fn error_reply(id: Option<u32>, err: &ProtoError) -> String {
    let mut out = String::with_capacity(96 + err.message.len());
    out.push('{');
    if let Some(id) = id {
        let _ = write!(out, "\"id\":{id},");
    }
    out.push_str("\"error\":");
    write_error(&mut out, err);
    out.push('}');
    out
}

/// `{"code":..,"message":..[,"retry_after_ms":..]}`
pub fn write_error(out: &mut String, err: &ProtoError) {
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

/// The `message` push, encoded once per node for every member.
pub fn message_push(room: &RoomId, offset: u64, ts_ms: u64, from_json: &str, data: &[u8]) -> String {
    let data = std::str::from_utf8(data).unwrap_or("null");
    let mut out = String::with_capacity(64 + room.as_str().len() + from_json.len() + data.len());
    let _ = write!(
        out,
        "{{\"op\":\"message\",\"room\":\"{}\",\"offset\":{offset},\"ts\":{ts_ms},\"from\":{from_json},\"data\":{data}}}",
        room.as_str()
    );
    out
}

/// The `unsubscribed` push: the server ended the subscription to `room`
/// (an expired room token, a refreshed token that no longer grants it), with
/// error `forbidden` and `why` as its message.
pub fn unsubscribed_push(room: &RoomId, why: &'static str) -> String {
    let mut out = String::with_capacity(96 + room.as_str().len() + why.len());
    let _ = write!(
        out,
        "{{\"op\":\"unsubscribed\",\"room\":\"{}\",\"error\":",
        room.as_str()
    );
    write_error(&mut out, &ProtoError::forbidden(why));
    out.push('}');
    out
}

/// The `activity` push of a notify-mode room: `count` messages since the
/// previous one, the latest at `offset`.
pub fn activity_push(room: &RoomId, offset: u64, count: u64) -> String {
    format!(
        "{{\"op\":\"activity\",\"room\":\"{}\",\"offset\":{offset},\"count\":{count}}}",
        room.as_str()
    )
}

/// The `pong` push.
pub const PONG: &str = "{\"op\":\"pong\"}";

#[cfg(test)]
mod tests {
    use super::*;

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
        let bad: [&[u8]; 4] = [b"1e999999", b"\"\\ud800\"", b"[1,", deep.as_bytes()];
        for b in bad {
            let e = check_data(b).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{}", String::from_utf8_lossy(b));
        }
        assert!(check_data(format!("{}{}", "[".repeat(64), "]".repeat(64)).as_bytes()).is_ok());
    }

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
        assert_eq!(ok_reply(3, "{}"), r#"{"id":3,"ok":{}}"#);
        let err = ProtoError::rate_limited(250);
        assert_eq!(
            error_reply(Some(1), &err),
            r#"{"id":1,"error":{"code":"rate_limited","message":"rate limit exceeded","retry_after_ms":250}}"#
        );
        let push = message_push(&RoomId::parse("g").unwrap(), 7, 11, "\"al\\\"ice\"", b"[1]");
        let v: serde_json::Value = serde_json::from_str(&push).unwrap();
        assert_eq!(v["from"], "al\"ice");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["data"][0], 1);
    }
}

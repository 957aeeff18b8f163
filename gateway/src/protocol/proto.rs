//! The protobuf client protocol (`gw.v1.proto`): binary frames carrying the
//! messages of `proto/proto/client.proto`, with the same ops and fields as
//! `gw.v1.json`; `data` is the UTF-8 JSON text of the value, as bytes.
//!
//! Owns the translation only. Commands are decoded into the same
//! [`Command`] the JSON parser produces, so everything after parsing is
//! shared. Server frames are built as JSON by the shared code and transcoded
//! here: a reply once, a message push once per message per node (a room keeps
//! its protobuf members apart and encodes for them once, see `rooms`).

use bytes::Bytes;
use proto::Message as _;
use proto::client::{self as pb, command::Op, server_frame::Body};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Command, Parsed, SubscribeEntry};
use crate::error::{ErrorCode, ProtoError};
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
        Some(Op::Ping(_)) => Ok(Command::Ping),
    };
    Parsed { id: cmd.id, command }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// A server frame as the shared code writes it (JSON), the fields of every kind.
#[derive(Deserialize)]
struct Out<'a> {
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    op: Option<String>,
    #[serde(default, borrow)]
    ok: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<ErrorOut>,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default)]
    from: Option<String>,
    /// `Some` for every present value, `null` included.
    #[serde(default, borrow, deserialize_with = "crate::protocol::present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    count: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorOut {
    code: String,
    message: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

impl From<ErrorOut> for pb::Error {
    fn from(e: ErrorOut) -> Self {
        Self {
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}

/// The body of an `ok` reply: which fields are there says which command it answers.
#[derive(Deserialize)]
struct OkOut<'a> {
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<RoomOut>>,
    #[serde(default, borrow)]
    messages: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    max_frame_bytes: Option<u64>,
}

#[derive(Deserialize)]
struct RoomOut {
    room: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    error: Option<ErrorOut>,
}

/// A JSON server frame as the `gw.v1.proto` frame with the same content (a
/// reply stays a reply).
pub fn to_proto(frame: &Frame) -> Frame {
    let payload = server_frame(frame.as_bytes());
    if frame.is_reply() {
        Frame::binary_reply(&payload)
    } else {
        Frame::binary(&payload)
    }
}

/// Transcodes one JSON server frame (reply or push) to an encoded
/// `ServerFrame`. The JSON always comes from this node, so a frame that does
/// not parse is a bug: it becomes an `internal` error frame.
pub fn server_frame(json: &[u8]) -> Bytes {
    let frame = transcode(json).unwrap_or_else(|| pb::ServerFrame {
        id: None,
        body: Some(Body::Error(pb::Error {
            code: ErrorCode::Internal.as_str().into(),
            message: "frame could not be encoded".into(),
            retry_after_ms: None,
        })),
    });
    Bytes::from(frame.encode_to_vec())
}

fn transcode(json: &[u8]) -> Option<pb::ServerFrame> {
    let out: Out<'_> = serde_json::from_slice(json).ok()?;
    let body = if let Some(e) = out.error {
        match out.op.as_deref() {
            Some("unsubscribed") => Body::Unsubscribed(pb::Unsubscribed {
                room: out.room.unwrap_or_default(),
                error: Some(e.into()),
            }),
            _ => Body::Error(e.into()),
        }
    } else if let Some(ok) = out.ok {
        ok_body(ok)?
    } else {
        match out.op.as_deref()? {
            "message" => Body::Message(pb::Message {
                room: out.room?,
                offset: out.offset?,
                ts: out.ts.unwrap_or(0),
                from: out.from.unwrap_or_default(),
                data: Bytes::copy_from_slice(out.data?.get().as_bytes()),
            }),
            "activity" => Body::Activity(pb::Activity {
                room: out.room?,
                offset: out.offset?,
                count: out.count.unwrap_or(0),
            }),
            "pong" => Body::Pong(pb::Empty {}),
            _ => return None,
        }
    };
    Some(pb::ServerFrame {
        id: out.id,
        body: Some(body),
    })
}

fn ok_body(ok: &RawValue) -> Option<Body> {
    let text = ok.get();
    let o: OkOut<'_> = serde_json::from_str(text).ok()?;
    // `expires_in` may be null, so its presence is read from the text.
    let expires_in = || {
        #[derive(Deserialize)]
        struct Exp {
            #[serde(default)]
            expires_in: Option<u64>,
        }
        serde_json::from_str::<Exp>(text).ok().and_then(|e| e.expires_in)
    };
    Some(if let Some(client) = o.client {
        Body::ConnectOk(pb::ConnectOk {
            client,
            node: o.node.unwrap_or_default(),
            expires_in: expires_in(),
            max_frame_bytes: o.max_frame_bytes,
        })
    } else if let Some(rooms) = o.rooms {
        Body::SubscribeOk(pb::SubscribeOk {
            rooms: rooms
                .into_iter()
                .map(|r| pb::SubscribeResult {
                    room: r.room,
                    offset: r.offset,
                    recovered: r.recovered,
                    error: r.error.map(Into::into),
                })
                .collect(),
        })
    } else if let Some(messages) = o.messages {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            match transcode(m.get().as_bytes())?.body? {
                Body::Message(m) => out.push(m),
                _ => return None,
            }
        }
        Body::HistoryOk(pb::HistoryOk {
            messages: out,
            more: o.more,
        })
    } else if let Some(offset) = o.offset {
        Body::PublishOk(pb::PublishOk { offset })
    } else if text.contains("\"expires_in\"") {
        Body::RefreshOk(pb::RefreshOk {
            expires_in: expires_in(),
        })
    } else {
        Body::Ok(pb::Empty {})
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    fn decode(b: &Bytes) -> pb::ServerFrame {
        pb::ServerFrame::decode(b.clone()).unwrap()
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

    #[test]
    fn a_frame_that_cannot_be_transcoded_becomes_an_internal_error() {
        for bad in [
            &b"not json"[..],
            br#"{"op":"nonsense"}"#,
            br#"{"op":"message","room":"r"}"#,
        ] {
            let Some(Body::Error(e)) = decode(&server_frame(bad)).body else {
                panic!("{bad:?}");
            };
            assert_eq!(e.code, "internal");
        }
    }

    #[test]
    fn every_kind_of_server_frame_transcodes() {
        let room = crate::model::RoomId::parse("general").unwrap();
        let push = protocol::message_push(&room, 9, 1234, "\"alice\"", br#"{"t":1}"#);
        let f = decode(&server_frame(push.as_bytes()));
        assert_eq!(f.id, None);
        let Some(Body::Message(m)) = f.body else { panic!() };
        assert_eq!(
            (m.room.as_str(), m.offset, m.ts, m.from.as_str()),
            ("general", 9, 1234, "alice")
        );
        assert_eq!(&m.data[..], br#"{"t":1}"#);

        let connect = protocol::ok_reply(1, r#"{"client":"n-1","node":"n","expires_in":null}"#);
        let Some(Body::ConnectOk(c)) = decode(&server_frame(connect.as_bytes())).body else {
            panic!()
        };
        assert_eq!((c.client.as_str(), c.expires_in), ("n-1", None));

        let sub = protocol::ok_reply(
            2,
            r#"{"rooms":[{"room":"a","offset":3,"recovered":true},{"room":"b","error":{"code":"forbidden","message":"no"}}]}"#,
        );
        let Some(Body::SubscribeOk(s)) = decode(&server_frame(sub.as_bytes())).body else {
            panic!()
        };
        assert_eq!(s.rooms[0].recovered, Some(true));
        assert_eq!(s.rooms[1].error.as_ref().unwrap().code, "forbidden");

        let history = protocol::ok_reply(5, &format!(r#"{{"messages":[{push}],"more":true}}"#));
        let Some(Body::HistoryOk(h)) = decode(&server_frame(history.as_bytes())).body else {
            panic!()
        };
        assert!(h.more);
        assert_eq!(h.messages[0].offset, 9);

        let kinds = [
            (protocol::ok_reply(4, r#"{"offset":131}"#), "publish"),
            (protocol::ok_reply(6, r#"{"expires_in":300}"#), "refresh"),
            (protocol::ok_reply(3, "{}"), "ok"),
            (protocol::error_reply(Some(8), &ProtoError::rate_limited(250)), "error"),
            (protocol::activity_push(&room, 10, 2), "activity"),
            (protocol::PONG.to_string(), "pong"),
            (
                r#"{"op":"unsubscribed","room":"general","error":{"code":"forbidden","message":"x"}}"#.to_string(),
                "unsubscribed",
            ),
        ];
        for (json, kind) in kinds {
            let body = decode(&server_frame(json.as_bytes())).body.unwrap();
            let got = match body {
                Body::PublishOk(p) if p.offset == 131 => "publish",
                Body::RefreshOk(r) if r.expires_in == Some(300) => "refresh",
                Body::Ok(_) => "ok",
                Body::Error(e) if e.retry_after_ms == Some(250) => "error",
                Body::Activity(a) if a.count == 2 => "activity",
                Body::Pong(_) => "pong",
                Body::Unsubscribed(u) if u.room == "general" => "unsubscribed",
                other => panic!("{kind}: {other:?}"),
            };
            assert_eq!(got, kind);
        }
    }
}

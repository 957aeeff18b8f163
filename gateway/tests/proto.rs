//! The `gw.v1.proto` sub-protocol over real sockets: binary frames carrying
//! `proto/proto/client.proto` messages, with the same ops and fields as
//! `gw.v1.json`, side by side with JSON clients in the same rooms.

mod common;

use common::{TestNode, token, within};
use futures_util::{SinkExt, StreamExt};
use proto::Message as _;
use proto::client::{self as pb, command::Op, server_frame::Body};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Bytes, Message};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct ProtoClient {
    ws: Ws,
    next_id: u32,
    /// Frames read while waiting for a reply, for later `next` calls.
    pending: std::collections::VecDeque<pb::ServerFrame>,
}

impl ProtoClient {
    async fn open(node: &TestNode, offer: &str) -> (Self, String) {
        let mut req = node.url().into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", offer.parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        let chosen = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (
            Self {
                ws,
                next_id: 1,
                pending: Default::default(),
            },
            chosen,
        )
    }

    async fn connected(node: &TestNode, sub: &str) -> Self {
        let (mut c, chosen) = Self::open(node, "gw.v1.proto").await;
        assert_eq!(chosen, "gw.v1.proto");
        let tok = token(sub, &["*"], &["*"]);
        match c.request(Op::Connect(pb::Connect { token: tok })).await {
            Body::ConnectOk(ok) => assert!(!ok.client.is_empty()),
            other => panic!("{other:?}"),
        }
        c
    }

    async fn send(&mut self, cmd: &pb::Command) {
        self.ws
            .send(Message::Binary(Bytes::from(cmd.encode_to_vec())))
            .await
            .unwrap();
    }

    async fn next(&mut self) -> pb::ServerFrame {
        if let Some(f) = self.pending.pop_front() {
            return f;
        }
        self.read().await
    }

    async fn read(&mut self) -> pb::ServerFrame {
        loop {
            match within(self.ws.next()).await {
                Some(Ok(Message::Binary(b))) => return pb::ServerFrame::decode(b).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    /// Sends a command with the next id and returns its reply's body
    /// (pushes that arrive first are skipped).
    async fn request(&mut self, op: Op) -> Body {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&pb::Command {
            id: Some(id),
            op: Some(op),
        })
        .await;
        loop {
            let f = self.read().await;
            if f.id == Some(id) {
                return f.body.expect("a body");
            }
            self.pending.push_back(f);
        }
    }

    async fn next_message(&mut self) -> pb::Message {
        loop {
            if let Some(Body::Message(m)) = self.next().await.body {
                return m;
            }
        }
    }
}

fn subscribe(rooms: &[(&str, Option<u64>)]) -> Op {
    Op::Subscribe(pb::Subscribe {
        rooms: rooms
            .iter()
            .map(|(room, since)| pb::RoomEntry {
                room: room.to_string(),
                since: *since,
                mode: String::new(),
                token: String::new(),
                presence: None,
            })
            .collect(),
    })
}

fn publish(room: &str, data: &str) -> Op {
    Op::Publish(pb::Publish {
        room: room.into(),
        data: Bytes::copy_from_slice(data.as_bytes()),
        key: None,
    })
}

#[tokio::test]
async fn proto_and_json_clients_chat_in_one_room() {
    let node = TestNode::with(|o| o.no_rate_limits = Some(true)).await;
    let mut p = ProtoClient::connected(&node, "pia").await;
    let mut j = node.client("jay").await;
    match p.request(subscribe(&[("general", None)])).await {
        Body::SubscribeOk(ok) => {
            assert_eq!(ok.rooms[0].room, "general");
            assert!(ok.rooms[0].error.is_none());
        }
        other => panic!("{other:?}"),
    }
    j.subscribe(&["general"]).await;

    // JSON -> both.
    let r = j.publish("general", json!({"text":"from json"})).await;
    let offset = r["ok"]["offset"].as_u64().unwrap();
    let m = p.next_message().await;
    assert_eq!((m.room.as_str(), m.offset, m.from.as_str()), ("general", offset, "jay"));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&m.data).unwrap(),
        json!({"text":"from json"})
    );
    assert!(m.ts > 0);

    // proto -> both; `data` is the JSON text of the value.
    match p.request(publish("general", r#"{"text":"from proto"}"#)).await {
        Body::PublishOk(ok) => assert_eq!(ok.offset, offset + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.next_message().await.offset, offset + 1);
    let mut got = None;
    while got.is_none() {
        let v = j.next_push().await;
        if v["offset"] == offset + 1 {
            got = Some(v);
        }
    }
    let v = got.unwrap();
    assert_eq!(v["from"], "pia");
    assert_eq!(v["data"], json!({"text":"from proto"}));
}

#[tokio::test]
async fn since_history_ping_and_errors_come_as_protobuf() {
    let node = TestNode::with(|o| o.no_rate_limits = Some(true)).await;
    let mut writer = node.client("w").await;
    for i in 1..=5 {
        writer.publish("log", json!(i)).await;
    }
    let mut p = ProtoClient::connected(&node, "pia").await;
    match p.request(subscribe(&[("log", Some(2))])).await {
        Body::SubscribeOk(ok) => assert_eq!(ok.rooms[0].recovered, Some(true)),
        other => panic!("{other:?}"),
    }
    for want in 3..=5 {
        let m = p.next_message().await;
        assert_eq!((m.offset, m.data.as_ref()), (want, want.to_string().as_bytes()));
    }
    match p
        .request(Op::History(pb::History {
            room: "log".into(),
            limit: Some(2),
            before: Some(5),
        }))
        .await
    {
        Body::HistoryOk(h) => {
            let offsets: Vec<u64> = h.messages.iter().map(|m| m.offset).collect();
            assert_eq!(offsets, [3, 4]);
            assert!(h.more);
        }
        other => panic!("{other:?}"),
    }
    match p.request(Op::Ping(pb::Ping {})).await {
        Body::Ok(_) => {}
        other => panic!("{other:?}"),
    }
    // Errors: a bad room name, data that is not JSON text, no op at all.
    match p.request(publish("no spaces", "1")).await {
        Body::Error(e) => assert_eq!(e.code, "bad_request"),
        other => panic!("{other:?}"),
    }
    match p.request(publish("log", "{not json")).await {
        Body::Error(e) => assert_eq!(e.code, "bad_request"),
        other => panic!("{other:?}"),
    }
    p.send(&pb::Command { id: Some(99), op: None }).await;
    loop {
        let f = p.next().await;
        if f.id == Some(99) {
            assert!(matches!(f.body, Some(Body::Error(ref e)) if e.code == "bad_request"));
            break;
        }
    }
    // A text frame on the binary protocol is a bad frame, answered in protobuf.
    p.ws.send(Message::Text(r#"{"op":"ping"}"#.into())).await.unwrap();
    loop {
        if let Some(Body::Error(e)) = p.next().await.body {
            assert_eq!(e.code, "bad_request");
            assert!(e.message.contains("text frames"), "{}", e.message);
            break;
        }
    }
}

#[tokio::test]
async fn the_first_offered_protocol_we_speak_is_chosen() {
    let node = TestNode::start().await;
    let (_, chosen) = ProtoClient::open(&node, "gw.v1.proto, gw.v1.json").await;
    assert_eq!(chosen, "gw.v1.proto");
    let (_, chosen) = ProtoClient::open(&node, "mqtt, gw.v1.json, gw.v1.proto").await;
    assert_eq!(chosen, "gw.v1.json");
    let mut req = node.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    assert!(
        tokio_tungstenite::connect_async(req).await.is_err(),
        "nothing we speak: refused"
    );
}

#[tokio::test]
async fn a_json_first_frame_on_the_proto_protocol_is_unauthorized() {
    let node = TestNode::start().await;
    let (mut c, _) = ProtoClient::open(&node, "gw.v1.proto").await;
    let tok = token("x", &["*"], &[]);
    c.ws.send(Message::Text(format!(r#"{{"op":"connect","token":"{tok}"}}"#).into()))
        .await
        .unwrap();
    match c.next().await.body {
        Some(Body::Error(e)) => assert_eq!(e.code, "unauthorized"),
        other => panic!("{other:?}"),
    }
    let end = within(async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    assert_eq!(end, Some(4001));
}

#[tokio::test]
async fn notify_mode_activity_arrives_as_protobuf() {
    let node = TestNode::with(|o| {
        o.no_rate_limits = Some(true);
        o.activity_interval_ms = Some(100);
    })
    .await;
    let mut p = ProtoClient::connected(&node, "pia").await;
    let op = Op::Subscribe(pb::Subscribe {
        rooms: vec![pb::RoomEntry {
            room: "bg".into(),
            since: None,
            mode: "notify".into(),
            token: String::new(),
            presence: None,
        }],
    });
    assert!(matches!(p.request(op).await, Body::SubscribeOk(_)));
    let mut w = node.client("w").await;
    for i in 0..3 {
        w.publish("bg", json!(i)).await;
    }
    let activity = within(async {
        loop {
            if let Some(Body::Activity(a)) = p.next().await.body {
                return a;
            }
        }
    })
    .await;
    assert_eq!(activity.room, "bg");
    assert!(activity.count >= 1 && activity.offset >= 1, "{activity:?}");
}

/// Found by a black-box review: a message whose `data` is `null` reached
/// `gw.v1.proto` members as an id-less `internal` error (the JSON frame was
/// re-parsed and `null` read as "no data"), vanished from their catch-up and
/// replaced their `history` reply. `data` is any JSON value, `null` included.
#[tokio::test]
async fn a_message_with_null_data_reaches_protobuf_members_live_in_catchup_and_history() {
    let node = TestNode::with(|o| o.no_rate_limits = Some(true)).await;
    let mut live = ProtoClient::connected(&node, "live").await;
    assert!(matches!(
        live.request(subscribe(&[("nul", None)])).await,
        Body::SubscribeOk(_)
    ));
    let mut j = node.client("jay").await;
    for data in [json!(1), json!(null), json!(3)] {
        assert!(j.publish("nul", data).await["ok"]["offset"].as_u64().is_some());
    }
    let datas = |ms: &[pb::Message]| -> Vec<String> {
        ms.iter().map(|m| String::from_utf8(m.data.to_vec()).unwrap()).collect()
    };
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(live.next_message().await);
    }
    assert_eq!(datas(&got), ["1", "null", "3"]);
    // Catch-up of a late joiner.
    let mut late = ProtoClient::connected(&node, "late").await;
    assert!(matches!(
        late.request(subscribe(&[("nul", Some(0))])).await,
        Body::SubscribeOk(_)
    ));
    let mut caught = Vec::new();
    for _ in 0..3 {
        caught.push(late.next_message().await);
    }
    assert_eq!(datas(&caught), ["1", "null", "3"]);
    // A history page, answered with its id.
    match late
        .request(Op::History(pb::History {
            room: "nul".into(),
            limit: Some(10),
            before: None,
        }))
        .await
    {
        Body::HistoryOk(h) => assert_eq!(datas(&h.messages), ["1", "null", "3"]),
        other => panic!("{other:?}"),
    }
}

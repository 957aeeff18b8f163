//! The NATS envelope (`proto/proto/envelope.proto`), read from JetStream and
//! the fan-out subjects, where any NATS client with publish rights can
//! write. Decoded bytes become the typed message and its pushes in both
//! codecs exactly as `broker::nats` does: never a panic; when the envelope's
//! `data` passes the publish check the JSON push is valid JSON.
#![no_main]
use gateway::model::{Message, RoomId};
use gateway::protocol::{Codec, SharedMessage, check_data};
use libfuzzer_sys::fuzz_target;
use proto::Message as _;
use proto::bus::Envelope;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::decode(data) else { return };
    let msg = SharedMessage::new(Message {
        room: RoomId::parse("general").unwrap(),
        offset: 7,
        ts: env.ts_ms,
        from: env.from.clone(),
        data: env.data.clone(),
    });
    let json = msg.frame(Codec::Json).payload();
    let _ = msg.frame(Codec::Proto);
    if check_data(&env.data).is_ok() {
        let v: serde_json::Value = serde_json::from_slice(&json).expect("the push is JSON");
        assert_eq!(v["from"].as_str(), Some(env.from.as_str()));
    }
});

//! A publish's `data` (JSON text relayed byte for byte to every member) into
//! `check_data`: whatever it accepts is JSON that serde_json parses and a
//! `message` push carrying it is one valid JSON document.
#![no_main]
use gateway::model::{Message, RoomId};
use gateway::protocol::{Codec, SharedMessage, check_data};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if check_data(data).is_err() {
        return;
    }
    let msg = SharedMessage::new(Message {
        room: RoomId::parse("r").unwrap(),
        offset: 1,
        ts: 2,
        from: "u".into(),
        data: bytes::Bytes::copy_from_slice(data),
    });
    let push: serde_json::Value = serde_json::from_slice(&msg.frame(Codec::Json).payload()).expect("the push is JSON");
    let want: serde_json::Value = serde_json::from_slice(data).unwrap();
    assert_eq!(push["data"], want);
    assert_eq!(&msg.message().data[..], data);
});

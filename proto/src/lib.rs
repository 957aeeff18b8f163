//! Protobuf messages of the gateway, generated at build time from `proto/`.
//!
//! - [`bus`]: the envelope stored in JetStream and carried between gateways.
//! - [`client`]: the `gw.v1.proto` client sub-protocol.
//!
//! No logic lives here.

/// The NATS envelope.
pub mod bus {
    include!(concat!(env!("OUT_DIR"), "/gateway.bus.v1.rs"));
}

/// The client protocol over binary frames.
pub mod client {
    include!(concat!(env!("OUT_DIR"), "/gateway.client.v1.rs"));
}

pub use prost::Message;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let e = bus::Envelope {
            from: "alice".into(),
            ts_ms: 1_764_201_234_567,
            data: bytes::Bytes::from_static(br#"{"text":"hi"}"#),
        };
        let wire = e.encode_to_vec();
        assert_eq!(bus::Envelope::decode(wire.as_slice()).unwrap(), e);
    }
}

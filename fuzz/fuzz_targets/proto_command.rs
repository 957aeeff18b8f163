//! A `gw.v1.proto` binary client frame into the protobuf command parser: a
//! command or an error, never a panic; an accepted publish's `data` goes
//! through the same check as in JSON when the command runs.
#![no_main]
use gateway::protocol::{Codec, Command, check_data};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = bytes::Bytes::copy_from_slice(data);
    if let Ok(Command::Publish { data, .. }) = Codec::Proto.parse(&frame).command {
        let _ = check_data(&data);
    }
});

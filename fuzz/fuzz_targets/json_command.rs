//! A `gw.v1.json` client frame into the command parser. It must answer a
//! command or an error, never panic, and never accept a frame that is not
//! UTF-8. (A publish's `data` is checked when the command runs: see
//! `publish_data`.)
#![no_main]
use gateway::protocol::{Codec, Command, check_data};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = bytes::Bytes::copy_from_slice(data);
    let parsed = Codec::Json.parse(&frame);
    if let Ok(cmd) = &parsed.command {
        assert!(std::str::from_utf8(data).is_ok(), "accepted a frame that is not UTF-8");
        if let Command::Publish { data, .. } = cmd {
            let _ = check_data(data);
        }
    }
});

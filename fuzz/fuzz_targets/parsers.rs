#![no_main]
use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    let _ = gateway::protocol::json::parse(&b);
    let _ = gateway::protocol::proto::parse(&b);
    let _ = gateway::protocol::check_data(data);
});

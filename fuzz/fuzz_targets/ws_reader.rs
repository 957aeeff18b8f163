#![no_main]
use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = gateway::transport::ws::Reader::new(tokio::io::empty(), 4096, data);
        for _ in 0..1000 {
            if r.next().await.is_err() {
                break;
            }
        }
    });
});

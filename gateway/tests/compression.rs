//! WebSocket compression (RFC 7692 `permessage-deflate`) on the wire: the
//! negotiation, compressed pushes, replies and history pages read back by a
//! raw client and by Node.js's global `WebSocket`, compressed commands,
//! `--permessage-deflate false`, and a compressed frame that would inflate
//! past `--max-frame-bytes` (a zip bomb) against the gateway binary.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::raw::{FIN, OP_TEXT, RSV1, Raw, client_frame};
use common::{Client, TestNode, token, within};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The offer Chromium and Node.js send.
const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// `data` compressed as one message (RFC 7692 section 7.2.1: sync flush,
/// the 4-byte tail removed).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A compressed server message inflated (the tail appended back).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(64 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    out
}

/// A whole text message, compressed (RSV1) or not.
fn text(s: &str, compressed: bool) -> Vec<u8> {
    if compressed {
        client_frame(FIN | RSV1 | OP_TEXT, &deflate(s.as_bytes()))
    } else {
        client_frame(FIN | OP_TEXT, s.as_bytes())
    }
}

/// Upgrades with `offer` as the request's `Sec-WebSocket-Extensions`.
async fn open(addr: &str, offer: Option<&str>) -> Raw {
    let ext = offer
        .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
        .unwrap_or_default();
    Raw::open(addr, &ext, &[]).await
}

impl Raw {
    fn extensions(&self) -> Option<&str> {
        self.header("sec-websocket-extensions")
    }

    /// The next text message as JSON (skipping pings), and whether it came
    /// compressed.
    async fn next_json(&mut self) -> (Value, bool) {
        let (first, payload) = self.next_text().await;
        let compressed = first & RSV1 != 0;
        let bytes = if compressed { inflate(&payload) } else { payload };
        (serde_json::from_slice(&bytes).unwrap(), compressed)
    }
}

/// A chat message of about 200 bytes as a JSON value.
fn chat(i: usize) -> Value {
    json!({"text": format!("message {i}: {}", "the quick brown fox jumps over the lazy dog, again and again. ".repeat(2)), "user": "alice"})
}

#[tokio::test]
async fn compressed_pushes_replies_and_history_pages_read_back_as_the_plain_ones() {
    let node = TestNode::start().await;
    let addr = node.running.addr.to_string();
    let mut c = open(&addr, Some(BROWSER_OFFER)).await;
    assert_eq!(c.extensions(), Some(ANSWER), "{}", c.head);
    // Commands may come compressed too (the server inflates them).
    let connect = json!({"op":"connect","id":1,"token":node.token("zed")}).to_string();
    c.send(&text(&connect, true)).await;
    let (r, _) = c.next_json().await;
    assert!(r["ok"]["client"].is_string(), "{r}");
    c.send(&text(r#"{"op":"subscribe","id":2,"rooms":["dfl"]}"#, true))
        .await;
    let (r, _) = c.next_json().await;
    assert_eq!(r["ok"]["rooms"][0]["room"], "dfl", "{r}");

    // A member without compression sees the same messages.
    let mut plain = node.client("plain").await;
    plain.subscribe(&["dfl"]).await;
    let mut publisher = node.client("alice").await;
    for i in 0..3 {
        publisher.publish("dfl", chat(i)).await;
    }
    for i in 0..3 {
        let (push, compressed) = c.next_json().await;
        assert!(compressed, "a ~200-byte push is compressed");
        assert_eq!(push, plain.next_push().await);
        assert_eq!(push["data"], chat(i));
    }
    // Frames under 64 bytes (`ping`'s pong and reply) are sent as they are.
    c.send(&text(r#"{"op":"ping","id":5}"#, false)).await;
    loop {
        let (f, compressed) = c.next_json().await;
        assert!(!compressed, "{f}");
        if f["id"] == 5 {
            break;
        }
    }

    // A history page is one large reply: compressed, same content.
    c.send(&text(r#"{"op":"history","id":3,"room":"dfl","limit":10}"#, false))
        .await;
    let (page, compressed) = c.next_json().await;
    assert!(compressed, "{page}");
    let mut want = plain.request(json!({"op":"history","room":"dfl","limit":10})).await;
    want["id"] = json!(3);
    assert_eq!(page, want);
    assert_eq!(page["ok"]["messages"].as_array().unwrap().len(), 3);

    // Catch-up after a reconnect comes compressed as well.
    let mut again = open(&addr, Some(BROWSER_OFFER)).await;
    again.send(&text(&connect, false)).await;
    again.next_json().await;
    again
        .send(&text(
            r#"{"op":"subscribe","id":2,"rooms":[{"room":"dfl","since":0}]}"#,
            true,
        ))
        .await;
    let (r, _) = again.next_json().await;
    assert_eq!(r["ok"]["rooms"][0]["recovered"], true, "{r}");
    for i in 0..3 {
        let (push, compressed) = again.next_json().await;
        assert!(compressed);
        assert_eq!(push["data"], chat(i));
    }
}

/// `--permessage-deflate false`: the offer gets no answer (the connection
/// runs uncompressed) and a frame with RSV1 is a protocol error (1002).
#[tokio::test]
async fn with_permessage_deflate_false_the_offer_is_declined_and_rsv1_is_refused() {
    let node = TestNode::with(|o| o.permessage_deflate = Some(false)).await;
    let addr = node.running.addr.to_string();
    let mut c = open(&addr, Some(BROWSER_OFFER)).await;
    assert_eq!(c.extensions(), None, "{}", c.head);
    let connect = json!({"op":"connect","id":1,"token":node.token("zed")}).to_string();
    c.send(&text(&connect, false)).await;
    c.next_json().await;
    c.send(&text(r#"{"op":"subscribe","id":2,"rooms":["dfl"]}"#, false))
        .await;
    c.next_json().await;
    let mut publisher = node.client("alice").await;
    publisher.publish("dfl", chat(0)).await;
    let (push, compressed) = c.next_json().await;
    assert!(!compressed);
    assert_eq!(push["data"], chat(0));
    c.send(&text(r#"{"op":"ping","id":3}"#, true)).await;
    assert_eq!(c.close_code().await, 1002);

    // On by default: the same offer is answered.
    let on = TestNode::start().await;
    let c = open(&on.running.addr.to_string(), Some(BROWSER_OFFER)).await;
    assert_eq!(c.extensions(), Some(ANSWER));
}

#[tokio::test]
async fn offers_the_server_cannot_honour_are_declined_and_a_small_server_window_is_kept() {
    let node = TestNode::start().await;
    let addr = node.running.addr.to_string();
    for bad in [
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; unknown_param",
        "x-webkit-deflate-frame",
    ] {
        let c = open(&addr, Some(bad)).await;
        assert_eq!(c.extensions(), None, "{bad}");
    }
    // The first acceptable offer wins; a client that asked for a 512-byte
    // window gets long messages uncompressed or compressed within it.
    let mut c = open(
        &addr,
        Some("permessage-deflate; mystery, permessage-deflate; server_max_window_bits=9"),
    )
    .await;
    assert_eq!(c.extensions(), Some(&*format!("{ANSWER}; server_max_window_bits=9")));
    let connect = json!({"op":"connect","id":1,"token":node.token("zed")}).to_string();
    c.send(&text(&connect, false)).await;
    c.next_json().await;
    c.send(&text(r#"{"op":"subscribe","id":2,"rooms":["small"]}"#, false))
        .await;
    c.next_json().await;
    let mut publisher = node.client("alice").await;
    // 1,600 characters that repeat only from one message to the next (over
    // 512 bytes back): a compressor with a larger window would refer there.
    let mut seed = 7u32;
    let noise: String = (0..1600)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            char::from(b'a' + (seed >> 16) as u8 % 26)
        })
        .collect();
    let long = json!({ "text": noise });
    for _ in 0..2 {
        publisher.publish("small", long.clone()).await;
        let (push, compressed) = c.next_json().await;
        assert_eq!(push["data"], long);
        assert!(!compressed, "room pushes are shared only with full-window members");
    }
    // A reply over 512 bytes is compressed with a 512-byte window: an
    // inflater with that window reads it.
    c.send(&text(r#"{"op":"history","id":3,"room":"small"}"#, false)).await;
    let (first, payload) = c.next().await.unwrap();
    assert_ne!(first & RSV1, 0);
    let mut d = Decompress::new_with_window_bits(false, 9);
    let mut input = payload.clone();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    let page: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(page["ok"]["messages"][0]["data"], long);
    assert_eq!(page["ok"]["messages"][1]["data"], long);
    // That inflater does not refuse a reference further back (zlib keeps
    // the output it has): the size shows none was made. Each copy of the
    // noise is 1,600 letters of ~4.7 bits; only a reference from the second
    // copy to the first (~1,700 bytes back) gets both under 1,600 bytes.
    assert!(
        payload.len() > 1600,
        "{} bytes: a reference past the window",
        payload.len()
    );
}

/// Peak resident memory (VmHWM) of a process, KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A compressed message that inflates to `mib` MiB of zeros in a few KB per
/// MiB: one sync-flushed MiB repeated (each copy ends on a byte boundary and
/// refers only to zeros before it).
fn bomb(mib: usize) -> Vec<u8> {
    let mut c = Compress::new(Compression::best(), false);
    let mut one = Vec::with_capacity(1 << 16);
    c.compress_vec(&vec![0u8; 1 << 20], &mut one, FlushCompress::Sync)
        .unwrap();
    let mut out = one.repeat(mib);
    out.truncate(out.len() - 4);
    out
}

/// A zip bomb: a compressed frame well under `--max-frame-bytes` that would
/// inflate to 200 MiB closes with 1009, and the gateway process's peak
/// memory barely moves (it never held more than the limit of output per
/// connection). The node keeps serving. Run against the binary, so the
/// process's own figures measure it.
#[tokio::test]
async fn a_compressed_frame_inflating_past_the_limit_closes_1009_without_allocating_it() {
    let gw = common::process::GatewayProcess::start(&[
        "--jwt-secret",
        common::SECRET,
        "--max-frame-bytes",
        "262144",
        "--permessage-deflate",
        "true",
    ]);
    let (pid, addr) = (gw.pid(), gw.addr.clone());

    let payload = bomb(200);
    assert!(payload.len() < 262_144, "{} bytes pass the header check", payload.len());
    let connect = json!({"op":"connect","id":1,"token":token("zed", &["*"], &["*"])}).to_string();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = open(&addr, Some(BROWSER_OFFER)).await;
        c.send(&text(&connect, true)).await;
        c.next_json().await;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = vm_hwm_kib(pid);
    let bomb_frame = client_frame(FIN | RSV1 | OP_TEXT, &payload);
    for c in &mut clients {
        c.send(&bomb_frame).await;
    }
    for c in &mut clients {
        assert_eq!(c.close_code().await, 1009);
    }
    let grown = vm_hwm_kib(pid).saturating_sub(before);
    // Four bombs of 200 MiB each: a reader that inflated them whole would
    // add 800 MiB; this one holds at most 256 KiB of output per connection.
    assert!(grown < 24 * 1024, "peak RSS grew by {grown} KiB");

    // The node is fine: a new client talks to it.
    let mut ok = Client::open(&format!("ws://{addr}/ws")).await;
    let r = ok.connect(&token("after", &["*"], &["*"])).await;
    assert!(r["ok"]["client"].is_string(), "{r}");
}

/// Node.js's global `WebSocket` (Node 22; `scripts/ensure-node.sh` finds or
/// installs it, `$NODE` names it) offers `permessage-deflate`, gets it, and
/// reads compressed pushes and history pages as the messages that were sent.
#[tokio::test]
async fn nodes_global_websocket_negotiates_compression_and_reads_every_message() {
    let node_bin = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let version = std::process::Command::new(&node_bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("Node.js ({node_bin}) is needed: run scripts/ensure-node.sh and set NODE ({e})"));
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "{node_bin} is {version}: Node 22 is needed (scripts/ensure-node.sh)"
    );

    let gw = TestNode::start().await;
    // Prints one JSON line per event: the negotiated extensions, then each
    // message as received (already inflated by the client).
    let script = r#"
        const ws = new WebSocket(process.env.URL, 'gw.v1.json');
        const out = (v) => process.stdout.write(JSON.stringify(v) + '\n');
        ws.onopen = () => {
            out({ extensions: ws.extensions, protocol: ws.protocol });
            ws.send(JSON.stringify({ op: 'connect', id: 1, token: process.env.TOKEN }));
            ws.send(JSON.stringify({ op: 'subscribe', id: 2, rooms: ['node'] }));
        };
        let pushes = 0;
        ws.onmessage = (e) => {
            out({ text: e.data });
            const m = JSON.parse(e.data);
            if (m.op === 'message' && ++pushes === 3) {
                ws.send(JSON.stringify({ op: 'history', id: 3, room: 'node' }));
            }
            if (m.id === 3) ws.close(1000);
        };
        ws.onclose = (e) => { out({ closed: e.code }); process.exit(0); };
        ws.onerror = (e) => { out({ error: String(e.message || e) }); process.exit(1); };
        setTimeout(() => { out({ error: 'timeout' }); process.exit(2); }, 20000);
    "#;
    let mut cmd = tokio::process::Command::new(&node_bin);
    if major < 22 {
        cmd.arg("--experimental-websocket");
    }
    let mut child = cmd
        .args(["-e", script])
        .env("URL", gw.url())
        .env("TOKEN", gw.token("nodejs"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = within(lines.next_line()).await.unwrap().expect("node printed a line");
        serde_json::from_str(&line).unwrap()
    };
    let opened = next().await;
    assert_eq!(opened["extensions"], ANSWER, "{opened}");
    assert_eq!(opened["protocol"], "gw.v1.json");
    let parse =
        |v: Value| -> Value { serde_json::from_str(v["text"].as_str().unwrap_or_else(|| panic!("{v}"))).unwrap() };
    assert!(parse(next().await)["ok"]["client"].is_string());
    assert_eq!(parse(next().await)["ok"]["rooms"][0]["room"], "node");

    let mut publisher = gw.client("alice").await;
    let big = json!({"text": "Grüße, 世界! ".repeat(300)});
    let sent = [chat(1), big.clone(), json!("x")];
    for d in &sent {
        publisher.publish("node", d.clone()).await;
    }
    for d in &sent {
        let push = parse(next().await);
        assert_eq!(push["op"], "message");
        assert_eq!(&push["data"], d);
    }
    let page = parse(next().await);
    assert_eq!(page["id"], 3);
    let got: Vec<&Value> = page["ok"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(got, sent.iter().collect::<Vec<_>>());
    assert_eq!(next().await["closed"], 1000);
    let status = within(child.wait()).await.unwrap();
    assert!(status.success());
}

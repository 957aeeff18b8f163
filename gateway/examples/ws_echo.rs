//! An echo server on the gateway's own WebSocket framing (`gateway::transport::ws`), for
//! the Autobahn|Testsuite fuzzing client (`scripts/autobahn.sh`): every
//! message comes back as it came (text as text, binary as binary), pings
//! are answered, and the connection is closed with the code the framing
//! error earns (1002 protocol, 1007 bad UTF-8, 1009 too large).
//! `permessage-deflate` is negotiated as the gateway does it
//! (`gateway::transport::deflate::negotiate`): echoes are compressed the
//! way the gateway compresses its frames (Autobahn 12.x and 13.x).
//!
//! `cargo run --release -p gateway --example ws_echo -- 127.0.0.1:9001`

use std::collections::VecDeque;

use gateway::transport::deflate;
use gateway::transport::ws::{self, Frame, Incoming, ReadError, Reader};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Autobahn sends messages of up to 16 MiB.
const MAX_MESSAGE: usize = 20 << 20;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("ws_echo listening on {addr}");
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(tcp).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn serve(mut tcp: TcpStream) -> std::io::Result<()> {
    // As the gateway's listener does: no Nagle delay on small echoes.
    tcp.set_nodelay(true)?;
    // The handshake, by hand: read the request head, answer 101.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await? == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let header = |wanted: &'static str| {
        head.lines().filter_map(move |l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case(wanted).then(|| value.trim())
        })
    };
    let key = header("sec-websocket-key").next().unwrap_or_default().to_string();
    let negotiated = deflate::negotiate(header("sec-websocket-extensions"));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let (r, mut w) = tcp.split();
    let extensions = negotiated
        .as_ref()
        .map(|(_, v)| format!("Sec-WebSocket-Extensions: {v}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extensions}\r\n"
    );
    let compress = negotiated.map(|(d, _)| d);
    tokio::io::AsyncWriteExt::write_all(&mut w, response.as_bytes()).await?;
    let mut reader = Reader::new(r, MAX_MESSAGE, &[]);
    reader.set_deflate(compress.is_some());
    loop {
        let reply = match reader.next().await {
            Ok(Incoming::Text(t)) => Frame::text(String::from_utf8(t.to_vec()).expect("checked UTF-8")),
            Ok(Incoming::Binary(b)) => Frame::binary(&b),
            Ok(Incoming::Ping(p)) => Frame::pong(&p),
            Ok(Incoming::Pong) => continue,
            Ok(Incoming::Close(code)) => {
                ws::write_frame(&mut w, Frame::close(code.unwrap_or(1000), "")).await?;
                return Ok(());
            }
            Err(ReadError::Eof | ReadError::Io(_)) => return Ok(()),
            Err(e) => {
                let code = match e {
                    ReadError::TooLarge => 1009,
                    ReadError::BadUtf8 => 1007,
                    _ => 1002,
                };
                ws::write_frame(&mut w, Frame::close(code, "")).await?;
                // Complete the closing handshake: wait for the client's close.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    while !matches!(reader.next().await, Ok(Incoming::Close(_)) | Err(_)) {}
                })
                .await;
                return Ok(());
            }
        };
        let reply = reply.deflated_or_plain(compress);
        ws::write_all(&mut w, &mut VecDeque::from([reply])).await?;
    }
}

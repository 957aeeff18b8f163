//! The listening socket and one HTTP/1.1 connection on it: plain TCP or
//! TLS, a bounded request head, upgrades handed to `upgrade`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::node::Node;

pub(super) async fn accept_loop(node: Arc<Node>, listener: TcpListener, router: Router) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        // Accepted while draining: one request, then the connection ends
        // (the drain waits for it, so it must not linger).
        let token = if node.is_draining() {
            None
        } else {
            Some(node.shutdown.clone())
        };
        // One shared config whose resolver hands out the current certificate
        // per handshake: a reload reaches the next handshake, established
        // sessions keep theirs.
        let tls = node.tls.as_ref().map(|t| t.acceptor().clone());
        node.tracker.spawn(async move {
            match tls {
                None => serve_http(tcp, peer, router, token).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_http(stream, peer, router, token).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// Binds with a deep accept queue: during a reconnect storm a short queue
/// (tokio's default is 1,024) makes the kernel drop SYNs, and clients then
/// wait for their 1 s / 3 s retransmits instead of for the gateway.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accept queue length (the kernel caps it at net.core.somaxconn).
pub(super) const LISTEN_BACKLOG: u32 = 8192;

/// Longest a TLS handshake may take before the socket is dropped.
pub(super) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line and headers): a 1 MiB `Authorization`
/// header is refused by the HTTP layer (431) before anything parses it.
pub(super) const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// Serves HTTP/1.1 (and upgrades) on one accepted connection, plain or TLS.
///
/// With `token`, the connection is kept alive until the token is cancelled
/// (then shut down gracefully); without (a node already draining), it serves
/// one request.
pub(super) async fn serve_http<I>(io: I, peer: SocketAddr, router: Router, token: Option<CancellationToken>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer);
        let mut router = router.clone();
        async move { router.call(req.map(Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(token.is_some())
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        }
        () = async {
            match &token {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

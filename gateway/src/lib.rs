//! The gateway: a WebSocket fan-out node for chat.
//!
//! A node authenticates connections locally (JWT), keeps an index from room
//! to local connections, encodes each message once and queues the same bytes
//! for every local member. Alone it is a complete chat server (the embedded
//! bus); cluster mode joins nodes through NATS.
//!
//! Modules: [`config`] (flags, env, TOML), [`server`] (listener, router,
//! shutdown), [`conn`] (connection task), [`rooms`] (room index and log),
//! [`bus`] (how messages get offsets and reach nodes), [`auth`] (JWT; its
//! `auth::jwks` fetches key sets from URLs), [`tls`] (wss:// with certificate
//! reload), [`protocol`] (JSON wire format), [`limits`] (rate limits and
//! admission control), [`metrics`], [`error`].

pub mod auth;
pub mod bus;
pub mod config;
pub mod conn;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod protobuf;
pub mod protocol;
pub mod rooms;
pub mod server;
pub mod tcp;
pub mod tls;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::Config;
pub use server::{DrainReport, Node, serve};

/// A node serving in the background (tests and embedding).
pub struct Running {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<DrainReport>,
}

impl Running {
    /// Starts `node` on an already bound listener.
    pub fn start(node: Arc<Node>, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(node.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            node,
            stop: Some(stop),
            task,
        })
    }

    /// Binds `127.0.0.1:0` (with the production accept queue) and starts a
    /// node with `cfg`.
    pub async fn bind_local(cfg: Config) -> anyhow::Result<Self> {
        let listener = server::listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let node = Node::new(cfg).await?;
        Ok(Self::start(node, listener)?)
    }

    /// Drains the node and waits for it.
    pub async fn shutdown(mut self) -> DrainReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("serve task panicked")
    }
}

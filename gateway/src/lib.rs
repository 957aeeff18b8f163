//! The gateway: a WebSocket fan-out node for chat.
//!
//! A node authenticates connections locally (JWT), keeps an index from room
//! to local connections, encodes each message once and queues the same bytes
//! for every local member. Alone it is a complete chat server (the embedded
//! bus); cluster mode joins nodes through NATS.
//!
//! Modules, in their layer order (each uses only those before it;
//! `tests/architecture.rs` checks it): [`model`] (ids), [`error`] (error and
//! close codes), [`metrics`], [`transport`] (RFC 6455 framing, sockets, TLS),
//! [`protocol`] (client commands and server frames, JSON and protobuf),
//! [`rooms`] (room index, log, sequencer), [`broker`] (how messages get
//! offsets and reach nodes: embedded or NATS), [`auth`] (JWT; `auth::jwks` fetches key sets from URLs), [`limits`]
//! (rate limits and admission), [`config`] (flags, env, TOML), [`control`]
//! (server API orders to connections on every gateway, token revocations),
//! [`presence`] (cluster-wide room presence), [`node`] (the
//! services of one process), [`conn`] (a connection's task and commands),
//! [`http`] (router, listener, upgrade, shutdown, the server API).

pub mod auth;
pub mod broker;
pub mod config;
pub mod conn;
pub mod control;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod node;
pub mod presence;
pub mod protocol;
pub mod rooms;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::Config;
pub use http::serve;
pub use node::{DrainReport, Node};

/// A node serving in the background (tests and embedding).
pub struct Running {
    pub addr: SocketAddr,
    /// The server API's address, when `api_listen` is configured.
    pub api_addr: Option<SocketAddr>,
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
            api_addr: None,
            node,
            stop: Some(stop),
            task,
        })
    }

    /// Binds `127.0.0.1:0` (with the production accept queue) and starts a
    /// node with `cfg`; with `api_listen` set, the server API too (on
    /// `127.0.0.1:0` when its port is 0, else on that address).
    pub async fn bind_local(cfg: Config) -> anyhow::Result<Self> {
        let listener = http::listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let api = match cfg.api_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let node = Node::new(cfg).await?;
        let mut running = Self::start(node.clone(), listener)?;
        if let Some(api) = api {
            running.api_addr = Some(api.local_addr()?);
            node.spawn_service(http::api::serve_api(node.clone(), api));
        }
        Ok(running)
    }

    /// Drains the node and waits for it.
    pub async fn shutdown(mut self) -> DrainReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("serve task panicked")
    }
}

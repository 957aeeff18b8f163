//! The control plane between gateways: orders for every gateway's
//! connections and cluster-wide questions (the nodes), over
//! core NATS subjects under the node's prefix. Embedded mode answers from
//! this node alone.
//!
//! Subjects (every gateway subscribes to each, no queue group):
//! - `<prefix>.ctl.order`: a [`Broadcast`] (JSON); each gateway applies it
//!   to its connections. Core NATS: a gateway that is disconnected at that
//!   moment misses it (revocations do not: they are in the bucket).
//! - `<prefix>.ctl.info`: a request; every gateway answers with its
//!   [`NodeInfo`]. The asker gathers
//!   answers until none came for [`GATHER_QUIET`], at most [`GATHER_MAX`].
//!   Cost: one message to each gateway and one answer from each, per call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Broadcast, Registry, Revocations, RevokeError};
use crate::broker::NatsBus;
use crate::broker::nats::follow;

/// A gathering ends once no answer came for this long.
pub const GATHER_QUIET: Duration = Duration::from_millis(150);
/// A gathering never takes longer than this.
pub const GATHER_MAX: Duration = Duration::from_secs(1);

/// One gateway, as `info` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Rooms with state on the node (members, cached log).
    pub rooms: u64,
    /// Distinct users with an authenticated connection.
    pub users: u64,
    pub draining: bool,
}

/// This node's answer to `info`, made by the node (it knows its counts).
pub type InfoFn = Arc<dyn Fn() -> NodeInfo + Send + Sync>;

/// The control plane of a node (see the module doc).
pub struct Control {
    pub registry: Arc<Registry>,
    pub revocations: Arc<Revocations>,
    nats: Option<async_nats::Client>,
    prefix: String,
}

impl Control {
    /// Embedded mode: this node alone; revocations in memory.
    pub fn embedded() -> Self {
        Self {
            registry: Arc::default(),
            revocations: Arc::new(Revocations::memory()),
            nats: None,
            prefix: String::new(),
        }
    }

    /// Cluster mode: opens the revocation bucket (loading it), retried for
    /// up to `patience` while JetStream is not ready.
    pub async fn cluster(
        bus: &NatsBus,
        prefix: &str,
        replicas: usize,
        patience: std::time::Duration,
    ) -> Result<Self, RevokeError> {
        let revocations = Revocations::open(bus.jetstream(), prefix, replicas, patience).await?;
        Ok(Self {
            registry: Arc::default(),
            revocations: Arc::new(revocations),
            nats: Some(bus.client().clone()),
            prefix: prefix.to_string(),
        })
    }

    fn subject(&self, what: &str) -> String {
        format!("{}.ctl.{what}", self.prefix)
    }

    /// Cluster mode: subscribes to the control subjects and watches the
    /// revocation bucket, on `tasks` until `stop`.
    pub async fn start(
        &self,
        info: InfoFn,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), async_nats::SubscribeError> {
        let Some(client) = &self.nats else {
            return Ok(());
        };
        tasks.spawn(self.revocations.clone().watch(self.registry.clone(), stop.clone()));
        let orders = client.subscribe(self.subject("order")).await?;
        let infos = client.subscribe(self.subject("info")).await?;
        let registry = self.registry.clone();
        follow(tasks, stop, orders, move |msg| {
            match serde_json::from_slice::<Broadcast>(&msg.payload) {
                Ok(order) => {
                    let n = registry.apply(&order);
                    tracing::debug!(?order, connections = n, "control order applied");
                }
                Err(e) => tracing::warn!(error = %e, "malformed control order ignored"),
            }
            async {}
        });
        let client1 = client.clone();
        follow(tasks, stop, infos, move |msg| {
            let (client, body) = (client1.clone(), serde_json::to_vec(&info()));
            async move {
                if let (Some(reply), Ok(body)) = (msg.reply, body) {
                    let _ = client.publish(reply, body.into()).await;
                }
            }
        });
        Ok(())
    }

    /// Sends `order` to every gateway (this one included); answers once
    /// NATS took it. Embedded mode applies it here. Returns the connections
    /// reached on this node in embedded mode (0 in cluster mode: each
    /// gateway counts its own).
    pub async fn broadcast(&self, order: &Broadcast) -> Result<usize, String> {
        let Some(client) = &self.nats else {
            return Ok(self.registry.apply(order));
        };
        let body = serde_json::to_vec(order).map_err(|e| e.to_string())?;
        client
            .publish(self.subject("order"), body.into())
            .await
            .map_err(|e| e.to_string())?;
        client.flush().await.map_err(|e| e.to_string())?;
        Ok(0)
    }

    /// Asks every gateway; `None` in embedded mode (the caller answers
    /// for this node alone).
    async fn gather<T: for<'de> Deserialize<'de>>(&self, what: &str, payload: Bytes) -> Option<Result<Vec<T>, String>> {
        let client = self.nats.as_ref()?;
        let run = async {
            let inbox = client.new_inbox();
            let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
            client
                .publish_with_reply(self.subject(what), inbox, payload)
                .await
                .map_err(|e| e.to_string())?;
            client.flush().await.map_err(|e| e.to_string())?;
            let end = Instant::now() + GATHER_MAX;
            let mut out = Vec::new();
            loop {
                let quiet = (Instant::now() + GATHER_QUIET).min(end);
                match tokio::time::timeout_at(quiet, sub.next()).await {
                    Ok(Some(msg)) => {
                        if let Ok(v) = serde_json::from_slice(&msg.payload) {
                            out.push(v);
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = sub.unsubscribe().await;
            Ok(out)
        };
        Some(run.await)
    }

    /// Every gateway's [`NodeInfo`] (cluster mode), sorted by node id.
    pub async fn nodes(&self) -> Option<Result<Vec<NodeInfo>, String>> {
        let r = self.gather::<NodeInfo>("info", Bytes::new()).await?;
        Some(r.map(|mut v| {
            v.sort_by(|a, b| a.node.cmp(&b.node));
            v
        }))
    }
}

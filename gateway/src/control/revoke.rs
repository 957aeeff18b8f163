//! Token revocations: "tokens of this user issued before T are refused".
//!
//! Cluster mode keeps them in the JetStream key-value bucket
//! `<PREFIX>_REVOKED` (one key per user, the base64url of the `sub`; the
//! value is T in Unix seconds; replicas as the room streams), so they survive
//! restarts of gateways and NATS servers. Every gateway loads the bucket at
//! start, before it serves, and then watches it: an update closes the
//! user's live connections holding an older token (4001) as soon as the
//! watch delivers it. Embedded mode keeps them in this process's memory
//! only: a restart forgets them.
//!
//! The latest revocation of a user replaces an earlier one. Entries are
//! never expired by the gateway (a token without `exp` stays revocable); a
//! bucket entry can be deleted with the `nats` CLI.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use base64::Engine as _;
use futures_util::StreamExt as _;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use super::Registry;

/// Why a revocation could not be stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("the revocation bucket {bucket} could not be opened: {detail}")]
    Bucket { bucket: String, detail: String },
    #[error("the revocation could not be stored: {0}")]
    Store(String),
}

/// The revocation list of this node (see the module doc).
pub struct Revocations {
    before: RwLock<HashMap<String, u64, foldhash::fast::RandomState>>,
    kv: Option<kv::Store>,
}

/// How long a broken watch waits before it is opened again.
const REWATCH_DELAY: Duration = Duration::from_secs(1);

fn key_of(user: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user.as_bytes())
}

fn user_of(key: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key).ok()?;
    String::from_utf8(bytes).ok()
}

impl Revocations {
    /// Embedded mode: in memory, lost on restart.
    pub fn memory() -> Self {
        Self {
            before: RwLock::default(),
            kv: None,
        }
    }

    /// Cluster mode: opens (or creates) the bucket and loads every entry.
    /// JetStream may be briefly unavailable at start (a server just
    /// restarted, a meta leader being elected: "JetStream system temporarily
    /// unavailable"): the whole open is retried until `patience`
    /// (`--nats-connect-timeout-ms`) has passed.
    ///
    /// Errors: [`RevokeError::Bucket`] with the last failure, once `patience`
    /// is spent.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        replicas: usize,
        patience: Duration,
    ) -> Result<Self, RevokeError> {
        let bucket = format!("{}_REVOKED", prefix.to_ascii_uppercase());
        let deadline = std::time::Instant::now() + patience;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match Self::open_once(js, &bucket, replicas).await {
                Ok(this) => return Ok(this),
                Err(detail) if std::time::Instant::now() < deadline => {
                    tracing::warn!(%bucket, attempt, error = %detail, "revocation bucket not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10)))).await;
                }
                Err(detail) => return Err(RevokeError::Bucket { bucket, detail }),
            }
        }
    }

    /// One attempt at [`Self::open`]: the bucket (created if missing) and
    /// every entry.
    async fn open_once(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<Self, String> {
        // Several gateways may start at once: a create that loses the race
        // is retried as a lookup.
        let store = match js.get_key_value(bucket).await {
            Ok(s) => s,
            Err(_) => {
                let cfg = kv::Config {
                    bucket: bucket.to_string(),
                    description: "gateway token revocations: user -> unix seconds".into(),
                    history: 1,
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                };
                match js.create_key_value(cfg).await {
                    Ok(s) => s,
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let this = Self {
            before: RwLock::default(),
            kv: Some(store),
        };
        this.load().await.map_err(|e| e.to_string())?;
        Ok(this)
    }

    /// Reads every entry of the bucket (at start, before the node serves).
    async fn load(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(store) = &self.kv else {
            return Ok(());
        };
        let mut keys = store.keys().await?;
        let mut n = 0usize;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let (Some(user), Some(value)) = (user_of(&key), store.get(&key).await?)
                && let Some(before) = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok())
            {
                self.before.write().insert(user, before);
                n += 1;
            }
        }
        tracing::info!(revocations = n, "token revocations loaded");
        Ok(())
    }

    /// Whether revocations are kept in JetStream (survive restarts).
    pub fn is_durable(&self) -> bool {
        self.kv.is_some()
    }

    /// Whether a token of `user` issued at `iat` (0: no `iat`) is revoked.
    pub fn is_revoked(&self, user: &str, iat: u64) -> bool {
        self.before.read().get(user).is_some_and(|before| iat < *before)
    }

    /// Revokes `user`'s tokens issued before `before` (Unix seconds): stored
    /// (cluster mode: in the bucket, replicated, before this returns), applied
    /// to this node's list and to its live connections in `registry`.
    pub async fn revoke(&self, registry: &Registry, user: &str, before: u64) -> Result<usize, RevokeError> {
        if let Some(store) = &self.kv {
            store
                .put(key_of(user), before.to_string().into())
                .await
                .map_err(|e| RevokeError::Store(e.to_string()))?;
        }
        self.before.write().insert(user.to_string(), before);
        Ok(registry.revoke(user, before))
    }

    /// Cluster mode: follows the bucket until `stop`, applying every update
    /// to the list and to the live connections of `registry`. A watch that
    /// breaks is opened again after `REWATCH_DELAY` (it re-reads the
    /// latest entry of every user, so nothing is missed across the gap).
    pub async fn watch(self: Arc<Self>, registry: Arc<Registry>, stop: CancellationToken) {
        let Some(store) = self.kv.clone() else {
            return;
        };
        loop {
            match store.watch_with_history(">").await {
                Ok(mut w) => {
                    while let Some(entry) = tokio::select! {
                        e = w.next() => e,
                        () = stop.cancelled() => return,
                    } {
                        let Ok(entry) = entry else { break };
                        self.apply(&registry, &entry);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch the revocation bucket; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(REWATCH_DELAY) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    fn apply(&self, registry: &Registry, entry: &kv::Entry) {
        let Some(user) = user_of(&entry.key) else {
            return;
        };
        match entry.operation {
            kv::Operation::Put => {
                let Some(before) = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                else {
                    return;
                };
                let changed = self.before.write().insert(user.clone(), before) != Some(before);
                if changed || registry.count(&user) > 0 {
                    let closed = registry.revoke(&user, before);
                    if closed > 0 {
                        tracing::info!(closed, "closed connections holding a revoked token");
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.before.write().remove(&user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_any_user_id_and_are_valid_kv_keys() {
        for user in ["alice", "a.b*c>d e", "ユーザー", "x/y=z"] {
            let k = key_of(user);
            assert!(
                k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{k}"
            );
            assert_eq!(user_of(&k).as_deref(), Some(user));
        }
    }

    #[tokio::test]
    async fn a_revocation_refuses_older_tokens_and_tokens_without_iat_only() {
        let r = Revocations::memory();
        let reg = Registry::default();
        r.revoke(&reg, "alice", 1000).await.unwrap();
        assert!(r.is_revoked("alice", 999));
        assert!(r.is_revoked("alice", 0));
        assert!(!r.is_revoked("alice", 1000));
        assert!(!r.is_revoked("bob", 1));
        assert!(!r.is_durable());
    }
}

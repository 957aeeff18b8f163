//! The room streams: their configuration, creation at start, and the check
//! that refuses an existing stream whose limits would drop messages the
//! gateway promises to keep (the old system's silent JetStream loss).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

use super::{ClusterConfig, ClusterError};

pub(super) fn stream_name(cfg: &ClusterConfig, p: u32) -> String {
    format!("{}_ROOMS_{p}", cfg.prefix.to_ascii_uppercase())
}

pub(super) fn stream_config(cfg: &ClusterConfig, p: u32) -> stream::Config {
    stream::Config {
        name: stream_name(cfg, p),
        description: Some(format!("gateway rooms, partition {p} of {}", cfg.partitions)),
        subjects: vec![format!("{}.store.{p}.*", cfg.prefix)],
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: cfg.history,
        max_age: cfg.max_age,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: cfg.dedup_window,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: format!("{}.store.{p}.*", cfg.prefix),
            destination: format!("{}.room.{{{{wildcard(1)}}}}", cfg.prefix),
            headers_only: false,
        }),
        metadata: HashMap::from([("gateway.partitions".to_string(), cfg.partitions.to_string())]),
        ..Default::default()
    }
}

/// Creates the stream of partition `p`, or checks that an existing one keeps
/// at least what the gateway promises. Never shrinks or rewrites a stream.
pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &ClusterConfig,
    p: u32,
) -> Result<stream::Stream, ClusterError> {
    let name = stream_name(cfg, p);
    let wrap = |e: Box<dyn std::error::Error + Send + Sync>| ClusterError::Stream {
        stream: name.clone(),
        source: e,
    };
    // Several nodes may start at once: a create that loses the race (or times
    // out while the meta leader is busy) is retried as a lookup. JetStream
    // may also be briefly unavailable (a server just restarted, a meta
    // leader being elected): failures are retried for the connect timeout.
    let patience = Instant::now() + cfg.connect_timeout;
    let mut attempt = 0;
    let retry = |attempt: u64| attempt < 5 || Instant::now() < patience;
    let pause = |attempt: u64| Duration::from_millis(200 * attempt.min(10));
    let mut stream = loop {
        attempt += 1;
        match js.get_stream(&name).await {
            Ok(mut s) => match s.info().await {
                Ok(info) => {
                    check_stream(&name, &info.config, cfg)?;
                    break s;
                }
                // A stream another gateway has just created can answer
                // "not found" for a moment (its group not formed yet).
                Err(e) if retry(attempt) => {
                    tracing::debug!(stream = %name, error = %e, "new stream not readable yet; retrying");
                    tokio::time::sleep(pause(attempt)).await;
                }
                Err(e) => return Err(wrap(Box::new(e))),
            },
            Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                tracing::info!(stream = %name, replicas = cfg.replicas, "creating room stream");
                match js.create_stream(stream_config(cfg, p)).await {
                    Ok(s) => break s,
                    Err(e) if retry(attempt) => {
                        tracing::debug!(stream = %name, error = %e, "stream create failed; looking it up again");
                        tokio::time::sleep(pause(attempt)).await;
                    }
                    Err(e) => return Err(wrap(Box::new(e))),
                }
            }
            Err(e) if retry(attempt) => {
                tracing::warn!(stream = %name, error = %e, attempt, "stream lookup failed; retrying");
                tokio::time::sleep(pause(attempt)).await;
            }
            Err(e) => return Err(wrap(Box::new(e))),
        }
    };
    // A replicated stream takes a moment to elect its leader; the node is not
    // ready before its streams can take writes.
    let deadline = Instant::now() + cfg.connect_timeout;
    loop {
        // Right after its creation a replicated stream may answer "not
        // found" until its group has formed: wait for it like for a leader.
        let info = match stream.get_info().await {
            Ok(info) => info,
            Err(e) if Instant::now() <= deadline => {
                tracing::debug!(stream = %name, error = %e, "new stream not readable yet; waiting");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(wrap(Box::new(e))),
        };
        let has_leader = info
            .cluster
            .as_ref()
            .is_none_or(|c| c.leader.is_some() || c.name.is_none());
        if has_leader || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stream.info().await;
    Ok(stream)
}

/// Refuses a stream whose limits would drop messages the gateway promises
/// to keep (the report's silent JetStream loss).
pub fn check_stream(name: &str, have: &stream::Config, want: &ClusterConfig) -> Result<(), ClusterError> {
    let unsafe_ = |limit: &'static str, detail: String| ClusterError::Unsafe {
        stream: name.to_string(),
        limit,
        detail,
    };
    if have.storage != stream::StorageType::File {
        return Err(unsafe_("storage", "memory storage loses everything on restart".into()));
    }
    // A stream-wide limit with discard-old evicts other rooms' history.
    if have.discard == stream::DiscardPolicy::Old {
        for (limit, value) in [("max_msgs", have.max_messages), ("max_bytes", have.max_bytes)] {
            if value > 0 {
                return Err(unsafe_(
                    limit,
                    format!("{limit}={value} with discard=old evicts other rooms' history"),
                ));
            }
        }
    }
    if have.max_messages_per_subject > 0 && (want.history < 0 || have.max_messages_per_subject < want.history) {
        return Err(unsafe_(
            "max_msgs_per_subject",
            format!(
                "{} < the room history of {}",
                have.max_messages_per_subject, want.history
            ),
        ));
    }
    if !have.max_age.is_zero() && (want.max_age.is_zero() || have.max_age < want.max_age) {
        return Err(unsafe_(
            "max_age",
            format!("{:?} is shorter than the configured {:?}", have.max_age, want.max_age),
        ));
    }
    if have.num_replicas < want.replicas {
        return Err(unsafe_(
            "replicas",
            format!("{} < the configured {}", have.num_replicas, want.replicas),
        ));
    }
    if have.duplicate_window < want.dedup_window {
        return Err(unsafe_(
            "duplicate_window",
            format!(
                "{:?} < the publish dedup window {:?}",
                have.duplicate_window, want.dedup_window
            ),
        ));
    }
    let partitions = have.metadata.get("gateway.partitions");
    if partitions.is_some_and(|p| *p != want.partitions.to_string()) {
        return Err(unsafe_(
            "partitions",
            format!(
                "made for {} partitions, the gateway has {}",
                partitions.cloned().unwrap_or_default(),
                want.partitions
            ),
        ));
    }
    if have.republish.is_none() {
        return Err(unsafe_(
            "republish",
            "no republish to the rooms' fan-out subjects".into(),
        ));
    }
    Ok(())
}

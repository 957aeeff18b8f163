//! Configuration: one typed [`Config`] from flags, environment and a TOML file.
//!
//! Precedence: flag, then `GATEWAY_*` environment variable, then the file given
//! by `--config`, then the default. Every option has all three spellings:
//! `--max-frame-bytes`, `GATEWAY_MAX_FRAME_BYTES`, `max_frame_bytes`.
//! Values are validated before any port is bound; an invalid configuration is
//! an error that names the option, never a silent default.
//!
//! Owns the resolved [`Config`], [`ConfigError`] and [`verifier`] (the
//! `auth::Verifier` a configuration describes; here so that `auth` never
//! depends on `config`). The options as given live in [`opts`]; defaults and
//! validation ([`Config::resolve`]) in [`resolve`]. Neither submodule is used
//! by this file except through re-exports. Does not own what the values do:
//! each module reads its fields.

pub mod opts;
pub mod resolve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::jwks::SourceOptions;
use crate::auth::{Grants, KeyError, Pattern, Verifier, VerifyOptions};
pub use crate::config::opts::{Cli, Command, Opts, RoomLimitOpts, TokenArgs};
use crate::limits::LimitConfig;

/// Default `--max-frame-bytes`: a `subscribe` of 2,000 rooms, each with a
/// 64-character name and a 20-digit `since`, is about 210,000 bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;
/// Default `--catchup-max-bytes`.
pub const DEFAULT_CATCHUP_MAX_BYTES: usize = 4 << 20;

/// Why the configuration is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{option}: {problem}")]
    Invalid { option: &'static str, problem: String },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The resolved configuration. Field docs give defaults and units.
#[derive(Debug, Clone)]
pub struct Config {
    /// WebSocket and HTTP address. Default 127.0.0.1:8080.
    pub listen: SocketAddr,
    /// Separate /metrics address. Default: none (served on `listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// Server API address (`--api-listen`). Default none: no server API.
    pub api_listen: Option<SocketAddr>,
    /// Accepted server API keys. Non-empty whenever `api_listen` is set.
    pub api_keys: Vec<String>,
    /// Largest server API request body, bytes. Default 1 MiB.
    pub api_max_body_bytes: usize,
    /// Server API requests per second (burst twice that); 0 = no limit.
    /// Default 1,000.
    pub api_requests_per_sec: u32,
    /// Rooms with at most this many members have a presence user list;
    /// 0 = counts only. Default 1,000.
    pub presence_list_max: usize,
    /// Interval of the presence summaries (cluster mode). Default 1 s.
    pub presence_interval: Duration,
    /// Node id. Default gw-<8 random hex digits>.
    pub node_id: String,
    /// HS256 secret. Default none (dev mode when no key at all).
    pub jwt_secret: Option<String>,
    /// Dev mode: no key was configured, `jwt_secret` is a random secret made
    /// for this process, and the node serves the demo page (`/`) and the dev
    /// token endpoint (`/dev/token`). Set only by [`Config::enter_dev_mode`].
    pub dev_mode: bool,
    /// PEM public keys. Default none.
    pub jwt_public_keys: Vec<PathBuf>,
    /// JWKS file or URL. Default none.
    pub jwks: Option<String>,
    pub jwt_issuers: Vec<String>,
    pub jwt_audiences: Vec<String>,
    /// Leeway for exp/nbf. Default 5 s.
    pub jwt_leeway: Duration,
    pub default_rooms: Vec<String>,
    pub default_pub: Vec<String>,
    /// ISSUER=FILE_OR_URL entries. Default none.
    pub jwt_issuer_keys: Vec<String>,
    /// Dotted path of the rooms claim. Default "rooms".
    pub jwt_rooms_claim: String,
    /// Routine JWKS URL refetch interval. Default 300 s.
    pub jwks_refresh: Duration,
    /// Least time between unknown-kid JWKS refetches. Default 10 s.
    pub jwks_refetch_min: Duration,
    /// Certificate file poll interval. Default 10 s.
    pub tls_reload: Duration,
    /// NATS URLs; empty = embedded mode.
    pub nats: Vec<String>,
    /// Default "gw".
    pub nats_prefix: String,
    /// Default 8.
    pub nats_partitions: u32,
    /// Default 1.
    pub nats_replicas: usize,
    /// Default 0 (keep).
    pub room_max_age: Duration,
    /// Default none.
    pub ephemeral_prefixes: Vec<String>,
    /// Default 5 s.
    pub room_linger: Duration,
    /// Default 5 s.
    pub publish_timeout: Duration,
    /// Default 10 s.
    pub nats_connect_timeout: Duration,
    /// Default false.
    pub nats_ignore_discovered: bool,
    /// JetStream domain (`$JS.<domain>.API`); default none.
    pub nats_js_domain: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Allowed origins; empty = any.
    pub allowed_origins: Vec<String>,
    /// Allow upgrades without Origin. Default true.
    pub allow_no_origin: bool,
    /// Local members of a room (per codec) above which its fan-out is split
    /// into shards across cores. Default 10,000 members.
    pub tree_threshold: usize,
    /// Shards of a room split at the threshold; a shard holds at most
    /// `ceil(tree_threshold / tree_degree)` members. Default 16.
    pub tree_degree: usize,
    /// What the operator should know about the options given: settings that
    /// have no effect in this configuration (cluster-only options without
    /// `--nats`). Logged at start.
    pub warnings: Vec<String>,
    /// Flushers; default one per CPU core.
    pub fanout_shards: usize,
    /// Most rooms shown by name on /metrics. Default 20.
    pub room_metrics_top: usize,
    /// Rooms that may be shown by name on /metrics. Default none.
    pub room_metrics_rooms: Vec<Pattern>,
    /// Default false.
    pub no_rate_limits: bool,
    /// Rate limits and admission budgets (each field gives its default);
    /// `no_rate_limits` turns them off.
    pub limits: LimitConfig,
    /// Default 5 s.
    pub auth_timeout: Duration,
    /// Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Offer `permessage-deflate`. Default true.
    pub permessage_deflate: bool,
    /// Default 5,000.
    pub max_rooms_per_conn: usize,
    /// Default 50,000.
    pub max_connections: usize,
    /// Connections of one user on this node (`--user-max-conns`); 0: no cap
    /// (the default).
    pub user_max_conns: usize,
    /// Default 1 MiB.
    pub outbox_max_bytes: usize,
    /// Default 8,192.
    pub outbox_max_frames: usize,
    /// Default 10 s.
    pub write_timeout: Duration,
    /// Default 1,000 messages.
    pub history_size: usize,
    /// Default 4 MiB.
    pub history_max_bytes: usize,
    /// Bytes of history across every room of the node (`rooms::budget`);
    /// default 1 GiB, at least `history_max_bytes`.
    pub history_total_bytes: usize,
    /// Default 200.
    pub history_page_max: usize,
    /// Default 120 s.
    pub dedup_window: Duration,
    /// Default 10,000.
    pub dedup_max_keys: usize,
    /// Default 1,000,000.
    pub max_rooms: usize,
    /// Default 16 MiB.
    pub catchup_max_bytes: usize,
    /// Default 1 s.
    pub activity_interval: Duration,
    /// Default 25 s.
    pub ping_interval: Duration,
    /// Default 70 s.
    pub idle_timeout: Duration,
    /// Default 20 per minute.
    pub max_bad_frames: u32,
    /// Default 10 s.
    pub drain_timeout: Duration,
    /// Default 2 s.
    pub drain_spread: Duration,
    /// Default text.
    pub log_format: LogFormat,
    /// Default "info".
    pub log: String,
}

impl Config {
    /// True when no verification key of any kind is configured (no
    /// `--jwt-secret`, `--jwt-public-key`, `--jwks` or `--jwt-issuer-keys`).
    pub fn has_no_keys(&self) -> bool {
        self.jwt_secret.is_none()
            && self.jwt_public_keys.is_empty()
            && self.jwks.is_none()
            && self.jwt_issuer_keys.is_empty()
    }

    /// Enters dev mode when no key is configured: a random 32-byte HS256
    /// secret (64 hex digits) for this process only, and `dev_mode` set.
    /// Returns whether it did; with any key configured nothing changes.
    pub fn enter_dev_mode(&mut self) -> bool {
        if !self.has_no_keys() {
            return false;
        }
        let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        self.jwt_secret = Some(secret);
        self.dev_mode = true;
        true
    }
}

/// The verifier described by the configuration: options, secret, PEM keys,
/// `--jwks` and `--jwt-issuer-keys`. Reads files now; JWKS URLs are fetched
/// by the node's JWKS refresh loop ([`crate::auth::jwks::JwksSource::refresh_loop`]) once the node starts.
///
/// Lives here, not in `auth`, so that `auth` never depends on `config`.
pub fn verifier(cfg: &Config) -> Result<Verifier, KeyError> {
    let mut v = Verifier::new(VerifyOptions {
        leeway_secs: cfg.jwt_leeway.as_secs(),
        issuers: cfg.jwt_issuers.clone(),
        audiences: cfg.jwt_audiences.clone(),
        default_grants: Grants {
            subscribe: cfg.default_rooms.iter().map(|p| Pattern::new(p)).collect(),
            publish: cfg.default_pub.iter().map(|p| Pattern::new(p)).collect(),
        },
        rooms_claim: cfg.jwt_rooms_claim.split('.').map(String::from).collect(),
        jwks: SourceOptions {
            refresh: cfg.jwks_refresh,
            refetch_min: cfg.jwks_refetch_min,
            ..SourceOptions::default()
        },
    });
    if let Some(secret) = &cfg.jwt_secret {
        v.add_secret(secret.as_bytes())?;
    }
    for path in &cfg.jwt_public_keys {
        v.add_public_key_file(path)?;
    }
    if let Some(jwks) = &cfg.jwks {
        v.add_jwks(jwks, None)?;
    }
    for entry in &cfg.jwt_issuer_keys {
        let (issuer, source) = entry
            .split_once('=')
            .filter(|(i, s)| !i.is_empty() && !s.is_empty())
            .ok_or_else(|| KeyError::IssuerKeys { entry: entry.clone() })?;
        v.add_jwks(source, Some(issuer))?;
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Opts {
        let mut v = vec!["gateway"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().opts
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_frame_bytes, 262_144);
        assert_eq!(c.max_rooms_per_conn, 5_000);
        assert_eq!(c.history_size, 1_000);
        assert_eq!(c.auth_timeout, Duration::from_secs(5));
        assert!(c.node_id.starts_with("gw-"));
        assert!(!c.dev_mode);
    }

    #[test]
    fn dev_mode_only_without_any_key() {
        let mut c = Config::default();
        assert!(c.enter_dev_mode());
        assert!(c.dev_mode);
        assert_eq!(c.jwt_secret.as_ref().map(String::len), Some(64));
        let mut c = Config::resolve(parse(&["--jwt-secret", "0123456789abcdef0123456789abcdef"])).unwrap();
        assert!(!c.enter_dev_mode());
        assert!(!c.dev_mode);
        let mut c = Config::resolve(parse(&["--jwks", "/etc/keys.json"])).unwrap();
        assert!(!c.enter_dev_mode());
        assert!(c.jwt_secret.is_none());
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nhistory_size = 50\nallowed_origins = [\"https://a.example\"]\n",
        )
        .unwrap();
        let opts = parse(&["--config", path.to_str().unwrap(), "--history-size", "7"]);
        let c = Config::resolve(opts.with_file().unwrap()).unwrap();
        assert_eq!(c.history_size, 7);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.allowed_origins, vec!["https://a.example"]);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()]).with_file().unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
    }

    #[test]
    fn invalid_values_name_the_option() {
        let err = Config::resolve(parse(&["--max-frame-bytes", "0"])).unwrap_err();
        assert!(err.to_string().starts_with("max_frame_bytes"), "{err}");
        let err = Config::resolve(parse(&["--allowed-origins", "example.com"])).unwrap_err();
        assert!(err.to_string().starts_with("allowed_origins"), "{err}");
        let err = Config::resolve(parse(&["--log-format", "xml"])).unwrap_err();
        assert!(err.to_string().starts_with("log_format"), "{err}");
        for (args, option) in [
            (&["--nats-prefix", "gw.x"][..], "nats_prefix"),
            (&["--nats-partitions", "2000"][..], "nats_partitions"),
            (&["--nats-partitions", "0"][..], "nats_partitions"),
            (&["--ephemeral-prefixes", "typing:,"][..], "ephemeral_prefixes"),
            (&["--tls-cert", "/c.pem"][..], "tls_cert"),
            (&["--tree-degree", "1"][..], "tree_degree"),
            (&["--room-metrics-rooms", "general,dm.*"][..], "room_metrics_rooms"),
        ] {
            let err = Config::resolve(parse(args)).unwrap_err();
            assert!(err.to_string().starts_with(option), "{args:?}: {err}");
        }
    }

    #[test]
    fn rate_limits_default_and_room_namespaces_come_from_the_file() {
        let c = Config::default();
        assert_eq!(c.limits.publish, Rate::new(5, 10));
        assert_eq!(c.limits.subscribe_rooms, Rate::new(100, 5_000));
        assert_eq!(c.limits.connects, Rate::new(2_000, 2_000));
        assert_eq!(c.limits.addr_max_conns, 0);
        assert_eq!(c.limits.addr_connects, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "room_publish_per_sec = 40\n[room_limits.ann]\npublish_per_sec = 1\n[room_limits.dm]\npublish_burst = 7\n[room_limits.bots]\npublish_per_sec = 0\n",
        )
        .unwrap();
        let opts = parse(&["--config", path.to_str().unwrap(), "--publish-per-sec", "0"]);
        let c = Config::resolve(opts.with_file().unwrap()).unwrap();
        assert_eq!(c.limits.publish, None, "0 turns a limit off");
        let ns = &c.limits.room_namespaces;
        assert_eq!(ns["ann"], Rate::new(1, 2));
        assert_eq!(ns["dm"], Rate::new(40, 7), "the rate defaults to room_publish_per_sec");
        assert_eq!(ns["bots"], None);
        let err = Config::resolve(Opts {
            room_limits: Some([("a:b".to_string(), RoomLimitOpts::default())].into()),
            ..Opts::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("room_limits"), "{err}");
        let err = Config::resolve(parse(&["--trusted-proxy-header", "bad header"])).unwrap_err();
        assert!(err.to_string().starts_with("trusted_proxy_header"), "{err}");
        let err = Config::resolve(parse(&["--publish-burst", "0"])).unwrap_err();
        assert!(err.to_string().starts_with("publish_burst"), "{err}");
    }

    #[test]
    fn admission_shares_default_to_a_tenth_with_a_floor() {
        let c = Config::default();
        assert_eq!(c.limits.addr_max_handshakes, 100);
        assert_eq!(c.limits.addr_budget, Rate::new(200, 200));
        assert_eq!(c.limits.handshake_shed_after, Duration::from_secs(1));
        let c = Config::resolve(parse(&[
            "--max-handshakes",
            "20",
            "--connects-per-sec",
            "20",
            "--auth-timeout-ms",
            "1000",
        ]))
        .unwrap();
        assert_eq!(c.limits.addr_max_handshakes, 16, "the floor");
        assert_eq!(c.limits.addr_budget, Rate::new(10, 10), "the floor");
        assert_eq!(c.limits.handshake_shed_after, Duration::from_millis(200));
        let c = Config::resolve(parse(&["--max-handshakes", "4", "--connects-per-sec", "5"])).unwrap();
        assert_eq!(c.limits.addr_max_handshakes, 4, "never above the cap");
        assert_eq!(c.limits.addr_budget, Rate::new(5, 5), "never above the budget");
        let c = Config::resolve(parse(&["--addr-budget-per-sec", "0", "--addr-max-handshakes", "0"])).unwrap();
        assert_eq!((c.limits.addr_budget, c.limits.addr_max_handshakes), (None, 0));
        let c = Config::resolve(parse(&["--connects-per-sec", "0"])).unwrap();
        assert_eq!(c.limits.addr_budget, None, "no share of a budget that is off");
    }

    #[test]
    fn auth_and_tls_options() {
        let c = Config::resolve(parse(&[
            "--jwks",
            "https://kc.example.com/realms/chat/protocol/openid-connect/certs",
            "--jwt-issuer-keys",
            "https://kc.example.com/realms/a=/etc/a.json,https://b.example=https://b.example/jwks",
            "--jwt-rooms-claim",
            "chat.rooms",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
        ]))
        .unwrap();
        assert_eq!(c.jwt_issuer_keys.len(), 2);
        assert_eq!(c.jwt_rooms_claim, "chat.rooms");
        assert_eq!(c.jwks_refresh, Duration::from_secs(300));
        assert_eq!(c.jwks_refetch_min, Duration::from_secs(10));
        assert_eq!(c.tls_reload, Duration::from_secs(10));
        let err = Config::resolve(parse(&["--jwt-issuer-keys", "no-equals-sign"])).unwrap_err();
        assert!(err.to_string().starts_with("jwt_issuer_keys"), "{err}");
        let err = Config::resolve(parse(&["--jwt-rooms-claim", "a..b"])).unwrap_err();
        assert!(err.to_string().starts_with("jwt_rooms_claim"), "{err}");
        let err = Config::resolve(parse(&["--tls-cert", "/c.pem"])).unwrap_err();
        assert!(err.to_string().starts_with("tls_cert"), "{err}");
    }

    #[test]
    fn bool_flags_take_no_value() {
        assert_eq!(parse(&["--no-rate-limits"]).no_rate_limits, Some(true));
        assert_eq!(parse(&["--no-rate-limits", "false"]).no_rate_limits, Some(false));
    }

    #[test]
    fn token_subcommand_takes_global_options() {
        let cli = Cli::try_parse_from([
            "gateway",
            "token",
            "--jwt-secret",
            "s",
            "--sub",
            "alice",
            "--rooms",
            "general,team-*",
        ])
        .unwrap();
        assert_eq!(cli.opts.jwt_secret.as_deref(), Some("s"));
        match cli.command {
            Some(Command::Token(t)) => assert_eq!(t.rooms, vec!["general", "team-*"]),
            None => panic!("no subcommand"),
        }
    }
}

//! Configuration: one typed [`Config`] from flags, environment and a TOML file.
//!
//! Precedence: flag, then `GATEWAY_*` environment variable, then the file given
//! by `--config`, then the default. Every option has all three spellings:
//! `--max-frame-bytes`, `GATEWAY_MAX_FRAME_BYTES`, `max_frame_bytes`.
//! Values are validated before any port is bound; an invalid configuration is
//! an error that names the option, never a silent default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::HeaderName;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::auth::jwks::SourceOptions;
use crate::auth::{Grants, KeyError, Pattern, Verifier, VerifyOptions};
use crate::limits::{self, LimitConfig, Rate};
use crate::rooms::RoomId;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about = "WebSocket fan-out gateway for chat.", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: Opts,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a connection token signed with the configured HS256 secret.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Room patterns the user may subscribe to, comma-separated (`*` matches any run of room characters).
    #[arg(long, default_value = "*", value_delimiter = ',')]
    pub rooms: Vec<String>,
    /// Room patterns the user may publish to [default: the value of --rooms].
    #[arg(long = "pub", value_delimiter = ',')]
    pub publish: Option<Vec<String>>,
    /// Lifetime in seconds; 0 for a token without `exp`.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
}

/// Every option, unresolved. The same struct is read from flags/environment
/// (clap) and from the TOML file (serde).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opts {
    /// TOML file with any of the options below (keys in snake_case).
    #[arg(long, env = "GATEWAY_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address for WebSocket (/ws) and HTTP [default: 127.0.0.1:8080].
    #[arg(long, env = "GATEWAY_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// Separate address for Prometheus /metrics [default: served on --listen].
    #[arg(long, env = "GATEWAY_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// This node's id, shown to clients and in metrics [default: gw-<random>].
    #[arg(long, env = "GATEWAY_NODE_ID", global = true)]
    pub node_id: Option<String>,

    /// HS256 secret for connection and room tokens. Without any key the node runs in dev mode.
    #[arg(long, env = "GATEWAY_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key files (RSA, EC or Ed25519), comma-separated.
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY", global = true, value_delimiter = ',')]
    pub jwt_public_key: Option<Vec<PathBuf>>,
    /// A JWKS file or http(s):// URL with verification keys (e.g. a Keycloak realm's .../protocol/openid-connect/certs).
    #[arg(long, env = "GATEWAY_JWKS", global = true)]
    pub jwks: Option<String>,
    /// Accepted `iss` values, comma-separated [default: any].
    #[arg(long, env = "GATEWAY_JWT_ISSUER", global = true, value_delimiter = ',')]
    pub jwt_issuer: Option<Vec<String>>,
    /// Accepted `aud` values, comma-separated [default: any; tokens with `aud` then pass].
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE", global = true, value_delimiter = ',')]
    pub jwt_audience: Option<Vec<String>>,
    /// Clock leeway for `exp` and `nbf`, seconds [default: 5].
    #[arg(long, env = "GATEWAY_JWT_LEEWAY_SECS", global = true)]
    pub jwt_leeway_secs: Option<u64>,
    /// Subscribe grants for tokens without a `rooms` claim, comma-separated patterns [default: none].
    #[arg(long, env = "GATEWAY_DEFAULT_ROOMS", global = true, value_delimiter = ',')]
    pub default_rooms: Option<Vec<String>>,
    /// Publish grants for tokens without a `rooms` claim, comma-separated patterns [default: none].
    #[arg(long, env = "GATEWAY_DEFAULT_PUB", global = true, value_delimiter = ',')]
    pub default_pub: Option<Vec<String>>,
    /// Keys bound to one issuer, comma-separated ISSUER=FILE_OR_URL (JWKS); such keys verify only tokens with that `iss` [default: none].
    #[arg(long, env = "GATEWAY_JWT_ISSUER_KEYS", global = true, value_delimiter = ',')]
    pub jwt_issuer_keys: Option<Vec<String>>,
    /// Dotted path of the claim with room grants, e.g. chat.rooms [default: rooms].
    #[arg(long, env = "GATEWAY_JWT_ROOMS_CLAIM", global = true)]
    pub jwt_rooms_claim: Option<String>,
    /// Interval of routine refetches of JWKS URLs, seconds [default: 300].
    #[arg(long, env = "GATEWAY_JWKS_REFRESH_SECS", global = true)]
    pub jwks_refresh_secs: Option<u64>,
    /// Least time between two JWKS refetches for tokens with an unknown kid, seconds [default: 10].
    #[arg(long, env = "GATEWAY_JWKS_REFETCH_MIN_SECS", global = true)]
    pub jwks_refetch_min_secs: Option<u64>,
    /// Interval at which --tls-cert and --tls-key are checked for a new certificate, ms [default: 10000]. SIGHUP also reloads.
    #[arg(long, env = "GATEWAY_TLS_RELOAD_MS", global = true)]
    pub tls_reload_ms: Option<u64>,

    /// NATS URLs, comma-separated: cluster mode (JetStream for durable rooms) [default: embedded, no NATS].
    #[arg(long, env = "GATEWAY_NATS", global = true)]
    pub nats: Option<String>,
    /// Subject prefix in NATS; streams are named <PREFIX>_ROOMS_<n> [default: gw].
    #[arg(long, env = "GATEWAY_NATS_PREFIX", global = true)]
    pub nats_prefix: Option<String>,
    /// Number of JetStream streams rooms are spread over (by a hash of the name); the same on every node [default: 8].
    #[arg(long, env = "GATEWAY_NATS_PARTITIONS", global = true)]
    pub nats_partitions: Option<u32>,
    /// Replicas of each room stream (3 in production) [default: 1].
    #[arg(long, env = "GATEWAY_NATS_REPLICAS", global = true)]
    pub nats_replicas: Option<usize>,
    /// Age after which stored room messages expire, seconds; 0 keeps them [default: 0].
    #[arg(long, env = "GATEWAY_ROOM_MAX_AGE_SECS", global = true)]
    pub room_max_age_secs: Option<u64>,
    /// Room-name prefixes of ephemeral rooms (no storage, no history; e.g. typing:), comma-separated [default: none].
    #[arg(long, env = "GATEWAY_EPHEMERAL_PREFIXES", global = true, value_delimiter = ',')]
    pub ephemeral_prefixes: Option<Vec<String>>,
    /// How long a node stays subscribed to a room after its last local member left, ms [default: 5000].
    #[arg(long, env = "GATEWAY_ROOM_LINGER_MS", global = true)]
    pub room_linger_ms: Option<u64>,
    /// How long a durable publish waits for the stream's acknowledgement, ms [default: 5000].
    #[arg(long, env = "GATEWAY_PUBLISH_TIMEOUT_MS", global = true)]
    pub publish_timeout_ms: Option<u64>,
    /// Connect only to the --nats URLs, never to servers the cluster announces (NATS behind a load balancer or NAT) [default: false].
    #[arg(long, env = "GATEWAY_NATS_IGNORE_DISCOVERED", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub nats_ignore_discovered: Option<bool>,
    /// How long the node waits for NATS at start, ms [default: 10000].
    #[arg(long, env = "GATEWAY_NATS_CONNECT_TIMEOUT_MS", global = true)]
    pub nats_connect_timeout_ms: Option<u64>,
    /// PEM certificate chain: serve wss:// (with --tls-key).
    #[arg(long, env = "GATEWAY_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Origins allowed to upgrade, comma-separated (e.g. https://chat.example.com) [default: any].
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", global = true, value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Whether upgrades without an Origin header (non-browser clients) are allowed [default: true].
    #[arg(long, env = "GATEWAY_ALLOW_NO_ORIGIN", global = true)]
    pub allow_no_origin: Option<bool>,

    /// Room size (members) at which a room fans out through the tiered tree [default: 10000].
    #[arg(long, env = "GATEWAY_TREE_THRESHOLD", global = true)]
    pub tree_threshold: Option<usize>,
    /// Fan-out per node of the tiered tree [default: 16].
    #[arg(long, env = "GATEWAY_TREE_DEGREE", global = true)]
    pub tree_degree: Option<usize>,
    /// Flusher tasks writing room messages to sockets; a room's members are spread over them (0 = one per CPU core) [default: 0].
    #[arg(long, env = "GATEWAY_FANOUT_SHARDS", global = true)]
    pub fanout_shards: Option<usize>,
    /// Most rooms shown by name on /metrics: the busiest of the last 30-60 s among those matching --room-metrics-rooms; the rest are summed in room="_other" (0 = no per-room series) [default: 20].
    #[arg(long, env = "GATEWAY_ROOM_METRICS_TOP", global = true)]
    pub room_metrics_top: Option<usize>,
    /// Room patterns that may appear by name in /metrics labels, comma-separated (`*` matches any run of room characters, e.g. general,team-*); room names are user data, so none by default [default: none].
    #[arg(long, env = "GATEWAY_ROOM_METRICS_ROOMS", global = true, value_delimiter = ',')]
    pub room_metrics_rooms: Option<Vec<String>>,
    /// Turn every rate limit and admission budget off (benchmarks, trusted networks); connection-count limits stay.
    #[arg(long, env = "GATEWAY_NO_RATE_LIMITS", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub no_rate_limits: Option<bool>,
    /// Publishes per second per connection; 0 turns the limit off [default: 5].
    #[arg(long, env = "GATEWAY_PUBLISH_PER_SEC", global = true)]
    pub publish_per_sec: Option<u32>,
    /// Publish burst per connection [default: 2 x --publish-per-sec].
    #[arg(long, env = "GATEWAY_PUBLISH_BURST", global = true)]
    pub publish_burst: Option<u32>,
    /// Publishes per second per user, across that user's connections on this node; 0 = off [default: 10].
    #[arg(long, env = "GATEWAY_USER_PUBLISH_PER_SEC", global = true)]
    pub user_publish_per_sec: Option<u32>,
    /// Publish burst per user [default: 2 x --user-publish-per-sec].
    #[arg(long, env = "GATEWAY_USER_PUBLISH_BURST", global = true)]
    pub user_publish_burst: Option<u32>,
    /// Publishes per second per room entering through this node; 0 = off [default: 100].
    #[arg(long, env = "GATEWAY_ROOM_PUBLISH_PER_SEC", global = true)]
    pub room_publish_per_sec: Option<u32>,
    /// Publish burst per room [default: 2 x --room-publish-per-sec].
    #[arg(long, env = "GATEWAY_ROOM_PUBLISH_BURST", global = true)]
    pub room_publish_burst: Option<u32>,
    /// Per-room publish limits by room namespace (the name before the first `:`), TOML only:
    /// `[room_limits.ann]` with `publish_per_sec` (0 = unlimited) and `publish_burst`.
    #[arg(skip)]
    pub room_limits: Option<BTreeMap<String, RoomLimitOpts>>,
    /// Rooms subscribed per second per connection (a frame costs its room count); 0 = off [default: 100].
    #[arg(long, env = "GATEWAY_SUBSCRIBE_ROOMS_PER_SEC", global = true)]
    pub subscribe_rooms_per_sec: Option<u32>,
    /// Rooms one connection may subscribe at once [default: --max-rooms-per-conn].
    #[arg(long, env = "GATEWAY_SUBSCRIBE_ROOMS_BURST", global = true)]
    pub subscribe_rooms_burst: Option<u32>,
    /// `history` requests per second per connection; 0 = off [default: 5].
    #[arg(long, env = "GATEWAY_HISTORY_PER_SEC", global = true)]
    pub history_per_sec: Option<u32>,
    /// `history` burst per connection [default: 2 x --history-per-sec].
    #[arg(long, env = "GATEWAY_HISTORY_BURST", global = true)]
    pub history_burst: Option<u32>,
    /// Bytes per second of client frames per connection; 0 = off [default: 65536].
    #[arg(long, env = "GATEWAY_CLIENT_BYTES_PER_SEC", global = true)]
    pub client_bytes_per_sec: Option<u32>,
    /// Byte burst per connection [default: 2 x --client-bytes-per-sec, at least 2 x --max-frame-bytes].
    #[arg(long, env = "GATEWAY_CLIENT_BYTES_BURST", global = true)]
    pub client_bytes_burst: Option<u32>,
    /// Bytes per second one connection may be sent from history (`since` catch-up and `history` pages), on top of a burst of --catchup-max-bytes; beyond, rooms answer recovered:false and `history` rate_limited; 0 = off [default: 1048576].
    #[arg(long, env = "GATEWAY_REPLAY_BYTES_PER_SEC", global = true)]
    pub replay_bytes_per_sec: Option<u32>,
    /// `rate_limited` replies tolerated per window; one more closes with 4008 [default: 20].
    #[arg(long, env = "GATEWAY_MAX_RATE_LIMITED", global = true)]
    pub max_rate_limited: Option<u32>,
    /// Window for --max-rate-limited, ms [default: 10000].
    #[arg(long, env = "GATEWAY_RATE_LIMITED_WINDOW_MS", global = true)]
    pub rate_limited_window_ms: Option<u64>,
    /// New connections per second on this node; more get HTTP 503 with Retry-After; 0 = off [default: 2000].
    #[arg(long, env = "GATEWAY_CONNECTS_PER_SEC", global = true)]
    pub connects_per_sec: Option<u32>,
    /// Burst of new connections [default: --connects-per-sec].
    #[arg(long, env = "GATEWAY_CONNECTS_BURST", global = true)]
    pub connects_burst: Option<u32>,
    /// Upgrades accepted but not yet through `connect`; more get HTTP 503; 0 = off [default: 1000].
    #[arg(long, env = "GATEWAY_MAX_HANDSHAKES", global = true)]
    pub max_handshakes: Option<usize>,
    /// Open connections per client address; more get HTTP 429; 0 = off [default: 0].
    #[arg(long, env = "GATEWAY_ADDR_MAX_CONNS", global = true)]
    pub addr_max_conns: Option<usize>,
    /// New connections per second per client address; more get HTTP 429; 0 = off [default: 0].
    #[arg(long, env = "GATEWAY_ADDR_CONNECTS_PER_SEC", global = true)]
    pub addr_connects_per_sec: Option<u32>,
    /// Burst of new connections per client address [default: --addr-connects-per-sec].
    #[arg(long, env = "GATEWAY_ADDR_CONNECTS_BURST", global = true)]
    pub addr_connects_burst: Option<u32>,
    /// One client address's share of --max-handshakes: while the table is full, an address holding fewer handshakes takes the place of the oldest silent one (closed with 4001), one holding this many gets HTTP 503; 0 = no share, any address may shed [default: --max-handshakes / 10, at least 16].
    #[arg(long, env = "GATEWAY_ADDR_MAX_HANDSHAKES", global = true)]
    pub addr_max_handshakes: Option<usize>,
    /// A handshake silent (no frame since the upgrade) for this long may be shed to make room in a full table, ms [default: --auth-timeout-ms / 5].
    #[arg(long, env = "GATEWAY_HANDSHAKE_SHED_AFTER_MS", global = true)]
    pub handshake_shed_after_ms: Option<u64>,
    /// One client address's share of --connects-per-sec: past it, the address is admitted only while the node budget holds more than half its burst, so the rest stays for other addresses; 0 = no share [default: --connects-per-sec / 10, at least 10].
    #[arg(long, env = "GATEWAY_ADDR_BUDGET_PER_SEC", global = true)]
    pub addr_budget_per_sec: Option<u32>,
    /// Burst of one client address's share of the connection budget [default: --connects-burst / 10, at least 10].
    #[arg(long, env = "GATEWAY_ADDR_BUDGET_BURST", global = true)]
    pub addr_budget_burst: Option<u32>,
    /// Header set by a trusted proxy with the client address (e.g. X-Forwarded-For; its right-most entry is used) [default: none, the socket address].
    #[arg(long, env = "GATEWAY_TRUSTED_PROXY_HEADER", global = true)]
    pub trusted_proxy_header: Option<String>,
    /// Keys (users, rooms, addresses) one keyed rate limiter may hold after pruning before it is reset [default: 100000].
    #[arg(long, env = "GATEWAY_RATE_LIMIT_MAX_KEYS", global = true)]
    pub rate_limit_max_keys: Option<usize>,

    /// Time a new connection has to send `connect`, ms [default: 5000].
    #[arg(long, env = "GATEWAY_AUTH_TIMEOUT_MS", global = true)]
    pub auth_timeout_ms: Option<u64>,
    /// Largest client frame, bytes; larger closes with 1009. The default fits a `subscribe` of 2,000 rooms with 64-character names and `since` [default: 262144].
    #[arg(long, env = "GATEWAY_MAX_FRAME_BYTES", global = true)]
    pub max_frame_bytes: Option<usize>,
    /// Rooms one connection may be subscribed to [default: 5000].
    #[arg(long, env = "GATEWAY_MAX_ROOMS_PER_CONN", global = true)]
    pub max_rooms_per_conn: Option<usize>,
    /// WebSocket connections on this node; more are closed with 4029 [default: 50000].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// Bytes queued for one connection (pushes, replies, catch-up, history pages and the batch being written) before it is closed as a slow consumer (4009) [default: 4194304].
    #[arg(long, env = "GATEWAY_OUTBOX_MAX_BYTES", global = true)]
    pub outbox_max_bytes: Option<usize>,
    /// Frames queued for one connection (counted like --outbox-max-bytes) before it is closed as a slow consumer (4009) [default: 16384].
    #[arg(long, env = "GATEWAY_OUTBOX_MAX_FRAMES", global = true)]
    pub outbox_max_frames: Option<usize>,
    /// A socket write that makes no progress for this long closes the connection as slow, ms [default: 10000].
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT_MS", global = true)]
    pub write_timeout_ms: Option<u64>,

    /// Messages kept per room for `since` and `history` [default: 1000].
    #[arg(long, env = "GATEWAY_HISTORY_SIZE", global = true)]
    pub history_size: Option<usize>,
    /// Bytes kept per room for `since` and `history` [default: 4194304].
    #[arg(long, env = "GATEWAY_HISTORY_MAX_BYTES", global = true)]
    pub history_max_bytes: Option<usize>,
    /// Largest `limit` of one `history` page [default: 200].
    #[arg(long, env = "GATEWAY_HISTORY_PAGE_MAX", global = true)]
    pub history_page_max: Option<usize>,
    /// How long a publish `key` is remembered for de-duplication, ms [default: 120000].
    #[arg(long, env = "GATEWAY_DEDUP_WINDOW_MS", global = true)]
    pub dedup_window_ms: Option<u64>,
    /// Publish keys remembered per room [default: 10000].
    #[arg(long, env = "GATEWAY_DEDUP_MAX_KEYS", global = true)]
    pub dedup_max_keys: Option<usize>,
    /// Rooms with state (members or history) on this node [default: 1000000].
    #[arg(long, env = "GATEWAY_MAX_ROOMS", global = true)]
    pub max_rooms: Option<usize>,
    /// Bytes of missed messages one `subscribe` may replay (also the burst of --replay-bytes-per-sec); rooms beyond answer recovered:false [default: 4194304].
    #[arg(long, env = "GATEWAY_CATCHUP_MAX_BYTES", global = true)]
    pub catchup_max_bytes: Option<usize>,

    /// Coalescing interval of `activity` pushes for notify-mode rooms, ms [default: 1000].
    #[arg(long, env = "GATEWAY_ACTIVITY_INTERVAL_MS", global = true)]
    pub activity_interval_ms: Option<u64>,
    /// Interval of WebSocket pings from the server, ms [default: 25000].
    #[arg(long, env = "GATEWAY_PING_INTERVAL_MS", global = true)]
    pub ping_interval_ms: Option<u64>,
    /// A connection that sends nothing (not even a pong) for this long is closed, ms [default: 70000].
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT_MS", global = true)]
    pub idle_timeout_ms: Option<u64>,
    /// Bad frames tolerated per minute before closing with 4008 [default: 20].
    #[arg(long, env = "GATEWAY_MAX_BAD_FRAMES", global = true)]
    pub max_bad_frames: Option<u32>,
    /// Time the node takes on shutdown to close every connection with 1012 and exit, ms [default: 10000].
    #[arg(long, env = "GATEWAY_DRAIN_TIMEOUT_MS", global = true)]
    pub drain_timeout_ms: Option<u64>,
    /// Window over which drain closes are spread so clients do not reconnect all at once, ms [default: 2000].
    #[arg(long, env = "GATEWAY_DRAIN_SPREAD_MS", global = true)]
    pub drain_spread_ms: Option<u64>,

    /// Log format: text or json [default: text].
    #[arg(long, env = "GATEWAY_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Log filter (tracing EnvFilter syntax, e.g. info,gateway=debug) [default: info; RUST_LOG also works].
    #[arg(long, env = "GATEWAY_LOG", global = true)]
    pub log: Option<String>,
}

macro_rules! prefer {
    ($a:ident, $b:ident, $($f:ident),* $(,)?) => {
        Opts { config: $a.config.or($b.config), $($f: $a.$f.or($b.$f)),* }
    };
}

impl Opts {
    /// `self` where set, else `file`.
    pub fn or(self, file: Opts) -> Opts {
        let a = self;
        let b = file;
        prefer!(
            a,
            b,
            listen,
            metrics_listen,
            node_id,
            jwt_secret,
            jwt_public_key,
            jwks,
            jwt_issuer,
            jwt_audience,
            jwt_leeway_secs,
            default_rooms,
            default_pub,
            jwt_issuer_keys,
            jwt_rooms_claim,
            jwks_refresh_secs,
            jwks_refetch_min_secs,
            tls_reload_ms,
            nats,
            nats_prefix,
            nats_partitions,
            nats_replicas,
            room_max_age_secs,
            ephemeral_prefixes,
            room_linger_ms,
            publish_timeout_ms,
            nats_connect_timeout_ms,
            nats_ignore_discovered,
            tls_cert,
            tls_key,
            allowed_origins,
            allow_no_origin,
            tree_threshold,
            tree_degree,
            fanout_shards,
            room_metrics_top,
            room_metrics_rooms,
            no_rate_limits,
            publish_per_sec,
            publish_burst,
            user_publish_per_sec,
            user_publish_burst,
            room_publish_per_sec,
            room_publish_burst,
            room_limits,
            subscribe_rooms_per_sec,
            subscribe_rooms_burst,
            history_per_sec,
            history_burst,
            client_bytes_per_sec,
            client_bytes_burst,
            replay_bytes_per_sec,
            max_rate_limited,
            rate_limited_window_ms,
            connects_per_sec,
            connects_burst,
            max_handshakes,
            addr_max_conns,
            addr_connects_per_sec,
            addr_connects_burst,
            trusted_proxy_header,
            addr_max_handshakes,
            handshake_shed_after_ms,
            addr_budget_per_sec,
            addr_budget_burst,
            rate_limit_max_keys,
            auth_timeout_ms,
            max_frame_bytes,
            max_rooms_per_conn,
            max_connections,
            outbox_max_bytes,
            outbox_max_frames,
            write_timeout_ms,
            history_size,
            history_max_bytes,
            history_page_max,
            dedup_window_ms,
            dedup_max_keys,
            max_rooms,
            catchup_max_bytes,
            activity_interval_ms,
            ping_interval_ms,
            idle_timeout_ms,
            max_bad_frames,
            drain_timeout_ms,
            drain_spread_ms,
            log_format,
            log,
        )
    }

    /// Reads the TOML file named by `--config` (if any) and merges it under `self`.
    pub fn with_file(self) -> Result<Opts, ConfigError> {
        match self.config.clone() {
            None => Ok(self),
            Some(path) => Ok(self.or(read_file(&path)?)),
        }
    }
}

fn read_file(path: &Path) -> Result<Opts, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.display().to_string(),
        source,
    })
}

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

fn invalid(option: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        problem: problem.into(),
    }
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
    /// Node id. Default gw-<8 random hex digits>.
    pub node_id: String,
    /// HS256 secret. Default none (dev mode when no key at all).
    pub jwt_secret: Option<String>,
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
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Allowed origins; empty = any.
    pub allowed_origins: Vec<String>,
    /// Allow upgrades without Origin. Default true.
    pub allow_no_origin: bool,
    /// Default 10,000 members.
    pub tree_threshold: usize,
    /// Default 16.
    pub tree_degree: usize,
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
    /// Default 5,000.
    pub max_rooms_per_conn: usize,
    /// Default 50,000.
    pub max_connections: usize,
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

impl Default for Config {
    fn default() -> Self {
        Config::resolve(Opts::default()).expect("defaults are valid")
    }
}

fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

fn positive<T: PartialOrd + Default + Copy>(option: &'static str, v: Option<T>, default: T) -> Result<T, ConfigError> {
    let v = v.unwrap_or(default);
    if v <= T::default() {
        return Err(invalid(option, "must be greater than 0"));
    }
    Ok(v)
}

impl Config {
    /// Applies defaults and checks every value.
    pub fn resolve(o: Opts) -> Result<Config, ConfigError> {
        let limits = resolve_limits(&o)?;
        let nats: Vec<String> = o
            .nats
            .as_deref()
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let nats_prefix = o.nats_prefix.unwrap_or_else(|| "gw".to_string());
        if nats_prefix.is_empty()
            || !nats_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "nats_prefix",
                "must be letters, digits, _ or - (one subject token)",
            ));
        }
        let nats_partitions = positive("nats_partitions", o.nats_partitions, 8)?;
        if nats_partitions > 1024 {
            return Err(invalid("nats_partitions", "at most 1024"));
        }
        let ephemeral_prefixes = o.ephemeral_prefixes.unwrap_or_default();
        if ephemeral_prefixes.iter().any(String::is_empty) {
            return Err(invalid(
                "ephemeral_prefixes",
                "an empty prefix would make every room ephemeral",
            ));
        }
        if o.tls_cert.is_some() != o.tls_key.is_some() {
            return Err(invalid("tls_cert", "--tls-cert and --tls-key go together"));
        }
        for entry in o.jwt_issuer_keys.iter().flatten() {
            if !entry
                .split_once('=')
                .is_some_and(|(i, k)| !i.is_empty() && !k.is_empty())
            {
                return Err(invalid(
                    "jwt_issuer_keys",
                    format!("{entry:?} is not ISSUER=FILE_OR_URL"),
                ));
            }
        }
        let jwt_rooms_claim = o.jwt_rooms_claim.unwrap_or_else(|| "rooms".to_string());
        if jwt_rooms_claim.split('.').any(str::is_empty) {
            return Err(invalid(
                "jwt_rooms_claim",
                "must be a dotted path like rooms or chat.rooms",
            ));
        }
        if let Some(s) = &o.jwt_secret
            && s.len() < crate::auth::MIN_HMAC_SECRET_BYTES
        {
            // RFC 7518 section 3.2: an HS256 key as long as the hash output.
            // Dev mode (no key configured) makes a random 32-byte secret.
            return Err(invalid(
                "jwt_secret",
                format!(
                    "must be at least {} bytes (RFC 7518 section 3.2), got {}",
                    crate::auth::MIN_HMAC_SECRET_BYTES,
                    s.len()
                ),
            ));
        }
        let log_format = match o.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log_format", format!("{other:?} is not text or json"))),
        };
        let max_frame_bytes = positive("max_frame_bytes", o.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES)?;
        let outbox_max_bytes = positive("outbox_max_bytes", o.outbox_max_bytes, 4 << 20)?;
        if outbox_max_bytes < max_frame_bytes {
            return Err(invalid(
                "outbox_max_bytes",
                format!("must be at least max_frame_bytes ({max_frame_bytes})"),
            ));
        }
        let tree_degree = o.tree_degree.unwrap_or(16);
        if tree_degree < 2 {
            return Err(invalid("tree_degree", "must be at least 2"));
        }
        for origin in o.allowed_origins.iter().flatten() {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
                return Err(invalid(
                    "allowed_origins",
                    format!("{origin:?} is not an origin like https://chat.example.com"),
                ));
            }
        }
        let mut room_metrics_rooms = Vec::new();
        for p in o.room_metrics_rooms.iter().flatten() {
            let valid = !p.is_empty()
                && p.len() <= RoomId::MAX_LEN
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:*".contains(&b));
            if !valid {
                return Err(invalid(
                    "room_metrics_rooms",
                    format!("{p:?} is not a room pattern (room characters and *)"),
                ));
            }
            room_metrics_rooms.push(Pattern::new(p));
        }
        let node_id = match o.node_id {
            Some(id) if id.is_empty() || id.len() > 64 => {
                return Err(invalid("node_id", "must be 1 to 64 characters"));
            }
            Some(id) => id,
            None => format!("gw-{:08x}", rand::random::<u32>()),
        };
        Ok(Config {
            listen: o.listen.unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid")),
            metrics_listen: o.metrics_listen,
            node_id,
            jwt_secret: o.jwt_secret,
            jwt_public_keys: o.jwt_public_key.unwrap_or_default(),
            jwks: o.jwks,
            jwt_issuers: o.jwt_issuer.unwrap_or_default(),
            jwt_audiences: o.jwt_audience.unwrap_or_default(),
            jwt_leeway: Duration::from_secs(o.jwt_leeway_secs.unwrap_or(5)),
            default_rooms: o.default_rooms.unwrap_or_default(),
            default_pub: o.default_pub.unwrap_or_default(),
            jwt_issuer_keys: o.jwt_issuer_keys.unwrap_or_default(),
            jwt_rooms_claim,
            jwks_refresh: Duration::from_secs(positive("jwks_refresh_secs", o.jwks_refresh_secs, 300)?),
            jwks_refetch_min: Duration::from_secs(o.jwks_refetch_min_secs.unwrap_or(10)),
            tls_reload: ms(Some(positive("tls_reload_ms", o.tls_reload_ms, 10_000)?), 0),
            nats,
            nats_prefix,
            nats_partitions,
            nats_replicas: positive("nats_replicas", o.nats_replicas, 1)?,
            room_max_age: Duration::from_secs(o.room_max_age_secs.unwrap_or(0)),
            ephemeral_prefixes,
            room_linger: ms(o.room_linger_ms, 5_000),
            publish_timeout: ms(Some(positive("publish_timeout_ms", o.publish_timeout_ms, 5_000)?), 0),
            nats_ignore_discovered: o.nats_ignore_discovered.unwrap_or(false),
            nats_connect_timeout: ms(
                Some(positive("nats_connect_timeout_ms", o.nats_connect_timeout_ms, 10_000)?),
                0,
            ),
            tls_cert: o.tls_cert,
            tls_key: o.tls_key,
            allowed_origins: o.allowed_origins.unwrap_or_default(),
            allow_no_origin: o.allow_no_origin.unwrap_or(true),
            tree_threshold: positive("tree_threshold", o.tree_threshold, 10_000)?,
            tree_degree,
            fanout_shards: match o.fanout_shards.unwrap_or(0) {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            room_metrics_top: o.room_metrics_top.unwrap_or(20),
            room_metrics_rooms,
            no_rate_limits: o.no_rate_limits.unwrap_or(false),
            limits,
            auth_timeout: ms(Some(positive("auth_timeout_ms", o.auth_timeout_ms, 5_000)?), 0),
            max_frame_bytes,
            max_rooms_per_conn: positive("max_rooms_per_conn", o.max_rooms_per_conn, 5_000)?,
            max_connections: positive("max_connections", o.max_connections, 50_000)?,
            outbox_max_bytes,
            outbox_max_frames: positive("outbox_max_frames", o.outbox_max_frames, 16_384)?,
            write_timeout: ms(Some(positive("write_timeout_ms", o.write_timeout_ms, 10_000)?), 0),
            history_size: positive("history_size", o.history_size, 1_000)?,
            history_max_bytes: positive("history_max_bytes", o.history_max_bytes, 4 << 20)?,
            history_page_max: positive("history_page_max", o.history_page_max, 200)?,
            dedup_window: ms(o.dedup_window_ms, 120_000),
            dedup_max_keys: positive("dedup_max_keys", o.dedup_max_keys, 10_000)?,
            max_rooms: positive("max_rooms", o.max_rooms, 1_000_000)?,
            catchup_max_bytes: o.catchup_max_bytes.unwrap_or(DEFAULT_CATCHUP_MAX_BYTES),
            activity_interval: ms(
                Some(positive("activity_interval_ms", o.activity_interval_ms, 1_000)?),
                0,
            ),
            ping_interval: ms(Some(positive("ping_interval_ms", o.ping_interval_ms, 25_000)?), 0),
            idle_timeout: ms(Some(positive("idle_timeout_ms", o.idle_timeout_ms, 70_000)?), 0),
            max_bad_frames: o.max_bad_frames.unwrap_or(20),
            drain_timeout: ms(o.drain_timeout_ms, 10_000),
            drain_spread: ms(o.drain_spread_ms, 2_000),
            log_format,
            log: o.log.unwrap_or_else(|| "info".to_string()),
        })
    }
}

/// The verifier described by the configuration: options, secret, PEM keys,
/// `--jwks` and `--jwt-issuer-keys`. Reads files now; JWKS URLs are fetched
/// once [`Verifier::start`] runs (or on first use).
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

/// Per-room publish limits of one room namespace (TOML `[room_limits.NAME]`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomLimitOpts {
    /// Publishes per second per room of the namespace; 0 = unlimited [default: --room-publish-per-sec].
    pub publish_per_sec: Option<u32>,
    /// Burst per room [default: 2 x publish_per_sec].
    pub publish_burst: Option<u32>,
}

/// A rate from a `per_sec` and a `burst` option: off when the rate is 0; an
/// unset burst is `burst_default(rate)`.
fn rate(
    option: &'static str,
    per_sec: Option<u32>,
    burst: Option<u32>,
    default: u32,
    burst_default: impl Fn(u32) -> u32,
) -> Result<Option<Rate>, ConfigError> {
    let per_sec = per_sec.unwrap_or(default);
    if burst == Some(0) && per_sec > 0 {
        return Err(invalid(option, "burst must be greater than 0"));
    }
    Ok(Rate::new(per_sec, burst.unwrap_or_else(|| burst_default(per_sec))))
}

/// Default `--max-frame-bytes`: a `subscribe` of 2,000 rooms, each with a
/// 64-character name and a 20-digit `since`, is about 210,000 bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;
/// Default `--catchup-max-bytes`.
pub const DEFAULT_CATCHUP_MAX_BYTES: usize = 4 << 20;

fn resolve_limits(o: &Opts) -> Result<LimitConfig, ConfigError> {
    let twice = |r: u32| r.saturating_mul(2);
    let same = |r: u32| r;
    let room_publish = rate(
        "room_publish_burst",
        o.room_publish_per_sec,
        o.room_publish_burst,
        100,
        twice,
    )?;
    let mut room_namespaces = BTreeMap::new();
    for (ns, l) in o.room_limits.iter().flatten() {
        let valid = !ns.is_empty()
            && ns.len() < RoomId::MAX_LEN
            && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(invalid(
                "room_limits",
                format!("{ns:?} is not a room namespace (the part of a room name before ':')"),
            ));
        }
        let per_sec = l.publish_per_sec.or(room_publish.map(|r| r.per_sec));
        room_namespaces.insert(ns.clone(), rate("room_limits", per_sec, l.publish_burst, 0, twice)?);
    }
    let max_rooms = o.max_rooms_per_conn.unwrap_or(5_000);
    let max_rooms = u32::try_from(max_rooms).unwrap_or(u32::MAX);
    let max_frame = o.max_frame_bytes.unwrap_or(DEFAULT_MAX_FRAME_BYTES);
    let catchup_max = o.catchup_max_bytes.unwrap_or(DEFAULT_CATCHUP_MAX_BYTES);
    let header = match o.trusted_proxy_header.as_deref() {
        None | Some("") => None,
        Some(h) => Some(
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid("trusted_proxy_header", format!("{h:?} is not an HTTP header name")))?,
        ),
    };
    let connects = rate("connects_burst", o.connects_per_sec, o.connects_burst, 2_000, same)?;
    let max_handshakes = o.max_handshakes.unwrap_or(1_000);
    let auth_timeout_ms = o.auth_timeout_ms.unwrap_or(5_000);
    // A share of a budget that is off is off too.
    let addr_budget = match connects.and_then(limits::budget_share) {
        None => None,
        Some(share) => rate(
            "addr_budget_burst",
            o.addr_budget_per_sec,
            o.addr_budget_burst,
            share.per_sec,
            |_| share.burst,
        )?,
    };
    Ok(LimitConfig {
        publish: rate("publish_burst", o.publish_per_sec, o.publish_burst, 5, twice)?,
        user_publish: rate(
            "user_publish_burst",
            o.user_publish_per_sec,
            o.user_publish_burst,
            10,
            twice,
        )?,
        room_publish,
        room_namespaces,
        subscribe_rooms: rate(
            "subscribe_rooms_burst",
            o.subscribe_rooms_per_sec,
            o.subscribe_rooms_burst,
            100,
            |_| max_rooms,
        )?,
        history: rate("history_burst", o.history_per_sec, o.history_burst, 5, twice)?,
        client_bytes: rate(
            "client_bytes_burst",
            o.client_bytes_per_sec,
            o.client_bytes_burst,
            64 * 1024,
            // A frame up to the limit must fit the burst after a `connect`.
            |r| twice(r).max(twice(u32::try_from(max_frame).unwrap_or(u32::MAX))),
        )?,
        replay_bytes: rate("replay_bytes_per_sec", o.replay_bytes_per_sec, None, 1 << 20, |_| {
            u32::try_from(catchup_max).unwrap_or(u32::MAX)
        })?,
        max_rate_limited: o.max_rate_limited.unwrap_or(20),
        rate_limited_window: ms(
            Some(positive("rate_limited_window_ms", o.rate_limited_window_ms, 10_000)?),
            0,
        ),
        connects,
        max_handshakes,
        addr_max_handshakes: o
            .addr_max_handshakes
            .unwrap_or_else(|| limits::handshake_share(max_handshakes)),
        addr_budget,
        handshake_shed_after: ms(o.handshake_shed_after_ms, auth_timeout_ms / 5),
        addr_max_conns: o.addr_max_conns.unwrap_or(0),
        addr_connects: rate(
            "addr_connects_burst",
            o.addr_connects_per_sec,
            o.addr_connects_burst,
            0,
            same,
        )?,
        trusted_proxy_header: header,
        max_keys: positive("rate_limit_max_keys", o.rate_limit_max_keys, 100_000)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

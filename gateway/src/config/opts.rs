//! The options as given: the command line (clap) and the TOML file (serde),
//! one [`Opts`] struct for both, unresolved.
//!
//! Owns every option's three spellings (`--max-frame-bytes`,
//! `GATEWAY_MAX_FRAME_BYTES`, `max_frame_bytes`), its help text, the `token`
//! subcommand, and the merge "flag or environment, then file" ([`Opts::or`],
//! [`Opts::with_file`]). Does not own defaults or validation: every field is
//! an `Option` here and `config::resolve` decides what an unset or invalid
//! value means.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::config::ConfigError;

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
    /// Address of the server API for application backends (POST /api/<method>, docs/server-api.md); never the --listen port; needs --api-key [default: off].
    #[arg(long, env = "GATEWAY_API_LISTEN", global = true)]
    pub api_listen: Option<SocketAddr>,
    /// Keys accepted by the server API (header `Authorization: apikey <KEY>`), comma-separated so one can be rotated; at least 16 characters each [default: none].
    #[arg(
        long,
        env = "GATEWAY_API_KEY",
        global = true,
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Option<Vec<String>>,
    /// Largest server API request body, bytes; a bigger one is answered too_large (HTTP 413) [default: 1048576].
    #[arg(long, env = "GATEWAY_API_MAX_BODY_BYTES", global = true)]
    pub api_max_body_bytes: Option<usize>,
    /// Server API requests per second on this node (all keys together, refused ones included), burst 2x; more are answered rate_limited (HTTP 429); 0 = off [default: 1000].
    #[arg(long, env = "GATEWAY_API_REQUESTS_PER_SEC", global = true)]
    pub api_requests_per_sec: Option<u32>,
    /// Rooms with at most this many members get a user list in `presence` answers and the server API's `room` (0 = counts only). Lists are read from the room's member set when asked or summarized, so the bound caps that read, not a per-join cost [default: 1000].
    #[arg(long, env = "GATEWAY_PRESENCE_LIST_MAX", global = true)]
    pub presence_list_max: Option<usize>,
    /// Interval of each gateway's presence summary over NATS and of presence pushes (joins and leaves, coalesced), ms; a dead gateway's members leave the cluster-wide counts within 3 intervals [default: 1000].
    #[arg(long, env = "GATEWAY_PRESENCE_INTERVAL_MS", global = true)]
    pub presence_interval_ms: Option<u64>,
    /// This node's id, shown to clients and in metrics [default: gw-<random>].
    #[arg(long, env = "GATEWAY_NODE_ID", global = true)]
    pub node_id: Option<String>,

    /// HS256 secret for connection and room tokens. Without any key the node runs in dev mode (a random secret for this run, the demo chat at / and a token endpoint at /dev/token).
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
    /// How long a durable publish waits for the stream's acknowledgement, and any other JetStream API request (a stream read from its leader) for its answer, ms [default: 5000].
    #[arg(long, env = "GATEWAY_PUBLISH_TIMEOUT_MS", global = true)]
    pub publish_timeout_ms: Option<u64>,
    /// Connect only to the --nats URLs, never to servers the cluster announces (NATS behind a load balancer or NAT) [default: false].
    #[arg(long, env = "GATEWAY_NATS_IGNORE_DISCOVERED", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub nats_ignore_discovered: Option<bool>,
    /// JetStream domain of the streams, for a node connected to a NATS leaf node whose JetStream runs in the hub cluster (JetStream API requests go to $JS.<DOMAIN>.API) [default: none: the local account's JetStream].
    #[arg(long, env = "GATEWAY_NATS_JS_DOMAIN", global = true)]
    pub nats_js_domain: Option<String>,
    /// How long the node waits for NATS at start (the connection, then JetStream: the room streams and the revocation bucket), ms [default: 10000].
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

    /// Local members of a room (per codec) above which this node splits the room's fan-out into member shards that run on all cores in parallel; at or below it the room fans out inline on one core [default: 10000].
    #[arg(long, env = "GATEWAY_TREE_THRESHOLD", global = true)]
    pub tree_threshold: Option<usize>,
    /// The node tier's fan-out: a room split at --tree-threshold gets this many shards, and no shard ever holds more than ceil(threshold / degree) members (bigger rooms get more shards); 2 to --tree-threshold [default: 16].
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
    /// Offer WebSocket compression (RFC 7692 permessage-deflate, server_no_context_takeover): a room message is compressed once per node for every member that negotiated it; frames under 64 bytes go uncompressed; a client message may inflate to at most --max-frame-bytes. `false` answers every upgrade without it [default: true].
    #[arg(long, env = "GATEWAY_PERMESSAGE_DEFLATE", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub permessage_deflate: Option<bool>,
    /// Rooms one connection may be subscribed to [default: 5000].
    #[arg(long, env = "GATEWAY_MAX_ROOMS_PER_CONN", global = true)]
    pub max_rooms_per_conn: Option<usize>,
    /// WebSocket connections on this node; more are closed with 4029 [default: 50000].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// WebSocket connections of one user (`sub`) on this node; a `connect` past it gets `limit_exceeded` and close 4029; 0 = off [default: 0].
    #[arg(long, env = "GATEWAY_USER_MAX_CONNS", global = true)]
    pub user_max_conns: Option<usize>,
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
    /// Bytes of history kept across all rooms of the node; over it the least recently active rooms' history is dropped, rooms without members first; at least --history-max-bytes [default: 1073741824].
    #[arg(long, env = "GATEWAY_HISTORY_TOTAL_BYTES", global = true)]
    pub history_total_bytes: Option<usize>,
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
            api_listen,
            api_key,
            api_max_body_bytes,
            api_requests_per_sec,
            presence_list_max,
            presence_interval_ms,
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
            nats_js_domain,
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
            permessage_deflate,
            max_rooms_per_conn,
            max_connections,
            user_max_conns,
            outbox_max_bytes,
            outbox_max_frames,
            write_timeout_ms,
            history_size,
            history_max_bytes,
            history_total_bytes,
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

/// Per-room publish limits of one room namespace (TOML `[room_limits.NAME]`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomLimitOpts {
    /// Publishes per second per room of the namespace; 0 = unlimited [default: --room-publish-per-sec].
    pub publish_per_sec: Option<u32>,
    /// Burst per room [default: 2 x publish_per_sec].
    pub publish_burst: Option<u32>,
}

//! Defaults and validation: [`Opts`] in, [`Config`] or a [`ConfigError`] out.
//!
//! Owns every default value and every check, by group: rate limits
//! (`resolve_limits`), cluster, auth, connection, rooms and the rest. The
//! first invalid value found ends resolution with an error naming its option
//! (groups are checked in that order, each option once). Does not own the
//! option spellings or the file merge (`config::opts`) nor the fields'
//! meaning (`config`).
//!
//! Pure: reads nothing but the [`Opts`] given (the node id's random default
//! aside) and binds nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::HeaderName;

use crate::auth::{MIN_HMAC_SECRET_BYTES, Pattern};
use crate::config::opts::Opts;
use crate::config::{Config, ConfigError, DEFAULT_CATCHUP_MAX_BYTES, DEFAULT_MAX_FRAME_BYTES, LogFormat};
use crate::limits::{self, LimitConfig, Rate};
use crate::rooms::RoomId;

impl Config {
    /// Applies defaults and checks every value.
    pub fn resolve(o: Opts) -> Result<Config, ConfigError> {
        let limits = resolve_limits(&o)?;
        let cluster = Cluster::resolve(&o)?;
        let auth = Auth::resolve(&o)?;
        let conn = Connection::resolve(&o)?;
        let rooms = Rooms::resolve(&o)?;
        let log_format = match o.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log_format", format!("{other:?} is not text or json"))),
        };
        let tree_threshold = positive("tree_threshold", o.tree_threshold, 10_000)?;
        let tree_degree = o.tree_degree.unwrap_or(16);
        if tree_degree < 2 || tree_degree > tree_threshold {
            return Err(invalid(
                "tree_degree",
                "must be at least 2 and at most --tree-threshold (a shard holds at least one member)",
            ));
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
        let api = Api::resolve(&o)?;
        let warnings = warnings(&o);
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
            api_listen: api.listen,
            api_keys: api.keys,
            api_max_body_bytes: api.max_body_bytes,
            api_requests_per_sec: api.requests_per_sec,
            presence_list_max: o.presence_list_max.unwrap_or(1_000),
            presence_interval: ms(
                Some(positive("presence_interval_ms", o.presence_interval_ms, 1_000)?),
                0,
            ),
            node_id,
            jwt_secret: o.jwt_secret,
            dev_mode: false,
            jwt_public_keys: o.jwt_public_key.unwrap_or_default(),
            jwks: o.jwks,
            jwt_issuers: o.jwt_issuer.unwrap_or_default(),
            jwt_audiences: o.jwt_audience.unwrap_or_default(),
            jwt_leeway: Duration::from_secs(o.jwt_leeway_secs.unwrap_or(5)),
            default_rooms: o.default_rooms.unwrap_or_default(),
            default_pub: o.default_pub.unwrap_or_default(),
            jwt_issuer_keys: o.jwt_issuer_keys.unwrap_or_default(),
            jwt_rooms_claim: auth.jwt_rooms_claim,
            jwks_refresh: auth.jwks_refresh,
            jwks_refetch_min: Duration::from_secs(o.jwks_refetch_min_secs.unwrap_or(10)),
            tls_reload: conn.tls_reload,
            nats: cluster.nats,
            nats_prefix: cluster.nats_prefix,
            nats_partitions: cluster.nats_partitions,
            nats_replicas: cluster.nats_replicas,
            room_max_age: Duration::from_secs(o.room_max_age_secs.unwrap_or(0)),
            ephemeral_prefixes: cluster.ephemeral_prefixes,
            room_linger: ms(o.room_linger_ms, 5_000),
            publish_timeout: cluster.publish_timeout,
            nats_ignore_discovered: o.nats_ignore_discovered.unwrap_or(false),
            nats_js_domain: cluster.nats_js_domain,
            nats_connect_timeout: cluster.nats_connect_timeout,
            tls_cert: o.tls_cert,
            tls_key: o.tls_key,
            allowed_origins: o.allowed_origins.unwrap_or_default(),
            allow_no_origin: o.allow_no_origin.unwrap_or(true),
            tree_threshold,
            tree_degree,
            fanout_shards: match o.fanout_shards.unwrap_or(0) {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            room_metrics_top: o.room_metrics_top.unwrap_or(20),
            room_metrics_rooms,
            no_rate_limits: o.no_rate_limits.unwrap_or(false),
            limits,
            auth_timeout: conn.auth_timeout,
            max_frame_bytes: conn.max_frame_bytes,
            permessage_deflate: o.permessage_deflate.unwrap_or(true),
            max_rooms_per_conn: conn.max_rooms_per_conn,
            max_connections: conn.max_connections,
            user_max_conns: o.user_max_conns.unwrap_or(0),
            outbox_max_bytes: conn.outbox_max_bytes,
            outbox_max_frames: conn.outbox_max_frames,
            write_timeout: conn.write_timeout,
            history_size: rooms.history_size,
            history_max_bytes: rooms.history_max_bytes,
            history_total_bytes: rooms.history_total_bytes,
            history_page_max: rooms.history_page_max,
            dedup_window: ms(o.dedup_window_ms, 120_000),
            dedup_max_keys: rooms.dedup_max_keys,
            max_rooms: rooms.max_rooms,
            catchup_max_bytes: o.catchup_max_bytes.unwrap_or(DEFAULT_CATCHUP_MAX_BYTES),
            activity_interval: conn.activity_interval,
            ping_interval: conn.ping_interval,
            idle_timeout: conn.idle_timeout,
            max_bad_frames: o.max_bad_frames.unwrap_or(20),
            drain_timeout: ms(o.drain_timeout_ms, 10_000),
            drain_spread: ms(o.drain_spread_ms, 2_000),
            log_format,
            log: o.log.unwrap_or_else(|| "info".to_string()),
            warnings,
        })
    }
}

/// The server API: its listener, keys and limits.
struct Api {
    listen: Option<std::net::SocketAddr>,
    keys: Vec<String>,
    max_body_bytes: usize,
    requests_per_sec: u32,
}

/// Shortest API key: a short key is guessable within the rate limit's reach.
const MIN_API_KEY_LEN: usize = 16;

impl Api {
    fn resolve(o: &Opts) -> Result<Self, ConfigError> {
        let keys: Vec<String> = o
            .api_key
            .iter()
            .flatten()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(k) = keys
            .iter()
            .find(|k| k.len() < MIN_API_KEY_LEN || k.bytes().any(|b| !b.is_ascii_graphic()))
        {
            // Never the key itself in the message: it ends up in logs.
            return Err(invalid(
                "api_key",
                format!(
                    "a key of {} characters: each key must be at least {MIN_API_KEY_LEN} printable ASCII characters without spaces",
                    k.len()
                ),
            ));
        }
        if let Some(addr) = o.api_listen {
            if keys.is_empty() {
                return Err(invalid(
                    "api_listen",
                    "needs --api-key: the server API never runs without a key",
                ));
            }
            let client = o.listen.unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid"));
            if addr.port() != 0
                && addr.port() == client.port()
                && (addr.ip() == client.ip() || addr.ip().is_unspecified() || client.ip().is_unspecified())
            {
                return Err(invalid(
                    "api_listen",
                    "must differ from --listen: the server API never shares the client port",
                ));
            }
        }
        let max_body_bytes = positive("api_max_body_bytes", o.api_max_body_bytes, 1 << 20)?;
        Ok(Self {
            listen: o.api_listen,
            keys,
            max_body_bytes,
            requests_per_sec: o.api_requests_per_sec.unwrap_or(1_000),
        })
    }
}

/// Cluster mode: NATS, streams and room storage.
struct Cluster {
    nats: Vec<String>,
    nats_prefix: String,
    nats_partitions: u32,
    nats_replicas: usize,
    ephemeral_prefixes: Vec<String>,
    publish_timeout: Duration,
    nats_connect_timeout: Duration,
    nats_js_domain: Option<String>,
}

impl Cluster {
    fn resolve(o: &Opts) -> Result<Self, ConfigError> {
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
        let nats_prefix = o.nats_prefix.clone().unwrap_or_else(|| "gw".to_string());
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
        let nats_js_domain = o.nats_js_domain.clone();
        if let Some(d) = &nats_js_domain
            && (d.is_empty() || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(invalid(
                "nats_js_domain",
                "must be letters, digits, _ or - (one subject token, as in nats-server's jetstream.domain)",
            ));
        }
        let ephemeral_prefixes = o.ephemeral_prefixes.clone().unwrap_or_default();
        if ephemeral_prefixes.iter().any(String::is_empty) {
            return Err(invalid(
                "ephemeral_prefixes",
                "an empty prefix would make every room ephemeral",
            ));
        }
        Ok(Cluster {
            nats,
            nats_js_domain,
            nats_prefix,
            nats_partitions,
            nats_replicas: positive("nats_replicas", o.nats_replicas, 1)?,
            ephemeral_prefixes,
            publish_timeout: ms(Some(positive("publish_timeout_ms", o.publish_timeout_ms, 5_000)?), 0),
            nats_connect_timeout: ms(
                Some(positive("nats_connect_timeout_ms", o.nats_connect_timeout_ms, 10_000)?),
                0,
            ),
        })
    }
}

/// Token verification: the values checked here; the rest are copied as given.
struct Auth {
    jwt_rooms_claim: String,
    jwks_refresh: Duration,
}

impl Auth {
    fn resolve(o: &Opts) -> Result<Self, ConfigError> {
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
        let jwt_rooms_claim = o.jwt_rooms_claim.clone().unwrap_or_else(|| "rooms".to_string());
        if jwt_rooms_claim.split('.').any(str::is_empty) {
            return Err(invalid(
                "jwt_rooms_claim",
                "must be a dotted path like rooms or chat.rooms",
            ));
        }
        if let Some(s) = &o.jwt_secret
            && s.len() < MIN_HMAC_SECRET_BYTES
        {
            // RFC 7518 section 3.2: an HS256 key as long as the hash output.
            // Dev mode (no key configured) makes a random 32-byte secret.
            return Err(invalid(
                "jwt_secret",
                format!(
                    "must be at least {} bytes (RFC 7518 section 3.2), got {}",
                    MIN_HMAC_SECRET_BYTES,
                    s.len()
                ),
            ));
        }
        Ok(Auth {
            jwt_rooms_claim,
            jwks_refresh: Duration::from_secs(positive("jwks_refresh_secs", o.jwks_refresh_secs, 300)?),
        })
    }
}

/// One connection: TLS, origins, frames, outbox, timers.
struct Connection {
    tls_reload: Duration,
    auth_timeout: Duration,
    max_frame_bytes: usize,
    max_rooms_per_conn: usize,
    max_connections: usize,
    outbox_max_bytes: usize,
    outbox_max_frames: usize,
    write_timeout: Duration,
    activity_interval: Duration,
    ping_interval: Duration,
    idle_timeout: Duration,
}

impl Connection {
    fn resolve(o: &Opts) -> Result<Self, ConfigError> {
        if o.tls_cert.is_some() != o.tls_key.is_some() {
            return Err(invalid("tls_cert", "--tls-cert and --tls-key go together"));
        }
        for origin in o.allowed_origins.iter().flatten() {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
                return Err(invalid(
                    "allowed_origins",
                    format!("{origin:?} is not an origin like https://chat.example.com"),
                ));
            }
        }
        let max_frame_bytes = positive("max_frame_bytes", o.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES)?;
        let outbox_max_bytes = positive("outbox_max_bytes", o.outbox_max_bytes, 4 << 20)?;
        if outbox_max_bytes < max_frame_bytes {
            return Err(invalid(
                "outbox_max_bytes",
                format!("must be at least max_frame_bytes ({max_frame_bytes})"),
            ));
        }
        Ok(Connection {
            tls_reload: ms(Some(positive("tls_reload_ms", o.tls_reload_ms, 10_000)?), 0),
            auth_timeout: ms(Some(positive("auth_timeout_ms", o.auth_timeout_ms, 5_000)?), 0),
            max_frame_bytes,
            max_rooms_per_conn: positive("max_rooms_per_conn", o.max_rooms_per_conn, 5_000)?,
            max_connections: positive("max_connections", o.max_connections, 50_000)?,
            outbox_max_bytes,
            outbox_max_frames: positive("outbox_max_frames", o.outbox_max_frames, 16_384)?,
            write_timeout: ms(Some(positive("write_timeout_ms", o.write_timeout_ms, 10_000)?), 0),
            activity_interval: ms(
                Some(positive("activity_interval_ms", o.activity_interval_ms, 1_000)?),
                0,
            ),
            ping_interval: ms(Some(positive("ping_interval_ms", o.ping_interval_ms, 25_000)?), 0),
            idle_timeout: ms(Some(positive("idle_timeout_ms", o.idle_timeout_ms, 70_000)?), 0),
        })
    }
}

/// Rooms on this node: history kept, de-duplication, room count.
struct Rooms {
    history_size: usize,
    history_max_bytes: usize,
    history_total_bytes: usize,
    history_page_max: usize,
    dedup_max_keys: usize,
    max_rooms: usize,
}

impl Rooms {
    fn resolve(o: &Opts) -> Result<Self, ConfigError> {
        let history_max_bytes = positive("history_max_bytes", o.history_max_bytes, 4 << 20)?;
        let history_total_bytes = positive("history_total_bytes", o.history_total_bytes, 1 << 30)?;
        if history_total_bytes < history_max_bytes {
            return Err(invalid(
                "history_total_bytes",
                format!(
                    "{history_total_bytes} is below --history-max-bytes ({history_max_bytes}): one room could not keep its own history"
                ),
            ));
        }
        Ok(Rooms {
            history_size: positive("history_size", o.history_size, 1_000)?,
            history_max_bytes,
            history_total_bytes,
            history_page_max: positive("history_page_max", o.history_page_max, 200)?,
            dedup_max_keys: positive("dedup_max_keys", o.dedup_max_keys, 10_000)?,
            max_rooms: positive("max_rooms", o.max_rooms, 1_000_000)?,
        })
    }
}

fn invalid(option: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        problem: problem.into(),
    }
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

/// Options given that have no effect in this configuration.
fn warnings(o: &Opts) -> Vec<String> {
    let mut out = Vec::new();
    if o.api_listen.is_none() {
        for (name, given) in [
            ("api_key", o.api_key.is_some()),
            ("api_max_body_bytes", o.api_max_body_bytes.is_some()),
            ("api_requests_per_sec", o.api_requests_per_sec.is_some()),
        ] {
            if given {
                out.push(format!("{name} applies only with --api-listen; it has no effect here"));
            }
        }
    }
    if o.nats.as_deref().is_none_or(|n| n.trim().is_empty()) {
        let cluster_only = [
            ("nats_prefix", o.nats_prefix.is_some()),
            ("nats_partitions", o.nats_partitions.is_some()),
            ("nats_replicas", o.nats_replicas.is_some()),
            ("room_max_age_secs", o.room_max_age_secs.is_some()),
            ("ephemeral_prefixes", o.ephemeral_prefixes.is_some()),
            ("room_linger_ms", o.room_linger_ms.is_some()),
            ("publish_timeout_ms", o.publish_timeout_ms.is_some()),
            ("nats_connect_timeout_ms", o.nats_connect_timeout_ms.is_some()),
            ("nats_ignore_discovered", o.nats_ignore_discovered.is_some()),
            ("nats_js_domain", o.nats_js_domain.is_some()),
        ];
        for (name, given) in cluster_only {
            if given {
                out.push(format!(
                    "{name} applies only in cluster mode (--nats); it has no effect here"
                ));
            }
        }
    }
    out
}

//! The `gateway` binary: parse configuration, then run the library's server.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use gateway::config::{Cli, Command, Config, LogFormat, TokenArgs};
use gateway::{Node, auth};
use tokio::net::TcpListener;

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    gateway::transport::tls::install_default_provider();
    // A value clap cannot parse is an invalid configuration like any other
    // (64); `--help` and `--version` still exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = cli
        .opts
        .with_file()
        .map_err(anyhow::Error::from)
        .and_then(|o| Config::resolve(o).map_err(anyhow::Error::from));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: invalid configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Token(args)) = cli.command {
        return token(&config, args);
    }
    init_logs(&config);
    for w in &config.warnings {
        tracing::warn!("configuration: {w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn token(config: &Config, args: TokenArgs) -> ExitCode {
    let Some(secret) = &config.jwt_secret else {
        eprintln!(
            "gateway token: no HS256 secret configured (--jwt-secret, GATEWAY_JWT_SECRET or jwt_secret in --config)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    if !gateway::model::is_valid_user(&args.sub) {
        eprintln!(
            "gateway token: --sub must be 1 to {} bytes without control or bidirectional formatting characters (the gateway refuses such a token)",
            gateway::model::MAX_USER_LEN
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let publish = args.publish.unwrap_or_else(|| args.rooms.clone());
    let ttl = (args.ttl > 0).then_some(args.ttl);
    match auth::mint_hs256(secret.as_bytes(), &args.sub, args.rooms, publish, ttl) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(config: &Config) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.clone());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(mut config: Config) -> anyhow::Result<()> {
    let dev_mode = config.enter_dev_mode();
    let node = Node::new(config.clone()).await.context("starting the node")?;
    let listener =
        gateway::http::listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?,
        ),
        None => None,
    };
    let api_listener = match config.api_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the server API"))?,
        ),
        None => None,
    };
    let addr = listener.local_addr()?;
    let scheme = if node.is_tls() { "wss" } else { "ws" };
    tracing::info!(node = %config.node_id, %addr, bus = node.bus.kind(), "gateway listening on {scheme}://{addr}/ws");
    #[cfg(unix)]
    if node.is_tls() {
        node.spawn_service(reload_tls_on_sighup(node.clone()));
    }
    if dev_mode {
        announce_dev_mode(&config, addr);
    }
    if let Some(l) = api_listener {
        let api_addr = l.local_addr()?;
        tracing::info!(%api_addr, keys = config.api_keys.len(), "server API listening on http://{api_addr}/api/<method>");
        node.spawn_service(gateway::http::api::serve_api(node.clone(), l));
    }
    if let Some(l) = metrics_listener {
        node.spawn_service(gateway::http::serve_metrics(node.clone(), l));
    }
    let report = gateway::serve(node, listener, shutdown_signal()).await;
    tracing::info!(clean = report.clean, conns = report.conns_at_start, elapsed = ?report.elapsed, "stopped");
    Ok(())
}

fn announce_dev_mode(config: &Config, addr: std::net::SocketAddr) {
    let secret = config.jwt_secret.as_deref().unwrap_or_default();
    let sample = auth::mint_hs256(
        secret.as_bytes(),
        "dev",
        vec!["*".into()],
        vec!["*".into()],
        Some(86_400),
    )
    .unwrap_or_default();
    let http = if config.tls_cert.is_some() { "https" } else { "http" };
    let ws = if config.tls_cert.is_some() { "wss" } else { "ws" };
    tracing::warn!(
        "DEV MODE: no --jwt-secret, --jwt-public-key, --jwks or --jwt-issuer-keys configured; \
         using a random HS256 secret for this run only; serving the demo page at / and a token \
         endpoint at /dev/token that mints a token for any user"
    );
    let exposed = if addr.ip().is_loopback() {
        String::new()
    } else {
        format!(
            "  WARNING:      {addr} is not a loopback address: anyone who reaches it can mint tokens at /dev/token.\n"
        )
    };
    eprintln!(
        "\n  DEV MODE: tokens are signed with a secret made up for this run.\n  \
         Demo chat:    {http}://{addr}/  (open it in two tabs)\n  \
         Dev tokens:   {http}://{addr}/dev/token?sub=alice  (any user, every room; off once a key is configured)\n  \
         Get a token:  gateway token --jwt-secret {secret} --sub alice --rooms 'general,team-*'\n  \
         Or use this one (user \"dev\", all rooms, 24 h):\n    {sample}\n  \
         Connect:      {ws}://{addr}/ws  then send {{\"id\":1,\"op\":\"connect\",\"token\":\"<token>\"}}\n  \
         Client SDK:   {http}://{addr}/client.js  (docs/quickstart.md)\n{exposed}  \
         Production:   set --jwt-secret / --jwt-public-key / --jwks.\n"
    );
}

/// Reloads the TLS certificate on each SIGHUP.
#[cfg(unix)]
async fn reload_tls_on_sighup(node: std::sync::Arc<Node>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the TLS certificate");
        node.reload_tls();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

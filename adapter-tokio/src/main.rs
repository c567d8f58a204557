//! `slim-tokio`: a SLIM routing node.
//!
//! With no arguments it serves plaintext HTTP/2 on 127.0.0.1:46357. `--config FILE` reads a YAML
//! file in the reference node's layout.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use slim_tokio::config::{self, NodeConfig};
use slim_tokio::Node;

#[derive(Parser, Debug)]
#[command(
    name = "slim-tokio",
    version,
    about = "SLIM routing node (Secure Low-Latency Interactive Messaging), wire-compatible with slim-bindings >= 2.0",
    long_about = "SLIM routing node (Secure Low-Latency Interactive Messaging).\n\n\
        Serves the gRPC method /dataplane.proto.v1.DataPlaneService/OpenChannel and routes SLIM\n\
        messages between the clients (e.g. Python slim-bindings) connected to it.\n\n\
        Without arguments it listens on 127.0.0.1:46357 (plaintext HTTP/2) and logs to stderr.\n\
        Stop it with Ctrl-C or SIGTERM: open streams are ended cleanly.",
    after_help = "Example configuration (the reference node's layout; unknown keys are warned about):\n\n  \
        tracing: { log_level: info }\n  \
        services:\n    \
          slim/0:\n      \
            node_id: my-node\n      \
            dataplane:\n        \
              servers:\n          \
                - endpoint: 0.0.0.0:46357\n            \
                  tls: { insecure: true }      # or { cert_file: cert.pem, key_file: key.pem }\n\n\
        Log level: RUST_LOG (e.g. RUST_LOG=debug) overrides tracing.log_level."
)]
struct Cli {
    /// YAML configuration file (reference layout: services.<id>.dataplane.servers).
    #[arg(long, short = 'c', value_name = "FILE", env = "SLIM_CONFIG")]
    config: Option<PathBuf>,

    /// Listen on this address instead of the configured servers (e.g. 0.0.0.0:46357).
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
}

fn init_logging(level: Option<&str>) {
    let default = level.unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut node_config = match &cli.config {
        Some(path) => NodeConfig::from_file(path)
            .with_context(|| format!("invalid configuration {}", path.display()))?,
        None => NodeConfig::default(),
    };
    if let Some(endpoint) = &cli.endpoint {
        let addr = config::parse_listen_endpoint(endpoint)?;
        node_config.servers = vec![config::ServerConfig { addr, tls: None }];
    }
    init_logging(node_config.log_level.as_deref());
    for key in &node_config.unknown_keys {
        tracing::warn!(key = %key, "configuration key not supported: ignored");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("slim-node")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let node = Node::start(node_config).await?;
        tracing::info!(
            node_id = node.node_id(),
            version = slim_tokio::SLIM_VERSION,
            "node ready"
        );
        let signal = wait_for_signal().await?;
        tracing::info!(signal, "shutting down");
        if let Some(stats) = node.stats().await {
            let drops: Vec<String> = stats
                .router
                .drops()
                .map(|(reason, n)| format!("{reason}={n}"))
                .collect();
            tracing::info!(
                received = stats.router.received,
                forwarded = stats.router.forwarded,
                connections = stats.router.connections,
                subscriptions = stats.router.subscriptions,
                slow_consumer_drops = stats.slow_consumer_drops,
                drops = %drops.join(","),
                "final counters"
            );
        }
        node.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

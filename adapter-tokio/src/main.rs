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

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Measure a running SLIM node (ours or the reference) from two clients on this machine.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// The node to measure.
    #[arg(long, default_value = "http://127.0.0.1:46357")]
    endpoint: String,
    /// publish: raw data-plane messages, 1 publisher -> node -> 1 subscriber.
    #[arg(long, value_enum, default_value = "publish")]
    mode: BenchMode,
    /// Payload bytes per message (min 8).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Round trips measured after the throughput phase.
    #[arg(long, default_value_t = 2000)]
    round_trips: u64,
    /// Messages in flight at most during the throughput phase.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BenchMode {
    Publish,
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    init_logging(Some("warn"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let config = slim_tokio::bench::BenchConfig {
        endpoint: args.endpoint.clone(),
        size: args.size.max(8),
        duration: std::time::Duration::from_secs_f64(args.duration.max(0.1)),
        round_trips: args.round_trips,
        window: args.window,
    };
    let report = match args.mode {
        BenchMode::Publish => runtime.block_on(slim_tokio::bench::run_publish(&config)),
    }
    .with_context(|| format!("benchmark against {}", args.endpoint))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!(
            "mode {}  size {} B  endpoint {}",
            report.mode, report.size, args.endpoint
        );
        println!(
            "throughput  {:>12.0} msgs/s  {:>8.2} MB/s   ({} sent, {} received, {} out of order, {:.2} s)",
            report.msgs_per_s, report.mb_per_s, report.sent, report.received, report.out_of_order, report.seconds
        );
        println!(
            "round trip  p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us  ({} samples)",
            report.p50_us, report.p90_us, report.p99_us, report.p999_us, report.max_us, report.round_trips
        );
    }
    if report.received < report.sent {
        anyhow::bail!(
            "{} of {} messages were lost",
            report.sent - report.received,
            report.sent
        );
    }
    Ok(())
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
    if let Some(Command::Bench(args)) = cli.command {
        return run_bench(args);
    }
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

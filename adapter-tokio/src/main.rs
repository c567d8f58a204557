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

    /// Runtime worker threads, overriding `runtime.n_cores` (0: one per core). Default 1: the
    /// router is a single task, and one thread gives the shortest round trips.
    #[arg(long, value_name = "N", env = "SLIM_THREADS")]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Measure a running SLIM node (ours or the reference) from clients on this machine.
    Bench(BenchArgs),
    /// Serve a name: accept every session and answer each message with `reply|` + the message.
    Reply(ReplyArgs),
    /// Open a point-to-point session to a service, send requests and check every reply.
    Request(RequestArgs),
    /// Moderate a group: invite members, broadcast, optionally remove one and broadcast again.
    Group(GroupArgs),
    /// A plain TCP relay (connections paired in arrival order): the baseline that
    /// `bench --mode tcp-relay` measures next to a node.
    TcpRelay(TcpRelayArgs),
    /// For tests: a relay in front of a node that drops every Nth session data message
    /// (MSG) in each direction, so both session layers must recover the losses.
    LossyRelay(LossyRelayArgs),
}

#[derive(clap::Args, Debug)]
struct LossyRelayArgs {
    /// Address to listen on (plaintext HTTP/2, as a node).
    #[arg(long, default_value = "127.0.0.1:46359")]
    listen: String,
    /// The node to relay to, host:port.
    #[arg(long, default_value = "127.0.0.1:46357")]
    upstream: String,
    /// Drop the Nth, 2Nth, … data message of each stream direction (0: drop nothing).
    #[arg(long, default_value_t = 10)]
    drop_every: u64,
}

#[derive(clap::Args, Debug)]
struct TcpRelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:46358")]
    listen: String,
}

#[derive(clap::Args, Debug)]
struct GroupArgs {
    #[command(flatten)]
    app: AppArgs,
    /// The group channel, org/namespace/channel.
    #[arg(long, value_name = "ORG/NS/CHAN")]
    channel: String,
    /// A member to invite (any instance of that service); repeat for more.
    #[arg(long = "invite", value_name = "ORG/NS/SVC", required = true)]
    invite: Vec<String>,
    /// Broadcasts per round.
    #[arg(long, default_value_t = 10)]
    count: u64,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Remove this member after the first round, then broadcast another round.
    #[arg(long, value_name = "ORG/NS/SVC")]
    remove: Option<String>,
    /// Invite this member after the first round, then broadcast another round; repeat for more.
    #[arg(long = "then-invite", value_name = "ORG/NS/SVC")]
    then_invite: Vec<String>,
    /// Seconds to wait for the acknowledgements of a round.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Print one JSON line: {"members","sent","delivered","failed","removed"}.
    #[arg(long)]
    json: bool,
    /// For test drivers: after each step (a round, the later invites, the removal) print
    /// {"ev":"step","done":STEP} and wait for a line on stdin before the next one.
    #[arg(long)]
    step_on_stdin: bool,
}

fn run_group(args: GroupArgs) -> anyhow::Result<()> {
    init_logging(Some("warn"));
    let (name, secret) = args.app.resolve()?;
    let parse =
        |text: &String| slim_proto::Name::parse(text).with_context(|| format!("name {text}"));
    let config = slim_tokio::tools::GroupConfig {
        endpoint: args.app.endpoint.clone(),
        name,
        channel: parse(&args.channel)?,
        secret,
        invite: args
            .invite
            .iter()
            .map(parse)
            .collect::<anyhow::Result<_>>()?,
        count: args.count,
        size: args.size.max(8),
        remove: args.remove.as_ref().map(parse).transpose()?,
        then_invite: args
            .then_invite
            .iter()
            .map(parse)
            .collect::<anyhow::Result<_>>()?,
        reliability: slim_tokio::session::Reliability {
            interval: std::time::Duration::from_secs(1),
            max_retries: 10,
        },
        timeout: std::time::Duration::from_secs_f64(args.timeout.max(1.0)),
        mls: args.app.mls,
    };
    let runtime = client_runtime()?;
    let gate = args.step_on_stdin.then(stdin_step_gate);
    let report = runtime.block_on(slim_tokio::tools::run_group(&config, gate))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!(
            "members {}  sent {}  delivered {}  failed {}  removed {}",
            report.members, report.sent, report.delivered, report.failed, report.removed
        );
    }
    if !report.complete() {
        anyhow::bail!(
            "{} of {} broadcasts were acknowledged by every member",
            report.delivered,
            report.sent
        );
    }
    Ok(())
}

/// Reads `offline` / `online` lines from stdin into presence requests, and reports each.
fn stdin_presence() -> slim_tokio::tools::Presence {
    let (request, requests) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            let online = match line.trim() {
                "online" => true,
                "offline" => false,
                "" => continue,
                other => {
                    tracing::warn!(line = other, "expected `online` or `offline` on stdin");
                    continue;
                }
            };
            if request.blocking_send(online).is_err() {
                return;
            }
        }
    });
    slim_tokio::tools::Presence {
        requests,
        done: Box::new(|online, result| {
            if let Err(error) = &result {
                tracing::warn!(online, %error, "presence change failed");
            }
            println!(
                "{}",
                serde_json::json!({"ev": "presence", "online": online, "ok": result.is_ok()})
            );
        }),
    }
}

/// Announces each step on stdout and lets the next one start on each line read from stdin.
fn stdin_step_gate() -> slim_tokio::tools::StepGate {
    let (go, proceed) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() || go.blocking_send(()).is_err() {
                return;
            }
        }
    });
    slim_tokio::tools::StepGate {
        announce: Box::new(|done| {
            println!("{}", serde_json::json!({"ev": "step", "done": done}));
        }),
        proceed,
    }
}

/// Used when --secret is not given; every app of a deployment must share one secret.
const DEFAULT_SECRET: &str = "slim-tokio-default-secret-change-me-0123456789";

#[derive(clap::Args, Debug)]
struct AppArgs {
    /// The node to connect to.
    #[arg(long, default_value = "http://127.0.0.1:46357")]
    endpoint: String,
    /// This application's name, org/namespace/service.
    #[arg(long, value_name = "ORG/NS/SVC")]
    name: String,
    /// Shared secret of the deployment (at least 32 bytes), for identity tokens.
    #[arg(long, env = "SLIM_SECRET")]
    secret: Option<String>,
    /// End-to-end encryption with MLS (RFC 9420, ciphersuite 0x0002 as the reference): sessions
    /// we open are encrypted; `reply` accepts only encrypted sessions.
    #[arg(long)]
    mls: bool,
}

#[derive(clap::Args, Debug)]
struct ReplyArgs {
    #[command(flatten)]
    app: AppArgs,
    /// Print one JSON line per session event (opened, message, member change, closed) on stdout.
    #[arg(long)]
    json: bool,
    /// For test drivers: a line `offline` on stdin soft-closes every group session (the others
    /// stop waiting for us), `online` brings them back (rejoining the MLS group if it moved
    /// on); each prints {"ev":"presence","online":B,"ok":B}.
    #[arg(long)]
    presence_on_stdin: bool,
}

/// One JSON line describing a session event (payloads in hex).
fn event_json(event: &slim_core::session::SessionEvent) -> Option<String> {
    use slim_core::session::SessionEvent as E;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let value = match event {
        E::Incoming {
            session,
            peer,
            group,
            mls,
            ..
        } => {
            serde_json::json!({"ev": "session", "session": session, "peer": peer.to_string(), "group": group, "mls": mls})
        }
        E::Message {
            session,
            source,
            id,
            payload,
            ..
        } => {
            serde_json::json!({"ev": "msg", "session": session, "source": source.to_string(), "id": id, "hex": hex(payload)})
        }
        E::MemberJoined { session, member } => {
            serde_json::json!({"ev": "member_joined", "session": session, "member": member.to_string()})
        }
        E::MemberLeft { session, member } => {
            serde_json::json!({"ev": "member_left", "session": session, "member": member.to_string()})
        }
        E::MessageLost {
            session,
            source,
            id,
        } => {
            serde_json::json!({"ev": "lost", "session": session, "source": source.to_string(), "id": id})
        }
        E::Closed { session, reason } => {
            serde_json::json!({"ev": "closed", "session": session, "reason": format!("{reason:?}")})
        }
        _ => return None,
    };
    Some(value.to_string())
}

#[derive(clap::Args, Debug)]
struct RequestArgs {
    #[command(flatten)]
    app: AppArgs,
    /// The service to ask, org/namespace/service (any instance).
    #[arg(long, value_name = "ORG/NS/SVC")]
    to: String,
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Request size in bytes (min 8).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print one JSON line: {"sent","received","mismatched","p50_us","p99_us"}.
    #[arg(long)]
    json: bool,
}

impl AppArgs {
    fn resolve(&self) -> anyhow::Result<(slim_proto::Name, String)> {
        let name =
            slim_proto::Name::parse(&self.name).with_context(|| format!("--name {}", self.name))?;
        let secret = match &self.secret {
            Some(secret) => secret.clone(),
            None => {
                tracing::warn!(
                    "no --secret given: using the built-in default, which every peer must share"
                );
                DEFAULT_SECRET.to_owned()
            }
        };
        Ok((name, secret))
    }
}

/// A tokio runtime with `threads` workers: 1 is a current-thread runtime (no cross-thread
/// wake-ups between the tasks a message passes through), 0 one worker per core.
fn runtime(threads: usize, name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    if threads > config::MAX_WORKER_THREADS {
        anyhow::bail!(
            "--threads {threads}: at most {} worker threads",
            config::MAX_WORKER_THREADS
        );
    }
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .thread_name(name)
        .on_thread_park(slim_tokio::flush_owed_acks)
        .build()
        .context("starting the tokio runtime")
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime(1, "slim-client")
}

fn run_tcp_relay(args: TcpRelayArgs) -> anyhow::Result<()> {
    init_logging(Some("info"));
    client_runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %args.listen, "tcp relay ready");
        slim_tokio::bench::relay::serve(listener).await;
        Ok(())
    })
}

fn run_lossy_relay(args: LossyRelayArgs) -> anyhow::Result<()> {
    init_logging(Some("info"));
    client_runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %args.listen, upstream = %args.upstream, drop_every = args.drop_every, "lossy relay ready");
        let config = slim_tokio::lossy_relay::LossyConfig {
            upstream: args.upstream,
            drop_every: args.drop_every,
        };
        slim_tokio::lossy_relay::serve(listener, config).await;
        Ok(())
    })
}

fn run_reply(args: ReplyArgs) -> anyhow::Result<()> {
    init_logging(Some("info"));
    let (name, secret) = args.app.resolve()?;
    let runtime = client_runtime()?;
    let stats = runtime.block_on(async {
        slim_tokio::tools::run_reply(
            &args.app.endpoint,
            name,
            &secret,
            args.app.mls,
            |full| {
                tracing::info!(name = %full, "ready: answering sessions");
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"ev": "ready", "name": full.to_string()})
                    );
                }
            },
            |event| {
                if args.json {
                    if let Some(line) = event_json(event) {
                        println!("{line}");
                    }
                }
            },
            args.presence_on_stdin.then(stdin_presence),
            async {
                let _ = wait_for_signal().await;
            },
        )
        .await
    })?;
    tracing::info!(
        sessions = stats.sessions,
        replies = stats.replies,
        "stopped"
    );
    if args.json {
        println!(
            "{{\"ev\":\"stats\",\"sessions\":{},\"replies\":{},\"recovery\":{}}}",
            stats.sessions,
            stats.replies,
            slim_tokio::tools::recovery_json(&stats.session)
        );
    }
    Ok(())
}

fn run_request(args: RequestArgs) -> anyhow::Result<()> {
    init_logging(Some("warn"));
    let (name, secret) = args.app.resolve()?;
    let to = slim_proto::Name::parse(&args.to).with_context(|| format!("--to {}", args.to))?;
    let config = slim_tokio::tools::RequestConfig {
        endpoint: args.app.endpoint.clone(),
        name,
        to,
        secret,
        count: args.count,
        size: args.size.max(8),
        timeout: std::time::Duration::from_secs_f64(args.timeout.max(0.1)),
        reliability: Some(slim_tokio::session::Reliability {
            interval: std::time::Duration::from_secs(1),
            max_retries: 10,
        }),
        mls: args.app.mls,
    };
    let runtime = client_runtime()?;
    let report = runtime.block_on(slim_tokio::tools::run_request(&config))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!(
            "sent {}  received {}  mismatched {}  p50 {:.1} us  p99 {:.1} us",
            report.sent, report.received, report.mismatched, report.p50_us, report.p99_us
        );
    }
    if report.received != report.sent || report.mismatched > 0 || report.sent != args.count {
        anyhow::bail!(
            "{} of {} requests answered correctly",
            report.received - report.mismatched,
            args.count
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    slim-tokio bench --mode publish --size 64 --duration 5\n  \
    slim-tokio bench --mode multicast --subscribers 10 --size 1024 --count 100000 --json\n  \
    slim-tokio bench --mode anycast --subscribers 4 --publishers 2 --node-pid $(pidof slim-tokio)")]
struct BenchArgs {
    /// The node to measure.
    #[arg(long, default_value = "http://127.0.0.1:46357")]
    endpoint: String,
    /// publish: raw data-plane messages, each to one exact subscriber instance;
    /// anycast: to a service every subscriber serves (each message reaches one);
    /// multicast: to a channel every subscriber joined (each message reaches all);
    /// p2p: a reliable session between two apps.
    #[arg(long, value_enum, default_value = "publish")]
    mode: BenchMode,
    /// Payload bytes per message (8 to 4 MiB - 4 KiB).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Publish this many messages in all (split over the publishers) instead of for --duration.
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Raw modes: publishing clients (each its own connection).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Raw modes: receiving clients (each its own connection).
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Runtime worker threads of the bench's clients (0: one per core). With 1, the clients
    /// leave the other cores to the node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Round trips measured after the throughput phase.
    #[arg(long, default_value_t = 2000)]
    round_trips: u64,
    /// Messages in flight at most during the throughput phase, over all publishers (and at
    /// most 8 MiB of payload).
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// The node's process id: report its CPU time and memory (from /proc; resets its peak RSS
    /// counter when permitted, so the peak is this run's).
    #[arg(long, value_name = "PID")]
    node_pid: Option<u32>,
    /// p2p: encrypt the session end to end with MLS.
    #[arg(long)]
    mls: bool,
    /// p2p: a session without acknowledgements or retransmissions (reliable by default).
    #[arg(long)]
    unreliable: bool,
    /// Raw modes: app clients (the app API, a router per client, as applications embed it)
    /// or wire clients (the negotiated, MAC-signed link alone: they cost little beside the
    /// node, so the node is what is measured).
    #[arg(long, value_enum, default_value = "app")]
    client: BenchClient,
    /// Print one JSON line instead of a table (no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BenchClient {
    App,
    Wire,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BenchMode {
    /// Raw publishes to exact subscriber instances (1 -> 1 by default).
    #[value(alias = "unicast")]
    Publish,
    /// Raw publishes to a service name that every subscriber serves; the node picks one.
    Anycast,
    /// Raw publishes to a channel; every subscriber gets every message.
    Multicast,
    /// A p2p session (our session layer on both ends), reliable unless --unreliable:
    /// acknowledged one-way throughput, then request/reply round trips.
    P2p,
    /// The baseline: the same clients through a plain TCP relay (`slim-tokio tcp-relay`) instead
    /// of a node: one-way stream throughput and echo round trips, no protocol.
    TcpRelay,
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    use slim_tokio::bench::{ClientKind, LoadConfig, Mode, Stop};
    use std::io::IsTerminal as _;

    init_logging(Some("warn"));
    let runtime = runtime(args.threads, "slim-bench")?;
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    let config = LoadConfig {
        endpoint: args.endpoint.clone(),
        mode: match args.mode {
            BenchMode::Publish => Mode::Unicast,
            BenchMode::Anycast => Mode::Anycast,
            BenchMode::Multicast => Mode::Multicast,
            BenchMode::P2p => Mode::P2p,
            BenchMode::TcpRelay => Mode::TcpRelay,
        },
        size: args.size,
        stop: match args.count {
            Some(n) => Stop::Count(n),
            None => Stop::Duration(std::time::Duration::from_secs_f64(args.duration)),
        },
        round_trips: args.round_trips,
        window: args.window,
        publishers: args.publishers,
        subscribers: args.subscribers,
        progress: !args.json && std::io::stderr().is_terminal(),
        node_pid: args.node_pid,
        mls: args.mls,
        unreliable: args.unreliable,
        client: match args.client {
            BenchClient::App => ClientKind::App,
            BenchClient::Wire => ClientKind::Wire,
        },
    };
    // Spawned rather than run as `block_on`'s own future: the scheduler polls that future only
    // after checking the sockets again without blocking (an extra `epoll_wait` each time it is
    // woken, i.e. on every reply), which a task does not pay.
    let bench = runtime.spawn(async move { slim_tokio::bench::run(&config).await });
    let report = runtime
        .block_on(bench)
        .context("the benchmark task failed")?
        .with_context(|| format!("benchmark against {}", args.endpoint))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!(
            "mode {}{}{}  size {} B  publishers {}  subscribers {}  window {}  endpoint {}",
            report.mode,
            if report.mls { " (MLS)" } else { "" },
            if report.mode == "p2p" && !report.reliable {
                " (unreliable)"
            } else {
                ""
            },
            report.size,
            report.publishers,
            report.subscribers,
            report.window,
            args.endpoint
        );
        println!(
            "throughput  {:>12.0} msgs/s  {:>8.2} MB/s   ({} published, {} of {} deliveries, {} out of order, {:.2} s)",
            report.msgs_per_s, report.mb_per_s, report.sent, report.received, report.expected, report.out_of_order, report.seconds
        );
        if report.expected != report.sent {
            // Multicast: msgs/s counts deliveries; the publishes are fewer.
            println!(
                "publishes   {:>12.0} msgs/s  (each to {} subscribers)",
                report.published_per_s, report.subscribers
            );
        }
        println!(
            "round trip  p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us  ({} samples, {} unanswered)",
            report.p50_us, report.p90_us, report.p99_us, report.p999_us, report.max_us, report.round_trips, report.round_trips_lost
        );
        if let Some(node) = &report.node {
            println!(
                "node pid {}  CPU {:.2} s during throughput ({:.0} % of a core, {:.2} us per delivery), {:.2} s in all",
                node.pid, node.throughput_cpu_s, node.cpu_pct, node.cpu_us_per_msg, node.cpu_s
            );
            println!(
                "node RSS    {:.1} MiB at start  {:.1} MiB at end  peak {:.1} MiB ({})",
                node.rss_start_kib as f64 / 1024.0,
                node.rss_end_kib as f64 / 1024.0,
                node.peak_rss_kib as f64 / 1024.0,
                if node.peak_is_of_run {
                    "of this run"
                } else {
                    "since the node started: its peak counter could not be reset"
                }
            );
        }
    }
    if report.lost() > 0 {
        anyhow::bail!(
            "{} of {} deliveries were lost",
            report.lost(),
            report.expected
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

/// glibc malloc/free were ≈ 7 % of the node's CPU per routed message (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Bench(args)) => return run_bench(args),
        Some(Command::Reply(args)) => return run_reply(args),
        Some(Command::Request(args)) => return run_request(args),
        Some(Command::Group(args)) => return run_group(args),
        Some(Command::TcpRelay(args)) => return run_tcp_relay(args),
        Some(Command::LossyRelay(args)) => return run_lossy_relay(args),
        None => {}
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
    if let Some(threads) = cli.threads {
        node_config.worker_threads = threads;
    }
    let threads = node_config.worker_threads;
    let runtime = runtime(threads, &node_config.thread_name)?;
    runtime.block_on(async {
        let node = Node::start(node_config).await?;
        tracing::info!(
            node_id = node.node_id(),
            version = slim_tokio::SLIM_VERSION,
            threads,
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

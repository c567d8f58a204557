//! tokio driver for the SLIM cores: the `slim-tokio` node.
//!
//! [`Node::start`] binds the configured servers and runs a [`slim_core::router::Router`] behind
//! them; the adapter only moves bytes (TCP, TLS, HTTP/2, gRPC framing) and time into the core and
//! the core's outputs back out.
//!
//! ```no_run
//! # async fn run() -> Result<(), slim_tokio::NodeError> {
//! let node = slim_tokio::Node::start(slim_tokio::config::NodeConfig::default()).await?;
//! println!("serving on {:?}", node.local_addrs());
//! node.shutdown().await;
//! # Ok(()) }
//! ```

pub mod app;
pub mod bench;
pub mod clock;
pub mod config;
pub mod lossy_relay;
pub mod session;
pub mod tools;

mod client;
mod node;
mod quickack;
mod server;
mod stream;

/// For a runtime that runs a [`Node`]: install as its `on_thread_park` hook
/// (`tokio::runtime::Builder::on_thread_park(slim_tokio::flush_owed_acks)`, as the `slim-tokio`
/// binary does). The TCP acks that the node owes its clients after each read are then sent once
/// the message was routed on, rather than before. Without it they are sent at once, as before.
pub use quickack::flush_owed as flush_owed_acks;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use slim_core::router::{Router, RouterConfig, Stats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::node::{AdapterCounters, NodeHandle};

/// The SLIM version this node announces in link negotiations (semver, as clients require).
pub const SLIM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS for {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("no randomness from the operating system: {0}")]
    Entropy(String),
}

/// Counters of a running node.
#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    pub router: Stats,
    /// Frames dropped because a connection did not read them fast enough.
    pub slow_consumer_drops: u64,
}

/// A running node.
pub struct Node {
    handle: NodeHandle,
    shutdown: CancellationToken,
    addrs: Vec<SocketAddr>,
    router_task: JoinHandle<()>,
    counters: Arc<AdapterCounters>,
    node_id: String,
    drain_timeout: std::time::Duration,
}

fn random_bytes<const N: usize>() -> Result<[u8; N], NodeError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| NodeError::Entropy(e.to_string()))?;
    Ok(bytes)
}

/// A random UUIDv4 string, the reference's format for node and link ids.
fn random_uuid() -> Result<String, NodeError> {
    let mut b: [u8; 16] = random_bytes()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

impl Node {
    /// Binds every configured server and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let node_id = match &config.node_id {
            Some(id) => id.clone(),
            None => format!("node-{}", random_uuid()?),
        };
        let router = Router::new(
            RouterConfig {
                node_id: node_id.clone(),
                slim_version: SLIM_VERSION.to_owned(),
                deployment_name: config.deployment_name.clone(),
                require_header_mac: config.require_header_mac,
                negotiation_timeout: config.negotiation_timeout,
                ..RouterConfig::default()
            },
            random_bytes()?,
        );
        // Bind everything before spawning anything, so a failure leaves nothing running.
        let mut listeners = Vec::new();
        for server in &config.servers {
            let listener = tokio::net::TcpListener::bind(server.addr)
                .await
                .map_err(|source| NodeError::Bind {
                    addr: server.addr,
                    source,
                })?;
            let tls = match &server.tls {
                None => None,
                Some(files) => Some(
                    server::tls_acceptor(&files.cert_file, &files.key_file).map_err(|reason| {
                        NodeError::Tls {
                            addr: server.addr,
                            reason,
                        }
                    })?,
                ),
            };
            listeners.push((listener, tls));
        }
        let counters = Arc::new(AdapterCounters::default());
        let (handle, router_task) = node::spawn_router(router, Clock::new(), counters.clone());
        let shutdown = CancellationToken::new();
        let mut addrs = Vec::new();
        for (listener, tls) in listeners {
            let addr = listener.local_addr().map_err(|source| NodeError::Bind {
                addr: "0.0.0.0:0".parse().expect("valid address"),
                source,
            })?;
            tracing::info!(%addr, tls = tls.is_some(), "serving SLIM data plane");
            addrs.push(addr);
            tokio::spawn(server::accept_loop(
                listener,
                server::Acceptor {
                    node: handle.clone(),
                    tls,
                    max_message_size: config.max_message_size,
                    max_connection_idle: config.max_connection_idle,
                    shutdown: shutdown.clone(),
                },
            ));
        }
        for client in &config.clients {
            let link_id = match &client.link_id {
                Some(id) => id.clone(),
                None => random_uuid()?,
            };
            tracing::info!(endpoint = %client.authority, %link_id, kind = client.connection_type.as_str(), "linking to node");
            tokio::spawn(client::dial_loop(
                client.clone(),
                link_id,
                handle.clone(),
                config.max_message_size,
                shutdown.clone(),
            ));
        }
        Ok(Node {
            handle,
            shutdown,
            addrs,
            router_task,
            counters,
            node_id,
            drain_timeout: config.drain_timeout,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Current counters; `None` once the node stopped.
    pub async fn stats(&self) -> Option<NodeStats> {
        let router = self.handle.stats().await?;
        Some(NodeStats {
            router,
            slow_consumer_drops: self.counters.slow_consumer_drops.load(Ordering::Relaxed),
        })
    }

    /// Graceful stop: no new connections, every open stream ended with grpc-status 0 and an
    /// HTTP/2 GOAWAY, then up to the drain timeout for the streams to flush.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.handle.shutdown().await;
        let _ = tokio::time::timeout(self.drain_timeout, self.router_task).await;
        // Let writer tasks flush their trailers and GOAWAY frames.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

//! Node configuration: the reference's YAML layout (spec §8), the parts of it we implement.
//!
//! ```yaml
//! tracing: { log_level: info }
//! services:
//!   slim/0:
//!     node_id: my-node
//!     dataplane:
//!       servers: [ { endpoint: "127.0.0.1:46357", tls: { insecure: true } } ]
//! ```
//! Keys we do not know are reported (as warnings by the binary), never fatal, so a reference
//! config file works unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Address the node serves on when no configuration is given.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:46357";

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid YAML in {path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("no service under `services:` (expected e.g. `services: {{ slim/0: {{ dataplane: ... }} }}`)")]
    NoService,
    #[error("service {service}: no dataplane server configured")]
    NoServer { service: String },
    #[error("endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("server {endpoint}: tls needs both cert_file and key_file, or insecure: true")]
    IncompleteTls { endpoint: String },
    #[error("environment variable {0} (used as ${{env:{0}}}) is not set")]
    MissingEnv(String),
    #[error("runtime.n_cores: {0} worker threads is more than the {MAX_WORKER_THREADS} allowed")]
    TooManyThreads(usize),
}

/// More runtime workers than this is a typo, not a machine (each is an OS thread).
pub const MAX_WORKER_THREADS: usize = 1024;

/// A parsed, validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: Option<String>,
    pub deployment_name: String,
    pub log_level: Option<String>,
    pub servers: Vec<ServerConfig>,
    pub clients: Vec<ClientConfig>,
    pub require_header_mac: bool,
    pub negotiation_timeout: Duration,
    pub max_message_size: usize,
    /// Time given to open streams to finish after SIGINT/SIGTERM.
    pub drain_timeout: Duration,
    /// Runtime worker threads (reference `runtime.n_cores`; 0: one per core). The default is
    /// 1: the router is one task, so more workers mostly add cross-thread wake-ups to every hop
    /// (BENCHMARKS.md: the round trip through the node is 3–4× shorter on one thread).
    pub worker_threads: usize,
    /// Name of the runtime's threads (reference `runtime.thread_name`).
    pub thread_name: String,
    /// An HTTP/2 connection without any open stream for this long is closed (reference
    /// `keepalive.max_connection_idle`, 3600 s).
    pub max_connection_idle: Duration,
    /// Dotted paths of keys we ignored.
    pub unknown_keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// An outgoing link to another node.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` to dial.
    pub authority: String,
    pub link_id: Option<String>,
    pub connection_type: slim_core::router::ConnectionKind,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            deployment_name: String::new(),
            log_level: None,
            servers: vec![ServerConfig {
                addr: DEFAULT_ENDPOINT.parse().expect("valid default endpoint"),
                tls: None,
            }],
            clients: Vec::new(),
            require_header_mac: true,
            negotiation_timeout: Duration::from_secs(5),
            max_message_size: slim_proto::DEFAULT_MAX_MESSAGE_SIZE,
            drain_timeout: Duration::from_secs(5),
            worker_threads: 1,
            thread_name: "slim-node".into(),
            max_connection_idle: Duration::from_secs(3600),
            unknown_keys: Vec::new(),
        }
    }
}

type Extra = BTreeMap<String, serde_norway::Value>;

#[derive(Deserialize, Default)]
struct RawFile {
    #[serde(default)]
    tracing: Option<RawTracing>,
    #[serde(default)]
    runtime: Option<RawRuntime>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawTracing {
    log_level: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawRuntime {
    drain_timeout: Option<String>,
    n_cores: Option<usize>,
    thread_name: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawService {
    node_id: Option<String>,
    domain_name: Option<String>,
    dataplane: Option<RawDataplane>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawDataplane {
    #[serde(default)]
    servers: Vec<RawServer>,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawServer {
    endpoint: String,
    tls: Option<RawTls>,
    require_header_mac: Option<bool>,
    negotiation_timeout_secs: Option<u64>,
    /// MiB, as in the reference.
    max_frame_size: Option<u64>,
    keepalive: Option<RawKeepalive>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawKeepalive {
    max_connection_idle: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawTls {
    insecure: Option<bool>,
    cert_file: Option<String>,
    key_file: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RawClient {
    endpoint: String,
    link_id: Option<String>,
    connection_type: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

fn note_unknown(prefix: &str, extra: &Extra, out: &mut Vec<String>) {
    out.extend(extra.keys().map(|k| format!("{prefix}{k}")));
}

/// Replaces `${env:VAR}` with the variable's value, as the reference does.
fn substitute_env(text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${env:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 6..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        let value = std::env::var(var).map_err(|_| ConfigError::MissingEnv(var.to_owned()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses an endpoint: `host:port`, optionally with an `http://`/`https://` scheme.
pub fn parse_listen_endpoint(endpoint: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |reason: &str| ConfigError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let bare = strip_scheme(endpoint).trim_end_matches('/');
    if let Ok(addr) = bare.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = bare
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}")
        .parse()
        .map_err(|_| bad("host must be an IP address or localhost"))
}

fn strip_scheme(endpoint: &str) -> &str {
    endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint)
}

fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    if let Some(s) = text.strip_suffix('s') {
        return s.trim().parse::<f64>().ok().map(Duration::from_secs_f64);
    }
    text.parse::<f64>().ok().map(Duration::from_secs_f64)
}

impl NodeConfig {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses YAML text (`origin` names it in errors; relative TLS paths are resolved against
    /// its directory).
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let text = substitute_env(text)?;
        let raw: RawFile = if text.trim().is_empty() {
            RawFile::default()
        } else {
            serde_norway::from_str(&text).map_err(|source| ConfigError::Yaml {
                path: origin.to_owned(),
                source,
            })?
        };
        let base_dir = origin.parent().unwrap_or(Path::new("."));
        let mut config = NodeConfig {
            servers: Vec::new(),
            ..NodeConfig::default()
        };
        let unknown = &mut config.unknown_keys;
        note_unknown("", &raw.extra, unknown);
        if let Some(tracing) = &raw.tracing {
            config.log_level = tracing.log_level.clone();
            note_unknown("tracing.", &tracing.extra, unknown);
        }
        if let Some(runtime) = &raw.runtime {
            if let Some(d) = runtime.drain_timeout.as_deref().and_then(parse_duration) {
                config.drain_timeout = d;
            }
            if let Some(n) = runtime.n_cores {
                if n > MAX_WORKER_THREADS {
                    return Err(ConfigError::TooManyThreads(n));
                }
                config.worker_threads = n;
            }
            if let Some(name) = &runtime.thread_name {
                config.thread_name.clone_from(name);
            }
            note_unknown("runtime.", &runtime.extra, unknown);
        }
        let mut services = raw.services.into_iter();
        let (service_name, service) = services.next().ok_or(ConfigError::NoService)?;
        for (extra_service, _) in services {
            unknown.push(format!(
                "services.{extra_service} (only the first service is run)"
            ));
        }
        let prefix = format!("services.{service_name}.");
        note_unknown(&prefix, &service.extra, unknown);
        config.node_id = service.node_id;
        config.deployment_name = service.domain_name.unwrap_or_default();
        let dataplane = service.dataplane.ok_or_else(|| ConfigError::NoServer {
            service: service_name.clone(),
        })?;
        note_unknown(&format!("{prefix}dataplane."), &dataplane.extra, unknown);
        for (i, server) in dataplane.servers.into_iter().enumerate() {
            let server_prefix = format!("{prefix}dataplane.servers[{i}].");
            note_unknown(&server_prefix, &server.extra, unknown);
            let addr = parse_listen_endpoint(&server.endpoint)?;
            let tls = match server.tls {
                None => None,
                Some(tls) => {
                    note_unknown(&format!("{server_prefix}tls."), &tls.extra, unknown);
                    match (tls.insecure.unwrap_or(false), tls.cert_file, tls.key_file) {
                        (_, Some(cert), Some(key)) => Some(TlsFiles {
                            cert_file: base_dir.join(cert),
                            key_file: base_dir.join(key),
                        }),
                        (true, None, None) => None,
                        _ => {
                            return Err(ConfigError::IncompleteTls {
                                endpoint: server.endpoint,
                            })
                        }
                    }
                }
            };
            if let Some(require) = server.require_header_mac {
                config.require_header_mac = require;
            }
            if let Some(secs) = server.negotiation_timeout_secs {
                config.negotiation_timeout = Duration::from_secs(secs.max(1));
            }
            if let Some(keepalive) = &server.keepalive {
                note_unknown(
                    &format!("{server_prefix}keepalive."),
                    &keepalive.extra,
                    unknown,
                );
                if let Some(text) = &keepalive.max_connection_idle {
                    config.max_connection_idle =
                        parse_duration(text).ok_or_else(|| ConfigError::BadEndpoint {
                            endpoint: server.endpoint.clone(),
                            reason: format!(
                                "keepalive.max_connection_idle {text:?} is not a duration"
                            ),
                        })?;
                }
            }
            if let Some(mib) = server.max_frame_size {
                config.max_message_size = (mib.clamp(1, 64) as usize) * 1024 * 1024;
            }
            config.servers.push(ServerConfig { addr, tls });
        }
        if config.servers.is_empty() {
            return Err(ConfigError::NoServer {
                service: service_name,
            });
        }
        for (i, client) in dataplane.clients.into_iter().enumerate() {
            let client_prefix = format!("{prefix}dataplane.clients[{i}].");
            note_unknown(&client_prefix, &client.extra, &mut config.unknown_keys);
            let authority = strip_scheme(&client.endpoint)
                .trim_end_matches('/')
                .to_owned();
            parse_listen_endpoint(&authority)?;
            use slim_core::router::ConnectionKind;
            let connection_type = match client.connection_type.as_deref() {
                None | Some("peer") => ConnectionKind::Peer,
                Some("remote") => ConnectionKind::Remote,
                Some("edge") => ConnectionKind::Edge,
                Some(other) => {
                    return Err(ConfigError::BadEndpoint {
                        endpoint: client.endpoint.clone(),
                        reason: format!(
                            "connection_type {other:?} is not one of peer, remote, edge"
                        ),
                    })
                }
            };
            config.clients.push(ClientConfig {
                authority,
                link_id: client.link_id,
                connection_type,
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_yaml(text, Path::new("/etc/slim/config.yaml"))
    }

    #[test]
    fn reference_minimal_server_config() {
        let config = parse(
            r#"
tracing: { log_level: info, display_thread_names: true, display_thread_ids: true }
runtime: { n_cores: 0, thread_name: "slim-data-plane", drain_timeout: 10s }
services:
  slim/0:
    node_id: slim-server
    dataplane:
      servers: [ { endpoint: "0.0.0.0:46357", tls: { insecure: true } } ]
      clients: []
"#,
        )
        .unwrap();
        assert_eq!(config.node_id.as_deref(), Some("slim-server"));
        assert_eq!(config.servers.len(), 1);
        assert_eq!(config.servers[0].addr, "0.0.0.0:46357".parse().unwrap());
        assert!(config.servers[0].tls.is_none());
        assert_eq!(config.drain_timeout, Duration::from_secs(10));
        assert_eq!(config.worker_threads, 0);
        assert_eq!(config.thread_name, "slim-data-plane");
        assert_eq!(
            config.unknown_keys,
            vec!["tracing.display_thread_ids", "tracing.display_thread_names"]
        );
    }

    #[test]
    fn absurd_thread_counts_are_refused() {
        let error = parse("runtime: { n_cores: 100000 }\nservices: { slim/0: { dataplane: { servers: [ { endpoint: \"127.0.0.1:1\" } ] } } }\n")
            .unwrap_err();
        assert!(
            matches!(error, ConfigError::TooManyThreads(100000)),
            "{error}"
        );
        let ok = parse("runtime: { n_cores: 4 }\nservices: { slim/0: { dataplane: { servers: [ { endpoint: \"127.0.0.1:1\" } ] } } }\n")
            .unwrap();
        assert_eq!(ok.worker_threads, 4);
    }

    #[test]
    fn tls_paths_are_relative_to_the_file() {
        let config = parse(
            "services:\n  slim/0:\n    dataplane:\n      servers:\n        - endpoint: 127.0.0.1:1\n          tls: { cert_file: c.pem, key_file: k.pem }\n",
        )
        .unwrap();
        let tls = config.servers[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, Path::new("/etc/slim/c.pem"));
    }

    #[test]
    fn clear_errors() {
        assert!(matches!(parse("services: {}"), Err(ConfigError::NoService)));
        assert!(matches!(
            parse("services: { slim/0: { node_id: x } }"),
            Err(ConfigError::NoServer { .. })
        ));
        assert!(matches!(
            parse("services: { slim/0: { dataplane: { servers: [ { endpoint: nowhere } ] } } }"),
            Err(ConfigError::BadEndpoint { .. })
        ));
        assert!(matches!(
            parse("services: { slim/0: { dataplane: { servers: [ { endpoint: '1.2.3.4:5', tls: { cert_file: a } } ] } } }"),
            Err(ConfigError::IncompleteTls { .. })
        ));
        let err = parse("services: [").unwrap_err();
        assert!(matches!(err, ConfigError::Yaml { .. }));
        assert!(err.to_string().contains("/etc/slim/config.yaml"));
        assert!(matches!(
            parse("services: { slim/0: { node_id: '${env:SLIM_SURELY_UNSET_VAR}' } }"),
            Err(ConfigError::MissingEnv(_))
        ));
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_listen_endpoint("http://localhost:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            parse_listen_endpoint("[::1]:9").unwrap(),
            "[::1]:9".parse().unwrap()
        );
        assert!(parse_listen_endpoint("127.0.0.1").is_err());
        assert!(parse_listen_endpoint("127.0.0.1:x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("soon"), None);
    }
}

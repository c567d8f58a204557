//! The node behind TLS: a self-signed certificate, clients through tokio-rustls (ring, ALPN h2),
//! link negotiation and routing between two TLS clients; a plaintext client on the TLS port fails
//! promptly without harming the node.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use slim_proto::Name;
use slim_tokio::config::{ServerConfig, TlsFiles};
use slim_tokio::Node;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct TlsNode {
    node: Node,
    cert: CertificateDer<'static>,
    _dir: tempfile::TempDir,
}

/// A self-signed certificate for 127.0.0.1 and localhost, in PEM files the node reads.
async fn start_tls_node() -> TlsNode {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, certified.cert.pem()).unwrap();
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).unwrap();
    let node = start_node_with(|config| {
        config.servers = vec![ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: Some(TlsFiles {
                cert_file,
                key_file,
            }),
        }];
    })
    .await;
    TlsNode {
        node,
        cert: certified.cert.der().clone(),
        _dir: dir,
    }
}

fn connector(trusted: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).expect("trust anchor");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// TCP + TLS (verifying the node's certificate for `server_name`) + HTTP/2 + OpenChannel +
/// negotiation.
async fn connect_tls(
    addr: SocketAddr,
    trusted: &CertificateDer<'static>,
    server_name: ServerName<'static>,
    label: &str,
) -> Client {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    tcp.set_nodelay(true).unwrap();
    let tls = within(
        "TLS handshake",
        connector(trusted).connect(server_name, tcp),
    )
    .await
    .expect("TLS handshake with the node");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the node selects h2 by ALPN"
    );
    let mut client = Client::open(tls, "https", &addr.to_string(), label).await;
    client.negotiate().await;
    client
}

#[tokio::test]
async fn routes_between_tls_clients() {
    let tls = start_tls_node().await;
    let addr = node_addr(&tls.node);
    let ip_name = ServerName::IpAddress(addr.ip().into());
    let mut a = connect_tls(addr, &tls.cert, ip_name.clone(), "A").await;
    let mut b = connect_tls(
        addr,
        &tls.cert,
        ServerName::try_from("localhost").unwrap(),
        "B",
    )
    .await;
    let a_name = Name::with_id("org", "ns", "alice", 1);
    let b_name = Name::with_id("org", "ns", "bob", 2);
    a.subscribe(&a_name, 1).await;
    b.subscribe(&b_name, 2).await;
    assert_delivers(&mut a, &a_name, &mut b, &b_name, b"over TLS").await;
    assert_delivers(&mut b, &b_name, &mut a, &a_name, b"and back").await;

    // A client that does not trust the certificate cannot get in.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = within(
        "an untrusted TLS handshake to fail",
        connector(other.cert.der()).connect(ip_name, tcp),
    )
    .await;
    assert!(
        refused.is_err(),
        "a certificate we do not trust must be refused"
    );

    assert_delivers(&mut a, &a_name, &mut b, &b_name, b"still over TLS").await;
    let stats = stats(&tls.node).await;
    assert_eq!((stats.connections, stats.links_established), (2, 2));
    tls.node.shutdown().await;
    assert_eq!(a.status().await.code, 0);
    assert_eq!(b.status().await.code, 0);
}

#[tokio::test]
async fn plaintext_client_on_the_tls_port_fails_cleanly() {
    let tls = start_tls_node().await;
    let addr = node_addr(&tls.node);

    // A plaintext HTTP/2 client: the node reads the preface as a bad TLS ClientHello and hangs
    // up; the client sees an error (not a hang, not a response).
    let tcp = TcpStream::connect(addr).await.unwrap();
    let attempt = within(
        "the plaintext attempt to fail",
        Client::try_open(
            tcp,
            "http",
            &addr.to_string(),
            slim_proto::OPEN_CHANNEL_PATH,
            "plain",
        ),
    )
    .await;
    assert!(
        attempt.is_err(),
        "plaintext HTTP/2 must not work on a TLS port"
    );

    // At the byte level: the node answers with at most a TLS alert, then closes.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within("the node to close", tcp.read_to_end(&mut answer)).await;
    if let Some(first) = answer.first() {
        assert_eq!(*first, 0x15, "only a TLS alert record: {answer:02x?}");
    }

    // The node is unharmed: TLS clients still connect and route.
    let server_name = ServerName::try_from("localhost").unwrap();
    let mut a = connect_tls(addr, &tls.cert, server_name.clone(), "A").await;
    let mut b = connect_tls(addr, &tls.cert, server_name, "B").await;
    let a_name = Name::with_id("org", "ns", "alice", 1);
    let b_name = Name::with_id("org", "ns", "bob", 2);
    b.subscribe(&b_name, 2).await;
    assert_delivers(
        &mut a,
        &a_name,
        &mut b,
        &b_name,
        b"after the plaintext attempt",
    )
    .await;
    let stats = stats(&tls.node).await;
    assert_eq!(
        stats.connections, 2,
        "failed handshakes never reached the router"
    );
    assert_eq!(stats.connections_refused, 0);
    tls.node.shutdown().await;
}

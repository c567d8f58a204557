//! Accepting connections: TCP (TCP_NODELAY and quick acks on), optional TLS, HTTP/2 with the reference's
//! settings, and the one gRPC method a SLIM node serves.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::node::{NodeHandle, OpenKind};
use crate::quickack::QuickAck;
use crate::stream::{grpc_trailers, run_link};

/// A client has this long to complete TLS and the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 settings the reference node advertises (captures/README.md §1).
const INITIAL_WINDOW: u32 = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_STREAMS: u32 = 100;
/// How often an idle connection is looked at.
const IDLE_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) struct Acceptor {
    pub node: NodeHandle,
    pub tls: Option<TlsAcceptor>,
    pub max_message_size: usize,
    pub max_connection_idle: Duration,
    pub shutdown: CancellationToken,
}

pub(crate) async fn accept_loop(listener: TcpListener, acceptor: Acceptor) {
    loop {
        let accepted = tokio::select! {
            () = acceptor.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_connection(tcp, &acceptor).await {
                        tracing::info!(%peer, %error, "connection ended with an error");
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: &Acceptor) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let tcp = QuickAck::new(tcp);
    match &acceptor.tls {
        None => serve_h2(tcp, acceptor).await,
        Some(tls) => {
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            serve_h2(stream, acceptor).await
        }
    }
}

async fn serve_h2<T>(io: T, acceptor: &Acceptor) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let max_frame = acceptor
        .max_message_size
        .clamp(16 * 1024, 16 * 1024 * 1024 - 1) as u32;
    let handshake = h2::server::Builder::new()
        .initial_window_size(INITIAL_WINDOW)
        .initial_connection_window_size(INITIAL_WINDOW)
        .max_frame_size(max_frame.min(4 * 1024 * 1024))
        .max_header_list_size(MAX_HEADER_LIST)
        // Clients use one stream; a bound keeps a hostile one from opening thousands.
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(1024 * 1024)
        .handshake::<_, Bytes>(io);
    let mut connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| "HTTP/2 handshake timed out".to_string())?
        .map_err(|e| format!("not an HTTP/2 client: {e}"))?;
    let mut shutting_down = false;
    let open_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since = Some(tokio::time::Instant::now());
    let mut idle_check = tokio::time::interval(IDLE_CHECK.min(acceptor.max_connection_idle));
    loop {
        let next = tokio::select! {
            () = acceptor.shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                connection.graceful_shutdown();
                continue;
            }
            _ = idle_check.tick(), if !shutting_down => {
                let open = open_streams.load(std::sync::atomic::Ordering::Relaxed);
                match (open, idle_since) {
                    (0, None) => idle_since = Some(tokio::time::Instant::now()),
                    (0, Some(since)) if since.elapsed() >= acceptor.max_connection_idle => {
                        tracing::info!("closing a connection without streams (idle)");
                        shutting_down = true;
                        connection.graceful_shutdown();
                    }
                    (0, Some(_)) => {}
                    _ => idle_since = None,
                }
                continue;
            }
            next = connection.accept() => next,
        };
        match next {
            None => return Ok(()),
            Some(Err(error)) => return Err(format!("HTTP/2 error: {error}")),
            Some(Ok((request, respond))) => {
                let acceptor = acceptor.clone();
                let open_streams = open_streams.clone();
                open_streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                idle_since = None;
                tokio::spawn(async move {
                    serve_stream(request, respond, acceptor).await;
                    open_streams.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                });
            }
        }
    }
}

async fn serve_stream(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    acceptor: Acceptor,
) {
    let path = request.uri().path();
    if request.method() != http::Method::POST || path != slim_proto::OPEN_CHANNEL_PATH {
        tracing::info!(method = %request.method(), path, "request for an unknown method");
        reply_trailers_only(&mut respond, 12, &format!("unknown method {path}"));
        return;
    }
    let response = grpc_response();
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(error) => {
            tracing::debug!(%error, "stream gone before response headers");
            return;
        }
    };
    run_link(
        acceptor.node,
        OpenKind::Accepted,
        request.into_body(),
        send,
        acceptor.max_message_size,
        true,
        None,
    )
    .await;
}

pub(crate) fn grpc_response() -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A gRPC error without a body: status in the response headers (gRPC "Trailers-Only").
fn reply_trailers_only(respond: &mut SendResponse<Bytes>, code: u32, message: &str) {
    let _ = respond.send_response(trailers_only(code, message), true);
}

/// The response of a gRPC error without a body ("Trailers-Only").
pub(crate) fn trailers_only(code: u32, message: &str) -> Response<()> {
    let mut response = grpc_response();
    response.headers_mut().extend(grpc_trailers(code, message));
    response
}

/// A rustls server config for the certificate chain and key in PEM files.
pub(crate) fn tls_acceptor(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM in {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not work together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

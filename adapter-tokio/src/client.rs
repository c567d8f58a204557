//! Outgoing links to other nodes (`dataplane.clients` in the config): dial, open the gRPC stream,
//! let the router negotiate as initiator, and redial with a fixed backoff when the link drops.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::ClientConfig;
use crate::node::{NodeHandle, OpenKind};
use crate::stream::run_link;

/// The reference's default client backoff: fixed 2 s, unlimited.
const REDIAL_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) async fn dial_loop(
    config: ClientConfig,
    link_id: String,
    node: NodeHandle,
    max_message_size: usize,
    shutdown: CancellationToken,
) {
    loop {
        let attempt = dial_once(&config, &link_id, &node, max_message_size);
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = attempt => match result {
                Ok(()) => tracing::info!(endpoint = %config.authority, %link_id, "link to node ended"),
                Err(error) => tracing::warn!(endpoint = %config.authority, %link_id, %error, "cannot link to node"),
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(REDIAL_BACKOFF) => {}
        }
    }
}

async fn dial_once(
    config: &ClientConfig,
    link_id: &str,
    node: &NodeHandle,
    max_message_size: usize,
) -> Result<(), String> {
    let (recv, send) = open_channel(&config.authority).await?;
    run_link(
        node.clone(),
        OpenKind::Dialed {
            link_id: link_id.to_owned(),
            kind: config.connection_type,
        },
        recv,
        send,
        max_message_size,
        false,
        None,
    )
    .await;
    Ok(())
}

/// Dials `authority` (host:port, plaintext HTTP/2) and opens the OpenChannel stream.
pub(crate) async fn open_channel(
    authority: &str,
) -> Result<(h2::RecvStream, h2::SendStream<Bytes>), String> {
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::post(format!(
        "http://{authority}{}",
        slim_proto::OPEN_CHANNEL_PATH
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header("te", "trailers")
    .body(())
    .map_err(|e| e.to_string())?;
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let (response, send) = client
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| format!("OpenChannel: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("OpenChannel answered HTTP {}", response.status()));
    }
    if let Some(status) = response.headers().get("grpc-status") {
        return Err(format!("OpenChannel refused with grpc-status {status:?}"));
    }
    Ok((response.into_body(), send))
}

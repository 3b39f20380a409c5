//! The connector tonic calls for each new connection ([`PcsConnector`]), and connecting a
//! channel through it.
//!
//! The connector opens the connection ([`crate::dial`]) and returns the stream at once,
//! without writing the Prefix and without waiting for the Verdict: the [`PcsStream`] sends the
//! Prefix in the same TLS record and system call as hyper's first bytes, the HTTP/2 preface
//! (pipelining, PROTOCOL.md section 3), and consumes the Verdict on its first reads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::ClientError;
use crate::dial::{ClientInner, ConnGuard, Target, open_first, target};
use crate::error::{ConnectFailure, chain_text, find_connect_failure, io_messages};
use crate::log::ConnState;
use crate::stream::PcsStream;

/// The `tower::Service<Uri>` tonic's endpoint calls to open a connection.
#[derive(Clone)]
pub(crate) struct PcsConnector {
    pub(crate) target: Arc<Target>,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<PcsStream>, ConnectFailure>> + Send>>;

impl tower::Service<http::Uri> for PcsConnector {
    type Response = TokioIo<PcsStream>;
    type Error = ConnectFailure;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        // The URI is the channel's own `http://addr`: the target already knows the address.
        let calls = self.target.calls.load(Ordering::SeqCst);
        if let Some(failure) = self.target.log.failed_since(calls) {
            return Box::pin(async move { Err(ConnectFailure(failure)) });
        }
        let mut guard = ConnGuard::begin(self.target.clone(), calls);
        Box::pin(async move {
            match open_first(&guard.target).await {
                Ok((tls, prefix, proof)) => {
                    Ok(TokioIo::new(PcsStream::new(tls, prefix, guard, proof)))
                }
                Err(failure) => {
                    tracing::debug!(conn = guard.id, error = %failure.io_message(), "PCS1 connection failed");
                    guard.settle(ConnState::Failed(failure.clone()));
                    Err(ConnectFailure(failure))
                }
            }
        })
    }
}

/// A new connection to `addr` whose Prefix carries `code` (a step-up: never the session
/// ticket), once the server has accepted it.
pub(crate) async fn connect_with_code(
    client: &Arc<ClientInner>,
    addr: &str,
    code: Zeroizing<String>,
) -> Result<(Channel, Arc<Target>), ClientError> {
    let (target, endpoint) = target(client, addr)?;
    *target.preset_code.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
    let channel = connect_target(&target, endpoint).await?;
    Ok((channel, target))
}

/// Connects the endpoint through `target`'s connector and waits for the first Verdict.
pub(crate) async fn connect_target(
    target: &Arc<Target>,
    endpoint: Endpoint,
) -> Result<Channel, ClientError> {
    let channel = endpoint
        .connect_with_connector(PcsConnector {
            target: target.clone(),
        })
        .await
        .map_err(|e| {
            // The connector's own error, or (when the HTTP/2 handshake already hit the
            // refused connection) the failure recorded for it.
            let failure = find_connect_failure(&e)
                .cloned()
                .or_else(|| target.log.attribute(0, &io_messages(&e)));
            match failure {
                Some(failure) => failure.into_client_error(),
                None => ClientError::Transport(chain_text(&e)),
            }
        })?;
    // The channel's first connection has id 1; its Verdict is read by the HTTP/2 task.
    let timeout = target.client.connect_timeout;
    match tokio::time::timeout(timeout, target.log.wait_settled(1)).await {
        Ok(Some(ConnState::Accepted)) => Ok(channel),
        Ok(Some(ConnState::Failed(failure))) => Err(failure.into_client_error()),
        Ok(Some(ConnState::Pending) | None) => Err(ClientError::Transport(
            "the first connection was lost without a verdict".into(),
        )),
        Err(_) => Err(ClientError::Timeout(timeout)),
    }
}

//! The accept loop. `axum::serve` would do, except that it cannot bound
//! what a client may hold: here every connection needs one of
//! `HTTP_MAX_CONNECTIONS` slots (past that, new connections wait in the
//! kernel's backlog rather than being accepted), and a client that does not
//! send its request headers within `HTTP_HEADER_TIMEOUT_SECS` (a fresh
//! connection, or an idle keep-alive one) is disconnected.
//!
//! HTTP/1.1 only: Railway's proxy (and any proxy in front of the service)
//! speaks HTTP/1.1 to it, and hyper's protocol auto-detection reads the
//! first bytes before any header timeout starts, so a client that connects
//! and sends nothing would hold its slot forever.
//!
//! Each request carries the peer address as `ConnectInfo<SocketAddr>`, for
//! per-IP limits. On stop, no connection is accepted any more, open ones
//! finish their in-flight request (hyper's graceful shutdown), and
//! [`serve`] returns when the last one has closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::Request;
use axum::http::Extensions;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tower::Service;

/// After a failed `accept` (typically out of file descriptors), wait this
/// long before the next: retrying at once would spin a core while nothing
/// can be accepted anyway.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What one client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest time to receive a request's headers.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop` turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached; new connections wait"
                );
                tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = stopped(stop.clone()) => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = stopped(stop.clone()) => break,
        };
        // Answers are small and written at once; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().call(request)
        });
        let builder = builder.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(error = %error, "connection ended with an error");
                    }
                }
                _ = stopped(stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Resolves when `stop` is (or turns) true, or its sender is gone.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The peer address of a request served by [`serve`], from its
/// extensions; `None` for requests that did not come through it (router
/// tests with `oneshot`).
pub fn peer_of(extensions: &Extensions) -> Option<SocketAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}

//! Serving the Router on a listener until a shutdown signal.
//!
//! Connections are served by hyper directly rather than `axum::serve`, for two limits it does
//! not set: a client must send a request's head within [`HEADER_READ`] (a half-sent one held
//! its connection for good, and enough of them ran the process out of file descriptors), and at
//! most [`MAX_CONNECTIONS`] are open at once, fewer where the process may open fewer files
//! (further ones wait in the listen backlog).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long a client has to send a request's head.
pub const HEADER_READ: Duration = Duration::from_secs(30);

/// Connections served at once.
const MAX_CONNECTIONS: usize = 4096;

/// How long requests in flight may take to finish once shutting down: a client that stopped
/// reading, or an upload sent a byte at a time, would otherwise hold the process for good.
pub const DRAIN: Duration = Duration::from_secs(30);

/// Serves until `shutdown` completes, then stops accepting and lets requests in flight finish
/// (for [`DRAIN`] at most).
/// A connection that has not sent a request's head within `header_read` (an idle one its next
/// request's) is closed.
pub async fn run(
    listener: TcpListener,
    router: Router,
    header_read: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(connection_cap()));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, or a connection reset before it was taken: the listener
                // itself is fine; pause so a persistent cause does not spin.
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            seconds = DRAIN.as_secs(),
            "requests still in flight after the drain: closing them"
        );
    }
    Ok(())
}

/// How many connections may be open at once: [`MAX_CONNECTIONS`], within the files the process
/// may open (raised as far as they need within its hard limit: a soft one of 1024 is common),
/// less a reserve for the store's files and the registry's own.
fn connection_cap() -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // As many as the connections need, within the hard limit (`None` is unlimited).
    let wanted = (MAX_CONNECTIONS as u64 + FILE_RESERVE).min(limit.maximum.unwrap_or(u64::MAX));
    if limit.current.is_some_and(|current| current < wanted) {
        let raised = Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(%error, "raising the open-file limit failed");
        }
    }
    let files = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let cap = usize::try_from(files.saturating_sub(FILE_RESERVE))
        .unwrap_or(MAX_CONNECTIONS)
        .clamp(16, MAX_CONNECTIONS);
    if cap < MAX_CONNECTIONS {
        tracing::info!(
            connections = cap,
            files,
            "the open-file limit bounds the connections served at once"
        );
    }
    cap
}

/// Files kept for other than connections.
const FILE_RESERVE: u64 = 128;

/// Completes on Ctrl-C or SIGTERM (what container runtimes send).
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

//! Accepting connections on the plain listener: a cap on concurrent connections, and graceful
//! shutdown (stop accepting, close idle connections, let in-flight responses finish until the
//! deadline, then close what is left). Each connection is served by `http1` (HTTP/1.1, with
//! `sendfile` for cached blobs; h2c handed to hyper).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::App;

pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_timeout: Duration,
}

pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = super::http1::serve(
            stream,
            peer,
            app.clone(),
            limits.header_read_timeout,
            stop.clone(),
        );
        let all_permits = permits.clone();
        let max = limits.max_connections;
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
            if all_permits.available_permits() == max {
                release_free_memory();
            }
        });
    }
    app.ready.store(false, Ordering::Relaxed);
    drop(listener);
    tracing::info!(deadline = ?limits.shutdown_timeout, "shutting down: finishing in-flight requests");
    stop.cancel();
    connections.close();
    tokio::select! {
        _ = connections.wait() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(limits.shutdown_timeout) => tracing::warn!("shutdown deadline reached; closing remaining connections"),
    }
}

/// Hands free memory back every `period`, also while connections stay open (kubelets keep
/// theirs): the allocator otherwise keeps up to 4 MiB free on each heap (see `main`).
pub async fn trim_free_memory(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        release_free_memory();
    }
}

/// Hand the allocator's free pages back to the system (when the last connection closes, and
/// every few seconds), so an idle mirror's memory drops back after a burst of downloads
/// instead of staying at its peak.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

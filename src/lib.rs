//! regcache: a pull-through caching mirror for OCI and Docker registries.
//!
//! Layout (dependencies point down this list):
//! - `http`: the hyper edge; parses every request into a `Route` and maps every error.
//! - `cache`: what to serve: hits, coalesced misses, tag freshness, the cross-repository rule.
//! - `store` / `upstream`: the disk, and the only code that dials out.
//! - `oci`: the spec's types, no IO.
//! - `access`: who a client is and what it may pull (consulted by `http` before `cache`).
//! - `config`, `metrics`, `telemetry`: read by all of the above, depending on none of them.

pub mod access;
pub mod cache;
pub mod config;
pub mod http;
pub mod metrics;
pub mod oci;
pub mod store;
pub mod telemetry;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("cannot open the cache: {0}")]
    Store(#[from] store::Error),
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error("TLS: {0}")]
    Tls(#[from] http::tls::Error),
    #[error("access control: {0}")]
    Access(#[from] access::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the mirror on an already bound listener until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    config: config::Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let metrics = Arc::new(metrics::Metrics::new());
    let dir = config.cache.dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .map_err(store::Error::Task)??;
    let upstreams = Arc::new(upstream::Upstreams::new(&config, metrics.clone())?);
    metrics.prime(upstreams.all().map(|u| u.name().as_str()));
    let cache = cache::Cache::new(&config, store, upstreams, metrics.clone());
    let tls = http::tls::Tls::load(&config.tls)?;
    let access = access::Access::start(&config.access)?;
    if access.is_some() && tls.is_none() {
        tracing::warn!(
            "access control is on but the listener is plain HTTP: passwords and tokens cross the network in clear unless a TLS proxy sits in front (set tls.cert_file and tls.key_file)"
        );
    }
    let app = Arc::new(http::App::new(cache, metrics).with_access(access));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, cache = %config.cache.dir.display(), "listening");
    }
    let limits = http::server::Limits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout,
        shutdown_timeout: config.server.shutdown_timeout,
    };
    let shutdown_timeout = limits.shutdown_timeout;
    match tls {
        Some(tls) => http::tls::run(listener, app.clone(), limits, tls, shutdown).await,
        None => http::server::run(listener, app.clone(), limits, shutdown).await,
    }
    app.cache.drain(shutdown_timeout).await;
    Ok(())
}

/// Binds the configured address and serves until SIGTERM or Ctrl-C.
pub async fn run(config: config::Config) -> Result<(), Error> {
    let addr = config.listen_addr()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })?;
    serve(listener, config, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

//! regcache: a pull-through caching mirror for OCI and Docker registries.
//!
//! Layout (dependencies point down this list):
//! - `airgap`: the command-line workflows over the cache: seed, export, import.
//! - `http`: the hyper edge; parses every request into a `Route` and maps every error.
//! - `cache`: what to serve: hits, coalesced misses, tag freshness, the cross-repository rule.
//! - `store` / `upstream`: the disk, and the only code that dials out.
//! - `credentials`: which upstream credential applies to a request, from mounted secrets.
//! - `oci`: the spec's types, no IO.
//! - `maintenance`: the `regcache cache` commands (stats, verify, gc) over `store`.
//! - `access`: who a client is and what it may pull (consulted by `http` before `cache`).
//! - `config`, `metrics`, `telemetry`: read by all of the above, depending on none of them.
//! - `nodeconfig`: `regcache node-config`, runtime config files pointing nodes at the mirror.

pub mod access;
pub mod airgap;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod http;
pub mod maintenance;
pub mod metrics;
pub mod nodeconfig;
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
    #[error(transparent)]
    Airgap(#[from] airgap::Error),
    #[error(transparent)]
    Kubernetes(#[from] credentials::kubernetes::Error),
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

/// How long start-up waits for the first list of Secrets from the Kubernetes API.
const KUBERNETES_FIRST_LIST: std::time::Duration = std::time::Duration::from_secs(10);

/// How often memory the allocator holds free is handed back to the system.
const MEMORY_TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

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
    let credentials = Arc::new(credentials::Credentials::new(
        &config.credentials,
        metrics.clone(),
    ));
    credentials.reload();
    let file_watch = (!config.credentials.files.is_empty()).then(|| credentials.watch());
    let mut api_watches = None;
    if config.credentials.kubernetes.enabled {
        let (client, namespace) =
            credentials::kubernetes::client(&config.credentials.kubernetes).await?;
        tracing::info!(
            namespace,
            "reading upstream credentials from Kubernetes Secrets"
        );
        let mut watches = credentials::kubernetes::watch(
            &credentials,
            client,
            &namespace,
            &config.credentials.kubernetes,
        );
        // Requests wait in the listen backlog meanwhile: better than pulling without them.
        if !watches.wait_listed(KUBERNETES_FIRST_LIST).await {
            tracing::warn!(
                namespace,
                "Secrets not listed yet; serving without them until they are"
            );
        }
        api_watches = Some(watches);
    }
    let upstreams = Arc::new(upstream::Upstreams::new(
        &config,
        credentials.clone(),
        metrics.clone(),
    )?);
    metrics.prime(upstreams.all().map(|u| u.name().as_str()));
    let (stop_maintenance, maintenance_stopped) = tokio::sync::oneshot::channel::<()>();
    let maintenance = tokio::spawn(store::evict::run(
        store.clone(),
        config.cache.limits.clone(),
        metrics.clone(),
        async move {
            let _ = maintenance_stopped.await;
        },
    ));
    let trimming = tokio::spawn(http::server::trim_free_memory(MEMORY_TRIM_PERIOD));
    let cache = cache::Cache::new(&config, store, upstreams, metrics.clone());
    let tls = http::tls::Tls::load(&config.tls)?;
    let access = access::Access::start(&config.access)?;
    if access.is_some() && tls.is_none() {
        tracing::warn!(
            "access control is on but the listener is plain HTTP: passwords and tokens cross the network in clear unless a TLS proxy sits in front (set tls.cert_file and tls.key_file)"
        );
    }
    let mut app = http::App::new(cache, metrics).with_access(access);
    if config.credentials.admin_endpoint {
        app = app.with_credentials_admin(http::admin::CredentialsAdmin {
            config: config.clone(),
            set: credentials.clone(),
        });
    }
    let app = Arc::new(app);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, cache = %config.cache.dir.display(), "listening");
    }
    let limits = http::server::Limits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout,
        shutdown_timeout: config.server.shutdown_timeout,
    };
    let shutdown_timeout = limits.shutdown_timeout;
    // One deadline for the whole shutdown: finishing responses, then storing downloads.
    let began = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let began = began.clone();
        async move {
            shutdown.await;
            let _ = began.set(tokio::time::Instant::now());
        }
    };
    match tls {
        Some(tls) => http::tls::run(listener, app.clone(), limits, tls, shutdown).await,
        None => http::server::run(listener, app.clone(), limits, shutdown).await,
    }
    let spent = began
        .get()
        .map_or(std::time::Duration::ZERO, |t: &tokio::time::Instant| {
            t.elapsed()
        });
    app.cache
        .drain(shutdown_timeout.saturating_sub(spent))
        .await;
    if let Some(watch) = file_watch {
        watch.abort();
    }
    if let Some(watches) = api_watches {
        watches.abort();
    }
    trimming.abort();
    let _ = stop_maintenance.send(());
    let _ = maintenance.await;
    Ok(())
}

/// The cache for the command-line workflows (`seed`, `export`, `import`) that work on it
/// in-process. It may be in use by a running `regcache serve` at the same time: content is
/// addressed by digest and every write is a rename, so both see whole files only (the server's
/// size gauges learn of seeded content at its next start).
pub async fn open_cache(config: &config::Config) -> Result<cache::Cache, Error> {
    let metrics = Arc::new(metrics::Metrics::new());
    let dir = config.cache.dir.clone();
    let store =
        tokio::task::spawn_blocking(move || store::Store::open_with(&dir, store::Access::Shared))
            .await
            .map_err(store::Error::Task)??;
    // Credentials from mounted Secrets (files) apply here as in the server; the Kubernetes API
    // source is the server's only.
    let credentials = Arc::new(credentials::Credentials::new(
        &config.credentials,
        metrics.clone(),
    ));
    credentials.reload();
    let upstreams = Arc::new(upstream::Upstreams::new(
        config,
        credentials,
        metrics.clone(),
    )?);
    Ok(cache::Cache::new(config, store, upstreams, metrics))
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

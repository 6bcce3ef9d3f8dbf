//! TLS on the client-facing listener: certificate and key from PEM files (a mounted
//! `kubernetes.io/tls` Secret), re-read when they change and swapped into the certificate
//! resolver, so new handshakes get the new certificate while open connections carry on
//! untouched; HTTP/2 and HTTP/1.1 by ALPN; optional client certificates verified against a CA
//! bundle (also re-read on change), whose subject becomes the client's identity
//! (`subject:...` in access rules).
//! The accept loop mirrors `server.rs` (connection cap, graceful shutdown) with the handshake
//! added; `server.rs` keeps the plain listener.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::server::Limits;
use super::{App, ConnInfo};

pub use crate::config::{ClientAuth, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let chain = load_certs("certificate file", cert)?;
    let pem = read("key file", key)?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid("key file", key, format!("no usable private key: {e}")))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| invalid("key file", key, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|_| invalid("key file", key, "does not match the certificate"))?;
    Ok(certified)
}

/// Hands every handshake the current certificate; swapped when the files change.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The TLS side of the listener, ready to accept.
pub struct Tls {
    /// Rebuilt when the client CA bundle changes; handshakes in progress keep the old one.
    acceptor: RwLock<TlsAcceptor>,
    resolver: Arc<Resolver>,
    config: TlsConfig,
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn server_config(
    config: &TlsConfig,
    resolver: Arc<Resolver>,
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs("client CA file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| invalid("client CA file", ca, e.to_string()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match config.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| invalid("client CA file", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(resolver);
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

impl Tls {
    /// Loads the certificate, key and client CA; `None` when TLS is off. Starts the reload
    /// task, which ends when the returned value is dropped.
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<Tls>>, Error> {
        let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        let provider = provider();
        let certified = load_certified_key(cert, key, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(certified)),
        });
        let server = server_config(config, resolver.clone(), &provider)?;
        let tls = Arc::new(Tls {
            acceptor: RwLock::new(TlsAcceptor::from(Arc::new(server))),
            resolver,
            config: config.clone(),
            cert: cert.clone(),
            key: key.clone(),
            provider,
        });
        tokio::spawn(reload_loop(Arc::downgrade(&tls), config.reload_interval));
        Ok(Some(tls))
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn ca_stamp(&self) -> Stamp {
        match &self.config.client_ca_file {
            Some(ca) => stamp(&[ca]),
            None => Vec::new(),
        }
    }

    fn reload_certificate(&self) {
        match load_certified_key(&self.cert, &self.key, &self.provider) {
            Ok(certified) => {
                *self
                    .resolver
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
                tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
            }
            Err(e) => {
                // Often a half-written update (certificate written, key not yet): the next
                // change to either file tries again.
                tracing::warn!(error = %e, "cannot reload the TLS certificate; keeping the current one");
            }
        }
    }

    fn reload_client_ca(&self) {
        match server_config(&self.config, self.resolver.clone(), &self.provider) {
            Ok(server) => {
                *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) =
                    TlsAcceptor::from(Arc::new(server));
                tracing::info!("reloaded the client CA bundle");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the client CA bundle; keeping the current one");
            }
        }
    }
}

async fn reload_loop(tls: Weak<Tls>, interval: Duration) {
    let (mut last_cert, mut last_ca) = match tls.upgrade() {
        Some(t) => (stamp(&[&t.cert, &t.key]), t.ca_stamp()),
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(tls) = tls.upgrade() else {
            return;
        };
        let cert = stamp(&[&tls.cert, &tls.key]);
        let ca = tls.ca_stamp();
        let (cert_changed, ca_changed) = (cert != last_cert, ca != last_ca);
        last_cert = cert;
        last_ca = ca;
        if cert_changed || ca_changed {
            let done = tokio::task::spawn_blocking(move || {
                if cert_changed {
                    tls.reload_certificate();
                }
                if ca_changed {
                    tls.reload_client_ca();
                }
            })
            .await;
            if done.is_err() {
                return;
            }
        }
    }
}

/// The verified client certificate's subject, e.g. `O=acme, CN=node-1`.
fn subject(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.subject().to_string())
}

/// Serves HTTPS on `listener` until `shutdown` resolves, then drains like `server::run`.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    limits: Limits,
    tls: Arc<Tls>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // HTTP/2 has no header timeout: pings find peers that are gone.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(super::http1::H2_PING_INTERVAL))
        .keep_alive_timeout(super::http1::H2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = tls.acceptor();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let client_subject = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(subject);
            let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                req.extensions_mut().insert(ConnInfo {
                    remote: peer,
                    client_subject: client_subject.clone(),
                });
                req.extensions_mut().insert(super::auth::Tls);
                async move { Ok::<_, std::convert::Infallible>(super::handle(app, req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = watcher.watch(conn);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    app.ready.store(false, Ordering::Relaxed);
    drop(listener);
    tracing::info!(deadline = ?limits.shutdown_timeout, "shutting down: finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(limits.shutdown_timeout) => tracing::warn!("shutdown deadline reached; closing remaining connections"),
    }
}

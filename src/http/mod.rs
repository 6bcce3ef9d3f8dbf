//! The hyper edge: parses each request into a `Route` (`route`), calls the handler (`api`), and
//! turns every error into the spec's JSON body (`error`). Only this module decides what a client
//! sees; one span and one log line per request, with the cache outcome.

pub mod admin;
mod api;
pub mod audit;
pub mod auth;
mod body;
pub mod error;
mod http1;
mod range;
pub mod route;
pub mod server;
pub mod tls;
mod token;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use tokio::time::Instant;

use crate::access::Access;
use crate::cache::Cache;
use crate::metrics::Metrics;
use body::Body;
use error::{ApiError, Fault};
use route::Route;

/// Everything a request handler needs.
pub struct App {
    pub cache: Cache,
    pub metrics: Arc<Metrics>,
    /// False once shutdown has begun, so load balancers stop sending requests.
    pub ready: AtomicBool,
    /// Client access control; `None` when off (everyone may pull everything).
    pub access: Option<Arc<Access>>,
    next_id: AtomicU64,
    /// `GET /admin/credentials`, when `credentials.admin_endpoint` is on.
    credentials_admin: Option<admin::CredentialsAdmin>,
}

impl App {
    pub fn new(cache: Cache, metrics: Arc<Metrics>) -> App {
        App {
            cache,
            metrics,
            ready: AtomicBool::new(true),
            access: None,
            next_id: AtomicU64::new(1),
            credentials_admin: None,
        }
    }

    /// Serves `GET /admin/credentials` from `admin`.
    pub fn with_credentials_admin(mut self, admin: admin::CredentialsAdmin) -> App {
        self.credentials_admin = Some(admin);
        self
    }

    /// Turns on client access control.
    pub fn with_access(mut self, access: Option<Arc<Access>>) -> App {
        self.access = access;
        self
    }
}

/// What the connection layer knows about the client, carried in each request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address as the socket saw it.
    pub remote: std::net::SocketAddr,
    /// The subject of a verified client certificate, when the connection is mutual TLS.
    pub client_subject: Option<String>,
}

/// What the request log line reports beyond method and path.
#[derive(Default)]
pub struct RequestLog {
    pub upstream: Option<String>,
    pub repo: Option<String>,
    pub cache: Option<&'static str>,
    pub bytes: u64,
    /// Who the client authenticated as (when access control is on).
    pub identity: Option<String>,
    /// Why access control refused the request, if it did.
    pub refused: Option<&'static str>,
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let route = route::parse(req.uri().path());
    let kind = route.as_ref().map_or("invalid", Route::kind);
    let span = tracing::info_span!("request", id, %method, route = kind);
    let mut log = RequestLog::default();
    let result = tracing::Instrument::instrument(
        dispatch(&app, &method, &req, route.as_ref(), &mut log),
        span.clone(),
    )
    .await;
    let mut response = match result {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    };
    if method == Method::HEAD {
        // No HEAD answer carries a body, errors included (HTTP/2 clients reset a stream that
        // sends one); the headers stay those of the GET.
        *response.body_mut() = body::empty();
    }
    let status = response.status();
    // Methods outside the protocol's are counted together: a label must not grow with what
    // clients make up.
    let method_label = match method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    app.metrics
        .http_requests
        .with_label_values(&[kind, method_label, status.as_str()])
        .inc();
    app.metrics
        .http_duration
        .with_label_values(&[kind])
        .observe(started.elapsed().as_secs_f64());
    let _enter = span.enter();
    let path = req.uri().path();
    let upstream = log.upstream.as_deref().unwrap_or("-");
    let repo = log.repo.as_deref().unwrap_or("-");
    let cache = log.cache.unwrap_or("-");
    let ms = started.elapsed().as_secs_f64() * 1e3;
    audit::record(route.as_ref().ok(), auth::client_ip(&req), &log, &response);
    if kind == "metrics" || kind == "healthz" || kind == "readyz" {
        tracing::debug!(path, status = status.as_u16(), ms, "request");
    } else {
        tracing::info!(
            path,
            upstream,
            repo,
            status = status.as_u16(),
            bytes = log.bytes,
            cache,
            ms,
            "request"
        );
    }
    response
}

async fn dispatch<B>(
    app: &App,
    method: &Method,
    req: &Request<B>,
    route: Result<&Route, &route::Error>,
    log: &mut RequestLog,
) -> Result<Response<Body>, ApiError> {
    let is_read = method == Method::GET || method == Method::HEAD;
    if !is_read && req.uri().path().starts_with("/v2") {
        return Err(ApiError::unsupported());
    }
    let route = route.map_err(ApiError::from)?;
    if !is_read {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            crate::oci::ErrorCode::Unsupported,
            "method not allowed",
            Fault::Client,
        ));
    }
    let query = query_pairs(req.uri().query());
    if let Some(access) = &app.access {
        auth::gate(app, access, req, route, &query, log).await?;
    }
    let headers = req.headers();
    let mut resp = match route {
        Route::Base => api::base(),
        Route::Manifest { name, reference } => {
            api::manifest(app, method, headers, &query, name, reference, log).await?
        }
        Route::Blob { name, digest } => {
            api::blob(app, method, headers, &query, name, digest, log).await?
        }
        Route::Tags { name } => {
            api::passthrough(
                app,
                req.uri().path(),
                &query,
                name,
                "tags/list",
                &["n", "last"],
                log,
            )
            .await?
        }
        Route::Referrers { name, digest } => {
            api::passthrough(
                app,
                req.uri().path(),
                &query,
                name,
                &format!("referrers/{digest}"),
                &["artifactType"],
                log,
            )
            .await?
        }
        Route::Upload => return Err(ApiError::unsupported()),
        Route::Token => match &app.access {
            Some(access) => token::token(app, access, req, &query, log).await?,
            None => return Err(route::Error::NotFound.into()),
        },
        Route::Metrics => metrics(app),
        Route::Healthz => text(StatusCode::OK, "ok\n"),
        Route::Readyz if app.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        Route::Readyz => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        Route::AdminCredentials => admin::credentials(app.credentials_admin.as_ref(), req)?,
    };
    if method == Method::HEAD {
        // HEAD answers carry the GET's headers (Content-Length included) and no body.
        *resp.body_mut() = body::empty();
    }
    Ok(resp)
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(s));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn metrics(app: &App) -> Response<Body> {
    let (bytes, objects) = app.cache.store().usage();
    app.metrics
        .cache_size_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    app.metrics
        .cache_objects
        .set(i64::try_from(objects).unwrap_or(i64::MAX));
    let mut resp = Response::new(body::full(app.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    match e.fault {
        Fault::Client => {
            tracing::debug!(code = e.code.as_str(), message = %e.message, "client error")
        }
        Fault::Upstream => {
            tracing::warn!(code = e.code.as_str(), message = %e.message, source = e.source.as_deref().unwrap_or(""), "upstream error")
        }
        Fault::Ours => {
            tracing::error!(code = e.code.as_str(), message = %e.message, source = e.source.as_deref().unwrap_or(""), "internal error")
        }
    }
    let json = crate::oci::error::body(e.code, &e.message, None);
    let mut resp = Response::new(body::full(json));
    *resp.status_mut() = e.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let Some(ra) = &e.retry_after {
        h.insert(header::RETRY_AFTER, ra.clone());
    }
    if let Some(challenge) = &e.challenge {
        h.insert(header::WWW_AUTHENTICATE, (**challenge).clone());
    }
    resp
}

//! The access gate at the edge: who the client is (lockout first, then credentials, then a
//! verified certificate subject), and whether it may make this request, decided from the route
//! alone before the cache or an upstream is asked anything, so a refused client learns nothing
//! about what exists. 401 with a Bearer challenge when credentials are missing, bad or lack the
//! scope; 403 `DENIED` when a known identity is not allowed; 429 while an address is locked out.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use http::{HeaderValue, Request, StatusCode, header};

use super::error::{ApiError, Fault};
use super::route::Route;
use super::{App, ConnInfo, RequestLog};
use crate::access::{Access, Credentials, Decision, Principal};
use crate::oci::{ErrorCode, ImageName};

/// Marks a request that arrived over TLS, so the token realm uses `https`.
#[derive(Clone, Copy, Debug)]
pub struct Tls;

pub fn client_ip<B>(req: &Request<B>) -> IpAddr {
    req.extensions()
        .get::<ConnInfo>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.remote.ip())
}

/// The repository name as the request path spells it (what token scopes name).
pub fn path_name(name: &ImageName) -> String {
    match &name.host {
        Some(host) => format!("{host}/{}", name.repo),
        None => name.repo.to_string(),
    }
}

/// `<external URL>/token`, or built from the request's Host when none is configured.
pub fn realm<B>(access: &Access, req: &Request<B>) -> String {
    if let Some(url) = access.external_url() {
        return format!("{url}/token");
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .filter(|h| h.parse::<http::uri::Authority>().is_ok());
    let scheme = if req.extensions().get::<Tls>().is_some() {
        "https"
    } else {
        "http"
    };
    match host {
        Some(h) => format!("{scheme}://{h}/token"),
        None => "/token".to_owned(),
    }
}

/// 401 with `WWW-Authenticate: Bearer realm=...,service=...[,scope=...][,error=...]`.
pub fn challenge(realm: &str, scope: Option<&str>, error: Option<&str>) -> ApiError {
    let mut value = format!(
        "Bearer realm=\"{realm}\",service=\"{}\"",
        crate::access::jwt::SERVICE
    );
    if let Some(scope) = scope {
        value.push_str(&format!(",scope=\"{scope}\""));
    }
    if let Some(error) = error {
        value.push_str(&format!(",error=\"{error}\""));
    }
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        "authentication required",
        Fault::Client,
    );
    e.challenge = HeaderValue::from_str(&value).ok().map(Box::new);
    e
}

fn locked_out(left: Duration) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyRequests,
        "too many failed logins from this address; try again later",
        Fault::Client,
    );
    e.retry_after = Some(HeaderValue::from(left.as_secs().max(1)));
    e
}

fn denied() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Denied,
        "requested access to the resource is denied",
        Fault::Client,
    )
}

/// Who the client is. `on_failure` builds the 401 for refused credentials (the API wants a
/// Bearer challenge, `/token` a Basic one).
pub async fn authenticate<B>(
    app: &App,
    access: &Access,
    req: &Request<B>,
    log: &mut RequestLog,
    on_failure: impl FnOnce() -> ApiError,
) -> Result<Principal, ApiError> {
    let ip = client_ip(req);
    if let Some(left) = access.lockout().locked(ip) {
        log.refused = Some("locked_out");
        app.metrics
            .auth_refused
            .with_label_values(&["locked_out"])
            .inc();
        return Err(locked_out(left));
    }
    let creds = Credentials::parse(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    );
    let user_hint = match &creds {
        Credentials::Basic { user, password }
            if !password.starts_with("rcp_") && access.knows_user(user) =>
        {
            Some(user.clone())
        }
        _ => None,
    };
    match access.authenticate(creds).await {
        Ok(p) if p.is_anonymous() => {
            let subject = req
                .extensions()
                .get::<ConnInfo>()
                .and_then(|c| c.client_subject.as_deref());
            let p = subject.map_or(p, Principal::subject);
            log.identity = Some(p.identity.to_string());
            Ok(p)
        }
        Ok(p) => {
            // A success does not clear the address's failures: one valid credential must not
            // let the guessing of others go on unchecked.
            log.identity = Some(p.identity.to_string());
            Ok(p)
        }
        Err(failure) => {
            app.metrics
                .auth_failures
                .with_label_values(&[failure.as_str()])
                .inc();
            app.metrics
                .auth_refused
                .with_label_values(&["unauthorized"])
                .inc();
            log.refused = Some(failure.as_str());
            if let Some(user) = user_hint {
                log.identity = Some(format!("user:{user}"));
            }
            if failure.counts_toward_lockout() && access.lockout().failure(ip) {
                app.metrics.auth_lockouts.inc();
                tracing::warn!(target: "regcache::audit", event = "lockout", client = %ip, "client address locked out after repeated authentication failures");
            }
            Err(on_failure())
        }
    }
}

/// Lets the request through or refuses it.
pub async fn gate<B>(
    app: &App,
    access: &Access,
    req: &Request<B>,
    route: &Route,
    query: &[(String, String)],
    log: &mut RequestLog,
) -> Result<(), ApiError> {
    let name = match route {
        Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::Tags { name }
        | Route::Referrers { name, .. } => Some(name),
        Route::Base | Route::Upload | Route::AdminCredentials => None,
        Route::Metrics | Route::Healthz | Route::Readyz | Route::Token => return Ok(()),
    };
    let ns = query
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.as_str());
    let mut realm = realm(access, req);
    if let Some(ns) = ns {
        // containerd names the upstream with `?ns=` and token clients keep a realm's query, so
        // `/token` resolves the scope's names against the same upstream.
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", ns)
            .finish();
        realm = format!("{realm}?{q}");
    }
    let scope = name.map(|n| format!("repository:{}:pull", path_name(n)));
    let principal = authenticate(app, access, req, log, || {
        challenge(&realm, scope.as_deref(), Some("invalid_token"))
    })
    .await?;
    let ip = client_ip(req);
    let unauthorized = |log: &mut RequestLog, error: Option<&str>| {
        app.metrics
            .auth_refused
            .with_label_values(&["unauthorized"])
            .inc();
        log.refused = Some("unauthorized");
        challenge(&realm, scope.as_deref(), error)
    };
    if principal.is_anonymous() && !access.may_pull_anything(&principal, ip) {
        return Err(unauthorized(log, None));
    }
    // The admin endpoints answer members of `access.groups.admins` only.
    if matches!(route, Route::AdminCredentials) {
        if principal.is_anonymous() {
            return Err(unauthorized(log, None));
        }
        if !access.is_admin(&principal) {
            app.metrics
                .auth_refused
                .with_label_values(&["denied"])
                .inc();
            log.refused = Some("denied");
            return Err(denied());
        }
        tracing::info!(target: "regcache::audit", event = "admin", identity = %principal.identity, client = %ip, "admin endpoint used");
    }
    let Some(name) = name else {
        return Ok(());
    };
    let (upstream, repo) = app.cache.upstreams().select(ns, name)?;
    let target = format!("{}/{repo}", upstream.name());
    match access.decide(&principal, ip, &target, &path_name(name)) {
        Decision::Allowed => Ok(()),
        Decision::NeedsScope => Err(unauthorized(log, Some("insufficient_scope"))),
        Decision::Denied if principal.is_anonymous() => {
            Err(unauthorized(log, Some("insufficient_scope")))
        }
        Decision::Denied => {
            app.metrics
                .auth_refused
                .with_label_values(&["denied"])
                .inc();
            log.refused = Some("denied");
            Err(denied())
        }
    }
}

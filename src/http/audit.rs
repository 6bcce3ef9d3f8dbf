//! The audit trail: one structured event per pull (manifest, blob, tag list, referrers), per
//! token issued, and per request refused by access control, on its own tracing target
//! `regcache::audit`, so it can be routed and kept apart from the request log. Events carry
//! the identity and the client's address, never credentials or tokens.

use std::net::IpAddr;

use http::{Response, StatusCode};

use super::RequestLog;
use super::auth::path_name;
use super::body::Body;
use super::route::Route;

pub const TARGET: &str = "regcache::audit";

/// Emits the event for a finished request, when it is one the audit trail records.
pub fn record(route: Option<&Route>, client: IpAddr, log: &RequestLog, response: &Response<Body>) {
    let status = response.status();
    let (name, reference, route_digest) = match route {
        Some(Route::Manifest { name, reference }) => {
            (Some(name), Some(reference.to_string()), None)
        }
        Some(Route::Blob { name, digest }) => (Some(name), None, Some(digest.to_string())),
        Some(Route::Tags { name }) => (Some(name), None, None),
        Some(Route::Referrers { name, digest }) => (Some(name), None, Some(digest.to_string())),
        Some(Route::Token) => (None, None, None),
        _ if log.refused.is_some() => (None, None, None),
        _ => return,
    };
    let kind = route.map_or("invalid", Route::kind);
    let outcome = match log.refused {
        Some(reason) => reason,
        None if status.is_success() => "ok",
        None if status == StatusCode::NOT_FOUND => "not_found",
        None => "error",
    };
    let digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(route_digest);
    let identity = log.identity.as_deref().unwrap_or("anonymous");
    let event = match (route, log.refused) {
        (_, Some(_)) => "refused",
        (Some(Route::Token), None) => "token",
        _ => "pull",
    };
    let requested = name.map(path_name);
    tracing::info!(
        target: TARGET,
        event,
        route = kind,
        identity,
        client = %client,
        upstream = log.upstream.as_deref().unwrap_or("-"),
        repository = log.repo.as_deref().or(requested.as_deref()).unwrap_or("-"),
        reference = reference.as_deref().unwrap_or("-"),
        digest = digest.as_deref().unwrap_or("-"),
        bytes = log.bytes,
        cache = log.cache.unwrap_or("-"),
        status = status.as_u16(),
        outcome,
    );
}

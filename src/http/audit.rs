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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(
        route: Option<&Route>,
        log: &RequestLog,
        response: &Response<Body>,
    ) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            record(route, "192.0.2.9".parse().expect("ip"), log, response);
        });
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    #[test]
    fn a_pull_is_one_event_with_who_what_and_outcome() {
        let route = super::super::route::parse("/v2/library/alpine/manifests/3.19").expect("route");
        let log = RequestLog {
            upstream: Some("docker.io".into()),
            repo: Some("library/alpine".into()),
            cache: Some("hit"),
            bytes: 1234,
            identity: Some("token:ci".into()),
            refused: None,
        };
        let mut response = Response::new(super::super::body::empty());
        response.headers_mut().insert(
            "docker-content-digest",
            http::HeaderValue::from_static("sha256:abc"),
        );
        let events = capture(Some(&route), &log, &response);
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e["target"], TARGET);
        let f = &e["fields"];
        assert_eq!(f["event"], "pull");
        assert_eq!(f["identity"], "token:ci");
        assert_eq!(f["client"], "192.0.2.9");
        assert_eq!(f["upstream"], "docker.io");
        assert_eq!(f["repository"], "library/alpine");
        assert_eq!(f["reference"], "3.19");
        assert_eq!(f["digest"], "sha256:abc");
        assert_eq!(f["bytes"], 1234);
        assert_eq!(f["cache"], "hit");
        assert_eq!(f["outcome"], "ok");
    }

    #[test]
    fn refusals_are_recorded_and_ops_routes_are_not() {
        let log = RequestLog {
            refused: Some("bad_password"),
            identity: Some("user:alice".into()),
            ..RequestLog::default()
        };
        let mut response = Response::new(super::super::body::empty());
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        let events = capture(Some(&Route::Base), &log, &response);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["fields"]["event"], "refused");
        assert_eq!(events[0]["fields"]["outcome"], "bad_password");
        let quiet = capture(
            Some(&Route::Healthz),
            &RequestLog::default(),
            &Response::new(super::super::body::empty()),
        );
        assert!(quiet.is_empty());
    }
}

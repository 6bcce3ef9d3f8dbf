//! `GET /token`: the registry token endpoint of the distribution token spec. A client sends
//! Basic credentials (an htpasswd user, or a pull token as the password) or none (anonymous),
//! and one or more `scope=repository:<name>:pull`; it gets a short-lived signed token granting
//! those of the scopes the policy allows, and no more. Anything but `pull` is never granted.

use std::time::SystemTime;

use http::{HeaderValue, Request, Response, StatusCode, header};
use serde::Serialize;

use super::App;
use super::RequestLog;
use super::auth::{self, client_ip};
use super::body::{self, Body};
use super::error::{ApiError, Fault};
use crate::access::Access;
use crate::oci::{ErrorCode, ImageName};

#[derive(Serialize)]
struct TokenResponse<'a> {
    token: &'a str,
    access_token: &'a str,
    expires_in: u64,
    issued_at: String,
}

fn basic_challenge() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        "authentication required",
        Fault::Client,
    );
    e.challenge = Some(Box::new(HeaderValue::from_static(
        "Basic realm=\"regcache\"",
    )));
    e
}

/// The repository names asked for with `pull` (`repository:NAME:ACTIONS`, several per
/// parameter separated by spaces, several parameters).
fn requested_names(query: &[(String, String)]) -> Vec<String> {
    let mut names = Vec::new();
    for (_, value) in query.iter().filter(|(k, _)| k == "scope") {
        for scope in value.split(' ') {
            let Some(rest) = scope.strip_prefix("repository:") else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            if actions.split(',').any(|a| a == "pull" || a == "*")
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
    }
    names
}

pub async fn token<B>(
    app: &App,
    access: &Access,
    req: &Request<B>,
    query: &[(String, String)],
    log: &mut RequestLog,
) -> Result<Response<Body>, ApiError> {
    let principal = auth::authenticate(app, access, req, log, basic_challenge).await?;
    let ip = client_ip(req);
    if principal.is_anonymous() && !access.may_pull_anything(&principal, ip) {
        app.metrics
            .auth_refused
            .with_label_values(&["unauthorized"])
            .inc();
        log.refused = Some("unauthorized");
        return Err(basic_challenge());
    }
    // Set when the challenge came from a request naming its upstream with `?ns=`.
    let ns = query
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.as_str());
    let mut requested = Vec::new();
    for name in requested_names(query) {
        let Ok(parsed) = name.parse::<ImageName>() else {
            continue;
        };
        let Ok((upstream, repo)) = app.cache.upstreams().select(ns, &parsed) else {
            continue;
        };
        requested.push((name, format!("{}/{repo}", upstream.name())));
    }
    let (token, claims) = access.issue(&principal, ip, &requested);
    log.repo = Some(
        claims
            .access
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    let issued_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let json = serde_json::to_vec(&TokenResponse {
        token: &token,
        access_token: &token,
        expires_in: access.token_ttl().as_secs(),
        issued_at,
    })
    .expect("a token response serializes");
    let mut resp = Response::new(body::full(json));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_read_as_clients_send_them() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            requested_names(&q(&[
                ("service", "regcache"),
                ("scope", "repository:library/alpine:pull"),
                (
                    "scope",
                    "repository:registry.example.com:5000/team/app:pull,push"
                ),
                ("scope", "repository:a:push repository:b:pull"),
                ("scope", "registry:catalog:*"),
                ("scope", "repository:library/alpine:pull"),
            ])),
            vec![
                "library/alpine".to_string(),
                "registry.example.com:5000/team/app".to_string(),
                "b".to_string()
            ]
        );
    }
}

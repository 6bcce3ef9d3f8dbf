//! The pull API handlers: each takes a parsed `Route`, asks `cache` (or an upstream, for the
//! pass-through documents), and builds the response headers exactly as clients expect them.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::body::{self, Body};
use super::error::ApiError;
use super::range::{self, Range};
use super::{App, RequestLog};
use crate::cache::{Blob, Outcome};
use crate::oci::media_type::Accept;
use crate::oci::{Digest, ImageName, Reference};
use crate::upstream::Upstream;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

pub fn base() -> Response<Body> {
    let mut resp = Response::new(body::full("{}"));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    resp
}

fn select(
    app: &App,
    query: &[(String, String)],
    name: &ImageName,
    log: &mut RequestLog,
) -> Result<(Arc<Upstream>, crate::oci::RepoName), ApiError> {
    let ns = query
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.as_str());
    let (upstream, repo) = app.cache.upstreams().select(ns, name)?;
    log.upstream = Some(upstream.name().to_string());
    log.repo = Some(repo.to_string());
    Ok((upstream, repo))
}

fn header_value(s: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(s).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            crate::oci::ErrorCode::Unavailable,
            "the upstream sent a header value that cannot be passed on",
            super::error::Fault::Upstream,
        )
    })
}

pub async fn manifest(
    app: &App,
    method: &Method,
    headers: &HeaderMap,
    query: &[(String, String)],
    name: &ImageName,
    reference: &Reference,
    log: &mut RequestLog,
) -> Result<Response<Body>, ApiError> {
    let (upstream, repo) = select(app, query, name, log)?;
    let accept = Accept::from_lines(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let head = method == Method::HEAD;
    let m = app
        .cache
        .manifest(&upstream, &repo, reference, &accept, head)
        .await?;
    log.cache = Some(m.outcome.as_str());
    let mut resp = Response::new(match m.body {
        Some(b) if !head => body::full(b),
        _ => body::empty(),
    });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&m.media_type)?);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.size));
    h.insert(
        "docker-content-digest",
        header_value(&m.digest.to_string())?,
    );
    h.insert("docker-distribution-api-version", API_VERSION);
    log.bytes = m.size;
    Ok(resp)
}

pub async fn blob(
    app: &App,
    method: &Method,
    headers: &HeaderMap,
    query: &[(String, String)],
    name: &ImageName,
    digest: &Digest,
    log: &mut RequestLog,
) -> Result<Response<Body>, ApiError> {
    let (upstream, repo) = select(app, query, name, log)?;
    let head = method == Method::HEAD;
    let blob = app.cache.blob(&upstream, &repo, digest, head).await?;
    let mut status = StatusCode::OK;
    let mut content_range = None;
    let mut region = None;
    let mut growing = None;
    let (length, body) = match blob {
        Blob::Stored(file) => {
            log.cache = Some(Outcome::Hit.as_str());
            let requested = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
            let (start, end) = match range::parse(requested, file.size) {
                Range::Full => (0, file.size),
                Range::Part { start, end } => {
                    status = StatusCode::PARTIAL_CONTENT;
                    content_range = Some(format!("bytes {start}-{end}/{}", file.size));
                    (start, end + 1)
                }
                Range::Unsatisfiable => {
                    let mut resp = Response::new(body::empty());
                    *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    resp.headers_mut().insert(
                        header::CONTENT_RANGE,
                        header_value(&format!("bytes */{}", file.size))?,
                    );
                    return Ok(resp);
                }
            };
            let body = if head {
                body::empty()
            } else {
                region = Some(body::FileRegion {
                    file: file.file.clone(),
                    start,
                    end,
                });
                body::file_range(file.file, start, end, app.metrics.clone())
            };
            (Some(end - start), body)
        }
        Blob::Filling {
            reader,
            size,
            started_here,
        } => {
            log.cache = Some(if started_here { "miss" } else { "coalesced" });
            let (body, file) = body::growing(reader);
            growing = Some(file);
            (size, body)
        }
        Blob::InFlight { size } => {
            log.cache = Some("coalesced");
            (Some(size), body::empty())
        }
        Blob::Remote { size } => {
            log.cache = Some("miss");
            (Some(size), body::empty())
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Some(region) = region {
        resp.extensions_mut().insert(region);
    }
    if let Some(growing) = growing {
        resp.extensions_mut().insert(growing);
    }
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("docker-content-digest", header_value(&digest.to_string())?);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert("docker-distribution-api-version", API_VERSION);
    if let Some(length) = length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        log.bytes = length;
    }
    if let Some(cr) = content_range {
        h.insert(header::CONTENT_RANGE, header_value(&cr)?);
    }
    Ok(resp)
}

/// Tag lists and referrers: small documents passed through from the upstream, not cached.
pub async fn passthrough(
    app: &App,
    path: &str,
    query: &[(String, String)],
    name: &ImageName,
    rest: &str,
    allowed: &[&'static str],
    log: &mut RequestLog,
) -> Result<Response<Body>, ApiError> {
    let (upstream, repo) = select(app, query, name, log)?;
    if upstream.is_offline() {
        return offline_document(app, &upstream, &repo, query, rest, log).await;
    }
    let forwarded: Vec<(&str, String)> = query
        .iter()
        .filter_map(|(k, v)| allowed.iter().find(|a| **a == k).map(|a| (*a, v.clone())))
        .collect();
    let raw = upstream
        .raw(&repo, rest, &forwarded, app.cache.max_document_size())
        .await
        .map_err(|e| ApiError::from(&e))?;
    log.bytes = raw.body.len() as u64;
    let mut resp = Response::new(body::full(raw.body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        raw.content_type
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    if let Some(link) = raw
        .link
        .and_then(|l| next_page_link(&l, path, query, allowed))
    {
        h.insert(header::LINK, link);
    }
    h.insert("docker-distribution-api-version", API_VERSION);
    Ok(resp)
}

/// Tag lists and referrers of an offline upstream, from the cache: the recorded tags (with
/// `n` and `last`), and an empty referrers index (referrers are not cached).
async fn offline_document(
    app: &App,
    upstream: &Upstream,
    repo: &crate::oci::RepoName,
    query: &[(String, String)],
    rest: &str,
    log: &mut RequestLog,
) -> Result<Response<Body>, ApiError> {
    let (content_type, doc) = if rest == "tags/list" {
        let tags = app
            .cache
            .store()
            .tags(upstream.name(), repo)
            .await
            .map_err(|e| ApiError::from(crate::cache::Error::Store(e)))?;
        if tags.is_empty() {
            return Err(ApiError::from(&crate::upstream::Error::Offline {
                upstream: upstream.name().clone(),
            }));
        }
        let param = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let last = param("last");
        let n = param("n").and_then(|n| n.parse::<usize>().ok());
        let listed: Vec<&str> = tags
            .iter()
            .map(|t| t.as_str())
            .filter(|t| last.is_none_or(|l| *t > l.as_str()))
            .take(n.unwrap_or(usize::MAX))
            .collect();
        (
            "application/json",
            serde_json::json!({ "name": repo.to_string(), "tags": listed }),
        )
    } else {
        (
            crate::oci::media_type::OCI_INDEX,
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": crate::oci::media_type::OCI_INDEX,
                "manifests": [],
            }),
        )
    };
    let body = bytes::Bytes::from(doc.to_string());
    log.bytes = body.len() as u64;
    log.cache = Some(Outcome::Hit.as_str());
    let mut resp = Response::new(body::full(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("docker-distribution-api-version", API_VERSION);
    Ok(resp)
}

/// The upstream's `Link: <...>; rel="next"` names the page by the upstream's repository name;
/// the client must follow it to this mirror under the name it used, with its `ns` kept, or the
/// next page would come from another upstream.
fn next_page_link(
    link: &HeaderValue,
    path: &str,
    query: &[(String, String)],
    allowed: &[&str],
) -> Option<HeaderValue> {
    let link = link.to_str().ok()?;
    let target = link.split_once('<')?.1.split_once('>')?.0;
    let upstream_query = target.split_once('?').map_or("", |(_, q)| q);
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query.iter().filter(|(k, _)| !allowed.contains(&k.as_str())) {
        out.append_pair(k, v);
    }
    for (k, v) in form_urlencoded::parse(upstream_query.as_bytes()) {
        if allowed.contains(&k.as_ref()) {
            out.append_pair(&k, &v);
        }
    }
    HeaderValue::from_str(&format!("<{path}?{}>; rel=\"next\"", out.finish())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_keeps_the_clients_name_and_ns() {
        let link =
            HeaderValue::from_static("</v2/library/alpine/tags/list?last=b&n=2>; rel=\"next\"");
        let query = vec![
            ("ns".to_string(), "docker.io".to_string()),
            ("n".to_string(), "2".to_string()),
        ];
        let rewritten =
            next_page_link(&link, "/v2/alpine/tags/list", &query, &["n", "last"]).expect("link");
        assert_eq!(
            rewritten.to_str().expect("ascii"),
            "</v2/alpine/tags/list?ns=docker.io&last=b&n=2>; rel=\"next\""
        );
    }
}

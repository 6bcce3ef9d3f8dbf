//! The API surface outside pulls: malformed requests and write methods are refused with the
//! spec's error JSON before anything reaches an upstream; the base endpoint, health checks and
//! metrics answer as documented.

use std::net::SocketAddr;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{assert_error, cache_dir, header, mirror_for, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Image};
use crate::support::mirror::{metric_names, metric_value};

/// Every metric the README documents.
const DOCUMENTED_METRICS: &[&str] = &[
    "regcache_http_requests_total",
    "regcache_http_request_duration_seconds",
    "regcache_cache_hits_total",
    "regcache_cache_misses_total",
    "regcache_cache_coalesced_total",
    "regcache_cache_stale_served_total",
    "regcache_served_bytes_total",
    "regcache_upstream_requests_total",
    "regcache_upstream_request_duration_seconds",
    "regcache_upstream_errors_total",
    "regcache_digest_mismatches_total",
    "regcache_upstream_fetches_in_flight",
    "regcache_cache_size_bytes",
    "regcache_cache_objects",
    "regcache_cache_limit_bytes",
    "regcache_evictions_total",
    "regcache_evicted_bytes_total",
    "regcache_cache_disk_full_total",
    "regcache_build_info",
];

/// Documented metrics with no sample in `text` (a histogram counts by its `_bucket` etc.).
fn missing_metrics(text: &str, documented: &[&str]) -> Vec<String> {
    let present = metric_names(text);
    documented
        .iter()
        .filter(|name| {
            !present
                .iter()
                .any(|p| p == *name || p.starts_with(&format!("{name}_")))
        })
        .map(|name| name.to_string())
        .collect()
}

/// A GET sent byte for byte, for paths an HTTP client library would normalize (`..`).
async fn raw_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connecting to the mirror");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("sending the request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("reading the response");
        response
    };
    let response = within(&format!("raw GET {path}"), exchange).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP response to {path}: {text}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "a JSON error for {path}: {head}"
    );
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {body}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_names_references_and_digests_get_400_with_the_spec_code() {
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &Image::new(1, 1000))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let good_digest = format!("sha256:{}", "a".repeat(64));
    let long_tag = "t".repeat(129);

    let cases = [
        ("/v2/Team/app/manifests/v1".to_owned(), "NAME_INVALID"),
        (format!("/v2/team/App/blobs/{good_digest}"), "NAME_INVALID"),
        ("/v2/team/app-/manifests/v1".to_owned(), "NAME_INVALID"),
        ("/v2/team/app/manifests/bad!tag".to_owned(), "TAG_INVALID"),
        (format!("/v2/team/app/manifests/{long_tag}"), "TAG_INVALID"),
        (
            "/v2/team/app/manifests/sha256:abc".to_owned(),
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/team/app/manifests/sha256:{}", "A".repeat(64)),
            "DIGEST_INVALID",
        ),
        ("/v2/team/app/blobs/sha256:abc".to_owned(), "DIGEST_INVALID"),
        ("/v2/team/app/blobs/latest".to_owned(), "DIGEST_INVALID"),
        (
            format!("/v2/team/app/blobs/sha256:{}", "A".repeat(64)),
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/team/app/blobs/md5:{}", "a".repeat(32)),
            "DIGEST_INVALID",
        ),
    ];
    for (path, code) in &cases {
        assert_error(
            mirror.get(path).await,
            StatusCode::BAD_REQUEST,
            code,
            &format!("GET {path}"),
        )
        .await;
    }
    // Sent raw: a client library would resolve the dot segments before sending.
    for path in [
        "/v2/team/../app/manifests/v1".to_owned(),
        "/v2/../../etc/manifests/v1".to_owned(),
        format!("/v2/team/./app/blobs/{good_digest}"),
    ] {
        let (status, json) = raw_get(mirror.addr(), &path).await;
        assert_eq!(status, 400, "GET {path}");
        assert_eq!(json["errors"][0]["code"], "NAME_INVALID", "GET {path}");
    }
    assert!(
        up.requests().is_empty(),
        "bad input never reaches the upstream: {:?}",
        up.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_methods_get_405_unsupported() {
    let up = FakeUpstream::builder().start().await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let digest = format!("sha256:{}", "a".repeat(64));

    let paths = [
        "/v2/team/app/manifests/v1".to_owned(),
        format!("/v2/team/app/manifests/{digest}"),
        format!("/v2/team/app/blobs/{digest}"),
        "/v2/team/app/blobs/uploads/".to_owned(),
        "/v2/team/app/blobs/uploads/some-upload-id".to_owned(),
    ];
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        for path in &paths {
            assert_error(
                mirror.request(method.clone(), path, &[]).await,
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                &format!("{method} {path}"),
            )
            .await;
        }
    }
    assert!(up.requests().is_empty(), "writes never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn base_health_and_metrics_endpoints_answer() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let base = mirror.get("/v2/").await;
    assert_eq!(base.status(), StatusCode::OK);
    assert_eq!(
        header(&base, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(mirror.get(path).await.status(), StatusCode::OK, "{path}");
    }

    // A cold pull and a warm one exercise everything but failures.
    for round in ["cold", "warm"] {
        within(
            &format!("a {round} pull"),
            pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
        )
        .await;
    }
    let metrics = mirror.get("/metrics").await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let content_type = header(&metrics, "content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text, got {content_type}"
    );
    let text = metrics.text().await.expect("the metrics body arrives");
    let exercised: Vec<&str> = DOCUMENTED_METRICS
        .iter()
        .copied()
        .filter(|name| {
            ![
                "regcache_cache_coalesced_total",
                "regcache_cache_stale_served_total",
                "regcache_upstream_errors_total",
                "regcache_digest_mismatches_total",
            ]
            .contains(name)
        })
        .collect();
    assert_eq!(
        missing_metrics(&text, &exercised),
        Vec::<String>::new(),
        "documented metrics missing after a pull:\n{text}"
    );
    let hits = metric_value(&text, "regcache_cache_hits_total", &[("kind", "blob")]);
    assert!(hits >= 2.0, "the warm pull's blobs are hits: {hits}");
}

/// An operator alerting on `increase(regcache_digest_mismatches_total[5m]) > 0` needs the
/// series to exist at 0 before the first mismatch: a series born at 1 shows no increase, so
/// the first corrupt download would go unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_metric_is_exported_before_its_first_event() {
    let up = FakeUpstream::builder().start().await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    assert_eq!(mirror.get("/v2/").await.status(), StatusCode::OK);

    let text = mirror.metrics().await;
    // Request counters are labelled by status, which cannot be known in advance: the client
    // side exists once a request was answered (the `/v2/` above), the upstream side once an
    // upstream was asked. Every other label (kind, source, upstream) has a known set of values.
    let known_in_advance: Vec<&str> = DOCUMENTED_METRICS
        .iter()
        .copied()
        .filter(|name| *name != "regcache_upstream_requests_total")
        .collect();
    assert_eq!(
        missing_metrics(&text, &known_in_advance),
        Vec::<String>::new(),
        "documented metrics missing from a fresh mirror's /metrics:\n{text}"
    );
}

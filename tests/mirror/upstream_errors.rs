//! Upstream refusals reach the client truthfully: unknown content as the spec's 404 codes, rate
//! limiting as 429 with the upstream's Retry-After (unless a cached answer can be served), and
//! a failing or unreachable upstream as 502 after the configured attempts.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

use super::{Received, assert_error, body, cache_dir, header, mirror_for, read_until_end_or_error};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_content_is_404_with_the_spec_code() {
    let image = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let absent = format!("sha256:{}", "0".repeat(64));

    let cases = [
        ("/v2/team/app/manifests/nope".to_owned(), "MANIFEST_UNKNOWN"),
        (
            format!("/v2/team/app/manifests/{absent}"),
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/team/other/manifests/v1".to_owned(), "MANIFEST_UNKNOWN"),
        (format!("/v2/team/app/blobs/{absent}"), "BLOB_UNKNOWN"),
    ];
    for (path, code) in &cases {
        assert_error(
            mirror.get(path).await,
            StatusCode::NOT_FOUND,
            code,
            &format!("GET {path}"),
        )
        .await;
        assert_eq!(
            mirror.head(path).await.status(),
            StatusCode::NOT_FOUND,
            "HEAD {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limiting_is_passed_on_with_retry_after() {
    let image = Image::new(1, 1000);
    let layer = &image.layers[0];
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_manifest("v1").status(429).retry_after(7))
        .fault(Fault::on_blob(&layer.digest).status(429).retry_after(9))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    for (path, retry_after) in [
        ("/v2/team/app/manifests/v1".to_owned(), "7"),
        (format!("/v2/team/app/blobs/{}", layer.digest), "9"),
    ] {
        let response = mirror.get(&path).await;
        assert_eq!(
            header(&response, "retry-after").as_deref(),
            Some(retry_after),
            "GET {path}: the upstream's Retry-After"
        );
        assert_error(
            response,
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            &format!("GET {path}"),
        )
        .await;
    }
    assert_eq!(up.gets_of_manifest("v1"), 1, "a 429 is not retried at once");
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        1,
        "a 429 is not retried at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_revalidation_serves_the_cached_tag() {
    let image = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    // Every tag request revalidates.
    let mirror = mirror_for(&up, &dir).tag_ttl("0s").start().await;
    let response = mirror.get("/v2/team/app/manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK);
    body(response).await;

    up.inject(
        Fault::on_manifest("v1")
            .status(429)
            .retry_after(7)
            .any_method(),
    );
    let response = mirror.get("/v2/team/app/manifests/v1").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the cached answer beats the 429"
    );
    assert_eq!(
        header(&response, "docker-content-digest").as_deref(),
        Some(image.manifest.digest.as_str())
    );
    assert_eq!(body(response).await, image.manifest.bytes);
    assert_eq!(
        mirror
            .metric("regcache_cache_stale_served_total", &[])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_upstream_is_retried_the_configured_times_then_502() {
    let image = Image::new(1, 1000);
    let layer = &image.layers[0];
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_manifest("v1").status(503))
        .fault(Fault::on_blob(&layer.digest).status(503))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).attempts(3).start().await;

    assert_error(
        mirror.get("/v2/team/app/manifests/v1").await,
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        "a manifest from an upstream answering 503",
    )
    .await;
    assert_eq!(up.gets_of_manifest("v1"), 3, "three attempts");
    assert_error(
        mirror
            .get(&format!("/v2/team/app/blobs/{}", layer.digest))
            .await,
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        "a blob from an upstream answering 503",
    )
    .await;
    assert_eq!(up.gets_of_blob(&layer.digest), 3, "three attempts");

    up.set_refusing(true).await;
    assert_error(
        mirror.get("/v2/team/app/manifests/v2").await,
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        "an unreachable upstream",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_upstream_fails_the_request_within_the_read_timeout() {
    let image = Image::new(1, 200_000);
    let layer = &image.layers[0];
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        // Headers that never come in time, and a body that stops after its first chunk.
        .fault(Fault::on_manifest("v1").delay(Duration::from_secs(30)))
        .fault(Fault::on_blob(&layer.digest).throttle(1000, Duration::from_secs(30)))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir)
        .read_timeout("300ms")
        .attempts(2)
        .start()
        .await;

    let started = Instant::now();
    assert_error(
        mirror.get("/v2/team/app/manifests/v1").await,
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        "a manifest whose headers never come",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "given up after the read timeout and retries, not after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let response = mirror
        .get(&format!("/v2/team/app/blobs/{}", layer.digest))
        .await;
    if response.status() == StatusCode::OK {
        let Received { bytes, error } = read_until_end_or_error(response).await;
        assert!(
            error.is_some() && bytes.len() < layer.size(),
            "a stalled download ends in an error, got {} bytes and {error:?}",
            bytes.len()
        );
    } else {
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stalled body is given up after the read timeout, not after {:?}",
        started.elapsed()
    );
    let timeouts = mirror
        .metric(
            "regcache_upstream_errors_total",
            &[("upstream", &up.host()), ("kind", "timeout")],
        )
        .await;
    assert!(timeouts >= 2.0, "the timeouts are counted: {timeouts}");
}

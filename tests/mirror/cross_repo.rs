//! The cross-repository rule: content cached through one repository is served for another only
//! when the upstream has it there too, so a client allowed to pull one repository cannot read
//! another repository's private layers by digest.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;

use super::{assert_error, body, cache_dir, get_blob, mirror_for, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_cached_for_one_repository_is_served_for_another_only_if_the_upstream_has_it_there()
{
    let private = Image::new(1, 50_000);
    let shared = Image::new(1, 50_000);
    let private_layer = &private.layers[0];
    let shared_layer = &shared.layers[0];
    let up = FakeUpstream::builder()
        .image("team/private", "v1", &private)
        .image("team/private", "shared", &shared)
        .blob("team/public", shared_layer.bytes.clone())
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let bytes = get_blob(&mirror, "team/private", &private_layer.digest).await;
    assert_eq!(bytes, private_layer.bytes);

    let path = format!("/v2/team/public/blobs/{}", private_layer.digest);
    assert_error(
        mirror.get(&path).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
        "GET of another repository's cached blob",
    )
    .await;
    let head = mirror.head(&path).await;
    assert_eq!(
        head.status(),
        StatusCode::NOT_FOUND,
        "HEAD of another repository's cached blob"
    );
    assert_eq!(
        up.blob_bytes_sent(&private_layer.digest),
        private_layer.size() as u64,
        "the refusal sent no blob bytes"
    );

    let bytes = get_blob(&mirror, "team/private", &shared_layer.digest).await;
    assert_eq!(bytes, shared_layer.bytes);
    let bytes = get_blob(&mirror, "team/public", &shared_layer.digest).await;
    assert_eq!(
        bytes, shared_layer.bytes,
        "served where the upstream has it"
    );
    assert_eq!(
        up.blob_bytes_sent(&shared_layer.digest),
        shared_layer.size() as u64,
        "the second repository was served from the cache, not downloaded again"
    );
    // Confirmed once, the link holds: no further upstream question for this repository.
    up.clear_requests();
    let bytes = get_blob(&mirror, "team/public", &shared_layer.digest).await;
    assert_eq!(bytes, shared_layer.bytes);
    assert_eq!(
        up.requests().len(),
        0,
        "a confirmed repository is a plain hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_cached_for_one_repository_is_not_served_for_another_that_lacks_it() {
    let private = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/private", "v1", &private)
        .image("team/public", "v1", &Image::new(1, 1000))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let digest = &private.manifest.digest;

    // Everything of the private image is cached first, so what follows is the mirror's rule
    // at work, not the upstream's.
    let response = mirror
        .get(&format!("/v2/team/private/manifests/{digest}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body(response).await, private.manifest.bytes);
    for blob in private.blobs() {
        assert_eq!(
            get_blob(&mirror, "team/private", &blob.digest).await,
            blob.bytes
        );
    }

    assert_error(
        mirror
            .get(&format!("/v2/team/public/manifests/{digest}"))
            .await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "another repository's cached manifest by digest",
    )
    .await;
    // Nor are its layers readable through the other repository.
    for blob in private.blobs() {
        assert_error(
            mirror
                .get(&format!("/v2/team/public/blobs/{}", blob.digest))
                .await,
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "a private layer through another repository",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_in_progress_for_one_repository_is_not_joined_by_another_that_lacks_it() {
    let private = Image::new(1, 2 * 1024 * 1024);
    let layer = private.layers[0].clone();
    let up = Arc::new(
        FakeUpstream::builder()
            .image("team/private", "v1", &private)
            .image("team/public", "v1", &Image::new(1, 1000))
            .fault(Fault::on_blob(&layer.digest).throttle(64 * 1024, Duration::from_millis(10)))
            .start()
            .await,
    );
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let url = format!("{}/v2/team/private/blobs/{}", mirror.url(), layer.digest);
    let allowed = tokio::spawn(async move {
        let response = crate::support::mirror::client()
            .get(&url)
            .send()
            .await
            .expect("the mirror answers");
        (
            response.status(),
            response.bytes().await.expect("the body arrives whole"),
        )
    });
    let started = up
        .wait_until(Duration::from_secs(10), |up| {
            up.blob_bytes_sent(&layer.digest) > 0
        })
        .await;
    assert!(started, "the download starts");

    assert_error(
        mirror
            .get(&format!("/v2/team/public/blobs/{}", layer.digest))
            .await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
        "joining another repository's download",
    )
    .await;
    let (status, bytes) = within("the allowed pull", allowed)
        .await
        .expect("the allowed pull did not panic");
    assert_eq!(status, StatusCode::OK);
    assert!(bytes[..] == layer.bytes[..]);
}

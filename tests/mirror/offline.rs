//! Offline upstreams: everything cached keeps serving, tags included whatever their age, what
//! was never cached is a clean 404, and the upstream is never contacted, not even to fail.

use reqwest::StatusCode;

use super::{
    ACCEPT_MANIFESTS, assert_error, body, cache_dir, header, mirror_for, pull_image, within,
};
use crate::support::fake_upstream::{FakeUpstream, Image, Index};
use crate::support::mirror::MirrorBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_upstream_serves_the_cache_with_stale_tags_and_404s_and_is_never_contacted() {
    let index = Index::two_platforms(2, 10_000);
    let never_pulled = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .image("team/app", "v2", &never_pulled)
        .start()
        .await;
    let dir = cache_dir();
    // A tag TTL far shorter than the test, so any online mirror would revalidate.
    let online = mirror_for(&up, &dir).tag_ttl("1ms");
    let mirror = online.start().await;
    let before = within(
        "a pull while online",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    mirror.stop().await;

    let mirror = online.clone().upstream_offline(&up.host()).start().await;
    up.clear_requests();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let after = within(
        "a pull by tag while offline",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    assert_eq!(after, before, "the tag resolves and every object serves");
    let head = mirror
        .request(
            reqwest::Method::HEAD,
            "/v2/team/app/manifests/v1",
            &[("accept", ACCEPT_MANIFESTS)],
        )
        .await;
    assert_eq!(head.status(), StatusCode::OK, "HEAD of a cached tag");
    assert_eq!(
        header(&head, "docker-content-digest").as_deref(),
        Some(index.manifest.digest.as_str())
    );

    assert_error(
        mirror.get("/v2/team/app/manifests/v2").await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "a tag never cached",
    )
    .await;
    assert_error(
        mirror
            .get(&format!(
                "/v2/team/app/manifests/{}",
                never_pulled.manifest.digest
            ))
            .await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "a manifest never cached",
    )
    .await;
    let missing_layer = &never_pulled.layers[0].digest;
    assert_error(
        mirror
            .get(&format!("/v2/team/app/blobs/{missing_layer}"))
            .await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
        "a blob never cached",
    )
    .await;
    let head = mirror
        .head(&format!("/v2/team/app/blobs/{missing_layer}"))
        .await;
    assert_eq!(
        head.status(),
        StatusCode::NOT_FOUND,
        "HEAD of a missing blob"
    );
    // Cached content is still private to the repositories that fetched it.
    let cached_layer = &index.images[0].layers[0].digest;
    assert_error(
        mirror
            .get(&format!("/v2/other/app/blobs/{cached_layer}"))
            .await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
        "a blob cached for another repository",
    )
    .await;

    let tags = mirror.get("/v2/team/app/tags/list").await;
    assert_eq!(
        tags.status(),
        StatusCode::OK,
        "the tag list of a cached repository"
    );
    let tags: serde_json::Value = serde_json::from_slice(&body(tags).await).expect("JSON");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    assert_error(
        mirror.get("/v2/never/seen/tags/list").await,
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        "the tag list of a repository never cached",
    )
    .await;

    let referrers = mirror
        .get(&format!("/v2/team/app/referrers/{}", index.manifest.digest))
        .await;
    assert_eq!(
        referrers.status(),
        StatusCode::OK,
        "referrers while offline"
    );
    let referrers: serde_json::Value =
        serde_json::from_slice(&body(referrers).await).expect("JSON");
    assert_eq!(
        referrers["manifests"],
        serde_json::json!([]),
        "an empty index"
    );

    assert_eq!(
        up.requests().len(),
        0,
        "an offline upstream is never contacted: {:?}",
        up.requests()
    );
    assert_eq!(
        mirror.metric("regcache_upstream_requests_total", &[]).await,
        0.0
    );
    assert_eq!(
        mirror.metric("regcache_upstream_errors_total", &[]).await,
        0.0,
        "no connection attempt, so no connection error either"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_global_switch_takes_every_upstream_offline_even_an_unreachable_one() {
    let dir = cache_dir();
    // Nothing listens there: an online mirror would try, retry and answer 502.
    let mirror = MirrorBuilder::new(dir.path())
        .upstream("registry.example.com", "http://127.0.0.1:9")
        .offline(true)
        .start()
        .await;
    assert_error(
        mirror.get("/v2/team/app/manifests/latest").await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "an unknown tag",
    )
    .await;
    let digest = format!("sha256:{}", "a".repeat(64));
    assert_error(
        mirror.get(&format!("/v2/team/app/blobs/{digest}")).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
        "an unknown blob",
    )
    .await;
    assert_eq!(
        mirror.metric("regcache_upstream_errors_total", &[]).await,
        0.0,
        "nothing was dialled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_offline_upstream_leaves_the_others_online() {
    let image = Image::new(1, 1000);
    let offline = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let online = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = MirrorBuilder::new(dir.path())
        .upstream("offline.example", &offline.url())
        .upstream("online.example", &online.url())
        .upstream_offline("offline.example")
        .start()
        .await;
    assert_error(
        mirror
            .get("/v2/offline.example/team/app/manifests/v1")
            .await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "the offline upstream's tag",
    )
    .await;
    let pulled = within(
        "a pull from the online upstream",
        pull_image(
            mirror.client(),
            &mirror.url(),
            "online.example/team/app",
            "v1",
        ),
    )
    .await;
    assert_eq!(
        pulled[0].digest.as_deref(),
        Some(image.manifest.digest.as_str())
    );
    assert_eq!(offline.requests().len(), 0);
    assert!(!online.requests().is_empty());
}

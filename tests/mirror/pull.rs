//! Whole-image pulls, and the HEAD and Range requests clients make along the way.

use reqwest::StatusCode;

use super::{ACCEPT_MANIFESTS, body, cache_dir, get_blob, header, mirror_for, pull_image, within};
use crate::support::fake_upstream::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, FakeUpstream, Image, Index, OCI_MANIFEST,
};
use crate::support::mirror::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_pulls_by_tag_and_by_digest_exactly_as_the_upstream_serves_it() {
    let index = Index::two_platforms(2, 300_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let direct = within(
        "a pull from the upstream itself",
        pull_image(&client(), &up.url(), "team/app", "v1"),
    )
    .await;
    // index, amd64 manifest, config, two layers
    assert_eq!(direct.len(), 5);
    assert_eq!(direct[0].body, index.manifest.bytes);
    up.clear_requests();

    let by_tag = within(
        "a cold pull by tag through the mirror",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    assert_eq!(
        by_tag, direct,
        "bodies and Content-Type, Docker-Content-Digest, Content-Length as the upstream sent them"
    );
    assert_eq!(up.gets_of_manifest("v1"), 1, "the tag is fetched once");
    let tag_get = up
        .requests()
        .into_iter()
        .find(|r| r.method == reqwest::Method::GET && r.path.ends_with("/manifests/v1"))
        .expect("the tag GET");
    let forwarded = tag_get
        .headers
        .get_all("accept")
        .iter()
        .fold(String::new(), |all, v| {
            all + v.to_str().expect("Accept is text") + ","
        });
    for media_type in ACCEPT_MANIFESTS.split(", ") {
        assert!(
            forwarded.contains(media_type),
            "the client's Accept reaches the upstream: {media_type} missing from {forwarded}"
        );
    }
    for fetched in &direct[1..] {
        let digest = fetched.digest.as_deref().expect("a digest header");
        let gets = up.gets_of_manifest(digest) + up.gets_of_blob(digest);
        assert_eq!(
            gets, 1,
            "{} is fetched from the upstream once",
            fetched.path
        );
    }
    // Only what the client asked for: the other platform is not prefetched.
    let arm64 = &index.images[1];
    assert_eq!(arm64.architecture, "arm64");
    for content in std::iter::once(&arm64.manifest).chain(arm64.blobs()) {
        assert_eq!(
            up.gets_of_manifest(&content.digest) + up.gets_of_blob(&content.digest),
            0,
            "the arm64 image is not fetched by an amd64 pull"
        );
    }

    let by_digest = within(
        "a pull by the index digest",
        pull_image(
            mirror.client(),
            &mirror.url(),
            "team/app",
            &index.manifest.digest,
        ),
    )
    .await;
    assert_eq!(by_digest[1..], direct[1..]);
    let (index_by_digest, index_by_tag) = (&by_digest[0], &direct[0]);
    assert_eq!(
        (
            &index_by_digest.content_type,
            &index_by_digest.digest,
            &index_by_digest.length,
            &index_by_digest.body
        ),
        (
            &index_by_tag.content_type,
            &index_by_tag.digest,
            &index_by_tag.length,
            &index_by_tag.body
        ),
        "the index by digest is the index by tag"
    );

    // Everything is cached now: a second pull by digest needs no upstream at all, and one by
    // tag neither while the tag is fresh (the default TTL is minutes).
    up.clear_requests();
    let hits_before = mirror.metric("regcache_cache_hits_total", &[]).await;
    let again = within(
        "a warm pull by digest",
        pull_image(
            mirror.client(),
            &mirror.url(),
            "team/app",
            &index.manifest.digest,
        ),
    )
    .await;
    assert_eq!(again, by_digest);
    let again_by_tag = within(
        "a warm pull by tag",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    assert_eq!(again_by_tag, direct);
    let upstream_requests: Vec<String> = up
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        upstream_requests.is_empty(),
        "a warm pull reaches the upstream: {upstream_requests:?}"
    );
    let hits_after = mirror.metric("regcache_cache_hits_total", &[]).await;
    assert!(
        hits_after >= hits_before + 10.0,
        "two warm pulls of 5 objects count as hits: {hits_before} -> {hits_after}"
    );
    let blob_hits = mirror
        .metric("regcache_cache_hits_total", &[("kind", "blob")])
        .await;
    assert!(blob_hits >= 6.0, "six blob hits, got {blob_hits}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_carries_the_get_headers_and_range_serves_part_of_a_cached_blob() {
    let image = Image::new(1, 100_000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let manifest_size = image.manifest.size().to_string();

    // Cold (answered from the upstream's HEAD), then warm.
    for round in ["cold", "warm"] {
        let response = mirror.head("/v2/team/app/manifests/v1").await;
        assert_eq!(response.status(), StatusCode::OK, "{round} HEAD by tag");
        assert_eq!(
            header(&response, "docker-content-digest").as_deref(),
            Some(image.manifest.digest.as_str()),
            "{round} HEAD digest"
        );
        assert_eq!(
            header(&response, "content-type").as_deref(),
            Some(OCI_MANIFEST),
            "{round} HEAD type"
        );
        assert_eq!(
            header(&response, "content-length").as_deref(),
            Some(manifest_size.as_str()),
            "{round} HEAD length"
        );
        assert!(body(response).await.is_empty(), "{round} HEAD has no body");
        if round == "cold" {
            let get = mirror.get("/v2/team/app/manifests/v1").await;
            assert_eq!(body(get).await, image.manifest.bytes);
        }
    }

    let layer = &image.layers[0];
    let size = layer.size();
    let path = format!("/v2/team/app/blobs/{}", layer.digest);
    let response = mirror.head(&path).await;
    assert_eq!(response.status(), StatusCode::OK, "cold HEAD of a blob");
    assert_eq!(
        header(&response, "content-length"),
        Some(size.to_string()),
        "cold HEAD of a blob gives its size"
    );
    assert_eq!(
        header(&response, "docker-content-digest").as_deref(),
        Some(layer.digest.as_str())
    );
    assert!(body(response).await.is_empty(), "HEAD has no body");

    assert_eq!(
        get_blob(&mirror, "team/app", &layer.digest).await,
        layer.bytes
    );

    let ranged = |range: String| {
        let mirror = &mirror;
        let path = path.clone();
        async move {
            mirror
                .request(reqwest::Method::GET, &path, &[("range", &range)])
                .await
        }
    };
    let response = ranged("bytes=10-19".to_owned()).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&response, "content-range"),
        Some(format!("bytes 10-19/{size}"))
    );
    assert_eq!(header(&response, "content-length").as_deref(), Some("10"));
    assert_eq!(body(response).await, layer.bytes.slice(10..20));

    let response = ranged("bytes=-5".to_owned()).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&response, "content-range"),
        Some(format!("bytes {}-{}/{size}", size - 5, size - 1))
    );
    assert_eq!(body(response).await, layer.bytes.slice(size - 5..));

    let response = ranged(format!("bytes={size}-")).await;
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(&response, "content-range"),
        Some(format!("bytes */{size}"))
    );

    let response = mirror.head(&path).await;
    assert_eq!(response.status(), StatusCode::OK, "warm HEAD of a blob");
    assert_eq!(header(&response, "content-length"), Some(size.to_string()));
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        1,
        "the ranges came from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_client_pulls_too() {
    let index = Index::two_platforms(2, 100_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    // h2c with prior knowledge, as a gRPC-style client or a proxy in front of the mirror speaks.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(crate::support::mirror::REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP/2 client builds");

    let direct = within(
        "a pull from the upstream itself",
        pull_image(&client(), &up.url(), "team/app", "v1"),
    )
    .await;
    for round in ["cold", "warm"] {
        let pulled = within(
            &format!("a {round} pull over HTTP/2"),
            pull_image(&h2, &mirror.url(), "team/app", "v1"),
        )
        .await;
        assert_eq!(pulled, direct, "{round} pull over HTTP/2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_blob_pulls() {
    let up = FakeUpstream::builder()
        .blob("team/app", bytes::Bytes::new())
        .start()
        .await;
    let digest = crate::support::fake_upstream::sha256_digest(b"");
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    for round in ["cold", "warm"] {
        let response = mirror.get(&format!("/v2/team/app/blobs/{digest}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{round}");
        assert_eq!(
            header(&response, "content-length").as_deref(),
            Some("0"),
            "{round}"
        );
        assert!(body(response).await.is_empty(), "{round}");
    }
    assert_eq!(up.gets_of_blob(&digest), 1, "then served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_schema2_manifests_keep_their_media_types() {
    let image = Image::new(1, 1000);
    let descriptor = |media_type: &str, content: &crate::support::fake_upstream::Content| {
        serde_json::json!({
            "mediaType": media_type,
            "digest": content.digest,
            "size": content.size(),
        })
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor("application/vnd.docker.container.image.v1+json", &image.config),
        "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", &image.layers[0])],
    });
    let manifest = serde_json::to_vec(&manifest).expect("JSON");
    let up = FakeUpstream::builder()
        .image("team/app", "oci", &image)
        .start()
        .await;
    let digest = up.set_manifest("team/app", "docker", DOCKER_MANIFEST, manifest.clone());
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [{
            "mediaType": DOCKER_MANIFEST,
            "digest": digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    let list_digest = up.set_manifest(
        "team/app",
        "list",
        DOCKER_MANIFEST_LIST,
        serde_json::to_vec(&list).expect("JSON"),
    );
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let pulled = within(
        "a pull of a Docker manifest list",
        pull_image(mirror.client(), &mirror.url(), "team/app", "list"),
    )
    .await;
    assert_eq!(
        pulled[0].content_type.as_deref(),
        Some(DOCKER_MANIFEST_LIST)
    );
    assert_eq!(pulled[0].digest.as_deref(), Some(list_digest.as_str()));
    assert_eq!(pulled[1].content_type.as_deref(), Some(DOCKER_MANIFEST));
    assert_eq!(pulled[1].digest.as_deref(), Some(digest.as_str()));
    assert_eq!(pulled[1].body, manifest);
    let head = mirror
        .head(&format!("/v2/team/app/manifests/{digest}"))
        .await;
    assert_eq!(
        header(&head, "content-type").as_deref(),
        Some(DOCKER_MANIFEST)
    );
}

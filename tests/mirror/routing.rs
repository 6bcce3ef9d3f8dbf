//! Which upstream a request goes to: `ns` (containerd), else a registry host as the first path
//! component (registries.conf, k3s), else the default; and never a registry that is not
//! configured, whatever the client names.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::net::TcpListener;

use super::{assert_error, body, cache_dir, header};
use crate::support::fake_upstream::{FakeUpstream, Image};
use crate::support::mirror::{Mirror, MirrorBuilder};

/// GET a manifest through the mirror; its digest.
async fn manifest_digest(mirror: &Mirror, path: &str) -> String {
    let response = mirror.get(path).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    let digest = header(&response, "docker-content-digest").expect("a digest header");
    body(response).await;
    digest
}

fn paths(up: &FakeUpstream) -> Vec<String> {
    up.requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ns_then_host_prefix_then_default_choose_the_upstream() {
    let one = Image::new(1, 1000);
    let two = Image::new(1, 1000);
    let hub = Image::new(1, 1000);
    let first = FakeUpstream::builder()
        .image("team/app", "v1", &one)
        .image("alpine", "latest", &one)
        .start()
        .await;
    let second = FakeUpstream::builder()
        .image("team/app", "v1", &two)
        .image("prefixed/app", "v1", &two)
        .start()
        .await;
    let docker_hub = FakeUpstream::builder()
        .image("library/alpine", "latest", &hub)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = MirrorBuilder::new(dir.path())
        .upstream(&first.host(), &first.url())
        .upstream(&second.host(), &second.url())
        .upstream("docker.io", &docker_hub.url())
        .default_upstream(&first.host())
        .start()
        .await;
    let everyone = [&first, &second, &docker_hub];
    let clear = || everyone.iter().for_each(|up| up.clear_requests());

    let digest = manifest_digest(
        &mirror,
        &format!("/v2/team/app/manifests/v1?ns={}", second.host()),
    )
    .await;
    assert_eq!(digest, two.manifest.digest, "ns selects the upstream");
    assert_eq!(paths(&second), ["GET /v2/team/app/manifests/v1"]);
    assert!(paths(&first).is_empty() && paths(&docker_hub).is_empty());
    let layer = &two.layers[0];
    let response = mirror
        .get(&format!(
            "/v2/team/app/blobs/{}?ns={}",
            layer.digest,
            second.host()
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = body(response).await;
    assert_eq!(bytes, layer.bytes, "ns selects the upstream of blobs too");
    clear();

    let digest = manifest_digest(
        &mirror,
        &format!("/v2/{}/prefixed/app/manifests/v1", second.host()),
    )
    .await;
    assert_eq!(
        digest, two.manifest.digest,
        "a host prefix selects the upstream"
    );
    assert_eq!(paths(&second), ["GET /v2/prefixed/app/manifests/v1"]);
    assert!(paths(&first).is_empty() && paths(&docker_hub).is_empty());
    clear();

    let digest = manifest_digest(&mirror, "/v2/team/app/manifests/v1").await;
    assert_eq!(digest, one.manifest.digest, "no ns, no prefix: the default");
    assert_eq!(paths(&first), ["GET /v2/team/app/manifests/v1"]);
    assert!(paths(&second).is_empty() && paths(&docker_hub).is_empty());
    clear();

    let digest = manifest_digest(&mirror, "/v2/alpine/manifests/latest?ns=docker.io").await;
    assert_eq!(digest, hub.manifest.digest);
    assert_eq!(
        paths(&docker_hub),
        ["GET /v2/library/alpine/manifests/latest"],
        "docker.io names get library/"
    );
    clear();

    let digest = manifest_digest(&mirror, "/v2/alpine/manifests/latest").await;
    assert_eq!(digest, one.manifest.digest);
    assert_eq!(
        paths(&first),
        ["GET /v2/alpine/manifests/latest"],
        "other upstreams' names are left alone"
    );
    assert!(paths(&docker_hub).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_that_is_not_configured_is_refused_and_never_contacted() {
    let image = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    // A host a client could name: it must never see a connection from the mirror.
    let decoy = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("binding a decoy listener");
    let decoy_host = decoy.local_addr().expect("decoy address").to_string();
    let dir = cache_dir();
    let mirror = MirrorBuilder::new(dir.path())
        .upstream(&up.host(), &up.url())
        .start()
        .await;
    let layer = &image.layers[0].digest;

    let refused = [
        "/v2/team/app/manifests/v1?ns=quay.io".to_owned(),
        "/v2/evil.example:80/x/manifests/y".to_owned(),
        format!("/v2/team/app/manifests/v1?ns={decoy_host}"),
        format!("/v2/team/app/blobs/{layer}?ns={decoy_host}"),
        format!("/v2/{decoy_host}/team/app/manifests/v1"),
        format!("/v2/{decoy_host}/team/app/blobs/{layer}"),
        format!("/v2/{decoy_host}/team/app/tags/list"),
    ];
    for path in &refused {
        assert_error(
            mirror.get(path).await,
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            &format!("GET {path}"),
        )
        .await;
        let head = mirror.head(path).await;
        assert_eq!(head.status(), StatusCode::NOT_FOUND, "HEAD {path}");
    }
    let contacted = tokio::time::timeout(Duration::from_millis(300), decoy.accept()).await;
    assert!(
        contacted.is_err(),
        "the mirror connected to a host a client named"
    );
    assert!(
        paths(&up).is_empty(),
        "nor did it ask the configured upstream: {:?}",
        paths(&up)
    );
}

//! A layer many nodes ask for at once (a rollout) is downloaded from the upstream once.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::task::JoinSet;

use super::{cache_dir, header, mirror_for, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image};
use crate::support::mirror::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_cold_pulls_of_a_layer_make_one_upstream_download() {
    const CLIENTS: usize = 16;
    let image = Image::new(1, 4 * 1024 * 1024);
    let layer = image.layers[0].clone();
    // About 0.65 s for the whole layer, so every client asks while it downloads.
    let up = Arc::new(
        FakeUpstream::builder()
            .image("team/app", "v1", &image)
            .fault(Fault::on_blob(&layer.digest).throttle(64 * 1024, Duration::from_millis(10)))
            .start()
            .await,
    );
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let url = format!("{}/v2/team/app/blobs/{}", mirror.url(), layer.digest);

    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        // A client each, as separate nodes would be: separate connections.
        let (url, up, digest) = (url.clone(), up.clone(), layer.digest.clone());
        clients.spawn(async move {
            let mut response = client().get(&url).send().await.expect("the mirror answers");
            let status = response.status();
            let length = response.content_length();
            let mut bytes = Vec::new();
            let mut upstream_sent_at_first_bytes = None;
            while let Some(chunk) = response.chunk().await.expect("the body arrives whole") {
                upstream_sent_at_first_bytes.get_or_insert_with(|| up.blob_bytes_sent(&digest));
                bytes.extend_from_slice(&chunk);
            }
            (status, length, bytes, upstream_sent_at_first_bytes)
        });
    }
    let results = within("sixteen concurrent pulls", clients.join_all()).await;

    let size = layer.size() as u64;
    for (i, (status, length, bytes, _)) in results.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "client {i}");
        assert_eq!(*length, Some(size), "client {i} Content-Length");
        assert!(
            bytes[..] == layer.bytes[..],
            "client {i} got the layer intact"
        );
    }
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        1,
        "one upstream GET of the layer for {CLIENTS} clients"
    );
    assert_eq!(
        up.blob_bytes_sent(&layer.digest),
        size,
        "the upstream sent the layer once"
    );
    let earliest = results
        .iter()
        .filter_map(|r| r.3)
        .min()
        .expect("every client received bytes");
    assert!(
        earliest < size,
        "a cold pull streams while the layer downloads (first bytes after {earliest} of {size} upstream bytes)"
    );
    let coalesced = mirror
        .metric("regcache_cache_coalesced_total", &[("kind", "blob")])
        .await;
    assert!(
        coalesced >= 1.0,
        "clients that joined the download are counted as coalesced: {coalesced}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_head_for_a_layer_that_is_downloading_is_answered_by_the_download() {
    let image = Image::new(1, 2 * 1024 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).throttle(64 * 1024, Duration::from_millis(10)))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let path = format!("/v2/team/app/blobs/{}", layer.digest);

    let mut downloading = mirror.get(&path).await;
    assert_eq!(downloading.status(), StatusCode::OK);
    within("the first bytes", downloading.chunk())
        .await
        .expect("the body starts");
    let head = mirror.head(&path).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header(&head, "content-length"),
        Some(layer.size().to_string())
    );
    assert_eq!(
        up.count("HEAD", "/v2/team/app/blobs/"),
        0,
        "the HEAD did not reach the upstream"
    );
    drop(downloading);
}

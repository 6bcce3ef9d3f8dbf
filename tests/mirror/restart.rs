//! The cache outlives the process: what was stored is served after a restart without the
//! upstream, and a download cut short by the stop leaves nothing behind.

use reqwest::StatusCode;

use super::{cache_dir, mirror_for, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Index};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_mirror_serves_its_cache_with_the_upstream_gone_and_sweeps_partial_downloads() {
    let index = Index::two_platforms(2, 100_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let dir = cache_dir();
    let builder = mirror_for(&up, &dir);

    let mirror = builder.start().await;
    let before = within(
        "a cold pull",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    // The last blob's bytes reach the client as soon as they are verified, a moment before the
    // file is synced into the store: wait (bounded) for the store to count everything.
    let mut objects_before = 0.0;
    for _ in 0..100 {
        objects_before = mirror.metric("regcache_cache_objects", &[]).await;
        if objects_before >= before.len() as f64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let bytes_before = mirror.metric("regcache_cache_size_bytes", &[]).await;
    assert!(objects_before >= before.len() as f64);
    mirror.stop().await;

    up.set_refusing(true).await;
    // What a crash mid-download leaves behind.
    let leftover = dir.path().join("ingest").join("0123456789abcdef.part");
    std::fs::write(&leftover, b"half a layer").expect("writing a leftover ingest file");

    let mirror = builder.start().await;
    let ping = mirror.get("/v2/").await;
    assert_eq!(ping.status(), StatusCode::OK);
    assert!(
        !leftover.exists(),
        "the partial download is removed at start-up"
    );

    let after = within(
        "a pull by digest after the restart",
        pull_image(
            mirror.client(),
            &mirror.url(),
            "team/app",
            &index.manifest.digest,
        ),
    )
    .await;
    assert_eq!(
        after[1..],
        before[1..],
        "manifest, config and layers as before"
    );
    assert_eq!(after[0].body, before[0].body, "the index as before");
    assert_eq!(after[0].digest, before[0].digest);

    let layer = &after.last().expect("a layer").path;
    let head = mirror.head(layer).await;
    assert_eq!(
        head.status(),
        StatusCode::OK,
        "HEAD {layer} after the restart"
    );
    let ranged = mirror
        .request(reqwest::Method::GET, layer, &[("range", "bytes=0-9")])
        .await;
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        super::body(ranged).await,
        after.last().expect("a layer").body.slice(0..10)
    );

    // The tag's last check is not remembered across the restart, so it is revalidated, fails,
    // and the last known digest is served.
    let by_tag = within(
        "a pull by tag after the restart",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    assert_eq!(by_tag, before, "the tag resolves as before");

    assert_eq!(
        mirror.metric("regcache_cache_objects", &[]).await,
        objects_before,
        "the restarted mirror counts what it holds"
    );
    assert_eq!(
        mirror.metric("regcache_cache_size_bytes", &[]).await,
        bytes_before
    );
}

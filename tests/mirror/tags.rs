//! Tags: trusted for `cache.tag_ttl`, then revalidated with a HEAD; a moved tag is followed; an
//! upstream that is down or unreachable does not stop a cached tag from resolving.
//!
//! The TTL runs on real time here (the mirror and the fake talk over sockets, where a paused
//! clock would also stop timeouts and backoff in their tracks), so it is short.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::task::JoinSet;

use super::{ACCEPT_MANIFESTS, body, cache_dir, header, mirror_for, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image};
use crate::support::mirror::{Mirror, client};

const TTL: &str = "600ms";
const PAST_TTL: Duration = Duration::from_millis(700);

/// GET the tag through the mirror; the manifest digest and body it resolved to.
async fn resolve(mirror: &Mirror) -> (String, bytes::Bytes) {
    let response = mirror.get("/v2/team/app/manifests/latest").await;
    assert_eq!(response.status(), StatusCode::OK, "GET the tag");
    let digest = header(&response, "docker-content-digest").expect("a digest header");
    (digest, body(response).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_is_trusted_for_its_ttl_then_revalidated_followed_and_served_stale_while_the_upstream_fails()
 {
    let first = Image::new(1, 1000);
    let second = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "latest", &first)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).tag_ttl(TTL).start().await;
    let first_answer = (first.manifest.digest.clone(), first.manifest.bytes.clone());
    let second_answer = (
        second.manifest.digest.clone(),
        second.manifest.bytes.clone(),
    );

    assert_eq!(resolve(&mirror).await, first_answer, "cold");
    up.clear_requests();
    assert_eq!(resolve(&mirror).await, first_answer, "fresh");
    assert_eq!(
        up.requests().len(),
        0,
        "within the TTL the upstream is not asked"
    );

    tokio::time::sleep(PAST_TTL).await;
    assert_eq!(resolve(&mirror).await, first_answer, "revalidated");
    assert_eq!(
        up.heads_of_manifest("latest"),
        1,
        "revalidated with one HEAD"
    );
    assert_eq!(
        up.gets_of_manifest("latest"),
        0,
        "an unchanged tag is not downloaded again"
    );

    up.add_image("team/app", "latest", &second);
    tokio::time::sleep(PAST_TTL).await;
    up.clear_requests();
    assert_eq!(
        resolve(&mirror).await,
        second_answer,
        "the moved tag is followed"
    );
    assert!(up.heads_of_manifest("latest") >= 1);

    tokio::time::sleep(PAST_TTL).await;
    up.set_down(true);
    let stale_before = mirror
        .metric("regcache_cache_stale_served_total", &[])
        .await;
    assert_eq!(
        resolve(&mirror).await,
        second_answer,
        "while the upstream answers 503 the last known digest is served"
    );
    let stale = mirror
        .metric(
            "regcache_cache_stale_served_total",
            &[("upstream", &up.host())],
        )
        .await;
    assert_eq!(stale, stale_before + 1.0, "the stale answer is counted");

    up.set_down(false);
    up.set_refusing(true).await;
    assert_eq!(
        resolve(&mirror).await,
        second_answer,
        "while the upstream refuses connections the last known digest is served"
    );
    let head = mirror.head("/v2/team/app/manifests/latest").await;
    assert_eq!(
        head.status(),
        StatusCode::OK,
        "a HEAD is answered stale too"
    );
    assert_eq!(
        header(&head, "docker-content-digest").as_deref(),
        Some(second.manifest.digest.as_str())
    );
    let stale = mirror
        .metric("regcache_cache_stale_served_total", &[])
        .await;
    assert_eq!(stale, stale_before + 3.0, "every stale answer is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_requests_for_a_tag_make_one_upstream_manifest_get() {
    const CLIENTS: usize = 16;
    let image = Image::new(1, 1000);
    // Slow enough that every client asks while the first answer is on its way.
    let up = FakeUpstream::builder()
        .image("team/app", "latest", &image)
        .fault(Fault::on_manifest("latest").delay(Duration::from_millis(300)))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    let url = format!("{}/v2/team/app/manifests/latest", mirror.url());

    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        let url = url.clone();
        clients.spawn(async move {
            let response = client()
                .get(&url)
                .header("accept", ACCEPT_MANIFESTS)
                .send()
                .await
                .expect("the mirror answers");
            let status = response.status();
            let digest = header(&response, "docker-content-digest");
            (
                status,
                digest,
                response.bytes().await.expect("the body arrives"),
            )
        });
    }
    for (status, digest, bytes) in within("concurrent tag requests", clients.join_all()).await {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(digest.as_deref(), Some(image.manifest.digest.as_str()));
        assert_eq!(bytes, image.manifest.bytes);
    }
    // Docker Hub counts manifest GETs against its pull rate limit.
    assert_eq!(
        up.gets_of_manifest("latest"),
        1,
        "one upstream GET of the tag for {CLIENTS} clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_download_of_a_moved_tag_serves_the_last_known_digest() {
    let first = Image::new(1, 1000);
    let second = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "latest", &first)
        .start()
        .await;
    let dir = cache_dir();
    // Every tag request revalidates.
    let mirror = mirror_for(&up, &dir).tag_ttl("0s").start().await;
    assert_eq!(
        resolve(&mirror).await,
        (first.manifest.digest.clone(), first.manifest.bytes.clone())
    );

    // The tag moves; the HEAD says so (Docker Hub does not count HEADs), but the GET of the new
    // manifest is rate limited (Docker Hub counts GETs).
    up.add_image("team/app", "latest", &second);
    up.inject(Fault::on_manifest("latest").status(429).retry_after(7));
    let response = mirror.get("/v2/team/app/manifests/latest").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a cached answer is served instead of the upstream's 429"
    );
    assert_eq!(
        header(&response, "docker-content-digest").as_deref(),
        Some(first.manifest.digest.as_str()),
        "the last known digest"
    );
    assert_eq!(body(response).await, first.manifest.bytes);
    assert_eq!(
        mirror
            .metric("regcache_cache_stale_served_total", &[])
            .await,
        1.0,
        "and it is counted as stale"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_deleted_upstream_is_unknown_after_its_ttl_and_not_served_stale_later() {
    let image = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "latest", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).tag_ttl("0s").start().await;
    assert_eq!(resolve(&mirror).await.0, image.manifest.digest);

    up.remove_tag("team/app", "latest");
    let response = mirror.get("/v2/team/app/manifests/latest").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "a deleted tag");
    assert_eq!(super::error_code(response).await, "MANIFEST_UNKNOWN");

    up.set_down(true);
    let response = mirror.get("/v2/team/app/manifests/latest").await;
    assert_ne!(
        response.status(),
        StatusCode::OK,
        "a tag known to be deleted is not resurrected while the upstream is down"
    );
    // The manifest itself stays pullable by digest.
    let response = mirror
        .get(&format!("/v2/team/app/manifests/{}", image.manifest.digest))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

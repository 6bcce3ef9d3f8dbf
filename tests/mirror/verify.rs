//! Nothing the upstream sends is handed out as complete, or kept, before its digest checks out:
//! a corrupt or broken download reaches the client as an error or a short body, leaves nothing
//! in the cache, and is counted; a broken download that can be resumed is resumed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;

use super::{Received, cache_dir, get_blob, mirror_for, read_until_end_or_error, within};
use crate::support::fake_upstream::{Content, FakeUpstream, Fault, Image};
use crate::support::mirror::Mirror;

/// Files under the cache's content store named after `digest`'s hex.
/// Waits (bounded) until the blob is in the store: a client receives the last verified byte
/// while the mirror is still syncing the file into place.
async fn wait_stored(cache: &Path, digest: &str) -> usize {
    for _ in 0..100 {
        let copies = stored_copies(cache, digest).len();
        if copies > 0 {
            return copies;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    0
}

fn stored_copies(cache: &Path, digest: &str) -> Vec<PathBuf> {
    let hex = digest.trim_start_matches("sha256:");
    let mut found = Vec::new();
    let mut dirs = vec![cache.join("blobs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if entry.file_name().to_string_lossy() == hex {
                found.push(path);
            }
        }
    }
    found
}

fn leftover_ingest_files(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("ingest"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A GET of `layer` through the mirror must not end as a complete, clean body.
async fn assert_never_complete(mirror: &Mirror, layer: &Content, what: &str) {
    let response = mirror
        .get(&format!("/v2/team/app/blobs/{}", layer.digest))
        .await;
    let status = response.status();
    if status != StatusCode::OK {
        // Refusing before the body starts is as safe as cutting it.
        assert!(
            status.is_server_error(),
            "{what}: a refusal is a 5xx, got {status}"
        );
        return;
    }
    let length = response.content_length();
    let Received { bytes, error } = read_until_end_or_error(response).await;
    let complete = error.is_none() && length.is_none_or(|l| bytes.len() as u64 == l);
    assert!(
        !complete,
        "{what}: the client received a clean body of {} bytes (Content-Length {length:?})",
        bytes.len()
    );
    assert!(
        bytes.len() < layer.size() || error.is_some(),
        "{what}: a full-length body must end in an error"
    );
}

/// After a failed download: no copy in the store, no temp file left, and a later GET (fault
/// cleared) downloads afresh and gets the right bytes.
async fn assert_not_cached_then_recovers(
    up: &FakeUpstream,
    mirror: &Mirror,
    cache: &Path,
    layer: &Content,
) {
    assert_eq!(stored_copies(cache, &layer.digest), Vec::<PathBuf>::new());
    assert_eq!(leftover_ingest_files(cache), Vec::<PathBuf>::new());
    assert_eq!(
        mirror
            .metric("regcache_upstream_fetches_in_flight", &[])
            .await,
        0.0,
        "the failed download is over"
    );
    up.clear_faults();
    // The failed download leaves the mirror's table of running downloads just after its
    // clients hear of the failure; a client retrying that very instant is not the point here.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gets_before = up.gets_of_blob(&layer.digest);
    let bytes = get_blob(mirror, "team/app", &layer.digest).await;
    assert!(
        bytes[..] == layer.bytes[..],
        "the retry gets the right bytes"
    );
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        gets_before + 1,
        "the retry downloads again: nothing was kept"
    );
    assert_eq!(
        wait_stored(cache, &layer.digest).await,
        1,
        "now it is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_layer_with_wrong_bytes_is_never_served_complete_nor_cached() {
    let image = Image::new(1, 1024 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).wrong_bytes())
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    assert_never_complete(&mirror, &layer, "wrong bytes").await;
    let mismatches = mirror
        .metric(
            "regcache_digest_mismatches_total",
            &[("upstream", &up.host())],
        )
        .await;
    assert_eq!(mismatches, 1.0, "the mismatch is counted");
    assert_not_cached_then_recovers(&up, &mirror, dir.path(), &layer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_with_wrong_bytes_is_refused_and_not_cached() {
    let image = Image::new(1, 1000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_manifest(&image.manifest.digest).wrong_bytes())
        .fault(Fault::on_manifest("v1").wrong_bytes())
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    for reference in ["v1", image.manifest.digest.as_str()] {
        let response = mirror
            .get(&format!("/v2/team/app/manifests/{reference}"))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "a manifest that does not match its digest, by {reference}"
        );
    }
    let mismatches = mirror
        .metric(
            "regcache_digest_mismatches_total",
            &[("upstream", &up.host())],
        )
        .await;
    assert_eq!(mismatches, 2.0, "both mismatches are counted");
    assert!(stored_copies(dir.path(), &image.manifest.digest).is_empty());

    up.clear_faults();
    for reference in ["v1", image.manifest.digest.as_str()] {
        let response = mirror
            .get(&format!("/v2/team/app/manifests/{reference}"))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "by {reference}");
        assert_eq!(super::body(response).await, image.manifest.bytes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_reset_midway_without_retries_is_never_served_complete_nor_cached() {
    let image = Image::new(1, 1024 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).reset_after(300_000))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).attempts(1).start().await;

    assert_never_complete(&mirror, &layer, "a reset after 300000 bytes").await;
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        1,
        "with one attempt there is no resume"
    );
    let broken = mirror
        .metric(
            "regcache_upstream_errors_total",
            &[("upstream", &up.host()), ("kind", "body")],
        )
        .await;
    assert!(broken >= 1.0, "the broken download is counted: {broken}");
    assert_eq!(
        mirror.metric("regcache_digest_mismatches_total", &[]).await,
        0.0,
        "a short download is not a digest mismatch"
    );
    assert_not_cached_then_recovers(&up, &mirror, dir.path(), &layer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_reset_midway_is_resumed_with_a_range_request() {
    const RESET_AT: u64 = 300_000;
    let image = Image::new(1, 1024 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).reset_after(RESET_AT).once())
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).attempts(3).start().await;

    let response = mirror
        .get(&format!("/v2/team/app/blobs/{}", layer.digest))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let Received { bytes, error } = read_until_end_or_error(response).await;
    assert_eq!(error, None, "the client does not see the upstream's reset");
    assert!(bytes[..] == layer.bytes[..], "the resumed layer is intact");

    let gets: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.method == reqwest::Method::GET && r.path.ends_with(&layer.digest))
        .collect();
    assert_eq!(gets.len(), 2, "the first GET and one resume");
    assert_eq!(gets[0].header("range"), None);
    let resume_from: u64 = gets[1]
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the resume asks for `bytes=N-`: {:?}",
                gets[1].header("range")
            )
        });
    assert!(
        resume_from > 0 && resume_from <= RESET_AT,
        "the resume starts after the bytes already received: {resume_from}"
    );
    assert_eq!(wait_stored(dir.path(), &layer.digest).await, 1);
    let again = within("a warm GET", get_blob(&mirror, "team/app", &layer.digest)).await;
    assert!(again[..] == layer.bytes[..]);
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        2,
        "then served from the cache"
    );
}

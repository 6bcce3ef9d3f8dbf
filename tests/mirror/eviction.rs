//! A bounded cache: past its high watermark the mirror evicts least recently used content in the
//! background, never pinned content and never a blob a client is reading; clients keep getting
//! whole, verified blobs throughout, evicted ones are refetched, and the access order that
//! decides what goes survives a restart. The `regcache cache` commands see the same cache.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;

use super::{body, cache_dir, get_blob, mirror_for, within};
use crate::support::fake_upstream::{FakeUpstream, sha256_digest};
use crate::support::mirror::Mirror;

const KIB: usize = 1024;

fn blob_bytes(seed: u8, size: usize) -> Bytes {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn stored(cache: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .is_file()
}

/// Waits (bounded) until the blob is in the store.
async fn wait_stored(cache: &Path, digest: &str) {
    for _ in 0..200 {
        if stored(cache, digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{digest} was not stored in time");
}

/// Waits (bounded) until `check` holds on the mirror's metrics.
async fn wait_metrics(mirror: &Mirror, what: &str, check: impl Fn(&str) -> bool) {
    for _ in 0..200 {
        if check(&mirror.metrics().await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not reached in time\n{}", mirror.metrics().await);
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    crate::support::mirror::metric_value(text, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_limit_evicts_lru_content_while_concurrent_readers_get_whole_blobs() {
    let blobs: Vec<Bytes> = (0..12).map(|i| blob_bytes(i, 200 * KIB)).collect();
    let mut builder = FakeUpstream::builder();
    for b in &blobs {
        builder = builder.blob("team/app", b.clone());
    }
    let up = builder.start().await;
    let digests: Vec<String> = blobs.iter().map(|b| sha256_digest(b)).collect();
    let dir = cache_dir();
    // 1 MiB holds five of the twelve blobs; eviction goes down to half of it.
    let mirror = mirror_for(&up, &dir)
        .limit("max_size", "1MiB")
        .limit("high_watermark", "90%")
        .limit("low_watermark", "50%")
        .limit("check_interval", "50ms")
        .start()
        .await;

    // The first blob is pinned by an operator: it stays whatever the pressure.
    let pinned = &digests[0];
    let pin = dir
        .path()
        .join("pins/sha256")
        .join(pinned.trim_start_matches("sha256:"));
    std::fs::create_dir_all(pin.parent().expect("a parent")).expect("pins dir");
    std::fs::write(&pin, b"").expect("pin");
    assert_eq!(get_blob(&mirror, "team/app", pinned).await, blobs[0]);

    // A slow client starts reading a cached blob and holds on to it while others fill the
    // cache far past its limit.
    let held = &digests[1];
    assert_eq!(get_blob(&mirror, "team/app", held).await, blobs[1]);
    let mut slow = mirror.get(&format!("/v2/team/app/blobs/{held}")).await;
    assert_eq!(slow.status(), StatusCode::OK);
    let first = within("the slow client's first chunk", slow.chunk())
        .await
        .expect("a chunk")
        .expect("not empty");

    let mut readers = tokio::task::JoinSet::new();
    for round in 0..3 {
        for (i, digest) in digests.iter().enumerate().skip(2) {
            let client = mirror.client().clone();
            let url = format!("{}/v2/team/app/blobs/{digest}", mirror.url());
            let expected = blobs[i].clone();
            readers.spawn(async move {
                let response = client.get(&url).send().await.expect("the mirror answers");
                assert_eq!(response.status(), StatusCode::OK, "round {round} blob {i}");
                let got = response.bytes().await.expect("the body arrives whole");
                assert!(got == expected, "round {round} blob {i} arrives intact");
            });
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    within("36 concurrent reads", readers.join_all()).await;

    let mut rest = first.to_vec();
    while let Some(chunk) = within("the slow client's body", slow.chunk())
        .await
        .expect("the slow body arrives whole")
    {
        rest.extend_from_slice(&chunk);
    }
    assert!(
        rest[..] == blobs[1][..],
        "a blob being read is never cut short"
    );

    wait_metrics(&mirror, "the cache back under its high watermark", |m| {
        metric(m, "regcache_cache_size_bytes", &[]) <= 0.9 * 1024.0 * 1024.0
            && metric(m, "regcache_evictions_total", &[("reason", "size")]) > 0.0
    })
    .await;
    let m = mirror.metrics().await;
    assert!(metric(&m, "regcache_evicted_bytes_total", &[("reason", "size")]) >= 200.0 * 1024.0);
    assert_eq!(
        metric(&m, "regcache_cache_limit_bytes", &[]),
        1024.0 * 1024.0,
        "the limit is exported beside the size"
    );
    assert!(
        stored(dir.path(), pinned),
        "pinned content is never evicted"
    );
    assert!(
        digests.iter().filter(|d| stored(dir.path(), d)).count() < digests.len(),
        "something was evicted"
    );

    // An evicted blob is simply fetched again, whole.
    let evicted = digests
        .iter()
        .position(|d| !stored(dir.path(), d))
        .expect("an evicted blob");
    let before = up.gets_of_blob(&digests[evicted]);
    assert_eq!(
        get_blob(&mirror, "team/app", &digests[evicted]).await,
        blobs[evicted]
    );
    assert_eq!(up.gets_of_blob(&digests[evicted]), before + 1);
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_read_blob_goes_first_after_a_restart() {
    let blobs: Vec<Bytes> = (0..3).map(|i| blob_bytes(i, 300 * KIB)).collect();
    let mut builder = FakeUpstream::builder();
    for b in &blobs {
        builder = builder.blob("team/app", b.clone());
    }
    let up = builder.start().await;
    let d: Vec<String> = blobs.iter().map(|b| sha256_digest(b)).collect();
    let dir = cache_dir();
    let unbounded = mirror_for(&up, &dir);
    let mirror = unbounded.start().await;
    for (i, digest) in d.iter().enumerate() {
        assert_eq!(get_blob(&mirror, "team/app", digest).await, blobs[i]);
        // The last byte reaches the client a moment before the file is stored: wait for it,
        // so each blob's store time is distinct and before the next read.
        wait_stored(dir.path(), digest).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Reading the oldest again makes the second the least recently used.
    assert_eq!(get_blob(&mirror, "team/app", &d[0]).await, blobs[0]);
    mirror.stop().await;

    // Restarted with room for two of the three: exactly the second goes.
    let bounded = unbounded
        .limit("max_size", "700KiB")
        .limit("high_watermark", "95%")
        .limit("low_watermark", "90%")
        .limit("check_interval", "50ms");
    let mirror = bounded.start().await;
    wait_metrics(&mirror, "one eviction", |m| {
        metric(m, "regcache_evictions_total", &[("reason", "size")]) >= 1.0
    })
    .await;
    assert!(
        stored(dir.path(), &d[0]),
        "read again before the restart: kept"
    );
    assert!(!stored(dir.path(), &d[1]), "least recently read: evicted");
    assert!(stored(dir.path(), &d[2]), "newer: kept");
    assert_eq!(
        metric(
            &mirror.metrics().await,
            "regcache_evictions_total",
            &[("reason", "size")]
        ),
        1.0
    );
    mirror.stop().await;
}

fn regcache(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("running regcache")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_commands_report_verify_and_collect() {
    let good = blob_bytes(1, 100 * KIB);
    let bad = blob_bytes(2, 100 * KIB);
    let up = FakeUpstream::builder()
        .blob("team/app", good.clone())
        .blob("team/app", bad.clone())
        .start()
        .await;
    let (good_d, bad_d) = (sha256_digest(&good), sha256_digest(&bad));
    let dir = cache_dir();
    let builder = mirror_for(&up, &dir);
    let config = dir.path().join("regcache.yaml");
    let mirror = builder.start().await;
    assert_eq!(get_blob(&mirror, "team/app", &good_d).await, good);
    assert_eq!(get_blob(&mirror, "team/app", &bad_d).await, bad);
    assert_eq!(get_blob(&mirror, "team/app", &good_d).await, good);
    // The running mirror's hit ratio, through its metrics.
    std::fs::write(&config, builder.yaml()).expect("config");
    let stats = regcache(
        &config,
        &[
            "cache",
            "stats",
            "--metrics-url",
            &format!("{}/metrics", mirror.url()),
        ],
    );
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    assert!(text.contains("blob: 33.3% (1 hits"), "{text}");
    // gc beside the running mirror: the mirror evicts and reports back.
    let config_path = config.clone();
    let online = tokio::task::spawn_blocking(move || {
        regcache(&config_path, &["cache", "gc", "--target", "0"])
    })
    .await
    .expect("gc ran");
    let text = String::from_utf8_lossy(&online.stdout);
    assert!(
        online.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&online.stderr)
    );
    assert!(text.contains("done by the running mirror"), "{text}");
    assert!(text.contains("evicted 2 objects"), "{text}");
    assert!(!stored(dir.path(), &good_d) && !stored(dir.path(), &bad_d));
    assert_eq!(
        mirror
            .metric("regcache_evictions_total", &[("reason", "manual")])
            .await,
        2.0
    );
    // Evicted content is fetched again on demand.
    assert_eq!(get_blob(&mirror, "team/app", &good_d).await, good);
    assert_eq!(get_blob(&mirror, "team/app", &bad_d).await, bad);
    for _ in 0..100 {
        if stored(dir.path(), &good_d) && stored(dir.path(), &bad_d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mirror.stop().await;

    let stats = regcache(&config, &["cache", "stats"]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("objects:  2"), "{text}");
    assert!(
        text.contains(&format!("{}: 200.0 KiB in 2 objects", up.host())),
        "{text}"
    );
    assert!(text.contains("hit ratio: unavailable"), "{text}");

    // A flipped byte on disk.
    let hex = bad_d.trim_start_matches("sha256:");
    let path = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[1234] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let verify = regcache(&config, &["cache", "verify"]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("CORRUPT {bad_d}")), "{text}");
    assert!(dir.path().join("quarantine/sha256").join(hex).is_file());
    let again = regcache(&config, &["cache", "verify"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    // The corrupt blob is never served again: the mirror fetches it anew, whole.
    let mirror = builder.start().await;
    let response = mirror.get(&format!("/v2/team/app/blobs/{bad_d}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body(response).await, bad);
    mirror.stop().await;

    let gc = regcache(&config, &["cache", "gc", "--target", "0"]);
    let text = String::from_utf8_lossy(&gc.stdout);
    assert!(
        gc.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(text.contains("evicted 2 objects"), "{text}");
    assert!(!stored(dir.path(), &good_d) && !stored(dir.path(), &bad_d));
}

//! A full disk mid-download: clients still get the whole, verified blob straight from the
//! upstream, nothing partial is kept, the event is counted, and hits keep being served. Runs on
//! a real small filesystem (a 1 MiB tmpfs), which needs permission to mount; where mounting is
//! not permitted the test says so and does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use reqwest::StatusCode;

use super::{body, get_blob, read_until_end_or_error, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, sha256_digest};
use crate::support::mirror::MirrorBuilder;

/// A size-limited tmpfs, unmounted on drop.
struct SmallFs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("a mount point");
        let path = dir.path().to_owned();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .ok()?;
        status.success().then_some(SmallFs { _dir: dir, path })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a mirror task still stopping may hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_mid_download_still_serves_whole_blobs_and_keeps_nothing_partial() {
    let Some(fs) = SmallFs::mount("1m") else {
        eprintln!(
            "SKIPPED: mounting a small tmpfs is not permitted here, so a full disk cannot be tested"
        );
        return;
    };
    let small: Bytes = vec![7u8; 40 * 1024].into();
    let big: Bytes = (0..3 * 1024 * 1024u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (small_d, big_d) = (sha256_digest(&small), sha256_digest(&big));
    let up = FakeUpstream::builder()
        .blob("team/app", small.clone())
        .blob("team/app", big.clone())
        .start()
        .await;
    let mirror = MirrorBuilder::new(&fs.path)
        .upstream(&up.host(), &up.url())
        .start()
        .await;
    assert_eq!(get_blob(&mirror, "team/app", &small_d).await, small);

    // Two clients ask for a blob three times the size of the disk.
    let url = format!("{}/v2/team/app/blobs/{big_d}", mirror.url());
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let client = mirror.client().clone();
        let url = url.clone();
        clients.spawn(async move {
            let response = client.get(&url).send().await.expect("the mirror answers");
            assert_eq!(response.status(), StatusCode::OK);
            response.bytes().await.expect("the body arrives whole")
        });
    }
    for got in within("two pulls onto a full disk", clients.join_all()).await {
        assert!(got == big, "the blob arrives whole and intact");
    }

    assert_eq!(
        mirror.metric("regcache_cache_disk_full_total", &[]).await,
        1.0,
        "the full disk is counted once for the one download"
    );
    let hex = big_d.trim_start_matches("sha256:");
    assert!(
        !fs.path
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists(),
        "nothing of the big blob is kept"
    );
    assert_eq!(count_files(&fs.path.join("ingest")), 0, "no partial file");

    // Hits go on being served, and the big blob still reaches a new client.
    let hits = mirror
        .metric("regcache_cache_hits_total", &[("kind", "blob")])
        .await;
    assert_eq!(get_blob(&mirror, "team/app", &small_d).await, small);
    assert_eq!(
        mirror
            .metric("regcache_cache_hits_total", &[("kind", "blob")])
            .await,
        hits + 1.0
    );
    let again = mirror.get(&format!("/v2/team/app/blobs/{big_d}")).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert!(body(again).await == big);
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_relayed_past_a_full_disk_is_never_handed_out_as_complete() {
    let Some(fs) = SmallFs::mount("1m") else {
        eprintln!(
            "SKIPPED: mounting a small tmpfs is not permitted here, so a full disk cannot be tested"
        );
        return;
    };
    let big: Bytes = (0..3 * 1024 * 1024u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    let digest = sha256_digest(&big);
    let up = FakeUpstream::builder()
        .blob("team/app", big.clone())
        .fault(Fault::on_blob(&digest).wrong_bytes())
        .start()
        .await;
    let mirror = MirrorBuilder::new(&fs.path)
        .upstream(&up.host(), &up.url())
        .start()
        .await;
    let response = mirror.get(&format!("/v2/team/app/blobs/{digest}")).await;
    let received = read_until_end_or_error(response).await;
    assert!(
        received.error.is_some() || received.bytes.len() < big.len(),
        "a blob that does not match its digest never arrives complete"
    );
    assert_eq!(
        mirror.metric("regcache_cache_disk_full_total", &[]).await,
        1.0
    );
    assert_eq!(
        mirror
            .metric(
                "regcache_digest_mismatches_total",
                &[("upstream", &up.host())]
            )
            .await,
        1.0
    );
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_room_for_even_an_empty_file_clients_still_get_whole_blobs() {
    // Plenty of bytes, few inodes: once they are used up, no download file can be created.
    let Some(fs) = SmallFs::mount("8m,nr_inodes=64") else {
        eprintln!(
            "SKIPPED: mounting a small tmpfs is not permitted here, so a full disk cannot be tested"
        );
        return;
    };
    let small: Bytes = vec![9u8; 10 * 1024].into();
    let big: Bytes = (0..1024 * 1024u32)
        .map(|i| (i % 241) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (small_d, big_d) = (sha256_digest(&small), sha256_digest(&big));
    let up = FakeUpstream::builder()
        .blob("team/app", small.clone())
        .blob("team/app", big.clone())
        .start()
        .await;
    let mirror = MirrorBuilder::new(&fs.path)
        .upstream(&up.host(), &up.url())
        .start()
        .await;
    assert_eq!(get_blob(&mirror, "team/app", &small_d).await, small);
    let filler = fs.path.join("filler");
    std::fs::create_dir(&filler).expect("a directory for filler files");
    // Storing the small blob woke the mirror's maintenance, which may swap its index files and
    // so free an inode: fill, let that pass finish, and fill what it freed.
    let mut n = 0u32;
    for _ in 0..2 {
        while std::fs::write(filler.join(n.to_string()), b"").is_ok() {
            n += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    }
    assert!(
        std::fs::write(fs.path.join("probe"), b"").is_err(),
        "no inode is left"
    );

    let response = mirror.get(&format!("/v2/team/app/blobs/{big_d}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(body(response).await == big, "the blob arrives whole");
    assert_eq!(
        mirror.metric("regcache_cache_disk_full_total", &[]).await,
        1.0
    );
    assert_eq!(count_files(&fs.path.join("ingest")), 0);
    assert_eq!(get_blob(&mirror, "team/app", &small_d).await, small);
    std::fs::remove_dir_all(&filler).expect("room again");
    mirror.stop().await;
}

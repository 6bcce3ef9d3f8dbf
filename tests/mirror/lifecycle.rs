//! Downloads and the mirror's own life: a download outlives the client that started it, and a
//! stopping mirror finishes what it is serving while refusing new connections.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::net::TcpStream;

use super::{cache_dir, get_blob, mirror_for, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image};
use crate::support::mirror::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_goes_on_into_the_cache_after_its_client_leaves() {
    let image = Image::new(1, 2 * 1024 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).throttle(64 * 1024, Duration::from_millis(10)))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let leaving = client();
    let mut response = leaving
        .get(format!(
            "{}/v2/team/app/blobs/{}",
            mirror.url(),
            layer.digest
        ))
        .send()
        .await
        .expect("the mirror answers");
    assert_eq!(response.status(), StatusCode::OK);
    let first = within("the first bytes", response.chunk())
        .await
        .expect("the body starts");
    assert!(first.is_some_and(|c| !c.is_empty()));
    // The client gives up (a node drained, a pull cancelled).
    drop(response);
    drop(leaving);

    let finished = up
        .wait_until(Duration::from_secs(10), |up| {
            up.blob_bytes_sent(&layer.digest) == layer.size() as u64
        })
        .await;
    assert!(finished, "the upstream download runs to its end");
    let bytes = get_blob(&mirror, "team/app", &layer.digest).await;
    assert!(bytes[..] == layer.bytes[..]);
    assert_eq!(
        up.gets_of_blob(&layer.digest),
        1,
        "the next client is served what the first one left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_mirror_finishes_in_flight_pulls_and_refuses_new_connections() {
    let image = Image::new(1, 2 * 1024 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).throttle(64 * 1024, Duration::from_millis(10)))
        .start()
        .await;
    let dir = cache_dir();
    let mut mirror = mirror_for(&up, &dir).start().await;
    let addr = mirror.addr();

    let url = format!("{}/v2/team/app/blobs/{}", mirror.url(), layer.digest);
    let in_flight = tokio::spawn(async move {
        let response = client().get(&url).send().await.expect("the mirror answers");
        let status = response.status();
        (status, response.bytes().await)
    });
    let started = up
        .wait_until(Duration::from_secs(10), |up| {
            up.blob_bytes_sent(&layer.digest) > 0
        })
        .await;
    assert!(started, "the pull is under way");

    mirror.begin_stop();
    let refused = async {
        loop {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within("the listener closing", refused).await;

    let (status, bytes) = within("the in-flight pull", in_flight)
        .await
        .expect("the pull did not panic");
    assert_eq!(status, StatusCode::OK);
    let bytes = bytes.expect("the in-flight body completes during shutdown");
    assert!(bytes[..] == layer.bytes[..]);
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_nobody_reads_stops_after_the_fill_timeout() {
    let image = Image::new(1, 4 * 1024 * 1024);
    let layer = image.layers[0].clone();
    // About 1.3 s for the whole layer, far longer than the fill timeout.
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).throttle(32 * 1024, Duration::from_millis(10)))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).fill_timeout("100ms").start().await;

    let leaving = client();
    let mut response = leaving
        .get(format!(
            "{}/v2/team/app/blobs/{}",
            mirror.url(),
            layer.digest
        ))
        .send()
        .await
        .expect("the mirror answers");
    within("the first bytes", response.chunk())
        .await
        .expect("the body starts");
    drop(response);
    drop(leaving);

    // Well past the fill timeout, well before the download could have finished.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = up.blob_bytes_sent(&layer.digest);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        up.blob_bytes_sent(&layer.digest),
        sent,
        "the abandoned download stopped"
    );
    assert!(sent < layer.size() as u64, "it stopped before the end");
    assert_eq!(
        mirror
            .metric("regcache_upstream_fetches_in_flight", &[])
            .await,
        0.0
    );
    assert!(
        std::fs::read_dir(dir.path().join("ingest"))
            .map(|entries| entries.count())
            .unwrap_or(0)
            == 0,
        "the partial download is removed"
    );
    up.clear_faults();
    let bytes = get_blob(&mirror, "team/app", &layer.digest).await;
    assert!(
        bytes[..] == layer.bytes[..],
        "a later client downloads it anew"
    );
    assert_eq!(up.gets_of_blob(&layer.digest), 2);
}

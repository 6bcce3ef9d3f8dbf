//! `regcache seed`, run in-process as the command runs it: whole images land in the cache
//! through the verified ingest, re-running downloads nothing, `--platform` keeps only the chosen
//! children, `--pin` pins, and an offline mirror then serves the seeded images.

use reqwest::StatusCode;

use super::{assert_error, cache_dir, mirror_for, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Image, Index, sha256_digest};
use crate::support::mirror::MirrorBuilder;
use regcache::airgap::{self, SeedOptions, Silent};

fn options(platforms: &[&str], pin: bool) -> SeedOptions {
    SeedOptions {
        platforms: platforms
            .iter()
            .map(|p| p.parse().expect("a valid platform"))
            .collect(),
        pin,
        jobs: 3,
    }
}

async fn seed(
    builder: &MirrorBuilder,
    images: &[String],
    options: &SeedOptions,
) -> airgap::SeedReport {
    let config = regcache::config::Config::from_yaml(&builder.yaml()).expect("valid config");
    let cache = regcache::open_cache(&config)
        .await
        .expect("the cache opens");
    within("seeding", airgap::seed(&cache, images, options, &Silent))
        .await
        .expect("seed runs")
}

fn pinned(dir: &std::path::Path, digest: &str) -> bool {
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    dir.join("pins").join(alg).join(hex).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_images_serve_offline_and_a_second_seed_downloads_nothing() {
    let index = Index::two_platforms(2, 20_000);
    let image = Image::new(1, 5_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .image("team/tool", "v2", &image)
        .start()
        .await;
    let dir = cache_dir();
    let builder = mirror_for(&up, &dir);
    let host = up.host();
    let images = vec![
        format!("{host}/team/app:v1"),
        format!("{host}/team/tool@{}", image.manifest.digest),
    ];

    let report = seed(&builder, &images, &options(&[], true)).await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // index + 2 image manifests + 2 configs + 4 layers; manifest + config + layer.
    assert_eq!(report.objects, 9 + 3);
    assert_eq!(report.fetched, 12, "everything was downloaded");
    let every_blob = index
        .images
        .iter()
        .flat_map(|i| i.blobs())
        .chain(image.blobs());
    for blob in every_blob {
        assert_eq!(
            up.gets_of_blob(&blob.digest),
            1,
            "{} fetched once",
            blob.digest
        );
        assert!(pinned(dir.path(), &blob.digest), "{} pinned", blob.digest);
    }
    assert!(pinned(dir.path(), &index.manifest.digest));

    up.clear_requests();
    let again = seed(&builder, &images, &options(&[], false)).await;
    assert!(again.failures.is_empty(), "{:?}", again.failures);
    assert_eq!(again.objects, 12);
    assert_eq!(again.fetched, 0, "a second seed finds everything present");
    assert_eq!(
        up.requests()
            .iter()
            .filter(|r| r.method == reqwest::Method::GET)
            .count(),
        0,
        "only the tag is revalidated (HEAD): {:?}",
        up.requests()
    );

    up.clear_requests();
    let mirror = builder.clone().offline(true).start().await;
    for platform in ["amd64", "arm64"] {
        let wanted = index
            .images
            .iter()
            .find(|i| i.architecture == platform)
            .expect("both platforms");
        let pulled = within(
            "an offline pull of a seeded image",
            pull_image(
                mirror.client(),
                &mirror.url(),
                "team/app",
                &wanted.manifest.digest,
            ),
        )
        .await;
        assert_eq!(pulled.len(), 4, "manifest, config and two layers");
    }
    let pulled = within(
        "an offline pull by the seeded tag",
        pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
    )
    .await;
    assert_eq!(sha256_digest(&pulled[0].body), index.manifest.digest);
    let pulled = within(
        "an offline pull by the seeded digest",
        pull_image(
            mirror.client(),
            &mirror.url(),
            "team/tool",
            &image.manifest.digest,
        ),
    )
    .await;
    assert_eq!(pulled.len(), 3);
    assert_eq!(
        up.requests().len(),
        0,
        "the offline mirror never asked the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn platform_filter_keeps_only_the_chosen_children() {
    let index = Index::two_platforms(1, 5_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let dir = cache_dir();
    let builder = mirror_for(&up, &dir);
    let image = format!("{}/team/app:v1", up.host());
    let report = seed(
        &builder,
        std::slice::from_ref(&image),
        &options(&["linux/arm64"], false),
    )
    .await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        report.objects,
        2 + 2,
        "index, arm64 manifest, its config and layer"
    );
    for i in &index.images {
        let expected = usize::from(i.architecture == "arm64");
        for b in i.blobs() {
            assert_eq!(
                up.gets_of_blob(&b.digest),
                expected,
                "{} {}",
                i.architecture,
                b.digest
            );
        }
    }
    assert!(
        !pinned(dir.path(), &index.manifest.digest),
        "not pinned without --pin"
    );

    let report = seed(&builder, &[image], &options(&["windows/amd64"], false)).await;
    assert_eq!(report.failures.len(), 1);
    assert!(
        report.failures[0].contains("windows/amd64"),
        "{:?}",
        report.failures
    );

    let mirror = builder.clone().offline(true).start().await;
    let amd64 = &index.images[0].manifest.digest;
    assert_error(
        mirror.get(&format!("/v2/team/app/manifests/{amd64}")).await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "the platform that was not seeded",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_references_fail_before_anything_is_fetched_and_missing_images_are_reported() {
    let image = Image::new(1, 1_000);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let builder = mirror_for(&up, &dir);
    let config = regcache::config::Config::from_yaml(&builder.yaml()).expect("valid config");
    let cache = regcache::open_cache(&config)
        .await
        .expect("the cache opens");
    for bad in ["Team/App:v1", "quay.io/org/app:v1"] {
        let err = airgap::seed(&cache, &[bad.to_owned()], &options(&[], false), &Silent)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(bad), "{err}");
    }
    assert_eq!(up.requests().len(), 0);

    let offline = builder.clone().offline(true);
    let config = regcache::config::Config::from_yaml(&offline.yaml()).expect("valid config");
    let offline_cache = regcache::open_cache(&config)
        .await
        .expect("the cache opens");
    let image_ref = format!("{}/team/app:v1", up.host());
    let err = airgap::seed(&offline_cache, &[image_ref], &options(&[], false), &Silent)
        .await
        .expect_err("nothing can be seeded from an offline upstream");
    assert!(err.to_string().contains("offline"), "{err}");
    assert_eq!(up.requests().len(), 0);

    let host = up.host();
    let report = within(
        "seeding",
        airgap::seed(
            &cache,
            &[
                format!("{host}/team/app:v1"),
                format!("{host}/team/app:nope"),
            ],
            &options(&[], false),
            &Silent,
        ),
    )
    .await
    .expect("seed runs");
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(
        report.failures[0].contains("team/app:nope"),
        "{:?}",
        report.failures
    );
    assert_eq!(report.fetched, 3, "the good image is seeded all the same");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeding_beside_a_running_mirror_leaves_its_downloads_in_progress_alone() {
    let image = Image::new(1, 200_000);
    let layer = image.layers[0].digest.clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(
            crate::support::fake_upstream::Fault::on_blob(&layer)
                .throttle(16 * 1024, std::time::Duration::from_millis(10)),
        )
        .start()
        .await;
    let dir = cache_dir();
    let builder = mirror_for(&up, &dir);
    let mirror = builder.start().await;
    let (client, url) = (mirror.client().clone(), mirror.url());
    let pull = tokio::spawn(async move { pull_image(&client, &url, "team/app", "v1").await });
    within("the mirror's download to start", async {
        while up.gets_of_blob(&layer) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;

    let report = seed(
        &builder,
        &[format!("{}/team/app:v1", up.host())],
        &options(&[], false),
    )
    .await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let pulled = within("the mirror's pull", pull)
        .await
        .expect("the pull did not panic");
    assert_eq!(
        pulled.len(),
        3,
        "the client's pull completed, every digest checked"
    );
    // The mirror stored its own download too: the seed did not sweep it away mid-flight.
    let mut stored = 0.0;
    for _ in 0..200 {
        stored = mirror.metric("regcache_cache_objects", &[]).await;
        if stored >= 3.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        stored, 3.0,
        "manifest, config and layer stored by the mirror"
    );
    mirror.stop().await;

    let restarted = builder.clone().offline(true).start().await;
    let again = within(
        "an offline pull",
        pull_image(restarted.client(), &restarted.url(), "team/app", "v1"),
    )
    .await;
    assert_eq!(again, pulled);
}

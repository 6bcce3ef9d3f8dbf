//! `regcache export` and `regcache import`, in-process: a seeded image travels as an OCI image
//! layout (directory or tar) into another cache and serves from there offline; a corrupt or
//! truncated bundle is refused naming the digest, with nothing imported; an export of content
//! that is not cached names what is missing.

use std::path::Path;

use super::{cache_dir, mirror_for, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Index};
use crate::support::mirror::MirrorBuilder;
use regcache::airgap::{self, ExportOptions, ImportOptions, SeedOptions, Silent};

async fn open(builder: &MirrorBuilder) -> regcache::cache::Cache {
    let config = regcache::config::Config::from_yaml(&builder.yaml()).expect("valid config");
    regcache::open_cache(&config)
        .await
        .expect("the cache opens")
}

async fn seeded(
    up: &FakeUpstream,
    images: &[String],
    platforms: &[&str],
) -> (tempfile::TempDir, MirrorBuilder) {
    let dir = cache_dir();
    let builder = mirror_for(up, &dir);
    let options = SeedOptions {
        platforms: platforms
            .iter()
            .map(|p| p.parse().expect("platform"))
            .collect(),
        pin: false,
        jobs: 2,
    };
    let report = within(
        "seeding",
        airgap::seed(&open(&builder).await, images, &options, &Silent),
    )
    .await
    .expect("seed runs");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    (dir, builder)
}

/// Every regular file under `dir/sub`.
fn files(dir: &Path, sub: &str) -> Vec<std::path::PathBuf> {
    fn walk(p: &Path, out: &mut Vec<std::path::PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join(sub), &mut out);
    out
}

fn assert_nothing_imported(dir: &Path) {
    assert_eq!(
        files(dir, "blobs"),
        Vec::<std::path::PathBuf>::new(),
        "no blob stored"
    );
    assert_eq!(
        files(dir, "repos"),
        Vec::<std::path::PathBuf>::new(),
        "no tag or link"
    );
    assert_eq!(
        files(dir, "ingest"),
        Vec::<std::path::PathBuf>::new(),
        "no staging left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exported_bundle_imports_into_another_cache_that_serves_it_offline() {
    let index = Index::two_platforms(2, 30_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let image = format!("{}/team/app:v1", up.host());
    let (_source, source) = seeded(&up, std::slice::from_ref(&image), &[]).await;
    let out = tempfile::tempdir().expect("tempdir");
    let cache = open(&source).await;
    for name in ["bundle", "bundle.tar"] {
        let report = airgap::export(
            &cache,
            std::slice::from_ref(&image),
            &out.path().join(name),
            &ExportOptions::default(),
            &Silent,
        )
        .await
        .expect("export");
        assert_eq!(report.objects, 9, "index, 2 manifests, 2 configs, 4 layers");
    }
    assert!(out.path().join("bundle.tar").is_file());
    let index_json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("bundle/index.json")).expect("index.json"),
    )
    .expect("JSON");
    assert_eq!(
        index_json["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        image.as_str()
    );
    assert_eq!(
        index_json["manifests"][0]["digest"],
        index.manifest.digest.as_str()
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("bundle/oci-layout")).expect("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let err = airgap::export(
        &cache,
        std::slice::from_ref(&image),
        &out.path().join("bundle"),
        &ExportOptions::default(),
        &Silent,
    )
    .await
    .expect_err("an existing output is not overwritten");
    assert!(err.to_string().contains("already exists"), "{err}");

    for name in ["bundle", "bundle.tar"] {
        let dir = cache_dir();
        let target = mirror_for(&up, &dir);
        let report = airgap::import(
            &open(&target).await,
            &out.path().join(name),
            &ImportOptions { pin: true },
            &Silent,
        )
        .await
        .unwrap_or_else(|e| panic!("importing {name}: {e}"));
        assert_eq!(report.images, vec![image.clone()]);
        assert_eq!((report.objects, report.new_objects), (9, 9));
        assert!(files(dir.path(), "ingest").is_empty());
        assert_eq!(
            files(dir.path(), "pins").len(),
            9,
            "--pin pins every object"
        );

        up.clear_requests();
        let mirror = target.offline(true).start().await;
        let pulled = within(
            "an offline pull of the imported image",
            pull_image(mirror.client(), &mirror.url(), "team/app", "v1"),
        )
        .await;
        assert_eq!(
            pulled[0].digest.as_deref(),
            Some(index.manifest.digest.as_str())
        );
        assert_eq!(pulled[0].body, index.manifest.bytes);
        assert_eq!(pulled.len(), 5, "index, manifest, config, two layers");
        assert_eq!(up.requests().len(), 0);
        mirror.stop().await;

        let again = airgap::import(
            &open(&mirror_for(&up, &dir)).await,
            &out.path().join(name),
            &ImportOptions::default(),
            &Silent,
        )
        .await
        .expect("a second import");
        assert_eq!(
            (again.objects, again.new_objects),
            (9, 0),
            "nothing new the second time"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_and_truncated_bundles_are_refused_naming_the_digest_and_import_nothing() {
    let index = Index::two_platforms(1, 200_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let image = format!("{}/team/app:v1", up.host());
    let (_source, source) = seeded(&up, std::slice::from_ref(&image), &[]).await;
    let out = tempfile::tempdir().expect("tempdir");
    let cache = open(&source).await;
    for name in ["bundle", "bundle.tar"] {
        airgap::export(
            &cache,
            std::slice::from_ref(&image),
            &out.path().join(name),
            &ExportOptions::default(),
            &Silent,
        )
        .await
        .expect("export");
    }

    // A flipped byte in a layer.
    let layer = &index.images[1].layers[0].digest;
    let hex = layer.trim_start_matches("sha256:");
    let path = out.path().join("bundle/blobs/sha256").join(hex);
    let mut bytes = std::fs::read(&path).expect("the layer is in the bundle");
    bytes[1000] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupting");
    let dir = cache_dir();
    let err = airgap::import(
        &open(&mirror_for(&up, &dir)).await,
        &out.path().join("bundle"),
        &ImportOptions::default(),
        &Silent,
    )
    .await
    .expect_err("a corrupt bundle is refused");
    let message = err.to_string();
    assert!(message.contains(layer.as_str()), "{message}");
    assert!(message.contains("nothing imported"), "{message}");
    assert_nothing_imported(dir.path());

    // A missing layer.
    std::fs::remove_file(&path).expect("removing");
    let err = airgap::import(
        &open(&mirror_for(&up, &dir)).await,
        &out.path().join("bundle"),
        &ImportOptions::default(),
        &Silent,
    )
    .await
    .expect_err("an incomplete bundle is refused");
    assert!(err.to_string().contains(layer.as_str()), "{err}");
    assert_nothing_imported(dir.path());

    // A tar cut short, inside a layer and then at an entry boundary.
    let tar = std::fs::read(out.path().join("bundle.tar")).expect("the tar");
    for keep in [tar.len() / 2, tar.len() - 2048] {
        let cut = out.path().join("cut.tar");
        std::fs::write(&cut, &tar[..keep]).expect("truncating");
        let err = airgap::import(
            &open(&mirror_for(&up, &dir)).await,
            &cut,
            &ImportOptions::default(),
            &Silent,
        )
        .await
        .expect_err("a truncated tar is refused");
        let message = err.to_string();
        assert!(
            message.contains("truncated") && message.contains("nothing imported"),
            "{message}"
        );
        assert_nothing_imported(dir.path());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exporting_what_is_not_cached_names_the_image_and_digest() {
    let index = Index::two_platforms(1, 5_000);
    let up = FakeUpstream::builder()
        .index("team/app", "v1", &index)
        .start()
        .await;
    let image = format!("{}/team/app:v1", up.host());
    let (_source, source) = seeded(&up, std::slice::from_ref(&image), &["linux/arm64"]).await;
    let cache = open(&source).await;
    let out = tempfile::tempdir().expect("tempdir");

    let err = airgap::export(
        &cache,
        &[format!("{}/team/app:v2", up.host())],
        &out.path().join("a"),
        &ExportOptions::default(),
        &Silent,
    )
    .await
    .expect_err("a tag never seeded");
    assert!(err.to_string().contains("team/app:v2"), "{err}");

    let err = airgap::export(
        &cache,
        std::slice::from_ref(&image),
        &out.path().join("b"),
        &ExportOptions::default(),
        &Silent,
    )
    .await
    .expect_err("the platform that was not seeded");
    let message = err.to_string();
    assert!(message.contains(&image), "{message}");
    assert!(
        message.contains(&index.images[0].manifest.digest),
        "{message}"
    );
    assert!(!out.path().join("b").exists(), "nothing written");

    let options = ExportOptions {
        platforms: vec!["linux/arm64".parse().expect("platform")],
    };
    airgap::export(
        &cache,
        std::slice::from_ref(&image),
        &out.path().join("c.tar"),
        &options,
        &Silent,
    )
    .await
    .expect("exporting the seeded platform");
    let dir = cache_dir();
    let target = mirror_for(&up, &dir);
    airgap::import(
        &open(&target).await,
        &out.path().join("c.tar"),
        &ImportOptions::default(),
        &Silent,
    )
    .await
    .expect("importing a one-platform bundle");
    let mirror = target.offline(true).start().await;
    let arm64 = &index.images[1];
    assert_eq!(arm64.architecture, "arm64");
    let pulled = within(
        "an offline pull of the imported platform",
        pull_image(
            mirror.client(),
            &mirror.url(),
            "team/app",
            &arm64.manifest.digest,
        ),
    )
    .await;
    assert_eq!(pulled.len(), 3);
}

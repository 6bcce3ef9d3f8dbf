//! regcache as a mirror between real clients and a real registry.
//!
//! The upstream is Debian's `docker-registry` (CNCF Distribution) on loopback with TLS from a
//! test CA and htpasswd auth; test images are built from random bytes and pushed with `skopeo`.
//! regcache runs as its built binary with a config file, and images are pulled through it with
//! `skopeo` (containers/image, as podman and CRI-O pull), with containerd's `ctr` through a
//! hosts.toml mirror (as the kubelet pulls) and with a private Docker daemon through
//! `--registry-mirror`, comparing every digest with what was pushed.
//!
//! Needs, from Debian: skopeo, docker-registry, containerd, docker.io, apache2-utils
//! (htpasswd), openssl.
//! A missing tool fails the test with the package to install. Runs as root (containerd).

#[path = "interop/containerd.rs"]
mod containerd;
#[path = "interop/docker.rs"]
mod docker;
#[path = "interop/image.rs"]
mod image;
#[path = "interop/mirror.rs"]
mod mirror;
#[path = "interop/process.rs"]
mod process;
#[path = "interop/prometheus.rs"]
mod prometheus;
#[path = "interop/registry.rs"]
mod registry;
#[path = "interop/skopeo.rs"]
mod skopeo;

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;
use tempfile::TempDir;

use containerd::{Containerd, write_hosts_dir, write_secure_hosts_dir};
use image::{
    Descriptor, Image, Index, Layout, sha256_digest, verify_pulled_dir, verify_pulled_layout,
};
use mirror::{DefaultUpstream, Mirror, metric_sum, write_config};
use process::{COMMAND_TIMEOUT, START_TIMEOUT, command, run, try_run, wait_for};
use prometheus::Prometheus;
use registry::{PASSWORD, Registry, Tls, USER};
use skopeo::{Skopeo, Source};

/// A repository name with more than one component, as most private registries use.
const NAME: &str = "team/app";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What was pushed to the registry.
#[derive(Clone)]
struct Pushed {
    /// `team/app:v1`: one OCI image manifest (linux/amd64).
    v1: Image,
    /// `team/app:multi`: an OCI index of linux/amd64 and linux/arm64 images.
    multi: Index,
    /// `team/app:v1-docker`: `v1` converted by skopeo to a Docker schema 2 manifest.
    docker: Descriptor,
}

/// A running upstream registry holding the test images. Fields drop in order: the registry is
/// killed before its directory is deleted.
struct World {
    registry: Registry,
    skopeo: Skopeo,
    tls: Tls,
    pushed: Pushed,
    dir: TempDir,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("creating the test directory");
        let tls = Tls::generate(&dir.path().join("tls"));
        let registry = Registry::start(&dir.path().join("registry"), &tls);
        let skopeo = Skopeo::new(&dir.path().join("skopeo"));

        let mut layout = Layout::create(&dir.path().join("layout"), &dir.path().join("layers"));
        // A base layer over 1 MiB, shared by every image: a blob reached through several
        // manifests, and big enough to stream in many chunks.
        let base = layout.layer(&[1_300_000]);
        let app = layout.layer(&[200_000, 4_000]);
        let amd64_only = layout.layer(&[150_000]);
        let arm64_only = layout.layer(&[170_000]);
        let v1 = layout.image("amd64", &[&base, &app]);
        layout.tag("v1", &v1.manifest);
        let amd64 = layout.image("amd64", &[&base, &amd64_only]);
        let arm64 = layout.image("arm64", &[&base, &arm64_only]);
        let multi = layout.index(vec![amd64, arm64]);
        layout.tag("multi", &multi.index);

        let upstream = Source::Registry(&registry, &tls);
        let push = |tag: &str, reference: &str, format: Option<&str>| {
            skopeo.push(layout.dir(), tag, &registry, &tls, reference, format);
        };
        push("v1", &format!("{NAME}:v1"), None);
        push("multi", &format!("{NAME}:multi"), None);
        push("v1", &format!("{NAME}:v1-docker"), Some("v2s2"));
        // Checked here so that a push which changed a digest is not blamed on the mirror.
        for (reference, digest) in [("v1", &v1.manifest.digest), ("multi", &multi.index.digest)] {
            let stored = skopeo.inspect_raw(&upstream, &format!("{NAME}:{reference}"));
            assert_eq!(
                &sha256_digest(&stored),
                digest,
                "the registry holds another {reference}"
            );
        }
        let docker = skopeo.inspect_raw(&upstream, &format!("{NAME}:v1-docker"));
        let docker_manifest: Value = serde_json::from_slice(&docker).expect("manifest is JSON");
        assert_eq!(
            docker_manifest["mediaType"], DOCKER_MANIFEST,
            "skopeo did not convert"
        );
        let docker = Descriptor {
            media_type: DOCKER_MANIFEST.to_owned(),
            digest: sha256_digest(&docker),
            size: docker.len() as u64,
        };

        World {
            registry,
            skopeo,
            tls,
            pushed: Pushed { v1, multi, docker },
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_mirror(&self, run: &str, default_upstream: DefaultUpstream) -> Mirror {
        let cache = self.path("cache");
        Mirror::start(
            self.dir.path(),
            run,
            &cache,
            &self.registry,
            &self.tls,
            default_upstream,
        )
    }

    /// Pulls `reference` through `mirror` with skopeo into the OCI layout `<dir>/<name>`, as
    /// `tag`.
    fn pull_to_layout(&self, mirror: &Mirror, reference: &str, name: &str, tag: &str) -> PathBuf {
        let dir = self.path(name);
        let dest = format!("oci:{}:{tag}", dir.display());
        self.skopeo.pull(&Source::Mirror(mirror), reference, &dest);
        dir
    }

    /// The blobs of every image in `index`, with the index itself.
    fn index_blobs(index: &Index) -> Vec<&Descriptor> {
        let mut blobs = vec![&index.index];
        blobs.extend(index.images.iter().flat_map(Image::all_blobs));
        blobs
    }
}

#[test]
fn skopeo_pulls_images_and_indexes_through_the_mirror() {
    let world = World::new();
    let mirror = world.start_mirror("first", DefaultUpstream::Registry);
    let (skopeo, pushed) = (&world.skopeo, &world.pushed);
    let through = Source::Mirror(&mirror);
    let upstream = Source::Registry(&world.registry, &world.tls);

    // Manifests and the index come back byte for byte as the registry serves them, by tag
    // and by digest, Docker media types included.
    for (tag, digest) in [
        ("v1", &pushed.v1.manifest.digest),
        ("multi", &pushed.multi.index.digest),
        ("v1-docker", &pushed.docker.digest),
    ] {
        let served = skopeo.inspect_raw(&through, &format!("{NAME}:{tag}"));
        assert_eq!(
            &sha256_digest(&served),
            digest,
            "{NAME}:{tag} through the mirror"
        );
        assert_eq!(
            served,
            skopeo.inspect_raw(&upstream, &format!("{NAME}:{tag}")),
            "{NAME}:{tag} differs between the mirror and the registry"
        );
        let by_digest = skopeo.inspect_raw(&through, &format!("{NAME}@{digest}"));
        assert_eq!(
            &sha256_digest(&by_digest),
            digest,
            "{NAME}@{digest} through the mirror"
        );
    }

    // Whole pulls: every blob arrives complete, and skopeo verified each digest as it came.
    let pull_all = |run: &str| {
        let v1 = world.pull_to_layout(&mirror, &format!("{NAME}:v1"), &format!("{run}-v1"), "v1");
        verify_pulled_layout(&v1, "v1", &pushed.v1.manifest, &pushed.v1.all_blobs());

        let reference = format!("{NAME}:multi");
        let multi = world.pull_to_layout(&mirror, &reference, &format!("{run}-multi"), "multi");
        let blobs = World::index_blobs(&pushed.multi);
        verify_pulled_layout(&multi, "multi", &pushed.multi.index, &blobs);

        // The Docker image into a plain directory: an OCI layout would need a conversion,
        // which would change the digest being checked.
        let docker = world.path(&format!("{run}-docker"));
        skopeo.pull(
            &through,
            &format!("{NAME}:v1-docker"),
            &format!("dir:{}", docker.display()),
        );
        let layers: Vec<&Descriptor> = pushed.v1.layers.iter().collect();
        verify_pulled_dir(&docker, &pushed.docker.digest, &layers);
    };
    pull_all("cold");
    // Each blob crossed from the registry once, though the base layer is in every image.
    let mut fetches: HashMap<String, usize> = HashMap::new();
    for request in world.registry.requests() {
        if request.method == "GET" && request.status == 200 && request.path.contains("/blobs/") {
            *fetches.entry(request.path).or_default() += 1;
        }
    }
    fetches.retain(|_, count| *count > 1);
    assert!(
        fetches.is_empty(),
        "blobs fetched from the registry more than once: {fetches:?}"
    );
    let upstream_requests = metric_sum(&mirror.metrics(), "regcache_upstream_requests_total");
    assert!(
        upstream_requests > 0.0,
        "regcache_upstream_requests_total is {upstream_requests} after cold pulls:\n{}",
        mirror.metrics()
    );

    // The registry's credentials came from the mounted Secret, and went nowhere else.
    assert_eq!(
        metric_sum(&mirror.metrics(), "regcache_credentials_reloads_total"),
        1.0,
        "the secret was loaded once"
    );
    let log = mirror.log();
    assert!(log.contains("credentials loaded"), "no audit line:\n{log}");
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            registry::USER,
            registry::PASSWORD
        ))
    };
    assert!(
        !log.contains(registry::PASSWORD) && !log.contains(&auth),
        "the registry's password is in regcache's log"
    );

    // The same pulls again are served from the cache: the registry sees none of them.
    let seen_before = world.registry.requests().len();
    pull_all("warm");
    let reached_upstream = &world.registry.requests()[seen_before..];
    assert!(
        reached_upstream.is_empty(),
        "warm pulls reached the registry: {reached_upstream:#?}"
    );
}

#[test]
fn containerd_pulls_through_a_hosts_toml_mirror() {
    let mut world = World::new();
    let mirror = world.start_mirror("first", DefaultUpstream::Decoy);
    let hosts_dir = write_hosts_dir(&world.path("certs.d"), &world.registry, &mirror);
    let pushed = &world.pushed;
    // containerd names the registry in the image reference and sends it as `?ns=`; the
    // mirror's default upstream is a decoy, so only routing by `ns` reaches the registry.
    let images = [
        (
            format!("{}/{NAME}:v1", world.registry.addr),
            &pushed.v1.manifest.digest,
        ),
        (
            format!("{}/{NAME}:multi", world.registry.addr),
            &pushed.multi.index.digest,
        ),
        (
            format!("{}/{NAME}:v1-docker", world.registry.addr),
            &pushed.docker.digest,
        ),
    ];

    let seen_before = world.registry.requests().len();
    let containerd = Containerd::start();
    for (reference, digest) in &images {
        containerd.pull(&hosts_dir, reference, "linux/amd64");
        assert_eq!(
            &containerd.image_digest(reference),
            *digest,
            "ctr pulled another {reference}"
        );
    }
    assert!(containerd.snapshot_count() > 0, "ctr unpacked nothing");
    let metrics = mirror.metrics();
    assert!(
        metric_sum(&metrics, "regcache_upstream_requests_total") > 0.0,
        "regcache counted no upstream requests:\n{metrics}"
    );

    let seen = &world.registry.requests()[seen_before..];
    let around_the_mirror: Vec<_> = seen
        .iter()
        .filter(|r| r.user_agent.starts_with("containerd"))
        .collect();
    assert!(
        around_the_mirror.is_empty(),
        "containerd went to the registry itself: {around_the_mirror:#?}"
    );
    // Only what containerd asked for was fetched: nothing of the index's arm64 image.
    let arm64 = pushed.multi.image("arm64");
    let arm64_only = [
        &arm64.manifest.digest,
        &arm64.config.digest,
        &arm64.layers[1].digest,
    ];
    let prefetched: Vec<_> = seen
        .iter()
        .filter(|r| {
            arm64_only
                .iter()
                .any(|digest| r.path.contains(digest.as_str()))
        })
        .collect();
    assert!(
        prefetched.is_empty(),
        "the arm64 image was fetched: {prefetched:#?}"
    );
    drop(containerd);

    // With the registry gone, a containerd with an empty store pulls everything again: tag
    // resolution (HEAD), manifests and blobs all come from the mirror's cache.
    world.registry.stop();
    let containerd = Containerd::start();
    for (reference, digest) in &images {
        containerd.pull(&hosts_dir, reference, "linux/amd64");
        assert_eq!(
            &containerd.image_digest(reference),
            *digest,
            "ctr pulled another {reference}"
        );
    }
}

#[test]
fn restarted_mirror_serves_its_cache_without_the_upstream() {
    let mut world = World::new();
    let mut mirror = world.start_mirror("first", DefaultUpstream::Registry);
    let v1 = world.pushed.v1.clone();
    let multi = world.pushed.multi.clone();
    world.pull_to_layout(&mirror, &format!("{NAME}:v1"), "filled-v1", "v1");
    world.pull_to_layout(&mirror, &format!("{NAME}:multi"), "filled-multi", "multi");

    mirror.stop();
    world.registry.stop();
    let mirror = world.start_mirror("restarted", DefaultUpstream::Registry);
    let reference = format!("{NAME}@{}", v1.manifest.digest);
    let restored = world.pull_to_layout(&mirror, &reference, "restored-v1", "v1");
    verify_pulled_layout(&restored, "v1", &v1.manifest, &v1.all_blobs());
    let reference = format!("{NAME}@{}", multi.index.digest);
    let restored = world.pull_to_layout(&mirror, &reference, "restored-multi", "multi");
    verify_pulled_layout(
        &restored,
        "multi",
        &multi.index,
        &World::index_blobs(&multi),
    );
}

/// Runs the `regcache` binary with `args`; its output, whatever the exit status.
fn regcache(args: &[&str]) -> process::Output {
    try_run(command(&mirror::binary()).args(args), COMMAND_TIMEOUT)
}

/// Every regular file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn air_gapped_seed_export_import_and_offline_pull() {
    let mut world = World::new();
    let pushed = world.pushed.clone();
    let host = world.registry.addr.clone();
    let images = [
        format!("{host}/{NAME}:v1"),
        format!("{host}/{NAME}:multi"),
        format!("{host}/{NAME}:v1-docker"),
    ];

    // Connected side: seed from the registry, then export as a directory and as a tar.
    let online = write_config(
        world.dir.path(),
        "seed",
        &world.path("seed-cache"),
        &world.registry,
        &world.tls,
        DefaultUpstream::Registry,
        false,
    );
    let online = online.to_string_lossy().into_owned();
    let list = world.path("images.txt");
    process::write(
        &list,
        format!("# the site's images\n{}\n\n{}\n", images[0], images[1]),
    );
    let seeded = regcache(&[
        "seed",
        "--config",
        &online,
        "--pin",
        "--file",
        &list.to_string_lossy(),
        &images[2],
    ]);
    assert!(seeded.status.success(), "seed failed:\n{}", seeded.stderr);
    assert!(
        seeded.stderr.contains("[1/") && seeded.stderr.contains(&format!("seeded {}", images[1])),
        "plain progress lines when not on a terminal:\n{}",
        seeded.stderr
    );
    let again = regcache(&[
        "seed", "--config", &online, &images[0], &images[1], &images[2],
    ]);
    assert!(
        again.status.success(),
        "second seed failed:\n{}",
        again.stderr
    );
    assert!(
        again.stdout_text().contains(": 0 downloaded"),
        "a second seed downloads nothing: {}",
        again.stdout_text()
    );

    let bundle_dir = world.path("bundle");
    let bundle_tar = world.path("bundle.tar");
    for out in [&bundle_dir, &bundle_tar] {
        let exported = regcache(&[
            "export",
            "--config",
            &online,
            "--output",
            &out.to_string_lossy(),
            &images[0],
            &images[1],
            &images[2],
        ]);
        assert!(
            exported.status.success(),
            "export failed:\n{}",
            exported.stderr
        );
    }

    // Other tools read the bundle: skopeo copies each image out by its reference.
    let from_bundle = world.path("from-bundle");
    world.skopeo.copy(
        &format!("oci:{}:{}", bundle_dir.display(), images[0]),
        &format!("oci:{}:v1", from_bundle.display()),
        false,
        &[],
    );
    verify_pulled_layout(
        &from_bundle,
        "v1",
        &pushed.v1.manifest,
        &pushed.v1.all_blobs(),
    );
    let from_archive = world.path("from-archive");
    world.skopeo.copy(
        &format!("oci-archive:{}:{}", bundle_tar.display(), images[1]),
        &format!("oci:{}:multi", from_archive.display()),
        true,
        &[],
    );
    verify_pulled_layout(
        &from_archive,
        "multi",
        &pushed.multi.index,
        &World::index_blobs(&pushed.multi),
    );

    // The air gap: the registry is gone for good.
    world.registry.stop();

    // A bundle with a flipped byte, and one cut short, are refused and import nothing.
    let corrupt = world.path("corrupt");
    run(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&bundle_dir)
            .arg(&corrupt),
        COMMAND_TIMEOUT,
    );
    let layer = &pushed.v1.layers[0].digest;
    let layer_path = corrupt
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = process::read(&layer_path);
    bytes[100] ^= 0x01;
    process::write(&layer_path, bytes);
    let truncated = world.path("truncated.tar");
    let tar = process::read(&bundle_tar);
    process::write(&truncated, &tar[..tar.len() * 2 / 3]);
    let refused_cache = world.path("refused-cache");
    let refused = write_config(
        world.dir.path(),
        "refused",
        &refused_cache,
        &world.registry,
        &world.tls,
        DefaultUpstream::Registry,
        true,
    );
    for (bundle, expect) in [(&corrupt, layer.as_str()), (&truncated, "truncated")] {
        let out = regcache(&[
            "import",
            "--config",
            &refused.to_string_lossy(),
            &bundle.to_string_lossy(),
        ]);
        assert!(
            !out.status.success(),
            "a bad bundle was imported: {}",
            bundle.display()
        );
        assert!(
            out.stderr.contains(expect) && out.stderr.contains("nothing imported"),
            "the refusal names {expect}:\n{}",
            out.stderr
        );
        // The store's own bookkeeping (`index/`) may exist; no content, link, tag or staged
        // file may.
        let index = refused_cache.join("index");
        let stored: Vec<_> = files_under(&refused_cache)
            .into_iter()
            .filter(|p| !p.starts_with(&index))
            .collect();
        assert!(stored.is_empty(), "a refused import left {stored:#?}");
    }

    // Disconnected side: import the tar into a fresh cache, serve it offline, pull with skopeo.
    let offline = write_config(
        world.dir.path(),
        "offline",
        &world.path("offline-cache"),
        &world.registry,
        &world.tls,
        DefaultUpstream::Registry,
        true,
    );
    let imported = regcache(&[
        "import",
        "--config",
        &offline.to_string_lossy(),
        &bundle_tar.to_string_lossy(),
    ]);
    assert!(
        imported.status.success(),
        "import failed:\n{}",
        imported.stderr
    );
    let mirror = Mirror::start_with(world.dir.path(), "offline", &offline);
    let v1 = world.pull_to_layout(&mirror, &format!("{NAME}:v1"), "offline-v1", "v1");
    verify_pulled_layout(&v1, "v1", &pushed.v1.manifest, &pushed.v1.all_blobs());
    let multi = world.pull_to_layout(&mirror, &format!("{NAME}:multi"), "offline-multi", "multi");
    verify_pulled_layout(
        &multi,
        "multi",
        &pushed.multi.index,
        &World::index_blobs(&pushed.multi),
    );
    let docker = world.path("offline-docker");
    world.skopeo.pull(
        &Source::Mirror(&mirror),
        &format!("{NAME}:v1-docker"),
        &format!("dir:{}", docker.display()),
    );
    let layers: Vec<&Descriptor> = pushed.v1.layers.iter().collect();
    verify_pulled_dir(&docker, &pushed.docker.digest, &layers);
    let metrics = mirror.metrics();
    assert_eq!(
        metric_sum(&metrics, "regcache_upstream_requests_total"),
        0.0,
        "the offline mirror contacted an upstream:\n{metrics}"
    );
    assert_eq!(metric_sum(&metrics, "regcache_upstream_errors_total"), 0.0);
}

/// A second upstream name for the test registry, as a registry without a port would be named;
/// `.test` names never resolve.
const PREFIXED: &str = "registry.test";

/// A loopback port nothing listens on: bound by the kernel, then released.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("a bound address").port()
}

#[test]
fn containerd_configured_only_by_node_config_pulls_through_the_mirror() {
    let world = World::new();
    // Images are named after a registry host where nothing listens; only the mirror knows that
    // this name is served by the test registry. containerd's fallback `server` from node-config
    // is that dead address, so every pull that succeeds came through the mirror.
    let dead = format!("127.0.0.1:{}", dead_port());
    let config = format!(
        "listen: \"127.0.0.1:0\"\n\
         cache:\n  dir: {cache}\n\
         default_upstream: \"{dead}\"\n\
         upstreams:\n\
         \x20 - name: \"{dead}\"\n\
         \x20   url: \"https://{registry}\"\n\
         \x20   username: {USER}\n\
         \x20   password: {PASSWORD}\n\
         \x20   ca_file: {ca}\n\
         \x20 - name: \"{PREFIXED}\"\n\
         \x20   url: \"https://{registry}\"\n\
         \x20   username: {USER}\n\
         \x20   password: {PASSWORD}\n\
         \x20   ca_file: {ca}\n\
         log:\n  format: json\n  level: info\n",
        cache = world.path("cache").display(),
        registry = world.registry.addr,
        ca = world.tls.ca_file.display(),
    );
    let mirror = Mirror::start_with_config(world.dir.path(), "node-config", &config);

    let hosts_dir = world.path("node-certs.d");
    let output = run(
        command(&mirror::binary())
            .arg("node-config")
            .arg("--config")
            .arg(Mirror::config_path(world.dir.path(), "node-config"))
            .arg("--mirror")
            .arg(format!("http://{}", mirror.addr))
            .arg("--runtime")
            .arg("containerd")
            .arg("--out")
            .arg(&hosts_dir),
        COMMAND_TIMEOUT,
    );
    let hosts_toml = hosts_dir.join(&dead).join("hosts.toml");
    assert!(
        hosts_toml.is_file(),
        "node-config wrote no {}: {}",
        hosts_toml.display(),
        output.stdout_text()
    );

    let pushed = &world.pushed;
    let containerd = Containerd::start();
    for (registry, tag, digest) in [
        (dead.as_str(), "v1", &pushed.v1.manifest.digest),
        (dead.as_str(), "multi", &pushed.multi.index.digest),
        (PREFIXED, "v1-docker", &pushed.docker.digest),
    ] {
        let reference = format!("{registry}/{NAME}:{tag}");
        containerd.pull(&hosts_dir, &reference, "linux/amd64");
        assert_eq!(
            &containerd.image_digest(&reference),
            digest,
            "ctr pulled another {reference}"
        );
    }
    assert!(containerd.snapshot_count() > 0, "ctr unpacked nothing");
    let metrics = mirror.metrics();
    assert!(
        metric_sum(&metrics, "regcache_upstream_requests_total") > 0.0,
        "regcache counted no upstream requests:\n{metrics}"
    );

    // podman and CRI-O, configured by the registries.conf drop-in: the mirror location carries
    // the registry as a path prefix, which routes the request as `ns` does for containerd.
    let conf_dir = world.path("registries.conf.d");
    run(
        command(&mirror::binary())
            .arg("node-config")
            .arg("--config")
            .arg(Mirror::config_path(world.dir.path(), "node-config"))
            .arg("--mirror")
            .arg(format!("http://{}", mirror.addr))
            .arg("--runtime")
            .arg("crio")
            .arg("--out")
            .arg(&conf_dir),
        COMMAND_TIMEOUT,
    );
    let pulled = world.path("crio-v1");
    world.skopeo.pull_configured(
        &conf_dir.join("50-regcache.conf"),
        &format!("{dead}/{NAME}:v1"),
        &format!("oci:{}:v1", pulled.display()),
    );
    verify_pulled_layout(&pulled, "v1", &pushed.v1.manifest, &pushed.v1.all_blobs());
    // A registry other than the default: the mirror location is `<mirror>/registry.test`, and
    // registry.test itself does not resolve.
    let pulled = world.path("crio-multi");
    world.skopeo.pull_configured(
        &conf_dir.join("50-regcache.conf"),
        &format!("{PREFIXED}/{NAME}:multi"),
        &format!("oci:{}:multi", pulled.display()),
    );
    let blobs = World::index_blobs(&pushed.multi);
    verify_pulled_layout(&pulled, "multi", &pushed.multi.index, &blobs);
}

/// The container image as CI builds it, without a container engine: `image/build-oci-layout.sh`
/// packs the binary (`REGCACHE_IMAGE_BINARY`, the static release build in CI; else this test
/// build's own binary) into an OCI layout, skopeo pushes it to the registry, and containerd pulls
/// and unpacks it through the mirror, getting the digest the script printed.
#[test]
fn image_built_without_an_engine_pulls_through_the_mirror() {
    let world = World::new();
    let (binary, allow_dynamic) = match std::env::var_os("REGCACHE_IMAGE_BINARY") {
        Some(path) => (PathBuf::from(path), "0"),
        None => (mirror::binary(), "1"),
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("image/build-oci-layout.sh");
    let layout = world.path("image-layout");
    let built = run(
        command(&PathBuf::from("bash"))
            .arg(&script)
            .arg(&binary)
            .arg(&layout)
            .arg("ci")
            .env("ALLOW_DYNAMIC", allow_dynamic),
        COMMAND_TIMEOUT,
    );
    let digest = built.stdout_text().trim().to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "the script printed no digest: {digest:?}"
    );
    // The manifest the script wrote names a non-root user and the binary as entrypoint.
    let blob = |digest: &str| {
        let path = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    };
    let manifest: Value = serde_json::from_slice(&blob(&digest)).expect("manifest is JSON");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("a config digest");
    let config: Value = serde_json::from_slice(&blob(config_digest)).expect("config is JSON");
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/regcache");

    world.skopeo.push(
        &layout,
        "ci",
        &world.registry,
        &world.tls,
        "regcache:ci",
        None,
    );
    let mirror = world.start_mirror("image", DefaultUpstream::Decoy);
    let hosts_dir = write_hosts_dir(&world.path("image-certs.d"), &world.registry, &mirror);
    let containerd = Containerd::start();
    let reference = format!("{}/regcache:ci", world.registry.addr);
    containerd.pull(&hosts_dir, &reference, "linux/amd64");
    assert_eq!(
        containerd.image_digest(&reference),
        digest,
        "ctr pulled another image"
    );
    assert!(containerd.snapshot_count() > 0, "ctr unpacked nothing");
}

/// The monitoring component against a real Prometheus: after pulls through the mirror (a cold
/// one and a cached one), every expression of the Grafana dashboard returns data, and every
/// alert rule passes `promtool check rules`, evaluates without error and is accepted by the
/// query API.
#[test]
fn monitoring_dashboard_and_alerts_work_on_regcache_metrics() {
    let world = World::new();
    let mirror = world.start_mirror("monitored", DefaultUpstream::Registry);
    world.pull_to_layout(&mirror, &format!("{NAME}:v1"), "monitored-cold", "v1");
    world.pull_to_layout(&mirror, &format!("{NAME}:v1"), "monitored-warm", "v1");

    // The PrometheusRule's spec is a plain rules file (JSON is YAML).
    let rule_resource = process::read(&prometheus::component_file("prometheusrule.yaml"));
    let rule_resource: Value =
        serde_saphyr::from_slice(&rule_resource).expect("prometheusrule.yaml is YAML");
    let rules_file = world.path("rules.yml");
    process::write(&rules_file, rule_resource["spec"].to_string());
    prometheus::check_rules(&rules_file);

    let prom_dir = world.path("prometheus");
    std::fs::create_dir_all(&prom_dir).expect("creating Prometheus's directory");
    let prom = Prometheus::start(&prom_dir, &mirror.addr, &rules_file);
    // rate() over a window needs two samples of a series; wait for three scrapes.
    wait_for("three scrapes of regcache", START_TIMEOUT, || {
        let result = prom.query("count_over_time(regcache_build_info[5m])");
        match result[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
        {
            Some(samples) if samples >= 3.0 => Ok(()),
            _ => Err(format!("{result}")),
        }
    });
    // One more pull between scrapes, so rates are above zero.
    world.pull_to_layout(&mirror, &format!("{NAME}:v1"), "monitored-again", "v1");
    wait_for("a scrape after the last pull", START_TIMEOUT, || {
        let result = prom.query("sum(increase(regcache_cache_hits_total[5m])) > 0");
        match result.as_array().map(Vec::len) {
            Some(n) if n > 0 => Ok(()),
            _ => Err(format!("{result}")),
        }
    });

    let dashboard: Value = serde_json::from_slice(&process::read(&prometheus::component_file(
        "regcache-dashboard.json",
    )))
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels");
    assert!(!panels.is_empty(), "the dashboard has no panels");
    for panel in panels {
        for target in panel["targets"].as_array().expect("a panel has targets") {
            let expr = target["expr"].as_str().expect("a target has an expr");
            let result = prom.query(expr);
            assert!(
                result.as_array().is_some_and(|r| !r.is_empty()),
                "panel {:?}: {expr:?} returned no data",
                panel["title"]
            );
        }
    }

    for rule in rule_resource["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("the group has rules")
    {
        let expr = rule["expr"].as_str().expect("a rule has an expr");
        prom.query(expr);
    }
    // Prometheus evaluated every rule without error.
    wait_for("every alert rule to be evaluated", START_TIMEOUT, || {
        let rules = prom.rules();
        let loaded = &rules["data"]["groups"][0]["rules"];
        let all = loaded.as_array().map(Vec::len).unwrap_or(0);
        let expected = rule_resource["spec"]["groups"][0]["rules"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        let healthy = loaded
            .as_array()
            .map(|r| r.iter().filter(|r| r["health"] == "ok").count())
            .unwrap_or(0);
        if all == expected && healthy == all {
            Ok(())
        } else {
            Err(format!("{rules}"))
        }
    });
}

/// The configs the Kubernetes manifests ship (deploy/base/regcache.yaml and the components'
/// replacements) are ones regcache accepts, and node-config renders every runtime's files from
/// the base's.
#[test]
fn the_deployed_config_is_valid_and_renders_node_config() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("deploy/base/regcache.yaml");
    for shipped in [
        "deploy/base/regcache.yaml",
        "deploy/components/downstream-auth-tls/regcache.yaml",
        "deploy/components/kubernetes-credentials/regcache.yaml",
        "deploy/components/upstream-credentials/regcache.yaml",
    ] {
        run(
            command(&mirror::binary())
                .arg("check-config")
                .arg("--config")
                .arg(root.join(shipped)),
            COMMAND_TIMEOUT,
        );
    }
    for runtime in ["containerd", "k3s", "crio"] {
        let output = run(
            command(&mirror::binary())
                .arg("node-config")
                .arg("--config")
                .arg(&config)
                .arg("--mirror=http://10.0.0.7:5000")
                .arg(format!("--runtime={runtime}")),
            COMMAND_TIMEOUT,
        );
        assert!(
            output.stdout_text().contains("10.0.0.7:5000"),
            "node-config --runtime {runtime} printed no mirror:\n{}",
            output.stdout_text()
        );
    }
}

/// The init containers of the manifests run `regcache node-config` with these exact arguments:
/// run them here, with the container's paths mapped into a temporary directory, and check what
/// the node would get.
#[test]
fn the_manifests_node_config_arguments_wire_a_node() {
    use std::os::unix::fs::MetadataExt as _;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("deploy/base/regcache.yaml");
    for manifest in [
        "deploy/overlays/node-local/daemonset.yaml",
        "deploy/components/node-wiring/daemonset.yaml",
    ] {
        let dir = tempfile::tempdir().expect("creating a directory");
        let text = process::read(&root.join(manifest));
        let daemonset: Value = serde_saphyr::from_slice(&text).expect("the manifest is YAML");
        let init = &daemonset["spec"]["template"]["spec"]["initContainers"][0];
        let args: Vec<String> = init["args"]
            .as_array()
            .expect("the init container has args")
            .iter()
            .map(|arg| {
                arg.as_str()
                    .expect("args are strings")
                    .replace("$(NODE_IP)", "10.0.0.7")
                    .replace("/etc/regcache/regcache.yaml", &config.to_string_lossy())
                    .replace("/host/etc/containerd", &dir.path().to_string_lossy())
                    .replace(
                        "/var/lib/regcache",
                        &dir.path().join("cache").to_string_lossy(),
                    )
            })
            .collect();
        assert_eq!(args[0], "node-config", "{manifest}: {args:?}");
        run(command(&mirror::binary()).args(&args), COMMAND_TIMEOUT);
        let hosts = std::fs::read_to_string(dir.path().join("certs.d/docker.io/hosts.toml"))
            .unwrap_or_else(|e| panic!("{manifest}: no docker.io/hosts.toml: {e}"));
        assert!(
            hosts.contains("[host.\"http://10.0.0.7:"),
            "{manifest}: {hosts}"
        );
        if args.iter().any(|arg| arg.starts_with("--cache-dir")) {
            // The mirror container's user owns the cache directory (the tests run as root).
            let meta = std::fs::metadata(dir.path().join("cache")).expect("the cache directory");
            let user = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"];
            assert_eq!(
                Some(u64::from(meta.uid())),
                user["runAsUser"].as_u64(),
                "{manifest}"
            );
            assert_eq!(
                Some(u64::from(meta.gid())),
                user["runAsGroup"].as_u64(),
                "{manifest}"
            );
        }
    }
}

#[test]
fn skopeo_pulls_over_https_with_credentials_tokens_and_the_token_flow() {
    let world = World::new();
    let (skopeo, pushed, tls) = (&world.skopeo, &world.pushed, &world.tls);
    let hash = bcrypt::hash("alice-pass", 4).expect("bcrypt");
    let htpasswd = world.path("htpasswd");
    process::write(&htpasswd, format!("alice:{hash}\nbob:{hash}\n"));
    let upstream = &world.registry.addr;
    let ci = regcache::access::tokens::create("ci", None, &[format!("{upstream}/team/**")])
        .expect("a pull token");
    let tokens = world.path("tokens");
    process::write(&tokens, format!("{}\n", ci.line));
    let extra = format!(
        "tls:\n  cert_file: {cert}\n  key_file: {key}\n\
         access:\n  enabled: true\n  htpasswd_file: {htpasswd}\n  tokens_file: {tokens}\n\
         \x20 rules:\n    - who: [user:alice, token:ci]\n      repositories: [\"{upstream}/team/*\"]\n",
        cert = tls.cert.display(),
        key = tls.key.display(),
        htpasswd = htpasswd.display(),
        tokens = tokens.display(),
    );
    let cache = world.path("cache");
    let mirror = Mirror::start_with_extra(
        world.dir.path(),
        "secure",
        &cache,
        &world.registry,
        tls,
        DefaultUpstream::Registry,
        &extra,
    );
    let v1 = format!("{NAME}:v1");
    let expected = pushed.v1.all_blobs();

    // User and password: skopeo meets the Bearer challenge and fetches a token from /token.
    let alice = Source::SecureMirror(&mirror, tls, vec!["--src-creds=alice:alice-pass".into()]);
    let dir = world.path("alice-v1");
    skopeo.pull(&alice, &v1, &format!("oci:{}:v1", dir.display()));
    verify_pulled_layout(&dir, "v1", &pushed.v1.manifest, &expected);

    // A pull token as the password, through the same token flow.
    let token_creds =
        Source::SecureMirror(&mirror, tls, vec![format!("--src-creds=ci:{}", ci.token)]);
    let dir = world.path("ci-v1");
    skopeo.pull(&token_creds, &v1, &format!("oci:{}:v1", dir.display()));
    verify_pulled_layout(&dir, "v1", &pushed.v1.manifest, &expected);

    // A pull token as a static Bearer header, as containerd's hosts.toml sends it.
    let static_bearer = Source::SecureMirror(
        &mirror,
        tls,
        vec![format!("--src-registry-token={}", ci.token)],
    );
    let dir = world.path("bearer-multi");
    skopeo.pull(
        &static_bearer,
        &format!("{NAME}:multi"),
        &format!("oci:{}:multi", dir.display()),
    );
    verify_pulled_layout(
        &dir,
        "multi",
        &pushed.multi.index,
        &World::index_blobs(&pushed.multi),
    );

    // Refused: a known user without a rule, wrong password, no credentials.
    for (flag, what) in [
        ("--src-creds=bob:alice-pass", "bob has no rule"),
        ("--src-creds=alice:wrong", "a wrong password"),
        ("--src-no-creds", "no credentials"),
    ] {
        let source = Source::SecureMirror(&mirror, tls, vec![flag.into()]);
        let (ok, stderr) = skopeo.try_inspect(&source, &v1);
        assert!(!ok, "{what}: skopeo inspect should fail");
        assert!(
            stderr.contains("denied")
                || stderr.contains("unauthorized")
                || stderr.contains("401")
                || stderr.contains("403"),
            "{what}: {stderr}"
        );
    }
}

/// A node wired by `regcache node-config --token-file --install-mirror-ca` to an HTTPS mirror
/// with access control on: without the token containerd is refused; with it, containerd trusts
/// the installed CA, sends the pull token as a static Bearer header from hosts.toml and pulls
/// through the mirror, never from the registry itself.
#[test]
fn containerd_wired_by_node_config_with_a_pull_token_pulls_from_an_authenticating_mirror() {
    let world = World::new();
    let tls = &world.tls;
    let upstream = &world.registry.addr;
    let node = regcache::access::tokens::create("node", None, &["**".into()]).expect("a token");
    let tokens = world.path("tokens");
    process::write(&tokens, format!("{}\n", node.line));
    // The token file as a mounted Secret key holds it (with a trailing newline).
    let token_file = world.path("pull-token");
    process::write(&token_file, format!("{}\n", node.token));
    let extra = format!(
        "tls:\n  cert_file: {cert}\n  key_file: {key}\n\
         access:\n  enabled: true\n  tokens_file: {tokens}\n\
         \x20 rules:\n    - who: [token:node]\n      repositories: [\"{upstream}/team/*\"]\n",
        cert = tls.cert.display(),
        key = tls.key.display(),
        tokens = tokens.display(),
    );
    let run_name = "node-config-token";
    let mirror = Mirror::start_with_extra(
        world.dir.path(),
        run_name,
        &world.path("cache"),
        &world.registry,
        tls,
        DefaultUpstream::Decoy,
        &extra,
    );
    let node_config = |out: &std::path::Path, token: bool| {
        let mut cmd = command(&mirror::binary());
        cmd.arg("node-config")
            .arg("--config")
            .arg(Mirror::config_path(world.dir.path(), run_name))
            .arg("--mirror")
            .arg(format!("https://{}", mirror.addr))
            // The CA as the node gets it: installed by node-config beside the hosts.toml files.
            .arg("--mirror-ca-file")
            .arg(out.join("regcache-mirror-ca.crt"))
            .arg("--install-mirror-ca")
            .arg(&tls.ca_file)
            .arg("--runtime=containerd")
            .arg("--out")
            .arg(out);
        if token {
            cmd.arg("--token-file").arg(&token_file);
        }
        run(&mut cmd, COMMAND_TIMEOUT);
        out.to_owned()
    };
    let reference = format!("{upstream}/{NAME}:v1");
    let containerd = Containerd::start();

    let without_token = node_config(&world.path("certs-no-token.d"), false);
    let (ok, _) = containerd.try_pull(&without_token, &reference, "linux/amd64");
    assert!(!ok, "a node without the pull token must not pull");

    let seen_before = world.registry.requests().len();
    let hosts_dir = node_config(&world.path("certs.d"), true);
    let hosts = process::read(&hosts_dir.join(upstream).join("hosts.toml"));
    let hosts = String::from_utf8_lossy(&hosts);
    assert!(
        hosts.contains(&format!("Authorization = [\"Bearer {}\"]", node.token)),
        "{hosts}"
    );
    containerd.pull(&hosts_dir, &reference, "linux/amd64");
    assert_eq!(
        containerd.image_digest(&reference),
        world.pushed.v1.manifest.digest,
        "ctr pulled another {reference}"
    );
    assert!(containerd.snapshot_count() > 0, "ctr unpacked nothing");
    let around_the_mirror = world.registry.requests()[seen_before..]
        .iter()
        .filter(|r| r.user_agent.starts_with("containerd"))
        .count();
    assert_eq!(
        around_the_mirror, 0,
        "containerd went to the registry itself"
    );
}

#[test]
fn containerd_pulls_over_https_with_a_pull_token_in_hosts_toml() {
    let world = World::new();
    let tls = &world.tls;
    let upstream = &world.registry.addr;
    let hash = bcrypt::hash("alice-pass", 4).expect("bcrypt");
    let htpasswd = world.path("htpasswd");
    process::write(&htpasswd, format!("alice:{hash}\n"));
    let node = regcache::access::tokens::create("node", None, &["**".into()]).expect("a token");
    let other = regcache::access::tokens::create("other", None, &["**".into()]).expect("a token");
    let tokens = world.path("tokens");
    process::write(&tokens, format!("{}\n{}\n", node.line, other.line));
    let extra = format!(
        "tls:\n  cert_file: {cert}\n  key_file: {key}\n\
         access:\n  enabled: true\n  tokens_file: {tokens}\n  htpasswd_file: {htpasswd}\n\
         \x20 rules:\n    - who: [token:node, user:alice]\n      repositories: [\"{upstream}/team/*\"]\n",
        cert = tls.cert.display(),
        key = tls.key.display(),
        tokens = tokens.display(),
        htpasswd = htpasswd.display(),
    );
    let mirror = Mirror::start_with_extra(
        world.dir.path(),
        "containerd-secure",
        &world.path("cache"),
        &world.registry,
        tls,
        DefaultUpstream::Decoy,
        &extra,
    );
    let reference = format!("{upstream}/{NAME}:multi");
    let containerd = Containerd::start();

    // A token the rules do not name: refused, and nothing fetched from the registry.
    let seen_before = world.registry.requests().len();
    let refused = write_secure_hosts_dir(
        &world.path("certs-other.d"),
        &world.registry,
        &mirror,
        &tls.ca_file,
        &format!("Bearer {}", other.token),
    );
    let (ok, _) = containerd.try_pull(&refused, &reference, "linux/amd64");
    assert!(!ok, "a token without a rule must not pull");
    let fetched = world.registry.requests().len() - seen_before;
    assert_eq!(fetched, 0, "a refused pull reached the registry");

    let hosts_dir = write_secure_hosts_dir(
        &world.path("certs.d"),
        &world.registry,
        &mirror,
        &tls.ca_file,
        &format!("Bearer {}", node.token),
    );
    containerd.pull(&hosts_dir, &reference, "linux/amd64");
    assert_eq!(
        containerd.image_digest(&reference),
        world.pushed.multi.index.digest,
        "ctr pulled another {reference}"
    );
    assert!(containerd.snapshot_count() > 0, "ctr unpacked nothing");
    let around_the_mirror: Vec<_> = world.registry.requests()[seen_before..]
        .iter()
        .filter(|r| r.user_agent.starts_with("containerd"))
        .cloned()
        .collect();
    assert!(
        around_the_mirror.is_empty(),
        "containerd went to the registry itself"
    );
}

//! regcache as a mirror between real clients and a real registry.
//!
//! The upstream is Debian's `docker-registry` (CNCF Distribution) on loopback with TLS from a
//! test CA and htpasswd auth; test images are built from random bytes and pushed with `skopeo`.
//! regcache runs as its built binary with a config file, and images are pulled through it with
//! `skopeo` (containers/image, as podman and CRI-O pull) and with containerd's `ctr` through a
//! hosts.toml mirror (as the kubelet pulls), comparing every digest with what was pushed.
//!
//! Needs, from Debian: skopeo, docker-registry, containerd, apache2-utils (htpasswd), openssl.
//! A missing tool fails the test with the package to install. Runs as root (containerd).

#[path = "interop/containerd.rs"]
mod containerd;
#[path = "interop/image.rs"]
mod image;
#[path = "interop/mirror.rs"]
mod mirror;
#[path = "interop/process.rs"]
mod process;
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
use mirror::{DefaultUpstream, Mirror, metric_sum};
use registry::{Registry, Tls};
use skopeo::{Skopeo, Source};

/// A repository name with more than one component, as most private registries use.
const NAME: &str = "team/app";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What was pushed to the registry.
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
    let mirror = Mirror::start_with(
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
    let mirror = Mirror::start_with(
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

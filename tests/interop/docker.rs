//! The Docker daemon as a client of the mirror: a private `dockerd` (Debian's docker.io) with
//! its own containerd, data root, exec root, pidfile, trust key and unix socket, all under a
//! short /tmp directory, the vfs storage driver and no iptables or bridge, so it needs and
//! changes nothing of the machine's own Docker. It is pointed at regcache with
//! `--registry-mirror`, as `"registry-mirrors"` in daemon.json does, and pulls Docker Hub names
//! (`busybox`), which regcache serves from the test registry configured as its `docker.io`.
//!
//! Docker falls back to Docker Hub whenever the mirror fails, and shows Docker Hub's error rather
//! than the mirror's. Its proxy is set to a dead loopback port (loopback itself excepted), so
//! that fallback fails at once and never leaves the machine: a pull that succeeds came through
//! the mirror, and a refusal is read from the mirror's own counters.
//!
//! A missing package fails the test (CI installs docker.io); only a daemon that cannot run on
//! this machine (not root, no cgroups, a storage driver the kernel refuses) skips it, with the
//! reason.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;

use crate::World;
use crate::containerd::Containerd;
use crate::image::Index;
use crate::mirror::{Mirror, metric_sum};
use crate::process::{
    COMMAND_TIMEOUT, Daemon, Output, START_TIMEOUT, command, require_tool, run, try_run, wait_for,
    write,
};
use crate::registry::{PASSWORD, USER};

/// A proxy nothing listens on (port 9, discard, as the decoy upstream uses): Docker's fallback
/// to Docker Hub goes through it and fails at once.
const DEAD_PROXY: &str = "http://127.0.0.1:9";
const DEAD_PROXY_ADDR: &str = "127.0.0.1:9";

/// The Docker Hub name the tests pull, as users type it: no registry, no `library/`.
const HUB_IMAGE: &str = "busybox";
/// Where the test registry holds it, as Docker asks the mirror for it.
const HUB_REPOSITORY: &str = "library/busybox";

/// What in dockerd's log means the machine cannot run a Docker daemon, rather than a mistake
/// in how the test starts it.
const MACHINE_REASONS: &[&str] = &[
    "operation not permitted",
    "permission denied",
    "cgroup",
    "error initializing graphdriver",
    "failed to mount",
    "read-only file system",
    "no space left on device",
    "must be run as the root user",
];

pub struct Docker {
    // Fields drop in order: the daemon is stopped (in `drop`) before its containerd, and both
    // before their directory is deleted.
    daemon: Daemon,
    /// Held for its drop, which stops it after the daemon.
    _containerd: Containerd,
    cli: PathBuf,
    socket: PathBuf,
    /// `DOCKER_CONFIG` for the CLI: empty, so no Docker Hub login of the machine's user is
    /// ever sent to the mirror.
    cli_config: PathBuf,
    dir: TempDir,
}

impl Docker {
    /// Starts a private dockerd using `mirror` (`http://127.0.0.1:PORT`) as its registry mirror,
    /// or says why this machine cannot run one.
    pub fn start(mirror: &str) -> Result<Docker, String> {
        let dockerd = require_tool("dockerd", "docker.io");
        let cli = require_tool("docker", "docker.io");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(format!(
                "dockerd needs root, and the test runs as uid {uid}"
            ));
        }
        let containerd = Containerd::start();
        let dir = tempfile::Builder::new()
            .prefix("rcd")
            .tempdir_in("/tmp")
            .expect("creating dockerd's directory under /tmp");
        let path = |name: &str| dir.path().join(name);
        let socket = path("docker.sock");
        let cli_config = path("cli");
        fs::create_dir_all(&cli_config).expect("creating the CLI's config directory");
        write(&cli_config.join("config.json"), "{}");
        // The daemon's own file, so /etc/docker/daemon.json never applies; the trust key would
        // otherwise be written to /etc/docker/key.json.
        let config = serde_json::json!({
            "deprecated-key-path": path("key.json"),
        });
        write(&path("daemon.json"), config.to_string());
        let mut cmd = command(&dockerd);
        cmd.env("HTTP_PROXY", DEAD_PROXY)
            .env("HTTPS_PROXY", DEAD_PROXY)
            .env("NO_PROXY", "127.0.0.1")
            .arg("--config-file")
            .arg(path("daemon.json"))
            .arg("--data-root")
            .arg(path("data"))
            .arg("--exec-root")
            .arg(path("exec"))
            .arg("--pidfile")
            .arg(path("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(containerd.socket())
            .args([
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--bridge=none",
                "--log-level=debug",
            ])
            .arg("--registry-mirror")
            .arg(mirror);
        let mut daemon = Daemon::spawn("dockerd", &mut cmd, &path("dockerd.log"));
        let listening = format!("API listen on {}", socket.display());
        let started = wait_for("dockerd to listen", START_TIMEOUT, || {
            let log = daemon.log();
            if log.contains(&listening) {
                return Ok(Ok(()));
            }
            match daemon.exited() {
                Some(status) => Ok(Err(format!("dockerd exited ({status}):\n{log}"))),
                None => Err(format!("not in its log yet:\n{log}")),
            }
        });
        if let Err(failure) = started {
            drop(daemon);
            unmount_under(dir.path());
            // Only the daemon's last words count: its debug lines mention cgroups and mounts
            // on any start.
            let last_words = failure
                .lines()
                .filter(|line| {
                    line.contains("level=fatal")
                        || line.contains("level=error")
                        || line.contains("failed to start daemon")
                })
                .collect::<Vec<_>>()
                .join("\n")
                .to_lowercase();
            match MACHINE_REASONS
                .iter()
                .find(|reason| last_words.contains(*reason))
            {
                Some(reason) => {
                    return Err(format!("dockerd cannot run here ({reason}): {failure}"));
                }
                None => panic!("{failure}"),
            }
        }
        let docker = Docker {
            daemon,
            _containerd: containerd,
            cli,
            socket,
            cli_config,
            dir,
        };
        wait_for("dockerd to answer `docker version`", START_TIMEOUT, || {
            let output = try_run(docker.cli().arg("version"), COMMAND_TIMEOUT);
            match output.status.success() {
                true => Ok(()),
                false => Err(output.stderr),
            }
        });
        Ok(docker)
    }

    /// [`Docker::start`], or `None` after saying on stderr why the test is skipped.
    pub fn start_or_skip(mirror: &Mirror, test: &str) -> Option<Docker> {
        match Docker::start(&format!("http://{}", mirror.addr)) {
            Ok(docker) => Some(docker),
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                None
            }
        }
    }

    /// The Docker CLI talking to this daemon only, with an empty client config.
    fn cli(&self) -> Command {
        let mut cmd = command(&self.cli);
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_CONFIG", &self.cli_config)
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()));
        cmd
    }

    /// `docker pull REFERENCE`, whatever its outcome.
    pub fn try_pull(&self, reference: &str) -> Output {
        try_run(self.cli().args(["pull", reference]), COMMAND_TIMEOUT)
    }

    /// `docker pull REFERENCE`, failing the test with dockerd's log if it fails.
    pub fn pull(&self, reference: &str) {
        let output = self.try_pull(reference);
        assert!(
            output.status.success(),
            "`docker pull {reference}` failed ({}):\n{}{}\n--- dockerd's log\n{}",
            output.status,
            output.stdout_text(),
            output.stderr,
            self.log_tail(),
        );
    }

    /// `docker rmi REFERENCE`.
    pub fn rmi(&self, reference: &str) {
        run(self.cli().args(["rmi", reference]), COMMAND_TIMEOUT);
    }

    /// The IDs of every image the daemon holds.
    pub fn image_ids(&self) -> Vec<String> {
        run(
            self.cli().args(["image", "ls", "--quiet", "--no-trunc"]),
            COMMAND_TIMEOUT,
        )
        .stdout_text()
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// `docker image inspect` of `reference`, as JSON.
    fn inspect(&self, reference: &str) -> Value {
        let out = run(
            self.cli()
                .args(["image", "inspect", "--format", "{{json .}}", reference]),
            COMMAND_TIMEOUT,
        );
        serde_json::from_slice(&out.stdout).expect("docker image inspect prints JSON")
    }

    /// `RepoDigests` of `reference`: `name@digest` of the manifest or index it was pulled by.
    pub fn repo_digests(&self, reference: &str) -> Vec<String> {
        let image = self.inspect(reference);
        image["RepoDigests"]
            .as_array()
            .map(|digests| {
                digests
                    .iter()
                    .filter_map(|d| d.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The image ID of `reference`: the digest of its config blob.
    pub fn image_id(&self, reference: &str) -> String {
        let image = self.inspect(reference);
        image["Id"].as_str().unwrap_or_default().to_owned()
    }

    fn log_tail(&self) -> String {
        let log = self.daemon.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // SIGTERM: dockerd unmounts what it mounted (its data root, made a shared mount) and
        // leaves containerd's namespace cleanly.
        self.daemon.stop();
        unmount_under(self.dir.path());
    }
}

/// Detaches every mount at or under `dir` that a killed dockerd may have left, deepest first,
/// so that deleting the directory cannot fail or reach into a mount.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let Ok(c_path) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path; a failure only leaves the mount in place.
        unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The sum of the samples of `metric` whose labels include every one of `labels`
/// (`kind="blob"`).
fn metric_with(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    let matching: String = metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(metric).is_some_and(|rest| {
                rest.starts_with('{') && labels.iter().all(|label| rest.contains(label))
            })
        })
        .map(|line| format!("{line}\n"))
        .collect();
    metric_sum(&matching, metric)
}

/// regcache's config for Docker: the test registry is its `docker.io` upstream and the default
/// one (Docker names no registry to a mirror), with the registry's credentials; `extra` is
/// appended (an `access:` section).
fn docker_hub_config(world: &World, cache: &str, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\n\
         cache:\n  dir: {cache}\n\
         default_upstream: docker.io\n\
         upstreams:\n\
         \x20 - name: docker.io\n\
         \x20   url: \"https://{registry}\"\n\
         \x20   ca_file: {ca}\n\
         \x20   username: \"{USER}\"\n\
         \x20   password: \"{PASSWORD}\"\n\
         log:\n  format: json\n  level: debug\n\
         {extra}",
        cache = world.path(cache).display(),
        registry = world.registry.addr,
        ca = world.tls.ca_file.display(),
    )
}

/// Pushes the test index (linux/amd64 and linux/arm64) to the registry as Docker Hub's
/// `library/busybox:latest`.
fn push_hub_image(world: &World) -> Index {
    world.skopeo.push(
        &world.path("layout"),
        "multi",
        &world.registry,
        &world.tls,
        &format!("{HUB_REPOSITORY}:latest"),
        None,
    );
    world.pushed.multi.clone()
}

/// Checks that `docker` holds `busybox` as the linux/amd64 image of `index`, recorded under
/// the index's digest.
fn assert_pulled(docker: &Docker, index: &Index) {
    assert_eq!(
        docker.repo_digests(HUB_IMAGE),
        vec![format!("{HUB_IMAGE}@{}", index.index.digest)],
        "docker recorded another digest for {HUB_IMAGE}"
    );
    assert_eq!(
        docker.image_id(HUB_IMAGE),
        index.image("amd64").config.digest,
        "docker holds another image than the index's linux/amd64 one"
    );
}

#[test]
fn docker_pulls_docker_hub_names_through_a_registry_mirror() {
    let mut world = World::new();
    let index = push_hub_image(&world);
    let config = docker_hub_config(&world, "docker-cache", "");
    let mirror = Mirror::start_with_config(world.dir.path(), "docker", &config);
    let Some(docker) = Docker::start_or_skip(&mirror, "docker_pulls_docker_hub_names") else {
        return;
    };

    let seen_before = world.registry.requests().len();
    docker.pull(HUB_IMAGE);
    assert_pulled(&docker, &index);
    let metrics = mirror.metrics();
    let amd64 = index.image("amd64");
    // The config and both layers came through the mirror, each fetched from the registry once.
    let blob_misses = metric_with(&metrics, "regcache_cache_misses_total", &["kind=\"blob\""]);
    assert_eq!(
        blob_misses,
        (1 + amd64.layers.len()) as f64,
        "blob misses after docker's cold pull:\n{metrics}"
    );
    assert!(
        metric_sum(&metrics, "regcache_upstream_requests_total") > 0.0,
        "regcache fetched nothing upstream:\n{metrics}"
    );
    // Docker resolved the tag with HEAD and took the answer: no fallback to GET by tag.
    let head = ["route=\"manifest\"", "method=\"HEAD\"", "status=\"200\""];
    assert!(
        metric_with(&metrics, "regcache_http_requests_total", &head) > 0.0,
        "docker resolved no tag with HEAD:\n{metrics}"
    );
    let seen = &world.registry.requests()[seen_before..];
    assert!(!seen.is_empty(), "the registry saw no request");
    let from_docker: Vec<_> = seen
        .iter()
        .filter(|r| r.user_agent.starts_with("docker/"))
        .collect();
    assert!(
        from_docker.is_empty(),
        "docker reached the registry itself: {from_docker:#?}"
    );
    let arm64 = index.image("arm64");
    let prefetched: Vec<_> = seen
        .iter()
        .filter(|r| {
            r.path.contains(&arm64.manifest.digest) || r.path.contains(&arm64.config.digest)
        })
        .collect();
    assert!(
        prefetched.is_empty(),
        "the arm64 image was fetched: {prefetched:#?}"
    );

    // Removed from Docker and pulled again with the registry gone: tag, index, manifest and
    // every blob come from the mirror's cache.
    docker.rmi(HUB_IMAGE);
    assert!(docker.image_ids().is_empty(), "`docker rmi` left an image");
    world.registry.stop();
    let upstream_before = metric_sum(&metrics, "regcache_upstream_requests_total");
    let hits_before = metric_with(&metrics, "regcache_cache_hits_total", &["kind=\"blob\""]);
    docker.pull(HUB_IMAGE);
    assert_pulled(&docker, &index);
    let metrics = mirror.metrics();
    let hits = metric_with(&metrics, "regcache_cache_hits_total", &["kind=\"blob\""]);
    assert!(
        hits - hits_before >= (1 + amd64.layers.len()) as f64,
        "the second pull's blobs were not cache hits ({hits_before} -> {hits}):\n{metrics}"
    );
    assert_eq!(
        metric_with(&metrics, "regcache_cache_misses_total", &["kind=\"blob\""]),
        blob_misses,
        "the second pull missed the cache:\n{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "regcache_upstream_requests_total"),
        upstream_before,
        "the second pull asked the upstream:\n{metrics}"
    );
}

#[test]
fn docker_pulls_with_access_control_when_a_rule_allows_its_network() {
    let world = World::new();
    let index = push_hub_image(&world);
    let access = |network: &str| {
        format!(
            "access:\n  enabled: true\n  rules:\n\
             \x20   - who: [anonymous]\n\
             \x20     networks: [\"{network}\"]\n\
             \x20     repositories: [\"docker.io/library/*\"]\n"
        )
    };

    // Anonymous pulls allowed only from another network (TEST-NET-1): Docker, which sends a
    // mirror no credentials, is refused, falls back to the dead Docker Hub and fails.
    let config = docker_hub_config(&world, "refused-cache", &access("192.0.2.0/24"));
    let refusing = Mirror::start_with_config(world.dir.path(), "docker-refused", &config);
    let Some(docker) = Docker::start_or_skip(&refusing, "docker_pulls_with_access_control") else {
        return;
    };
    let seen_before = world.registry.requests().len();
    let refused = docker.try_pull(HUB_IMAGE);
    assert!(
        !refused.status.success(),
        "docker pulled from a mirror that refuses its network:\n{}",
        refused.stderr
    );
    // What the user sees is Docker Hub's failure (through the dead proxy), not the mirror's.
    assert!(
        refused.stderr.contains("registry-1.docker.io") && refused.stderr.contains(DEAD_PROXY_ADDR),
        "docker did not fall back to Docker Hub through the dead proxy:\n{}",
        refused.stderr
    );
    assert!(
        docker.image_ids().is_empty(),
        "a refused pull left an image"
    );
    let metrics = refusing.metrics();
    assert!(
        metric_with(
            &metrics,
            "regcache_auth_refused_total",
            &["answer=\"unauthorized\""]
        ) > 0.0,
        "the mirror did not refuse docker:\n{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "regcache_upstream_requests_total"),
        0.0,
        "a refused pull reached the upstream:\n{metrics}"
    );
    assert_eq!(
        world.registry.requests().len(),
        seen_before,
        "a refused pull reached the registry"
    );
    drop(docker);

    // The rule for the daemon's own network, 127.0.0.0/8: the same pull goes through.
    let config = docker_hub_config(&world, "allowed-cache", &access("127.0.0.0/8"));
    let allowing = Mirror::start_with_config(world.dir.path(), "docker-allowed", &config);
    let Some(docker) = Docker::start_or_skip(&allowing, "docker_pulls_with_access_control") else {
        return;
    };
    docker.pull(HUB_IMAGE);
    assert_pulled(&docker, &index);
    let metrics = allowing.metrics();
    assert_eq!(
        metric_sum(&metrics, "regcache_auth_refused_total"),
        0.0,
        "the mirror refused a request of an allowed network:\n{metrics}"
    );
    assert!(
        metric_with(&metrics, "regcache_cache_misses_total", &["kind=\"blob\""]) > 0.0,
        "the pull did not go through the mirror:\n{metrics}"
    );
}

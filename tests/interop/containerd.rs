//! A private containerd daemon and its `ctr` client. The daemon has its own root, state and
//! socket under a short /tmp directory (unix socket paths must fit in 108 bytes), listens on no
//! TCP port, runs without the CRI plugin and unpacks with the native snapshotter, so it needs
//! nothing from the machine's own containerd and leaves nothing behind.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::mirror::Mirror;
use crate::process::{
    COMMAND_TIMEOUT, Daemon, START_TIMEOUT, command, require_tool, run, wait_for, write,
};
use crate::registry::Registry;

const NAMESPACE: &str = "interop";

pub struct Containerd {
    // Declared before `_dir`: fields drop in order, and the daemon must be gone before its
    // root is deleted.
    daemon: Daemon,
    ctr: PathBuf,
    socket: PathBuf,
    /// Held for its drop, which deletes the root, state and socket.
    _dir: TempDir,
}

impl Containerd {
    pub fn start() -> Containerd {
        let containerd = require_tool("containerd", "containerd");
        let ctr = require_tool("ctr", "containerd");
        let dir = tempfile::Builder::new()
            .prefix("rcc")
            .tempdir_in("/tmp")
            .expect("creating containerd's directory under /tmp");
        let path = |name: &str| dir.path().join(name);
        let socket = path("sock");
        // The `opt` plugin would otherwise create /opt/containerd on the machine.
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{socket}\"\n\
             [ttrpc]\n  address = \"{socket}.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = path("root").display(),
            state = path("state").display(),
            socket = socket.display(),
            opt = path("opt").display(),
        );
        write(&path("config.toml"), config);
        let mut daemon = Daemon::spawn(
            "containerd",
            command(&containerd)
                .arg("--config")
                .arg(path("config.toml")),
            &path("containerd.log"),
        );
        daemon.wait_for_log("that it booted", |line| {
            line.contains("containerd successfully booted")
                .then_some(())
        });
        let containerd = Containerd {
            daemon,
            ctr,
            socket,
            _dir: dir,
        };
        wait_for("containerd to answer `ctr version`", START_TIMEOUT, || {
            let output = crate::process::try_run(containerd.ctr().arg("version"), COMMAND_TIMEOUT);
            match output.status.success() {
                true => Ok(()),
                false => Err(output.stderr),
            }
        });
        containerd
    }

    /// The daemon's gRPC socket, for clients other than `ctr` (dockerd's `--containerd`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn ctr(&self) -> std::process::Command {
        let mut cmd = command(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    /// `ctr images pull` of `reference` for `platform`, resolving registries through the
    /// hosts.toml files in `hosts_dir`, and unpacking into the native snapshotter.
    pub fn pull(&self, hosts_dir: &Path, reference: &str, platform: &str) {
        run(
            self.ctr()
                .args([
                    "images",
                    "pull",
                    "--snapshotter",
                    "native",
                    "--platform",
                    platform,
                ])
                .arg("--hosts-dir")
                .arg(hosts_dir)
                .arg(reference),
            COMMAND_TIMEOUT,
        );
    }

    /// `ctr images pull` like [`Containerd::pull`], whatever its outcome: (success, stderr).
    pub fn try_pull(&self, hosts_dir: &Path, reference: &str, platform: &str) -> (bool, String) {
        self.try_pull_as(None, hosts_dir, reference, platform)
    }

    /// [`Containerd::try_pull`] with `--user USER:PASSWORD`, which containerd uses for the
    /// registry token flow.
    pub fn try_pull_as(
        &self,
        user: Option<&str>,
        hosts_dir: &Path,
        reference: &str,
        platform: &str,
    ) -> (bool, String) {
        let mut cmd = self.ctr();
        if let Some(user) = user {
            cmd.args(["images", "pull", "--user", user]);
        } else {
            cmd.args(["images", "pull"]);
        }
        let out = crate::process::try_run(
            cmd.args(["--snapshotter", "native", "--platform", platform])
                .arg("--hosts-dir")
                .arg(hosts_dir)
                .arg(reference),
            COMMAND_TIMEOUT,
        );
        (out.status.success(), out.stderr)
    }

    /// The digest `ctr images ls` reports for `reference` (the manifest or index it points to).
    pub fn image_digest(&self, reference: &str) -> String {
        let listing = run(self.ctr().args(["images", "ls"]), COMMAND_TIMEOUT).stdout_text();
        // Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS.
        listing
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|columns| columns.first() == Some(&reference))
            .and_then(|columns| columns.get(2).map(|digest| digest.to_string()))
            .unwrap_or_else(|| panic!("`ctr images ls` does not list {reference}:\n{listing}"))
    }

    /// How many snapshots the native snapshotter holds: ctr unpacks what it pulls, so layers
    /// that arrived whole and matched their config's diff_ids show up here.
    pub fn snapshot_count(&self) -> usize {
        let listing = run(
            self.ctr()
                .args(["snapshots", "--snapshotter", "native", "ls"]),
            COMMAND_TIMEOUT,
        )
        .stdout_text();
        listing
            .lines()
            .skip(1)
            .filter(|line| !line.trim().is_empty())
            .count()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Stop before the TempDir goes: a SIGTERM lets containerd close its database cleanly.
        self.daemon.stop();
    }
}

/// Writes `<dir>/<registry host>/hosts.toml` sending pulls and resolves for the registry to the
/// mirror, the way containerd (and the kubelet through it) is pointed at a mirror. The `server`
/// entry deliberately has neither the test CA nor credentials: if the mirror failed, containerd's
/// fallback to the registry would fail too, so a successful pull can only have come through the
/// mirror.
pub fn write_hosts_dir(dir: &Path, registry: &Registry, mirror: &Mirror) -> PathBuf {
    let host_dir = dir.join(&registry.addr);
    fs::create_dir_all(&host_dir).expect("creating the hosts.toml directory");
    write(
        &host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{registry}\"\n\n\
             [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            registry = registry.addr,
            mirror = mirror.addr,
        ),
    );
    dir.to_owned()
}

/// Like [`write_hosts_dir`], for a mirror serving HTTPS with a certificate from `ca_file`, sent
/// a static `Authorization` header (hosts.toml cannot hold a user name and password for a
/// mirror, so a pull token is how a node authenticates). An empty `authorization` sends none.
pub fn write_secure_hosts_dir(
    dir: &Path,
    registry: &Registry,
    mirror: &Mirror,
    ca_file: &Path,
    authorization: &str,
) -> PathBuf {
    let host_dir = dir.join(&registry.addr);
    fs::create_dir_all(&host_dir).expect("creating the hosts.toml directory");
    let mut text = format!(
        "server = \"https://{registry}\"\n\n\
         [host.\"https://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
        registry = registry.addr,
        mirror = mirror.addr,
        ca = ca_file.display(),
    );
    if !authorization.is_empty() {
        text.push_str(&format!(
            "  [host.\"https://{mirror}\".header]\n    Authorization = \"{authorization}\"\n",
            mirror = mirror.addr,
        ));
    }
    write(&host_dir.join("hosts.toml"), text);
    dir.to_owned()
}

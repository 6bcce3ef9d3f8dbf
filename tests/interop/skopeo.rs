//! skopeo, the containers/image client (the same code as podman and CRI-O), isolated from the
//! machine's /etc/containers: its own trust policy and an empty registries.conf, so no mirror
//! or search registry configured on the host can change where it goes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::mirror::Mirror;
use crate::process::{COMMAND_TIMEOUT, command, require_tool, run, write};
use crate::registry::{PASSWORD, Registry, Tls, USER};

pub struct Skopeo {
    bin: PathBuf,
    policy: PathBuf,
    registries_conf: PathBuf,
    tmp: PathBuf,
}

/// Where an image is read from: the registry itself (TLS with the test CA, credentials) or the
/// mirror (plain HTTP on loopback, no credentials: the mirror authenticates upstream itself).
pub enum Source<'a> {
    Registry(&'a Registry, &'a Tls),
    Mirror(&'a Mirror),
    /// The mirror over HTTPS (trusting the test CA), with skopeo's credential flags as given
    /// (`--src-creds=...`, `--src-registry-token=...`, `--src-no-creds`; `src-` is replaced by
    /// the command's prefix).
    SecureMirror(&'a Mirror, &'a Tls, Vec<String>),
}

impl Source<'_> {
    fn host(&self) -> &str {
        match self {
            Source::Registry(registry, _) => &registry.addr,
            Source::Mirror(mirror) | Source::SecureMirror(mirror, _, _) => &mirror.addr,
        }
    }

    /// The access flags, spelled with `prefix` (`src-` for copy, empty for inspect).
    fn flags(&self, prefix: &str) -> Vec<String> {
        match self {
            Source::Registry(_, tls) => vec![
                format!("--{prefix}creds={USER}:{PASSWORD}"),
                format!("--{prefix}cert-dir={}", tls.cert_dir.display()),
            ],
            Source::Mirror(_) => vec![
                format!("--{prefix}tls-verify=false"),
                format!("--{prefix}no-creds"),
            ],
            Source::SecureMirror(_, tls, creds) => {
                let mut flags = vec![format!("--{prefix}cert-dir={}", tls.cert_dir.display())];
                flags.extend(
                    creds
                        .iter()
                        .map(|f| f.replacen("--src-", &format!("--{prefix}"), 1)),
                );
                flags
            }
        }
    }
}

impl Skopeo {
    pub fn new(dir: &Path) -> Skopeo {
        let bin = require_tool("skopeo", "skopeo");
        fs::create_dir_all(dir.join("tmp")).expect("creating skopeo's directory");
        let policy = dir.join("policy.json");
        write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        );
        let registries_conf = dir.join("registries.conf");
        write(&registries_conf, "");
        Skopeo {
            bin,
            policy,
            registries_conf,
            tmp: dir.join("tmp"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = command(&self.bin);
        cmd.env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .arg("--policy")
            .arg(&self.policy)
            .arg("--tmpdir")
            .arg(&self.tmp);
        cmd
    }

    /// Pushes `oci:<layout>:<tag>`, with every image of an index, to the registry as
    /// `reference` (`name:tag`). Without `format` the digests are preserved or the push fails;
    /// `v2s2` converts to Docker media types.
    pub fn push(
        &self,
        layout: &Path,
        tag: &str,
        registry: &Registry,
        tls: &Tls,
        reference: &str,
        format: Option<&str>,
    ) {
        let mut cmd = self.command();
        cmd.args(["copy", "--quiet", "--all"])
            .arg(format!("--dest-creds={USER}:{PASSWORD}"))
            .arg(format!("--dest-cert-dir={}", tls.cert_dir.display()));
        match format {
            Some(format) => cmd.arg(format!("--format={format}")),
            None => cmd.arg("--preserve-digests"),
        };
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{reference}", registry.addr));
        run(&mut cmd, COMMAND_TIMEOUT);
    }

    /// Pulls `image` (`registry/name:tag`) to `dest` the way podman and CRI-O do on a node:
    /// by the registry's own name, with `registries_conf` (a registries.conf file) deciding
    /// which mirrors to try first. No credentials are given.
    pub fn pull_configured(&self, registries_conf: &Path, image: &str, dest: &str) {
        let mut cmd = self.command();
        // The flag: this skopeo (1.9) reads CONTAINERS_REGISTRIES_CONF only as a fallback.
        cmd.arg("--registries-conf")
            .arg(registries_conf)
            .args([
                "copy",
                "--quiet",
                "--all",
                "--preserve-digests",
                "--src-no-creds",
            ])
            .arg(format!("docker://{image}"))
            .arg(dest);
        run(&mut cmd, COMMAND_TIMEOUT);
    }

    /// Pulls `reference` (`name:tag` or `name@digest`) from `source`, with every image of an
    /// index, to `dest` (`oci:DIR:TAG` or `dir:DIR`). Digests are preserved or the copy fails.
    pub fn pull(&self, source: &Source, reference: &str, dest: &str) {
        let mut cmd = self.command();
        cmd.args(["copy", "--quiet", "--all", "--preserve-digests"])
            .args(source.flags("src-"))
            .arg(format!("docker://{}/{reference}", source.host()))
            .arg(dest);
        run(&mut cmd, COMMAND_TIMEOUT);
    }

    /// Copies between two containers/image transports (`oci:DIR:REF`, `oci-archive:FILE:REF`,
    /// `dir:DIR`, `docker://...`), every image of an index with `all`, preserving digests.
    /// `src_flags` are the source's access flags (`Source::flags("src-")` for a registry).
    pub fn copy(&self, src: &str, dest: &str, all: bool, src_flags: &[String]) {
        let mut cmd = self.command();
        cmd.args(["copy", "--quiet", "--preserve-digests"]);
        if all {
            cmd.arg("--all");
        }
        cmd.args(src_flags).arg(src).arg(dest);
        run(&mut cmd, COMMAND_TIMEOUT);
    }

    /// `skopeo inspect --raw` whatever its outcome: (success, stderr).
    pub fn try_inspect(&self, source: &Source, reference: &str) -> (bool, String) {
        let mut cmd = self.command();
        cmd.args(["inspect", "--raw"])
            .args(source.flags(""))
            .arg(format!("docker://{}/{reference}", source.host()));
        let out = crate::process::try_run(&mut cmd, COMMAND_TIMEOUT);
        (out.status.success(), out.stderr)
    }

    /// The manifest or index bytes exactly as `source` serves them for `reference`.
    pub fn inspect_raw(&self, source: &Source, reference: &str) -> Vec<u8> {
        let mut cmd = self.command();
        cmd.args(["inspect", "--raw"])
            .args(source.flags(""))
            .arg(format!("docker://{}/{reference}", source.host()));
        run(&mut cmd, COMMAND_TIMEOUT).stdout
    }
}

//! `regcache node-config`: the files that point a node's container runtime at the mirror, one
//! entry per configured upstream. containerd gets a `hosts.toml` directory (the mirror as a
//! pull/resolve host; containerd adds `?ns=<registry>` to every request, so one mirror serves
//! every upstream; the registry itself as the fallback `server`), k3s gets a `registries.yaml`,
//! and CRI-O/podman get a `registries.conf` drop-in whose mirror locations carry the registry as
//! a path prefix (`mirror:5000/ghcr.io`), since containers/image sends no `ns`. Where the
//! mirror has access control on, the runtime presents a user or a pull token (containerd: a
//! static `Authorization` header; k3s: user and password), and an https mirror's CA bundle can
//! be installed beside the files. Rendering is pure;
//! `write` puts the files in place atomically, so a runtime reading them mid-update sees either
//! the old file or the new one.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::config::{Secret, UpstreamConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mirror {url:?}: {reason}")]
    Mirror { url: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("--token-file: {0}")]
    Token(String),
    #[error("upstream name {0:?} cannot name a containerd hosts directory")]
    UpstreamName(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The container runtime whose configuration is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `<out>/<registry>/hosts.toml`; `<out>` is containerd's `config_path`, usually
    /// `/etc/containerd/certs.d`.
    Containerd,
    /// `<out>/registries.yaml`; `<out>` is usually `/etc/rancher/k3s` (or `/etc/rancher/rke2`).
    K3s,
    /// `<out>/50-regcache.conf`; `<out>` is usually `/etc/containers/registries.conf.d`.
    Crio,
}

/// Where the mirror is, as nodes reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorAddr {
    /// `http` or `https`.
    pub scheme: String,
    /// `host:port` (or `host` for the scheme's default port).
    pub authority: String,
}

impl MirrorAddr {
    /// Parses `http://host:port` or `https://host[:port]`; a path, query or credentials are
    /// refused because runtimes either reject or mangle them.
    pub fn parse(url: &str) -> Result<MirrorAddr, Error> {
        let fail = |reason: &str| Error::Mirror {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| fail("needs a scheme: http://HOST:PORT or https://HOST:PORT"))?;
        if scheme != "http" && scheme != "https" {
            return Err(fail("the scheme must be http or https"));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(fail("names no host"));
        }
        if authority.contains(['/', '?', '#', '@', ' ', '"', '\\']) {
            return Err(fail(
                "must be only scheme, host and port (no path, query or credentials)",
            ));
        }
        authority
            .parse::<http::uri::Authority>()
            .map_err(|e| fail(&format!("bad host or port: {e}")))?;
        if let Some((_, port)) = authority.rsplit_once(':')
            && !port.ends_with(']')
            && port.parse::<u16>().is_err()
        {
            return Err(fail("the port must be a number up to 65535"));
        }
        Ok(MirrorAddr {
            scheme: scheme.to_owned(),
            authority: authority.to_owned(),
        })
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    fn is_plain_http(&self) -> bool {
        self.scheme == "http"
    }
}

/// The user name sent with a pull token where only user and password can be configured (k3s):
/// the mirror recognises a pull token as a Basic password whatever the user name.
pub const PULL_TOKEN_USER: &str = "pull-token";

/// Credentials the runtime presents to the mirror (downstream auth).
#[derive(Clone, Debug)]
pub enum MirrorCredentials {
    /// A user of the mirror's `access.htpasswd_file`, sent as HTTP Basic.
    Basic { username: String, password: Secret },
    /// A pull token printed by `regcache token create` (`rcp_...`), sent as a static
    /// `Authorization: Bearer` header, which the mirror accepts on every request: a runtime
    /// needs no token flow, and the token never expires mid-pull as an issued one would.
    PullToken(Secret),
}

impl MirrorCredentials {
    /// A pull token as read from a file (a mounted Secret key): surrounding whitespace is
    /// dropped; anything but one `rcp_...` word is refused, since a header carrying it would
    /// be refused by the mirror on every pull.
    pub fn pull_token(text: &str) -> Result<MirrorCredentials, Error> {
        let token = text.trim();
        let fail = |reason: &str| Error::Token(reason.to_owned());
        if token.is_empty() {
            return Err(fail("the file is empty"));
        }
        if !token.starts_with(crate::access::tokens::PREFIX) {
            return Err(fail(
                "not a pull token: expected the `rcp_...` token `regcache token create` prints \
                 (not the tokens file line, which holds only its hash)",
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail("holds more than one word: expected the token alone"));
        }
        Ok(MirrorCredentials::PullToken(Secret::new(token)))
    }

    /// The `Authorization` header value.
    fn header(&self) -> String {
        match self {
            MirrorCredentials::Basic { username, password } => {
                let pair = format!("{username}:{}", password.expose());
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }
            MirrorCredentials::PullToken(token) => format!("Bearer {}", token.expose()),
        }
    }

    /// User and password for runtimes that take only those (k3s): a pull token goes as the
    /// password, which the mirror accepts in its token flow.
    fn user_and_password(&self) -> (&str, &str) {
        match self {
            MirrorCredentials::Basic { username, password } => {
                (username.as_str(), password.expose())
            }
            MirrorCredentials::PullToken(token) => (PULL_TOKEN_USER, token.expose()),
        }
    }
}

/// Everything `node-config` needs besides the upstream list.
#[derive(Clone, Debug)]
pub struct Options {
    pub mirror: MirrorAddr,
    /// CA bundle (path on the node) that signed an `https` mirror's certificate.
    pub mirror_ca_file: Option<PathBuf>,
    pub credentials: Option<MirrorCredentials>,
}

/// One file to write, its path relative to the output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    pub contents: String,
}

/// The files pointing `runtime` at the mirror for each of `upstreams`.
/// `default_upstream` is the one a request naming no registry goes to (config key
/// `default_upstream`).
pub fn render(
    runtime: Runtime,
    upstreams: &[UpstreamConfig],
    default_upstream: &str,
    options: &Options,
) -> Result<Vec<File>, Error> {
    match runtime {
        Runtime::Containerd => upstreams
            .iter()
            .map(|upstream| containerd_hosts(&upstream.name, options))
            .collect(),
        Runtime::K3s => Ok(vec![k3s_registries(upstreams, options)]),
        Runtime::Crio => {
            crio_registries_conf(upstreams, default_upstream, options).map(|file| vec![file])
        }
    }
}

/// The registry a runtime would contact without the mirror: the fallback `server`.
fn registry_url(name: &str) -> String {
    match name {
        // containerd's own default for Docker Hub.
        "docker.io" => "https://registry-1.docker.io".to_owned(),
        other => format!("https://{other}"),
    }
}

/// A TOML basic string.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn yaml_string(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

fn containerd_hosts(name: &str, options: &Options) -> Result<File, Error> {
    // The directory is the registry host exactly as image references name it.
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::UpstreamName(name.to_owned()));
    }
    let mirror = toml_string(&options.mirror.url());
    let mut toml = format!(
        "# Written by `regcache node-config`: pulls of {name} images go through the regcache\n\
         # mirror (containerd adds ?ns={name} to each request), and to the registry itself only\n\
         # if the mirror fails.\n\
         server = {server}\n\
         \n\
         [host.{mirror}]\n\
         \x20 capabilities = [\"pull\", \"resolve\"]\n",
        server = toml_string(&registry_url(name)),
    );
    if let Some(ca) = &options.mirror_ca_file {
        let _ = writeln!(toml, "  ca = {}", toml_string(&ca.to_string_lossy()));
    }
    if let Some(credentials) = &options.credentials {
        let _ = write!(
            toml,
            "  [host.{mirror}.header]\n    Authorization = [{}]\n",
            toml_string(&credentials.header())
        );
    }
    Ok(File {
        path: PathBuf::from(name).join("hosts.toml"),
        contents: toml,
    })
}

fn k3s_registries(upstreams: &[UpstreamConfig], options: &Options) -> File {
    let mut yaml = String::from(
        "# Written by `regcache node-config`: k3s/rke2 pull these registries through the regcache\n\
         # mirror, and from the registry itself only if the mirror fails.\n\
         mirrors:\n",
    );
    for upstream in upstreams {
        let _ = write!(
            yaml,
            "  {}:\n    endpoint:\n      - {}\n",
            yaml_string(&upstream.name),
            yaml_string(&options.mirror.url())
        );
    }
    if options.credentials.is_some() || options.mirror_ca_file.is_some() {
        let _ = writeln!(
            yaml,
            "configs:\n  {}:",
            yaml_string(&options.mirror.authority)
        );
        if let Some(credentials) = &options.credentials {
            let (username, password) = credentials.user_and_password();
            let _ = write!(
                yaml,
                "    auth:\n      username: {}\n      password: {}\n",
                yaml_string(username),
                yaml_string(password)
            );
        }
        if let Some(ca) = &options.mirror_ca_file {
            let _ = write!(
                yaml,
                "    tls:\n      ca_file: {}\n",
                yaml_string(&ca.to_string_lossy())
            );
        }
    }
    File {
        path: PathBuf::from("registries.yaml"),
        contents: yaml,
    }
}

fn crio_registries_conf(
    upstreams: &[UpstreamConfig],
    default_upstream: &str,
    options: &Options,
) -> Result<File, Error> {
    if options.credentials.is_some() {
        return Err(Error::Unsupported(
            "CRI-O and podman do not read mirror credentials from registries.conf: put them in \
             the auth file keyed by the mirror's host (CRI-O's global_auth_file, podman's \
             auth.json) and run node-config without --username or --token-file"
                .to_owned(),
        ));
    }
    if options.mirror_ca_file.is_some() {
        return Err(Error::Unsupported(
            "CRI-O and podman take a mirror's CA from /etc/containers/certs.d/<mirror host>/ca.crt, \
             not registries.conf: install it there and run node-config without --mirror-ca-file"
                .to_owned(),
        ));
    }
    let mut conf = String::from(
        "# Written by `regcache node-config`: CRI-O and podman pull these registries through the\n\
         # regcache mirror (the registry named as a path prefix), and from the registry itself\n\
         # only if the mirror fails.\n",
    );
    for upstream in upstreams {
        let name = &upstream.name;
        // The default upstream needs no prefix. A prefix with a port (`host:5000`) is not a
        // valid repository path component, so containers/image cannot send one.
        let location = if name == default_upstream {
            options.mirror.authority.clone()
        } else if name.contains(':') {
            let _ = write!(
                conf,
                "\n# {name}: not mirrored. containers/image cannot name a registry with a port in\n\
                 # a mirror path; make it regcache's default_upstream to mirror it here.\n"
            );
            continue;
        } else {
            format!("{}/{name}", options.mirror.authority)
        };
        let _ = write!(
            conf,
            "\n[[registry]]\nprefix = {name_str}\nlocation = {name_str}\n\n\
             [[registry.mirror]]\nlocation = {mirror}\n",
            name_str = toml_string(name),
            mirror = toml_string(&location),
        );
        if options.mirror.is_plain_http() {
            conf.push_str("insecure = true\n");
        }
    }
    Ok(File {
        path: PathBuf::from("50-regcache.conf"),
        contents: conf,
    })
}

/// The name of the mirror's CA bundle when `node-config` installs it in its output directory.
pub const MIRROR_CA_FILE: &str = "regcache-mirror-ca.crt";

/// The mirror's CA bundle as a file to install beside the runtime's configuration (containerd
/// ignores files at the top of its `config_path`). Refuses what holds no PEM certificate, which
/// would make every pull through the mirror fail its TLS handshake.
pub fn mirror_ca_file(pem: &str) -> Result<File, Error> {
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::Unsupported(
            "--install-mirror-ca: the file holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                .to_owned(),
        ));
    }
    Ok(File {
        path: PathBuf::from(MIRROR_CA_FILE),
        contents: pem.to_owned(),
    })
}

/// Writes `files` under `out`, each through a temporary file renamed into place.
pub fn write(out: &Path, files: &[File]) -> Result<(), Error> {
    for file in files {
        let path = out.join(&file.path);
        let fail = |source| Error::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(fail)?;
        }
        // A temporary name of its own per run, so two runs at once never write into each
        // other's file.
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".regcache-tmp-{:016x}", rand::random::<u64>()));
        let tmp = PathBuf::from(tmp);
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            // Owner-only when the file carries the mirror's credentials (a static
            // Authorization header, k3s auth); others stay readable, as podman running
            // rootless reads registries.conf.d.
            let mode = if carries_secret(&file.contents) {
                0o600
            } else {
                0o644
            };
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(fail)?;
            out.write_all(file.contents.as_bytes()).map_err(fail)?;
            out.sync_all().map_err(fail)?;
        }
        fs::rename(&tmp, &path).map_err(fail)?;
    }
    Ok(())
}

/// Whether rendered contents hold a credential for the mirror: containerd's `Authorization`
/// header lines, k3s's `auth` block.
fn carries_secret(contents: &str) -> bool {
    contents.contains("Authorization")
        || contents.contains("password:")
        || contents.contains("auth:")
}

/// Creates the mirror's cache directory on the node (a hostPath) owned by `uid:gid`, the user
/// the mirror runs as, so that a non-root mirror can write to it. Changes nothing that is
/// already so; never recurses (an existing cache keeps its files' owners).
pub fn prepare_cache_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt as _;
    let fail = |source| Error::Write {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(fail)?;
    let meta = fs::metadata(dir).map_err(fail)?;
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_owned(),
            url: format!("https://{name}"),
            username: None,
            password: None,
            ca_file: None,
            offline: false,
        }
    }

    fn options(mirror: &str) -> Options {
        Options {
            mirror: MirrorAddr::parse(mirror).unwrap(),
            mirror_ca_file: None,
            credentials: None,
        }
    }

    fn upstreams() -> Vec<UpstreamConfig> {
        vec![upstream("docker.io"), upstream("registry.example.com:5000")]
    }

    #[test]
    fn mirror_addresses_are_scheme_host_and_port_only() {
        let addr = MirrorAddr::parse("http://10.0.0.7:5000/").unwrap();
        assert_eq!(addr.url(), "http://10.0.0.7:5000");
        for bad in [
            "10.0.0.7:5000",
            "ftp://10.0.0.7",
            "http://",
            "http://host:5000/docker.io",
            "http://user:pw@host:5000",
            "http://host:port",
        ] {
            let err = MirrorAddr::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn containerd_gets_one_hosts_toml_per_upstream_with_the_registry_as_fallback() {
        let files = render(
            Runtime::Containerd,
            &upstreams(),
            "docker.io",
            &options("http://10.0.0.7:5000"),
        )
        .unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, Path::new("docker.io/hosts.toml"));
        assert_eq!(
            files[1].path,
            Path::new("registry.example.com:5000/hosts.toml")
        );
        let hub = &files[0].contents;
        assert!(hub.contains("server = \"https://registry-1.docker.io\"\n"));
        assert!(hub.contains(
            "[host.\"http://10.0.0.7:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
        assert!(!hub.contains("Authorization"));
        assert!(
            files[1]
                .contents
                .contains("server = \"https://registry.example.com:5000\"\n")
        );
    }

    #[test]
    fn containerd_sends_downstream_credentials_and_trusts_the_mirror_ca() {
        let mut options = options("https://regcache.example:5443");
        options.mirror_ca_file = Some(PathBuf::from("/etc/regcache/ca.pem"));
        options.credentials = Some(MirrorCredentials::Basic {
            username: "node".into(),
            password: Secret::new("s3cret"),
        });
        let files = render(
            Runtime::Containerd,
            &[upstream("ghcr.io")],
            "ghcr.io",
            &options,
        )
        .unwrap();
        let toml = &files[0].contents;
        assert!(toml.contains("  ca = \"/etc/regcache/ca.pem\"\n"));
        // base64("node:s3cret")
        assert!(toml.contains(
            "  [host.\"https://regcache.example:5443\".header]\n    \
             Authorization = [\"Basic bm9kZTpzM2NyZXQ=\"]\n"
        ));
    }

    #[test]
    fn containerd_sends_a_pull_token_as_a_static_bearer_header() {
        let mut options = options("https://10.0.0.7:5000");
        options.credentials = Some(MirrorCredentials::pull_token("rcp_Zm9vYmFy\n").unwrap());
        let files = render(Runtime::Containerd, &upstreams(), "docker.io", &options).unwrap();
        for file in &files {
            assert!(
                file.contents.contains(
                    "  [host.\"https://10.0.0.7:5000\".header]\n    \
                     Authorization = [\"Bearer rcp_Zm9vYmFy\"]\n"
                ),
                "{}",
                file.contents
            );
        }
        // The fallback server never gets the header: it belongs to the mirror's host table.
        let hub = &files[0].contents;
        let server_part = &hub[..hub.find("[host.").unwrap()];
        assert!(!server_part.contains("rcp_"), "{hub}");
    }

    #[test]
    fn the_mirror_ca_is_installed_only_if_it_holds_a_certificate() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let file = mirror_ca_file(pem).unwrap();
        assert_eq!(file.path, Path::new(MIRROR_CA_FILE));
        assert_eq!(file.contents, pem);
        let err = mirror_ca_file("-----BEGIN PRIVATE KEY-----\n").unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn pull_token_files_hold_one_pull_token() {
        assert!(matches!(
            MirrorCredentials::pull_token("  rcp_abc\r\n"),
            Ok(MirrorCredentials::PullToken(t)) if t.expose() == "rcp_abc"
        ));
        for (bad, why) in [
            ("", "empty"),
            ("\n", "empty"),
            ("node:$argon2id$v=19$...", "rcp_"),
            ("eyJhbGciOi.eyJ.sig", "rcp_"),
            ("rcp_abc rcp_def", "one word"),
            ("rcp_abc\nrcp_def", "one word"),
        ] {
            let err = MirrorCredentials::pull_token(bad).unwrap_err().to_string();
            assert!(
                err.contains("--token-file") && err.contains(why),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn k3s_sends_a_pull_token_as_the_password_of_the_token_flow() {
        let mut options = options("https://10.0.0.7:5000");
        options.credentials = Some(MirrorCredentials::pull_token("rcp_abc").unwrap());
        options.mirror_ca_file = Some(PathBuf::from("/etc/regcache/ca.crt"));
        let files = render(Runtime::K3s, &upstreams(), "docker.io", &options).unwrap();
        assert!(files[0].contents.contains(
            "configs:\n  \"10.0.0.7:5000\":\n    auth:\n      username: \"pull-token\"\n      \
             password: \"rcp_abc\"\n    tls:\n      ca_file: \"/etc/regcache/ca.crt\"\n"
        ));
    }

    #[test]
    fn k3s_lists_every_upstream_and_the_mirror_credentials() {
        let mut options = options("http://10.0.0.7:5000");
        let plain = render(Runtime::K3s, &upstreams(), "docker.io", &options).unwrap();
        assert_eq!(plain[0].path, Path::new("registries.yaml"));
        assert!(plain[0].contents.contains(
            "mirrors:\n  \"docker.io\":\n    endpoint:\n      - \"http://10.0.0.7:5000\"\n  \
             \"registry.example.com:5000\":\n    endpoint:\n      - \"http://10.0.0.7:5000\"\n"
        ));
        assert!(!plain[0].contents.contains("configs:"));
        options.credentials = Some(MirrorCredentials::Basic {
            username: "node".into(),
            password: Secret::new("pa\"ss"),
        });
        let with_auth = render(Runtime::K3s, &upstreams(), "docker.io", &options).unwrap();
        assert!(with_auth[0].contents.contains(
            "configs:\n  \"10.0.0.7:5000\":\n    auth:\n      username: \"node\"\n      \
             password: \"pa\\\"ss\"\n"
        ));
    }

    #[test]
    fn crio_mirrors_name_the_registry_as_a_path_prefix() {
        let mut all = upstreams();
        all.push(upstream("ghcr.io"));
        let files = render(
            Runtime::Crio,
            &all,
            "docker.io",
            &options("http://10.0.0.7:5000"),
        )
        .unwrap();
        assert_eq!(files[0].path, Path::new("50-regcache.conf"));
        let conf = &files[0].contents;
        // The default upstream is what the mirror serves for unprefixed names.
        assert!(conf.contains(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
             [[registry.mirror]]\nlocation = \"10.0.0.7:5000\"\ninsecure = true\n"
        ));
        assert!(conf.contains(
            "[[registry]]\nprefix = \"ghcr.io\"\nlocation = \"ghcr.io\"\n\n\
             [[registry.mirror]]\nlocation = \"10.0.0.7:5000/ghcr.io\"\ninsecure = true\n"
        ));
        // A port cannot be a path component: that registry is left out, with the reason.
        assert!(!conf.contains("prefix = \"registry.example.com:5000\""));
        assert!(conf.contains("# registry.example.com:5000: not mirrored."));
        // As the default upstream it is mirrored without a prefix.
        let files = render(
            Runtime::Crio,
            &upstreams(),
            "registry.example.com:5000",
            &options("http://10.0.0.7:5000"),
        )
        .unwrap();
        assert!(files[0].contents.contains(
            "prefix = \"registry.example.com:5000\"\nlocation = \"registry.example.com:5000\"\n\n\
             [[registry.mirror]]\nlocation = \"10.0.0.7:5000\"\n"
        ));
        let https = render(
            Runtime::Crio,
            &upstreams(),
            "ghcr.io",
            &options("https://regcache.example"),
        )
        .unwrap();
        assert!(!https[0].contents.contains("insecure"));
    }

    #[test]
    fn crio_refuses_what_registries_conf_cannot_carry() {
        let mut options = options("http://10.0.0.7:5000");
        options.credentials = Some(MirrorCredentials::Basic {
            username: "node".into(),
            password: Secret::new("x"),
        });
        let err = render(Runtime::Crio, &upstreams(), "docker.io", &options).unwrap_err();
        assert!(err.to_string().contains("auth file"), "{err}");
        options.credentials = Some(MirrorCredentials::pull_token("rcp_abc").unwrap());
        let err = render(Runtime::Crio, &upstreams(), "docker.io", &options).unwrap_err();
        assert!(err.to_string().contains("--token-file"), "{err}");
    }

    #[test]
    fn write_replaces_files_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let files = render(
            Runtime::Containerd,
            &upstreams(),
            "docker.io",
            &options("http://10.0.0.7:5000"),
        )
        .unwrap();
        write(dir.path(), &files).unwrap();
        let files = render(
            Runtime::Containerd,
            &upstreams(),
            "docker.io",
            &options("http://10.0.0.8:5000"),
        )
        .unwrap();
        write(dir.path(), &files).unwrap();
        let hub = fs::read_to_string(dir.path().join("docker.io/hosts.toml")).unwrap();
        assert!(hub.contains("10.0.0.8:5000"));
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("docker.io"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["hosts.toml"]);
    }

    #[test]
    fn prepare_cache_dir_creates_the_directory_and_keeps_an_existing_one() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("var/lib/regcache");
        let meta = fs::metadata(dir.path()).unwrap();
        // The current owner: works unprivileged, and is what a second run finds.
        prepare_cache_dir(&cache, meta.uid(), meta.gid()).unwrap();
        fs::write(cache.join("blob"), b"kept").unwrap();
        prepare_cache_dir(&cache, meta.uid(), meta.gid()).unwrap();
        assert_eq!(fs::read(cache.join("blob")).unwrap(), b"kept");
    }

    #[test]
    fn upstream_names_that_are_not_hosts_are_refused() {
        let err = render(
            Runtime::Containerd,
            &[upstream("../etc")],
            "docker.io",
            &options("http://10.0.0.7:5000"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("../etc"), "{err}");
    }
}

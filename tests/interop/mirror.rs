//! regcache itself, run as users run it: the built binary, `serve --config FILE`, listening on
//! a port the kernel picks (read back from its JSON log), logging to a file. The registry's
//! credentials reach it only through a dockerconfigjson file in a directory laid out as the
//! kubelet mounts a `kubernetes.io/dockerconfigjson` Secret.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::process::{Daemon, command, write};
use crate::registry::{PASSWORD, Registry, Tls, USER};

pub struct Mirror {
    /// `127.0.0.1:PORT`, plain HTTP.
    pub addr: String,
    daemon: Daemon,
}

/// Where the mirror sends requests that name no registry (skopeo, podman and Docker name
/// none; containerd names one with `?ns=` on every request).
pub enum DefaultUpstream {
    /// The test registry.
    Registry,
    /// A configured upstream nothing listens on: a request only reaches the registry if the
    /// mirror routed it there by the registry host the client named.
    Decoy,
}

/// An upstream name that no client in the test uses, at an address that refuses connections.
const DECOY: &str = "decoy.invalid:5000";

impl Mirror {
    /// Starts regcache with `cache_dir` as its cache and `registry` as an upstream, authenticating
    /// with the registry's credentials from a mounted-Secret directory and trusting the test CA. `run` names this start's config
    /// and log, so a restart keeps the first run's log.
    pub fn start(
        dir: &Path,
        run: &str,
        cache_dir: &Path,
        registry: &Registry,
        tls: &Tls,
        default_upstream: DefaultUpstream,
    ) -> Mirror {
        let config = write_config(dir, run, cache_dir, registry, tls, default_upstream, false);
        Mirror::start_with(dir, run, &config)
    }

    /// Starts `regcache serve --config CONFIG`, logging to `<dir>/regcache-<run>.log`.
    pub fn start_with(dir: &Path, run: &str, config_path: &Path) -> Mirror {
        let mut daemon = Daemon::spawn(
            &format!("regcache ({run})"),
            command(&binary())
                .arg("serve")
                .arg("--config")
                .arg(config_path),
            &dir.join(format!("regcache-{run}.log")),
        );
        let addr = daemon.wait_for_log("`listening`", listening_addr);
        assert!(
            addr.starts_with("127.0.0.1:"),
            "regcache listens on {addr}, not loopback"
        );
        Mirror { addr, daemon }
    }

    /// [`Mirror::start`] with more top-level config (`tls:`, `access:` sections).
    pub fn start_with_extra(
        dir: &Path,
        run: &str,
        cache_dir: &Path,
        registry: &Registry,
        tls: &Tls,
        default_upstream: DefaultUpstream,
        extra_config: &str,
    ) -> Mirror {
        let config = write_config(dir, run, cache_dir, registry, tls, default_upstream, false);
        let mut text = std::fs::read_to_string(&config).expect("reading the config just written");
        text.push_str(extra_config);
        write(&config, text);
        Mirror::start_with(dir, run, &config)
    }

    /// Starts regcache with `config` (YAML; it must listen on 127.0.0.1:0 and log JSON), saved
    /// as `<dir>/regcache-<run>.yaml`.
    pub fn start_with_config(dir: &Path, run: &str, config: &str) -> Mirror {
        let config_path = Mirror::config_path(dir, run);
        write(&config_path, config);
        Mirror::start_with(dir, run, &config_path)
    }

    pub fn config_path(dir: &Path, run: &str) -> PathBuf {
        dir.join(format!("regcache-{run}.yaml"))
    }

    /// The Prometheus text of `GET /metrics`.
    pub fn metrics(&self) -> String {
        let (status, body) = http_get(&self.addr, "/metrics");
        assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
        body
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Everything regcache has logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// A Secret volume as the kubelet writes it: the data in a timestamped directory, `..data` a
/// symlink to it, `.dockerconfigjson` a symlink through `..data`. The registry key is written
/// with a scheme, as `docker login` records it. Returns the volume's directory.
fn write_secret_volume(dir: &Path, registry: &str) -> PathBuf {
    use base64::Engine as _;
    if dir.join("..data").exists() {
        return dir.to_owned();
    }
    let version = dir.join("..2026_11_24_14_00_00.000000001");
    std::fs::create_dir_all(&version).expect("creating the secret volume");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let json = serde_json::json!({
        "auths": {
            format!("https://{registry}"): {
                "username": USER,
                "password": PASSWORD,
                "auth": auth,
            }
        }
    });
    write(&version.join(".dockerconfigjson"), json.to_string());
    std::os::unix::fs::symlink("..2026_11_24_14_00_00.000000001", dir.join("..data"))
        .expect("linking ..data");
    std::os::unix::fs::symlink("..data/.dockerconfigjson", dir.join(".dockerconfigjson"))
        .expect("linking the secret's key");
    dir.to_owned()
}

/// Writes `<dir>/regcache-<run>.yaml`: `cache_dir` as the cache, `registry` as an upstream with
/// the test CA, its credentials only in a mounted dockerconfigjson Secret, and a decoy upstream;
/// with `offline`, every upstream is served from the cache only.
pub fn write_config(
    dir: &Path,
    run: &str,
    cache_dir: &Path,
    registry: &Registry,
    tls: &Tls,
    default_upstream: DefaultUpstream,
    offline: bool,
) -> PathBuf {
    let default_upstream = match default_upstream {
        DefaultUpstream::Registry => registry.addr.as_str(),
        DefaultUpstream::Decoy => DECOY,
    };
    let secret = write_secret_volume(&dir.join(format!("secret-{run}")), &registry.addr);
    // Port 9 (discard) on loopback: nothing listens there, so the decoy fails at once.
    let config = format!(
        "listen: \"127.0.0.1:0\"\n\
         cache:\n  dir: {cache}\n\
         default_upstream: \"{default_upstream}\"\n\
         offline: {offline}\n\
         upstreams:\n\
         \x20 - name: \"{upstream}\"\n\
         \x20   url: \"https://{upstream}\"\n\
         \x20   ca_file: {ca}\n\
         \x20 - name: \"{DECOY}\"\n\
         \x20   url: \"https://127.0.0.1:9\"\n\
         credentials:\n  files: [\"{secret}\"]\n\
         log:\n  format: json\n  level: debug\n",
        secret = secret.display(),
        cache = cache_dir.display(),
        upstream = registry.addr,
        ca = tls.ca_file.display(),
    );
    let config_path = Mirror::config_path(dir, run);
    write(&config_path, config);
    config_path
}

/// The built `regcache` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_regcache"))
}

/// `fields.addr` of the line whose `fields.message` is `listening` (tracing-subscriber's JSON).
fn listening_addr(line: &str) -> Option<String> {
    let event: Value = serde_json::from_str(line).ok()?;
    let fields = event.get("fields")?;
    if fields.get("message")? != "listening" {
        return None;
    }
    Some(fields.get("addr")?.as_str()?.to_owned())
}

/// A bare HTTP/1.0 GET: a 1.0 request gets a plain, unchunked body ended by the connection
/// closing, which is all this needs to read.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let timeout = Duration::from_secs(10);
    let socket = addr.parse().expect("regcache logged a socket address");
    let mut stream = TcpStream::connect_timeout(&socket, timeout)
        .unwrap_or_else(|e| panic!("cannot connect to regcache at {addr}: {e}"));
    let timeout = Some(timeout);
    stream
        .set_read_timeout(timeout)
        .expect("setting a read timeout");
    stream
        .set_write_timeout(timeout)
        .expect("setting a write timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("sending a request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|e| panic!("reading GET {path} from regcache: {e}"));
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: not an HTTP response: {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: bad status line in {head:?}"));
    (status, body.to_owned())
}

/// The sum over all label sets of the samples of `metric` (0 if it has none yet).
pub fn metric_sum(metrics: &str, metric: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            (name == metric)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

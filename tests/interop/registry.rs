//! The upstream: Debian's `docker-registry` (CNCF Distribution 2.8) on 127.0.0.1 with real TLS
//! from a test CA and htpasswd (bcrypt) authentication, as a private registry is run in
//! production. Its access log records every request it receives and from which client, which
//! is how the test tells whether content came from the mirror's cache, from the mirror fetching
//! upstream, or from a client going around the mirror.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{
    COMMAND_TIMEOUT, Daemon, START_TIMEOUT, command, require_tool, run, wait_for, write,
};

pub const USER: &str = "interop";
pub const PASSWORD: &str = "pull-and-push-0";

/// A CA and a server certificate for 127.0.0.1 and localhost, made with the `openssl` CLI.
pub struct Tls {
    /// The CA certificate (PEM), for clients that take a file.
    pub ca_file: PathBuf,
    /// A directory holding only `ca.crt`, for containers/image's `--cert-dir`.
    pub cert_dir: PathBuf,
    /// The server certificate and key (for 127.0.0.1 and localhost).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
        let openssl = require_tool("openssl", "openssl");
        fs::create_dir_all(dir).expect("creating the TLS directory");
        let path = |name: &str| dir.join(name);
        // P-256 keys: quick to generate, and accepted by Go's TLS, rustls and containerd alike.
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(
            command(&openssl)
                .args([
                    "req",
                    "-x509",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=regcache interop CA",
                ])
                .args(ec)
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(path("ca.key"))
                .arg("-out")
                .arg(path("ca.crt")),
            COMMAND_TIMEOUT,
        );
        run(
            command(&openssl)
                .args(["req", "-new", "-subj", "/CN=127.0.0.1"])
                .args(ec)
                .arg("-keyout")
                .arg(path("server.key"))
                .arg("-out")
                .arg(path("server.csr")),
            COMMAND_TIMEOUT,
        );
        // Go and rustls both ignore the common name: the addresses must be subjectAltNames, and
        // webpki wants a leaf that is not a CA and may serve TLS.
        write(
            &path("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        );
        run(
            command(&openssl)
                .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
                .arg("-in")
                .arg(path("server.csr"))
                .arg("-CA")
                .arg(path("ca.crt"))
                .arg("-CAkey")
                .arg(path("ca.key"))
                .arg("-extfile")
                .arg(path("server.ext"))
                .arg("-out")
                .arg(path("server.crt")),
            COMMAND_TIMEOUT,
        );
        let cert_dir = path("clients");
        fs::create_dir_all(&cert_dir).expect("creating the client CA directory");
        fs::copy(path("ca.crt"), cert_dir.join("ca.crt")).expect("copying the CA");
        Tls {
            ca_file: path("ca.crt"),
            cert_dir,
            cert: path("server.crt"),
            key: path("server.key"),
        }
    }
}

pub struct Registry {
    /// `127.0.0.1:PORT`, the registry host as clients name it.
    pub addr: String,
    daemon: Daemon,
}

impl Registry {
    pub fn start(dir: &Path, tls: &Tls) -> Registry {
        let registry = require_tool("docker-registry", "docker-registry");
        let htpasswd = require_tool("htpasswd", "apache2-utils");
        fs::create_dir_all(dir.join("storage")).expect("creating the registry storage");
        let users = run(
            command(&htpasswd).args(["-Bbn", USER, PASSWORD]),
            COMMAND_TIMEOUT,
        );
        write(&dir.join("htpasswd"), users.stdout);
        // Port 0: the registry picks a free port and logs it, so parallel tests never race for
        // one. The access log (on stdout) stays on: the test reads it.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: 127.0.0.1:0\n  secret: regcache-interop\n  tls:\n    certificate: {cert}\n    key: {key}\n\
             auth:\n  htpasswd:\n    realm: regcache-interop\n    path: {users}\n",
            storage = dir.join("storage").display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            users = dir.join("htpasswd").display(),
        );
        write(&dir.join("config.yml"), config);
        let mut daemon = Daemon::spawn(
            "docker-registry",
            command(&registry).arg("serve").arg(dir.join("config.yml")),
            &dir.join("registry.log"),
        );
        let addr = daemon.wait_for_log("its address", |line| {
            let rest = line.split("listening on ").nth(1)?;
            let addr = rest.split([',', '"']).next()?;
            Some(addr.to_owned())
        });
        assert!(
            addr.starts_with("127.0.0.1:"),
            "the registry listens on {addr}, not loopback"
        );
        // Listening is not yet answering; the first real answer is the auth challenge.
        let url = format!("https://{addr}/v2/");
        wait_for(&format!("{url} to answer 401"), START_TIMEOUT, || {
            match https_get(&url, &tls.ca_file) {
                Ok(401) => Ok(()),
                Ok(status) => panic!("{url} answered {status}, expected 401 (htpasswd auth)"),
                // Debug, not Display: reqwest's Display hides the TLS cause.
                Err(e) => Err(format!("{e:?}")),
            }
        });
        Registry { addr, daemon }
    }

    /// Every request the registry has answered so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.daemon
            .log()
            .lines()
            .filter_map(Request::parse)
            .collect()
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }
}

/// One line of the registry's access log (Apache combined format).
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub user_agent: String,
}

impl Request {
    /// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 401 87 "" "skopeo/1.9.3"`
    fn parse(line: &str) -> Option<Request> {
        if !line.starts_with("127.0.0.1 ") {
            return None;
        }
        let mut quoted = line.split('"');
        let _ = quoted.next()?;
        let request_line = quoted.next()?;
        let status = quoted.next()?.split_whitespace().next()?.parse().ok()?;
        let user_agent = line.rsplit('"').nth(1)?.to_owned();
        let mut parts = request_line.split(' ');
        Some(Request {
            method: parts.next()?.to_owned(),
            path: parts.next()?.to_owned(),
            status,
            user_agent,
        })
    }
}

/// The status of a GET, trusting only `ca_file`.
fn https_get(url: &str, ca_file: &Path) -> Result<u16, reqwest::Error> {
    let ca = reqwest::Certificate::from_pem(&crate::process::read(ca_file))?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime");
    runtime.block_on(async { Ok(client.get(url).send().await?.status().as_u16()) })
}

//! The configuration file: serde structs with a default for every option, the embedded defaults
//! (`config/regcache.yaml`, compiled in), and `validate()`, which names the key and the reason
//! for anything it refuses. Nothing else reads the file; other modules receive typed values.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::oci::RegistryHost;

/// The documented example, which is also what `regcache serve` runs with when given no file.
pub const EMBEDDED: &str = include_str!("../config/regcache.yaml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid YAML for regcache: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the mirror listens on, `host:port`.
    pub listen: String,
    /// The on-disk cache.
    pub cache: CacheConfig,
    /// Upstream for requests that carry neither `ns` nor a registry-host path prefix.
    pub default_upstream: String,
    /// Registries the mirror may fetch from; a request naming any other host is refused.
    pub upstreams: Vec<UpstreamConfig>,
    /// How the mirror talks to upstreams.
    pub upstream_client: UpstreamClientConfig,
    /// Upstream credentials from dockerconfigjson files (mounted Kubernetes Secrets).
    pub credentials: CredentialsConfig,
    /// Limits of the HTTP server.
    pub server: ServerConfig,
    /// Log output.
    pub log: LogConfig,
    /// Serve every upstream purely from the cache, never contacting it (air-gapped sites).
    pub offline: bool,
    /// HTTPS on the listener (off by default).
    pub tls: TlsConfig,
    /// Client authentication and authorization (off by default).
    pub access: crate::access::AccessConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Directory holding blobs, manifests, tags and repository links.
    pub dir: PathBuf,
    /// How long a tag's digest is served before it is revalidated with an upstream HEAD.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Largest manifest (or tag list, referrers index) read from an upstream; at least 4 MiB.
    pub max_manifest_size: ByteSize,
    /// How long a download keeps filling the cache after every client waiting on it has gone.
    #[serde(with = "humantime_serde")]
    pub fill_timeout: Duration,
    /// Size limit, watermarks, per-upstream quotas and maximum unused age (all off by default).
    pub limits: crate::store::LimitsConfig,
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host clients name (`ns=`, path prefix), e.g. `docker.io`, `ghcr.io`.
    pub name: String,
    /// Base URL of the registry API, e.g. `https://registry-1.docker.io`.
    pub url: String,
    /// Optional static credentials.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// Extra PEM CA bundle trusted for this upstream (private registries).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Serve this upstream purely from the cache: tags from their last record whatever its age,
    /// a 404 for anything never cached, and no connection attempt ever.
    #[serde(default)]
    pub offline: bool,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("ca_file", &self.ca_file)
            .field("offline", &self.offline)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamClientConfig {
    /// Time allowed to establish a TCP (and TLS) connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence allowed while waiting for response headers or body bytes.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Attempts for an idempotent request failing with a connection error or a 5xx.
    pub attempts: u32,
    /// First retry delay; doubled for each further attempt.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// On SIGTERM, how long in-flight responses may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Time a client has to send its request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Serve other machines over plain HTTP (no `tls`). Loopback listeners never need it.
    pub plain_http: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `regcache=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// A credential value: prints `****` in `Debug`/`Display`, has no `Serialize`, and is read
/// through `expose()` only where it is put on the wire.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:5000".into(),
            cache: CacheConfig::default(),
            default_upstream: "docker.io".into(),
            upstreams: vec![UpstreamConfig {
                name: "docker.io".into(),
                url: "https://registry-1.docker.io".into(),
                username: None,
                password: None,
                ca_file: None,
                offline: false,
            }],
            upstream_client: UpstreamClientConfig::default(),
            credentials: CredentialsConfig::default(),
            server: ServerConfig::default(),
            log: LogConfig::default(),
            offline: false,
            tls: TlsConfig::default(),
            access: crate::access::AccessConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("./regcache-data"),
            tag_ttl: Duration::from_secs(300),
            max_manifest_size: ByteSize::mib(8),
            fill_timeout: Duration::from_secs(600),
            limits: crate::store::LimitsConfig::default(),
        }
    }
}

impl Default for UpstreamClientConfig {
    fn default() -> Self {
        UpstreamClientConfig {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            attempts: 3,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 4096,
            shutdown_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            plain_http: false,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// The spec's floor for manifests a registry must accept.
const MIN_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

impl Config {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Config, Error> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| Error::Parse(e.to_string()))?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads `path`, or the embedded defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        match path {
            None => Config::from_yaml(EMBEDDED),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::from_yaml(&text)
            }
        }
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, Error> {
        self.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!(
                    "`{}` is not an address of the form host:port, e.g. 127.0.0.1:5000",
                    self.listen
                ),
            )
        })
    }

    /// Whether `up` is served from the cache only (marked so, or everything is).
    pub fn is_offline(&self, up: &UpstreamConfig) -> bool {
        self.offline || up.offline
    }

    /// Checks everything serde cannot, naming the key and the reason.
    pub fn validate(&self) -> Result<(), Error> {
        let addr = self.listen_addr()?;
        // Serving other machines is an operator's explicit choice, twice over: how (TLS, or
        // plain HTTP said out loud) and to whom (access rules; public pull is a rule too).
        if !addr.ip().is_loopback() {
            if self.tls.cert_file.is_none() && !self.server.plain_http {
                return Err(invalid(
                    "server.plain_http",
                    format!(
                        "listen `{}` serves other machines: give it a certificate \
                         (tls.cert_file, tls.key_file), or set server.plain_http: true to serve \
                         them plain HTTP",
                        self.listen
                    ),
                ));
            }
            if !self.access.enabled {
                return Err(invalid(
                    "access.enabled",
                    format!(
                        "listen `{}` serves other machines, and without access control anyone \
                         reaching it could pull through it: set access.enabled: true with rules \
                         (an `anonymous` rule limited to the client networks, if that is what \
                         you want)",
                        self.listen
                    ),
                ));
            }
        }
        if self.cache.dir.as_os_str().is_empty() {
            return Err(invalid("cache.dir", "must not be empty"));
        }
        if self.cache.max_manifest_size.as_u64() < MIN_MANIFEST_SIZE {
            return Err(invalid(
                "cache.max_manifest_size",
                "must be at least 4MiB, the size every registry must accept",
            ));
        }
        if self.upstreams.is_empty() {
            return Err(invalid("upstreams", "at least one upstream is needed"));
        }
        let mut names = HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = |field: &str| format!("upstreams[{i}].{field}");
            let host: RegistryHost = up
                .name
                .parse()
                .map_err(|e| invalid(key("name"), format!("`{}`: {e}", up.name)))?;
            if !names.insert(host) {
                return Err(invalid(
                    key("name"),
                    format!("`{}` is configured twice", up.name),
                ));
            }
            validate_url(&up.url).map_err(|reason| invalid(key("url"), reason))?;
            if up.password.is_some() && up.username.is_none() {
                return Err(invalid(
                    key("username"),
                    "a password is set without a username",
                ));
            }
            if up.username.is_some() && up.password.is_none() {
                return Err(invalid(
                    key("password"),
                    "a username is set without a password",
                ));
            }
        }
        let default: RegistryHost = self.default_upstream.parse().map_err(|e| {
            invalid(
                "default_upstream",
                format!("`{}`: {e}", self.default_upstream),
            )
        })?;
        if !names.contains(&default) {
            return Err(invalid(
                "default_upstream",
                format!(
                    "`{}` is not one of the configured upstreams' names",
                    self.default_upstream
                ),
            ));
        }
        let hosts: Vec<RegistryHost> = names.iter().cloned().collect();
        self.cache
            .limits
            .validate(&hosts)
            .map_err(|(k, reason)| invalid(format!("cache.limits.{k}"), reason))?;
        if self.upstream_client.attempts == 0 {
            return Err(invalid("upstream_client.attempts", "must be at least 1"));
        }
        if self.upstream_client.connect_timeout.is_zero() {
            return Err(invalid(
                "upstream_client.connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.upstream_client.read_timeout.is_zero() {
            return Err(invalid(
                "upstream_client.read_timeout",
                "must be greater than zero",
            ));
        }
        self.credentials
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        self.tls
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.access
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        Ok(())
    }
}

fn validate_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("`{url}` must use http or https"));
    }
    if parsed.host_str().is_none() {
        return Err(format!("`{url}` has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials belong in username/password, not in the URL".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("`{url}` must not have a query or fragment"));
    }
    Ok(())
}

/// The `tls:` section of the config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (`tls.crt`); TLS is on when this is set.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (`tls.key`): PKCS#8, PKCS#1 or SEC1.
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle verifying client certificates; unset: no client certificates asked.
    pub client_ca_file: Option<PathBuf>,
    /// With a CA bundle: `optional` (clients may present a certificate) or `required`.
    pub client_auth: ClientAuth,
    /// How often the certificate and key files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth: ClientAuth::Optional,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// Checks what serde cannot; `(key, reason)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((format!("tls.{k}"), r.to_owned()));
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return err("key_file", "cert_file is set without key_file"),
            (None, Some(_)) => return err("cert_file", "key_file is set without cert_file"),
            _ => {}
        }
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            return err(
                "client_ca_file",
                "client certificates need TLS: set cert_file and key_file",
            );
        }
        if self.client_auth == ClientAuth::Required && self.client_ca_file.is_none() {
            return err("client_auth", "`required` needs client_ca_file");
        }
        if self.reload_interval.is_zero() {
            return err("reload_interval", "must be greater than zero");
        }
        Ok(())
    }
}

/// `credentials:` in the config file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    /// dockerconfigjson files, or directories holding `.dockerconfigjson` / `.dockercfg`
    /// (mounted Secrets). Earlier sources win over later ones for an equally specific key.
    pub files: Vec<PathBuf>,
    /// Re-read interval, the fallback when file events are missed.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Reading Secrets through the Kubernetes API instead of a mount.
    pub kubernetes: KubernetesConfig,
    /// Serve `GET /admin/credentials` (source, user name, kind and load time per upstream;
    /// values always masked). Off by default.
    pub admin_endpoint: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Read (and watch) Secrets through the API, with the pod's service account.
    pub enabled: bool,
    /// Empty: the pod's own namespace (from the service account).
    pub namespace: String,
    /// Secret names, or
    pub names: Vec<String>,
    /// a label selector.
    pub label_selector: String,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            files: Vec::new(),
            reload_interval: Duration::from_secs(30),
            kubernetes: KubernetesConfig::default(),
            admin_endpoint: false,
        }
    }
}

impl CredentialsConfig {
    /// `(key, reason)` of the first problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, file) in self.files.iter().enumerate() {
            if file.as_os_str().is_empty() {
                return Err((
                    format!("credentials.files[{i}]"),
                    "must not be empty".into(),
                ));
            }
        }
        if self.reload_interval < Duration::from_secs(1) {
            return Err((
                "credentials.reload_interval".into(),
                "must be at least 1s".into(),
            ));
        }
        let k = &self.kubernetes;
        if k.enabled && k.names.is_empty() && k.label_selector.is_empty() {
            return Err((
                "credentials.kubernetes".into(),
                "set names or label_selector: which Secrets to read".into(),
            ));
        }
        if k.names.iter().any(|n| n.is_empty()) {
            return Err((
                "credentials.kubernetes.names".into(),
                "a name is empty".into(),
            ));
        }
        if !k.names.is_empty() && !k.label_selector.is_empty() {
            return Err((
                "credentials.kubernetes".into(),
                "set names or label_selector, not both".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_the_embedded_default() {
        let shipped = Config::from_yaml(EMBEDDED).expect("config/regcache.yaml is valid");
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(Config::from_yaml("").expect("valid"), Config::default());
    }

    #[test]
    fn the_issue_shape_parses() {
        let c = Config::from_yaml(
            r#"
listen: "127.0.0.1:5000"
cache:
  dir: ./regcache-data
default_upstream: docker.io
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
  - name: ghcr.io
    url: https://ghcr.io
    username: bot
    password: secret
"#,
        )
        .expect("valid");
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(
            c.upstreams[1].password.as_ref().map(Secret::expose),
            Some("secret")
        );
        assert!(
            !format!("{c:?}").contains("secret"),
            "Debug must mask the password"
        );
    }

    #[test]
    fn offline_is_per_upstream_or_global() {
        let c = Config::from_yaml(
            "upstreams: [{name: docker.io, url: 'https://a', offline: true}, {name: ghcr.io, url: 'https://b'}]",
        )
        .expect("valid");
        assert!(c.is_offline(&c.upstreams[0]));
        assert!(!c.is_offline(&c.upstreams[1]));
        let c = Config::from_yaml("offline: true").expect("valid");
        assert!(c.is_offline(&c.upstreams[0]));
    }

    fn refused(yaml: &str) -> String {
        match Config::from_yaml(yaml) {
            Ok(_) => panic!("config should be refused:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn serving_other_machines_needs_a_transport_and_access_rules_said_out_loud() {
        let open = "listen: 0.0.0.0:5000\n";
        assert!(refused(open).contains("server.plain_http"));
        let plain = "listen: 0.0.0.0:5000\nserver: {plain_http: true}\n";
        assert!(refused(plain).contains("access.enabled"));
        let ruled = "listen: 0.0.0.0:5000\nserver: {plain_http: true}\naccess:\n  enabled: true\n  \
                     rules: [{who: [anonymous], networks: [10.0.0.0/8], repositories: ['**']}]\n";
        assert!(Config::from_yaml(ruled).is_ok());
        // Loopback is this machine only: the embedded defaults need neither.
        assert!(Config::from_yaml("listen: 127.0.0.1:5000\n").is_ok());
        assert!(Config::from_yaml("listen: '[::1]:5000'\n").is_ok());
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(refused("listen: nowhere").contains("`listen`"));
        assert!(refused("default_upstream: quay.io").contains("`default_upstream`"));
        let bad_url = refused("upstreams: [{name: docker.io, url: 'ftp://x'}]");
        assert!(bad_url.contains("upstreams[0].url"), "{bad_url}");
        let dup =
            "upstreams: [{name: docker.io, url: 'https://a'}, {name: docker.io, url: 'https://b'}]";
        assert!(refused(dup).contains("upstreams[1].name"));
        let lone_user = "upstreams: [{name: docker.io, url: 'https://a', username: u}]";
        assert!(refused(lone_user).contains("upstreams[0].password"));
        assert!(refused("cache: {max_manifest_size: 1KiB}").contains("cache.max_manifest_size"));
        assert!(refused("upstream_client: {attempts: 0}").contains("upstream_client.attempts"));
        assert!(
            refused("credentials: {reload_interval: 10ms}").contains("credentials.reload_interval")
        );
        assert!(refused("credentials: {files: ['']}").contains("credentials.files[0]"));
        assert!(
            refused("credentials: {kubernetes: {enabled: true}}")
                .contains("credentials.kubernetes")
        );
        assert!(
            refused("credentials: {kubernetes: {names: [a], label_selector: 'x=y'}}")
                .contains("credentials.kubernetes")
        );
        assert!(refused("credentials: {kubernets: {}}").contains("kubernets"));
        let watermarks = "cache: {limits: {high_watermark: 50%, low_watermark: 60%}}";
        assert!(refused(watermarks).contains("cache.limits.low_watermark"));
        let quota = "cache: {limits: {upstream_quotas: {quay.io: 1GiB}}}";
        assert!(refused(quota).contains("cache.limits.upstream_quotas"));
        assert!(refused("cache: {limits: {max_size: 120%}}").contains("cache.limits.max_size"));
        assert!(refused("cache: {limits: {max_size: lots}}").contains("lots"));
    }

    #[test]
    fn limits_take_sizes_shares_and_ages() {
        use crate::store::SizeLimit;
        let c = Config::from_yaml(
            "cache: {limits: {max_size: 50GiB, upstream_quotas: {docker.io: 20GiB}, max_unused_age: 30days}}",
        )
        .expect("valid");
        assert_eq!(c.cache.limits.max_size, Some(SizeLimit::Bytes(50 << 30)));
        assert_eq!(
            c.cache.limits.max_unused_age,
            Some(Duration::from_secs(30 * 86_400))
        );
        let c = Config::from_yaml("cache: {limits: {max_size: 80%}}").expect("valid");
        assert_eq!(c.cache.limits.max_size, Some(SizeLimit::Share(80.0)));
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        assert!(refused("lisen: 127.0.0.1:5000").contains("lisen"));
        assert!(
            refused("cache: {tag_ttl: soon}").contains("tag_ttl")
                || refused("cache: {tag_ttl: soon}").contains("soon")
        );
    }
}

//! The mirror under test, run in-process on 127.0.0.1:0 through `regcache::serve`, the way
//! `regcache serve` runs it, with a config written as an operator would write it.
//!
//! A [`MirrorBuilder`] keeps the config, so a test can stop a mirror and start another one on the
//! same cache directory to see what survives a restart. Every wait here is bounded: a mirror that
//! hangs fails the test instead of stalling the suite.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest a single request to the mirror (headers and whole body) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest the mirror may take to drain and stop once asked to.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
struct UpstreamEntry {
    name: String,
    url: String,
    credentials: Option<(String, String)>,
    offline: bool,
}

/// The mirror's configuration, as YAML, plus what starting it needs.
#[derive(Clone, Debug)]
pub struct MirrorBuilder {
    dir: PathBuf,
    upstreams: Vec<UpstreamEntry>,
    default_upstream: Option<String>,
    tag_ttl: String,
    attempts: u32,
    read_timeout: String,
    fill_timeout: String,
    offline: bool,
    credential_files: Vec<PathBuf>,
    credentials_admin: bool,
    limits: Vec<(String, String)>,
    access: Option<String>,
    tls: Option<String>,
}

impl MirrorBuilder {
    /// A mirror caching under `dir`, with short retry backoff so retry tests stay fast.
    pub fn new(dir: &Path) -> MirrorBuilder {
        MirrorBuilder {
            dir: dir.to_owned(),
            upstreams: Vec::new(),
            default_upstream: None,
            tag_ttl: "5m".to_owned(),
            attempts: 3,
            read_timeout: "5s".to_owned(),
            fill_timeout: "10m".to_owned(),
            offline: false,
            credential_files: Vec::new(),
            credentials_admin: false,
            limits: Vec::new(),
            access: None,
            tls: None,
        }
    }

    /// An anonymous upstream named as clients name it (`ns=`, path prefix).
    pub fn upstream(mut self, name: &str, url: &str) -> MirrorBuilder {
        self.upstreams.push(UpstreamEntry {
            name: name.to_owned(),
            url: url.to_owned(),
            credentials: None,
            offline: false,
        });
        self
    }

    /// An upstream the mirror logs in to with static credentials.
    pub fn upstream_with_credentials(
        mut self,
        name: &str,
        url: &str,
        username: &str,
        password: &str,
    ) -> MirrorBuilder {
        self.upstreams.push(UpstreamEntry {
            name: name.to_owned(),
            url: url.to_owned(),
            credentials: Some((username.to_owned(), password.to_owned())),
            offline: false,
        });
        self
    }

    /// The upstream for requests with neither `ns` nor a host prefix; the first one otherwise.
    pub fn default_upstream(mut self, name: &str) -> MirrorBuilder {
        self.default_upstream = Some(name.to_owned());
        self
    }

    /// `cache.tag_ttl`, in the config's human-readable form (`600ms`, `5m`).
    pub fn tag_ttl(mut self, ttl: &str) -> MirrorBuilder {
        self.tag_ttl = ttl.to_owned();
        self
    }

    /// The global `offline` switch: every upstream is served from the cache only.
    pub fn offline(mut self, offline: bool) -> MirrorBuilder {
        self.offline = offline;
        self
    }

    /// Marks the upstream named `name` `offline: true`.
    pub fn upstream_offline(mut self, name: &str) -> MirrorBuilder {
        for up in self.upstreams.iter_mut().filter(|u| u.name == name) {
            up.offline = true;
        }
        self
    }

    /// `upstream_client.attempts`.
    pub fn attempts(mut self, attempts: u32) -> MirrorBuilder {
        self.attempts = attempts;
        self
    }

    /// `upstream_client.read_timeout`: the longest upstream silence the mirror tolerates.
    pub fn read_timeout(mut self, timeout: &str) -> MirrorBuilder {
        self.read_timeout = timeout.to_owned();
        self
    }

    /// `cache.fill_timeout`: how long a download goes on with no client reading it.
    pub fn fill_timeout(mut self, timeout: &str) -> MirrorBuilder {
        self.fill_timeout = timeout.to_owned();
        self
    }

    /// `credentials.files`: a dockerconfigjson file or a mounted Secret directory.
    pub fn credentials_from(mut self, path: &Path) -> MirrorBuilder {
        self.credential_files.push(path.to_owned());
        self
    }

    /// `credentials.admin_endpoint`.
    pub fn credentials_admin_endpoint(mut self, on: bool) -> MirrorBuilder {
        self.credentials_admin = on;
        self
    }

    /// One `cache.limits` key (`max_size`, `high_watermark`, `check_interval`, ...).
    pub fn limit(mut self, key: &str, value: &str) -> MirrorBuilder {
        self.limits.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The `access:` section, as YAML indented by two spaces under it.
    pub fn access(mut self, yaml: &str) -> MirrorBuilder {
        self.access = Some(yaml.to_owned());
        self
    }

    /// The `tls:` section, as YAML indented by two spaces under it.
    pub fn tls(mut self, yaml: &str) -> MirrorBuilder {
        self.tls = Some(yaml.to_owned());
        self
    }

    pub fn cache_dir(&self) -> &Path {
        &self.dir
    }

    /// The config file this builder stands for.
    pub fn yaml(&self) -> String {
        // JSON strings are YAML strings, and quoting keeps `127.0.0.1:5000` a string.
        let q = |s: &str| serde_json::to_string(s).expect("a string always serializes");
        let default = self
            .default_upstream
            .clone()
            .or_else(|| self.upstreams.first().map(|u| u.name.clone()))
            .expect("a mirror needs at least one upstream");
        let mut yaml = format!(
            "listen: \"127.0.0.1:0\"\n\
             cache:\n  dir: {dir}\n  tag_ttl: {ttl}\n  fill_timeout: {fill_timeout}\n{limits}\
             default_upstream: {default}\n\
             upstream_client:\n  connect_timeout: 2s\n  read_timeout: {read_timeout}\n  attempts: {attempts}\n  retry_backoff: 10ms\n\
             server:\n  shutdown_timeout: 2s\n  header_read_timeout: 5s\n",
            dir = q(&self.dir.to_string_lossy()),
            ttl = q(&self.tag_ttl),
            default = q(&default),
            attempts = self.attempts,
            read_timeout = q(&self.read_timeout),
            fill_timeout = q(&self.fill_timeout),
            limits = if self.limits.is_empty() {
                String::new()
            } else {
                let mut l = "  limits:\n".to_owned();
                for (k, v) in &self.limits {
                    l.push_str(&format!("    {k}: {}\n", q(v)));
                }
                l
            },
        );
        // The periodic re-read is long, so a test sees the file watch (or a 401's re-read) work.
        yaml.push_str(&format!(
            "credentials:\n  reload_interval: 1h\n  admin_endpoint: {}\n  files: [{}]\n",
            self.credentials_admin,
            self.credential_files
                .iter()
                .map(|p| q(&p.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        yaml.push_str(&format!("offline: {}\n", self.offline));
        yaml.push_str("upstreams:\n");
        for up in &self.upstreams {
            yaml.push_str(&format!(
                "  - name: {}\n    url: {}\n",
                q(&up.name),
                q(&up.url)
            ));
            if up.offline {
                yaml.push_str("    offline: true\n");
            }
            if let Some((user, pass)) = &up.credentials {
                yaml.push_str(&format!(
                    "    username: {}\n    password: {}\n",
                    q(user),
                    q(pass)
                ));
            }
        }
        if let Some(tls) = &self.tls {
            yaml.push_str("tls:\n");
            yaml.push_str(tls);
        }
        if let Some(access) = &self.access {
            yaml.push_str("access:\n");
            yaml.push_str(access);
        }
        yaml
    }

    /// Binds 127.0.0.1:0 and serves the mirror on the current runtime. The listener is bound
    /// before this returns, so requests may be sent at once (they wait for the store to open).
    pub async fn start(&self) -> Mirror {
        let config = regcache::config::Config::from_yaml(&self.yaml())
            .unwrap_or_else(|e| panic!("the test config is valid: {e}\n{}", self.yaml()));
        if std::env::var_os("RUST_LOG").is_some() {
            regcache::telemetry::init(&config.log);
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding 127.0.0.1:0 for the mirror");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(regcache::serve(listener, config, async move {
            // A dropped sender stops the mirror too.
            let _ = stopped.await;
        }));
        Mirror {
            addr,
            stop: Some(stop),
            task: Some(task),
            client: client(),
        }
    }
}

/// A plain HTTP client as a registry client would use it: no proxy, no redirects followed.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("a plain HTTP client builds")
}

/// A running mirror; dropping it asks it to stop, [`Mirror::stop`] waits until it has.
pub struct Mirror {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), regcache::Error>>>,
    client: reqwest::Client,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Mirror {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// GET `path` (with any query) on the mirror.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, &[]).await
    }

    pub async fn head(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::HEAD, path, &[]).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.url()));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("the mirror answers {method} {path}: {e}"))
    }

    /// The Prometheus text at `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), reqwest::StatusCode::OK, "GET /metrics");
        response.text().await.expect("the metrics body arrives")
    }

    /// The sum of every series of `metric` whose labels include all of `labels`.
    pub async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, metric, labels)
    }

    /// Asks the mirror to stop (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops accepting, lets in-flight responses finish, and returns once `serve` has.
    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            let served = tokio::time::timeout(STOP_TIMEOUT, task)
                .await
                .expect("the mirror stops within its shutdown timeout")
                .expect("the mirror's task did not panic");
            served.expect("the mirror served without error");
        }
    }
}

/// The sum of every sample of `metric` in a Prometheus text exposition whose labels include all
/// of `labels` (0 when there is none).
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, series_labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = name == metric
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Metric family names present in an exposition (from its samples, not its comments).
pub fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let series = line.rsplit_once(' ')?.0;
            Some(series.split('{').next()?.to_owned())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

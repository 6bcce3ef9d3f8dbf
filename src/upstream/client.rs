//! One configured upstream: a reqwest client with connect and read timeouts, retries with
//! backoff for idempotent requests that failed to connect or got a 5xx, the `WWW-Authenticate`
//! challenge flow (Bearer token per scope, or Basic), and body reads under a size cap.
//!
//! Credentials: the static `username`/`password` of the upstream's config when set, otherwise
//! the best match in the live `credentials::Credentials` set, asked per request (by upstream
//! host and repository). A `registrytoken` is sent as the bearer token itself; Basic
//! credentials go to the registry (Basic scheme) or to the token realm its own challenge named;
//! an `identitytoken` is exchanged at that realm (OAuth2 `refresh_token` grant). Tokens are
//! cached per credential version, and those of a replaced credential are dropped. A 401 makes
//! the set re-read its files (a rotated Secret may be on disk before its file event arrives)
//! and, within the grace period after a rotation, the replaced credential is tried once, so a
//! rotation fails no request that either credential would have served.
//!
//! Redirects (Docker Hub sends blob GETs to a CDN) are followed by reqwest, which drops
//! `Authorization` when the next hop is another host or port, so the registry's credentials and
//! tokens never reach the object store. Credentials are never sent to a plain-http token realm
//! of an https registry.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::challenge::{self, Challenge, Token, TokenResponse};
use crate::config::{UpstreamClientConfig, UpstreamConfig};
use crate::credentials::{Credential, Credentials, Resolution};
use crate::metrics::Metrics;
use crate::oci::{Digest, RegistryHost, RepoName, media_type::Accept};

/// Credentials a request presents at most before it gives up on a refusing upstream.
const LOGIN_ATTEMPTS: usize = 4;

/// How long requests present the replaced credential first after the registry refused the
/// current one and accepted it; then the current one is tried again.
const PREFER_REPLACED_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream configuration: {0}")]
    Config(String),
    /// The upstream is configured `offline`: it is never contacted.
    #[error("upstream {upstream} is offline: only cached content is served")]
    Offline { upstream: RegistryHost },
    #[error("upstream {upstream} could not be reached: {source}")]
    Unreachable {
        upstream: RegistryHost,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream {upstream} answered {status}")]
    Status {
        upstream: RegistryHost,
        status: StatusCode,
        retry_after: Option<HeaderValue>,
    },
    #[error("upstream {upstream} token endpoint: {reason}")]
    Token {
        upstream: RegistryHost,
        reason: String,
        /// The endpoint answered 401 or 403: it refused the credentials.
        refused: bool,
    },
    #[error("upstream {upstream} sent more than {limit} bytes where a small document was expected")]
    TooLarge { upstream: RegistryHost, limit: u64 },
    #[error("upstream {upstream} sent an invalid response: {reason}")]
    Invalid {
        upstream: RegistryHost,
        reason: String,
    },
    #[error("upstream {upstream} broke off a response body: {source}")]
    Body {
        upstream: RegistryHost,
        #[source]
        source: reqwest::Error,
    },
}

/// How the upstream wants to be authenticated, learned from its first challenge so later
/// requests carry credentials up front instead of collecting a 401 each time.
#[derive(Clone, Debug)]
enum Scheme {
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// A credential as one request presents it. `id` is its version in the credential set (0 for
/// the config file's static credentials); cached tokens are keyed by it.
#[derive(Clone)]
struct Login {
    id: u64,
    credential: Credential,
}

impl Login {
    fn from_resolved(resolved: Option<&Arc<crate::credentials::Loaded>>) -> Option<Login> {
        resolved.map(|l| Login {
            id: l.id,
            credential: l.credential.clone(),
        })
    }
}

pub struct Upstream {
    name: RegistryHost,
    base: String,
    http: reqwest::Client,
    /// `upstreams[].username/password`: when set, used for every request.
    static_login: Option<Login>,
    /// Mounted-secret credentials, used when there is no static login.
    credentials: Arc<Credentials>,
    /// The names a credential key may use for this registry: its configured name and the
    /// URL's `host[:port]`.
    hosts: Vec<String>,
    /// Credential versions whose cached tokens were dropped after a rotation.
    retired: std::sync::Mutex<HashSet<u64>>,
    /// While a Secret is ahead of its registry: current credential id refused -> the replaced
    /// one's id that was accepted instead, and until when requests present that one first.
    ahead: std::sync::Mutex<HashMap<u64, (u64, Instant)>>,
    scheme: Mutex<Scheme>,
    /// Bearer tokens by `"{login id}|{scope}"`.
    tokens: moka::future::Cache<String, Token>,
    attempts: u32,
    backoff: Duration,
    metrics: Arc<Metrics>,
    offline: bool,
}

/// A manifest response: the headers the client must see as the upstream sent them, and the
/// body for GET.
#[derive(Debug)]
pub struct ManifestResponse {
    pub media_type: Option<String>,
    pub digest: Option<Digest>,
    pub length: Option<u64>,
    pub body: Option<Bytes>,
}

/// A small pass-through document (tag list, referrers index).
#[derive(Debug)]
pub struct RawResponse {
    pub content_type: Option<HeaderValue>,
    pub link: Option<HeaderValue>,
    pub body: Bytes,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        client: &UpstreamClientConfig,
        credentials: Arc<Credentials>,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, Error> {
        let name: RegistryHost = config
            .name
            .parse()
            .map_err(|_| Error::Config(format!("`{}` is not a registry host", config.name)))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(client.connect_timeout)
            .read_timeout(client.read_timeout)
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(10));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Config(format!("cannot read ca_file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::Config(format!(
                    "ca_file {} is not a PEM bundle: {e}",
                    path.display()
                ))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        let static_login = match (&config.username, &config.password) {
            (Some(user), Some(password)) => Some(Login {
                id: 0,
                credential: Credential::Basic {
                    username: user.clone(),
                    password: password.clone(),
                },
            }),
            _ => None,
        };
        let hosts = crate::credentials::upstream_hosts(config);
        Ok(Upstream {
            name,
            base: config.url.trim_end_matches('/').to_owned(),
            http,
            static_login,
            credentials,
            hosts,
            retired: std::sync::Mutex::new(HashSet::new()),
            ahead: std::sync::Mutex::new(HashMap::new()),
            scheme: Mutex::new(Scheme::Unknown),
            tokens: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(3600))
                .support_invalidation_closures()
                .build(),
            attempts: client.attempts.max(1),
            backoff: client.retry_backoff,
            metrics,
            offline: config.offline,
        })
    }

    pub fn name(&self) -> &RegistryHost {
        &self.name
    }

    /// Served from the cache only: nothing ever dials it.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Marks the upstream offline (the global `offline` switch).
    pub(super) fn set_offline(&mut self) {
        self.offline = true;
    }

    fn url(&self, repo: &RepoName, rest: &str) -> String {
        // Only validated names, digests and tags are joined here, so nothing needs escaping.
        format!("{}/v2/{}/{}", self.base, repo, rest)
    }

    /// GET or HEAD a manifest, forwarding the client's `Accept`.
    pub async fn manifest(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &str,
        accept: &Accept,
        limit: u64,
    ) -> Result<ManifestResponse, Error> {
        let mut headers = HeaderMap::new();
        if !accept.ranges().is_empty() {
            let joined = accept.ranges().join(", ");
            if let Ok(v) = HeaderValue::from_str(&joined) {
                headers.insert(header::ACCEPT, v);
            }
        }
        let is_get = method == Method::GET;
        let resp = self
            .send(
                method,
                &self.url(repo, &format!("manifests/{reference}")),
                repo,
                headers,
            )
            .await?;
        let resp = self.expect_success(resp)?;
        let headers = resp.headers();
        let media_type = header_str(headers, header::CONTENT_TYPE).map(str::to_owned);
        let digest = match header_str(headers, "docker-content-digest") {
            Some(d) => Some(
                d.parse::<Digest>()
                    .map_err(|e| self.invalid(format!("Docker-Content-Digest: {e}")))?,
            ),
            None => None,
        };
        let length = header_str(headers, header::CONTENT_LENGTH).and_then(|l| l.parse().ok());
        let body = if is_get {
            Some(self.read_capped(resp, limit).await?)
        } else {
            None
        };
        Ok(ManifestResponse {
            media_type,
            digest,
            length,
            body,
        })
    }

    /// Starts a blob download at byte `offset` (a resume when non-zero). The response is 200,
    /// or 206 when resuming.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, Error> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                .expect("digits are a valid header value");
            headers.insert(header::RANGE, range);
        }
        let resp = self
            .send(
                Method::GET,
                &self.url(repo, &format!("blobs/{digest}")),
                repo,
                headers,
            )
            .await?;
        let resp = self.expect_success(resp)?;
        if offset > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(self.invalid("a resumed download was not answered with 206".into()));
        }
        Ok(resp)
    }

    /// Whether `repo` has the blob, and its size. Some registries (chained proxies) answer HEAD
    /// with 404 until a blob was fetched once, so a 404 is confirmed with a GET whose body is
    /// not read.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, Error> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self
            .send(Method::HEAD, &url, repo, HeaderMap::new())
            .await?;
        let resp = if resp.status() == StatusCode::NOT_FOUND {
            self.send(Method::GET, &url, repo, HeaderMap::new()).await?
        } else {
            resp
        };
        let resp = self.expect_success(resp)?;
        header_str(resp.headers(), header::CONTENT_LENGTH)
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| self.invalid("blob response without Content-Length".into()))
    }

    /// A small document passed through (tag list, referrers), with allowed query parameters.
    pub async fn raw(
        &self,
        repo: &RepoName,
        rest: &str,
        query: &[(&str, String)],
        limit: u64,
    ) -> Result<RawResponse, Error> {
        let mut url =
            reqwest::Url::parse(&self.url(repo, rest)).map_err(|e| Error::Config(e.to_string()))?;
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let resp = self
            .send(Method::GET, url.as_str(), repo, HeaderMap::new())
            .await?;
        let resp = self.expect_success(resp)?;
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let link = resp.headers().get(header::LINK).cloned();
        let body = self.read_capped(resp, limit).await?;
        Ok(RawResponse {
            content_type,
            link,
            body,
        })
    }

    fn invalid(&self, reason: String) -> Error {
        self.metrics
            .upstream_errors
            .with_label_values(&[self.name.as_str(), "invalid"])
            .inc();
        Error::Invalid {
            upstream: self.name.clone(),
            reason,
        }
    }

    fn expect_success(&self, resp: reqwest::Response) -> Result<reqwest::Response, Error> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status != StatusCode::NOT_FOUND {
            self.metrics
                .upstream_errors
                .with_label_values(&[self.name.as_str(), "status"])
                .inc();
        }
        Err(Error::Status {
            upstream: self.name.clone(),
            status,
            retry_after: resp.headers().get(header::RETRY_AFTER).cloned(),
        })
    }

    /// Reads a whole body, refusing anything over `limit` bytes without buffering past it.
    pub async fn read_capped(
        &self,
        mut resp: reqwest::Response,
        limit: u64,
    ) -> Result<Bytes, Error> {
        if resp.content_length().is_some_and(|l| l > limit) {
            return Err(Error::TooLarge {
                upstream: self.name.clone(),
                limit,
            });
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.body_error(e))? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(Error::TooLarge {
                    upstream: self.name.clone(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    pub fn body_error(&self, source: reqwest::Error) -> Error {
        let kind = if source.is_timeout() {
            "timeout"
        } else {
            "body"
        };
        self.metrics
            .upstream_errors
            .with_label_values(&[self.name.as_str(), kind])
            .inc();
        Error::Body {
            upstream: self.name.clone(),
            source,
        }
    }

    /// The login for a request to `repo`, and the one it replaced if still within the grace
    /// period. Drops the cached tokens of a replaced credential the first time it is seen.
    fn login(&self, repo: &RepoName) -> (Option<Login>, Option<Login>) {
        if let Some(login) = &self.static_login {
            return (Some(login.clone()), None);
        }
        let hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        let Resolution { current, previous } = self.credentials.resolve(&hosts, repo.as_str());
        if let Some(previous) = &previous {
            let newly_retired = self
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(previous.id);
            if newly_retired {
                let prefix = format!("{}|", previous.id);
                // Only fails without `support_invalidation_closures`, which the builder sets.
                let _ = self
                    .tokens
                    .invalidate_entries_if(move |key, _| key.starts_with(&prefix));
                tracing::info!(upstream = %self.name, key = %previous.key, "credentials changed; dropped the tokens obtained with the old ones");
            }
        }
        (
            Login::from_resolved(current.as_ref()),
            Login::from_resolved(previous.as_ref()),
        )
    }

    /// Sends an idempotent request with the credential that applies to `repo`. Each time the
    /// upstream refuses, the credential files are re-read and the request tried again with,
    /// in order: a credential it has not presented yet (rotated meanwhile), the one the
    /// current credential replaced while that is within its grace period, or the current one
    /// once more when the last attempt presented another (the registry may have switched in
    /// between). At most `LOGIN_ATTEMPTS` attempts, and more than one only when the upstream
    /// refuses credentials that come from a Secret. Once the replaced credential was accepted
    /// where the current one was refused, requests present it first for a while.
    async fn send(
        &self,
        method: Method,
        url: &str,
        repo: &RepoName,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        // The one place requests leave: an offline upstream is never dialled, whoever asks.
        if self.offline {
            return Err(Error::Offline {
                upstream: self.name.clone(),
            });
        }
        let (current, previous) = self.login(repo);
        let mut current_id = current.as_ref().map(|l| l.id);
        let mut sent = match previous {
            Some(old) if self.registry_is_behind(current.as_ref(), &old) => Some(old),
            _ => current,
        };
        let mut last = self
            .send_as(sent.as_ref(), method.clone(), url, repo, headers.clone())
            .await;
        if self.static_login.is_some() || !self.credentials.has_sources() {
            return last;
        }
        let id = |l: &Option<Login>| l.as_ref().map(|l| l.id);
        let mut tried = vec![id(&sent)];
        while is_refused(&last, &self.base) && tried.len() < LOGIN_ATTEMPTS {
            self.credentials.refresh(Instant::now()).await;
            let (current, previous) = self.login(repo);
            current_id = id(&current);
            let next = if current.is_some() && !tried.contains(&id(&current)) {
                tracing::info!(upstream = %self.name, "the upstream refused the credentials; retrying with the ones just re-read");
                current
            } else if let Some(old) = previous.filter(|p| !tried.contains(&Some(p.id))) {
                tracing::info!(upstream = %self.name, "the upstream refused the current credentials; retrying once with the ones they replaced");
                Some(old)
            } else if current.is_some() && id(&current) != id(&sent) {
                // Refused with the old credential: the registry may have switched to the
                // current one while this request was trying the old.
                tracing::info!(upstream = %self.name, "the upstream refused the replaced credentials too; retrying once more with the current ones");
                current
            } else {
                break;
            };
            tried.push(id(&next));
            drop(last);
            last = self
                .send_as(next.as_ref(), method.clone(), url, repo, headers.clone())
                .await;
            sent = next;
        }
        // Only an answer tells which credential the registry takes; a failed connection does not.
        if last.is_ok() && !is_refused(&last, &self.base) {
            self.remember_accepted(id(&sent), current_id, &tried);
        }
        last
    }

    /// Whether `old` was accepted lately where the current credential was refused: the Secret
    /// is ahead of its registry, and presenting the current one on every request would be
    /// refused each time (registries count failed logins, and some lock the account).
    fn registry_is_behind(&self, current: Option<&Login>, old: &Login) -> bool {
        let Some(current) = current else {
            return false;
        };
        let ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        ahead
            .get(&current.id)
            .is_some_and(|&(accepted, until)| accepted == old.id && until > Instant::now())
    }

    /// After a request succeeded with `accepted`: if that was the replaced credential after
    /// the current one was refused, present it first for `PREFER_REPLACED_FOR`; if it was the
    /// current one, the registry has caught up.
    fn remember_accepted(
        &self,
        accepted: Option<u64>,
        current: Option<u64>,
        tried: &[Option<u64>],
    ) {
        let (Some(accepted), Some(current)) = (accepted, current) else {
            return;
        };
        let mut ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        if accepted == current {
            ahead.remove(&current);
        } else if tried.contains(&Some(current)) {
            let now = Instant::now();
            ahead.retain(|_, &mut (_, until)| until > now);
            ahead.insert(current, (accepted, now + PREFER_REPLACED_FOR));
        }
    }

    /// Sends with `login`: answers one authentication challenge, retries connection errors and
    /// 5xx with doubling backoff, and returns the last response whatever its status.
    async fn send_as(
        &self,
        login: Option<&Login>,
        method: Method,
        url: &str,
        repo: &RepoName,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        let scope = format!("repository:{repo}:pull");
        let mut attempt = 0;
        let mut answered_challenge = false;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(auth) = self.authorization(login, &scope, false).await? {
                request = request.header(header::AUTHORIZATION, auth);
            }
            let started = Instant::now();
            let result = request.send().await;
            self.metrics
                .upstream_duration
                .with_label_values(&[self.name.as_str()])
                .observe(started.elapsed().as_secs_f64());
            let resp = match result {
                Ok(resp) => resp,
                Err(source) => {
                    let kind = if source.is_timeout() {
                        "timeout"
                    } else {
                        "connect"
                    };
                    self.count("error");
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[self.name.as_str(), kind])
                        .inc();
                    tracing::warn!(upstream = %self.name, attempt, error = %source, "upstream request failed");
                    if attempt < self.attempts {
                        tokio::time::sleep(self.backoff * 2u32.saturating_pow(attempt - 1)).await;
                        continue;
                    }
                    return Err(Error::Unreachable {
                        upstream: self.name.clone(),
                        source: source.without_url(),
                    });
                }
            };
            let status = resp.status();
            self.count(status.as_str());
            // A challenge counts only from the registry itself: a 401 from a host it redirected
            // to (a blob CDN) must not make us send its credentials to a realm that host names.
            if status == StatusCode::UNAUTHORIZED
                && !answered_challenge
                && same_origin(resp.url(), &self.base)
            {
                answered_challenge = true;
                let challenge = resp
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(challenge::parse);
                if let Some(challenge) = challenge
                    && self.learn(challenge, login, &scope).await?
                {
                    attempt -= 1;
                    continue;
                }
                return Ok(resp);
            }
            if status.is_server_error() && attempt < self.attempts {
                tracing::warn!(upstream = %self.name, attempt, %status, "upstream failed, retrying");
                tokio::time::sleep(self.backoff * 2u32.saturating_pow(attempt - 1)).await;
                continue;
            }
            return Ok(resp);
        }
    }

    fn count(&self, status: &str) {
        self.metrics
            .upstream_requests
            .with_label_values(&[self.name.as_str(), status])
            .inc();
    }

    /// Records a challenge; true when a retry now has something new to present.
    async fn learn(
        &self,
        challenge: Challenge,
        login: Option<&Login>,
        scope: &str,
    ) -> Result<bool, Error> {
        let retry = match (&challenge, login.map(|l| &l.credential)) {
            // A registry token was refused as it is; sending it again changes nothing.
            (_, Some(Credential::RegistryToken { .. })) => false,
            // Without a password a Basic challenge cannot be answered.
            (Challenge::Basic, Some(Credential::Basic { .. })) => true,
            (Challenge::Basic, _) => false,
            (Challenge::Bearer { .. }, _) => true,
        };
        *self.scheme.lock().await = match challenge {
            Challenge::Basic => Scheme::Basic,
            Challenge::Bearer { realm, service } => Scheme::Bearer { realm, service },
        };
        if retry && matches!(*self.scheme.lock().await, Scheme::Bearer { .. }) {
            // The token we sent (if any) was refused: fetch a fresh one.
            self.tokens.invalidate(&token_key(login, scope)).await;
            self.authorization(login, scope, true).await?;
        }
        Ok(retry)
    }

    /// The `Authorization` value for `scope` under the scheme learned so far.
    async fn authorization(
        &self,
        login: Option<&Login>,
        scope: &str,
        fresh: bool,
    ) -> Result<Option<HeaderValue>, Error> {
        if let Some(Credential::RegistryToken { token }) = login.map(|l| &l.credential) {
            return Ok(Some(secret_header(&format!("Bearer {}", token.expose()))));
        }
        let scheme = self.scheme.lock().await.clone();
        match scheme {
            Scheme::Unknown => Ok(None),
            Scheme::Basic => Ok(login.and_then(basic).map(|b| secret_header(&b))),
            Scheme::Bearer { realm, service } => {
                let key = token_key(login, scope);
                if !fresh
                    && let Some(token) = self.tokens.get(&key).await
                    && token.expires_at > Instant::now()
                {
                    return Ok(Some(secret_header(&format!(
                        "Bearer {}",
                        token.value.expose()
                    ))));
                }
                let token = self
                    .fetch_token(&realm, service.as_deref(), scope, login)
                    .await?;
                let value = secret_header(&format!("Bearer {}", token.value.expose()));
                self.tokens.insert(key, token).await;
                Ok(Some(value))
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        login: Option<&Login>,
    ) -> Result<Token, Error> {
        let token_error_as = |reason: String, refused: bool| {
            self.metrics
                .upstream_errors
                .with_label_values(&[self.name.as_str(), "token"])
                .inc();
            Error::Token {
                upstream: self.name.clone(),
                reason,
                refused,
            }
        };
        let token_error = |reason: String| token_error_as(reason, false);
        let mut url = reqwest::Url::parse(realm)
            .map_err(|_| token_error("the challenge's realm is not a URL".into()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(token_error(
                "the challenge's realm is not an http(s) URL".into(),
            ));
        }
        if login.is_some() && url.scheme() == "http" && self.base.starts_with("https:") {
            return Err(token_error(
                "the challenge's realm is plain http; credentials are not sent over it".into(),
            ));
        }
        let credential = login.map(|l| &l.credential);
        let request = match credential {
            Some(Credential::IdentityToken { token, .. }) => {
                // OAuth2 refresh-token grant, as docker and containerd send it.
                let mut form = form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", token.expose())
                    .append_pair("client_id", "regcache")
                    .append_pair("scope", scope);
                if let Some(service) = service {
                    form.append_pair("service", service);
                }
                self.http
                    .post(url)
                    .header(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/x-www-form-urlencoded"),
                    )
                    .body(form.finish())
            }
            _ => {
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", scope);
                    if let Some(user) = credential.and_then(Credential::username) {
                        query.append_pair("account", user);
                    }
                }
                let mut request = self.http.get(url);
                if let Some(basic) = login.and_then(basic) {
                    request = request.header(header::AUTHORIZATION, secret_header(&basic));
                }
                request
            }
        };
        let resp = request
            .send()
            .await
            .map_err(|e| token_error(format!("unreachable: {}", e.without_url())))?;
        if !resp.status().is_success() {
            let refused = matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            );
            return Err(token_error_as(
                format!("answered {}", resp.status()),
                refused,
            ));
        }
        let body = self.read_capped(resp, 1 << 20).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| token_error("the token response is not JSON".into()))?;
        parsed
            .into_token(Instant::now())
            .ok_or_else(|| token_error("the token response has no token".into()))
    }
}

/// Whether the upstream (or its token endpoint) refused the credentials presented. A 401 from
/// a host the registry redirected to (an expired signed CDN URL) is not a refusal of them.
fn is_refused(result: &Result<reqwest::Response, Error>, base: &str) -> bool {
    match result {
        Ok(resp) => resp.status() == StatusCode::UNAUTHORIZED && same_origin(resp.url(), base),
        Err(Error::Token { refused, .. }) => *refused,
        Err(_) => false,
    }
}

/// Where a bearer token for `scope` obtained with `login` is cached.
fn token_key(login: Option<&Login>, scope: &str) -> String {
    format!("{}|{scope}", login.map_or(0, |l| l.id))
}

/// `Basic base64(user:password)` for a Basic credential.
fn basic(login: &Login) -> Option<String> {
    match &login.credential {
        Credential::Basic { username, password } => {
            let raw = format!("{username}:{}", password.expose());
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ))
        }
        Credential::IdentityToken { .. } | Credential::RegistryToken { .. } => None,
    }
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header value marked sensitive, so hyper and reqwest keep it out of their debug output.
fn secret_header(value: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

/// Whether `url` is on the same scheme, host and port as the upstream's base URL.
fn same_origin(url: &reqwest::Url, base: &str) -> bool {
    reqwest::Url::parse(base).is_ok_and(|b| {
        b.scheme() == url.scheme()
            && b.host_str() == url.host_str()
            && b.port_or_known_default() == url.port_or_known_default()
    })
}

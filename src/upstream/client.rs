//! One configured upstream: a reqwest client with connect and read timeouts, retries with
//! backoff for idempotent requests that failed to connect or got a 5xx, the `WWW-Authenticate`
//! challenge flow (Bearer token per scope, or Basic), and body reads under a size cap.
//!
//! Redirects (Docker Hub sends blob GETs to a CDN) are followed by reqwest, which drops
//! `Authorization` when the next hop is another host or port, so the registry's credentials and
//! tokens never reach the object store.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::challenge::{self, Challenge, Token, TokenResponse};
use crate::config::{Secret, UpstreamClientConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::{Digest, RegistryHost, RepoName, media_type::Accept};

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

pub struct Upstream {
    name: RegistryHost,
    base: String,
    http: reqwest::Client,
    credentials: Option<(String, Secret)>,
    scheme: Mutex<Scheme>,
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
        let credentials = match (&config.username, &config.password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            _ => None,
        };
        Ok(Upstream {
            name,
            base: config.url.trim_end_matches('/').to_owned(),
            http,
            credentials,
            scheme: Mutex::new(Scheme::Unknown),
            tokens: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(3600))
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

    /// Sends an idempotent request: answers one authentication challenge, retries connection
    /// errors and 5xx with doubling backoff, and returns the last response whatever its status.
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
        let scope = format!("repository:{repo}:pull");
        let mut attempt = 0;
        let mut answered_challenge = false;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(auth) = self.authorization(&scope, false).await? {
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
            if status == StatusCode::UNAUTHORIZED && !answered_challenge {
                answered_challenge = true;
                let challenge = resp
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(challenge::parse);
                if let Some(challenge) = challenge
                    && self.learn(challenge, &scope).await?
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
    async fn learn(&self, challenge: Challenge, scope: &str) -> Result<bool, Error> {
        let retry = match &challenge {
            // Without credentials a Basic challenge cannot be answered.
            Challenge::Basic => self.credentials.is_some(),
            Challenge::Bearer { .. } => true,
        };
        *self.scheme.lock().await = match challenge {
            Challenge::Basic => Scheme::Basic,
            Challenge::Bearer { realm, service } => Scheme::Bearer { realm, service },
        };
        if retry && matches!(*self.scheme.lock().await, Scheme::Bearer { .. }) {
            // The token we sent (if any) was refused: fetch a fresh one.
            self.tokens.invalidate(scope).await;
            self.authorization(scope, true).await?;
        }
        Ok(retry)
    }

    /// The `Authorization` value for `scope` under the scheme learned so far.
    async fn authorization(&self, scope: &str, fresh: bool) -> Result<Option<HeaderValue>, Error> {
        let scheme = self.scheme.lock().await.clone();
        match scheme {
            Scheme::Unknown => Ok(None),
            Scheme::Basic => Ok(self.basic().map(|b| secret_header(&b))),
            Scheme::Bearer { realm, service } => {
                if !fresh
                    && let Some(token) = self.tokens.get(scope).await
                    && token.expires_at > Instant::now()
                {
                    return Ok(Some(secret_header(&format!(
                        "Bearer {}",
                        token.value.expose()
                    ))));
                }
                let token = self.fetch_token(&realm, service.as_deref(), scope).await?;
                let value = secret_header(&format!("Bearer {}", token.value.expose()));
                self.tokens.insert(scope.to_owned(), token).await;
                Ok(Some(value))
            }
        }
    }

    fn basic(&self) -> Option<String> {
        self.credentials.as_ref().map(|(user, password)| {
            let raw = format!("{user}:{}", password.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, Error> {
        let token_error = |reason: String| {
            self.metrics
                .upstream_errors
                .with_label_values(&[self.name.as_str(), "token"])
                .inc();
            Error::Token {
                upstream: self.name.clone(),
                reason,
            }
        };
        let mut url = reqwest::Url::parse(realm)
            .map_err(|_| token_error("the challenge's realm is not a URL".into()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(token_error(
                "the challenge's realm is not an http(s) URL".into(),
            ));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
            if let Some((user, _)) = &self.credentials {
                query.append_pair("account", user);
            }
        }
        let mut request = self.http.get(url);
        if let Some(basic) = self.basic() {
            request = request.header(header::AUTHORIZATION, secret_header(&basic));
        }
        let resp = request
            .send()
            .await
            .map_err(|e| token_error(format!("unreachable: {}", e.without_url())))?;
        if !resp.status().is_success() {
            return Err(token_error(format!("answered {}", resp.status())));
        }
        let body = self.read_capped(resp, 1 << 20).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| token_error("the token response is not JSON".into()))?;
        parsed
            .into_token(Instant::now())
            .ok_or_else(|| token_error("the token response has no token".into()))
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

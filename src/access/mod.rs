//! Downstream access control: who a client is (htpasswd users with Basic, static pull tokens
//! as Basic password or Bearer, registry tokens from `/token`, mTLS subjects, or nobody), and
//! what that identity may pull from where (`policy`), with lockout of addresses that keep
//! failing. Off by default; once on, whatever no rule allows is denied. The HTTP edge asks
//! here before it touches the cache or an upstream, and decides the status codes itself.
//! Files (htpasswd, tokens) are re-read when they change; a bad new file is logged and the last
//! good one stays in force.

pub mod htpasswd;
pub mod jwt;
pub mod lockout;
pub mod policy;
pub mod tokens;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use htpasswd::Htpasswd;
use lockout::{Lockout, LockoutConfig};
use policy::{Glob, Policy, RuleConfig};
use tokens::Tokens;

/// The `access:` section of the config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Off: every client may pull everything (the mirror's behaviour without this section).
    pub enabled: bool,
    /// The URL clients reach this mirror at (`https://mirror.example.com`), used for the token
    /// realm; without it the realm is built from the request's Host header.
    pub external_url: Option<String>,
    /// htpasswd file of users (bcrypt only, `htpasswd -B`).
    pub htpasswd_file: Option<PathBuf>,
    /// Pull tokens file, lines printed by `regcache token create`.
    pub tokens_file: Option<PathBuf>,
    /// Key signing `/token` tokens (at least 32 bytes); generated at start when unset, which
    /// invalidates issued tokens on restart and differs between replicas.
    pub signing_key_file: Option<PathBuf>,
    /// Lifetime of a token issued by `/token`.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// How often the htpasswd and tokens files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Named sets of identities (`user:NAME`, `token:NAME`, `subject:SUBJECT`).
    pub groups: BTreeMap<String, Vec<String>>,
    /// Who may pull what; anything no rule allows is denied.
    pub rules: Vec<RuleConfig>,
    pub lockout: LockoutConfig,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            enabled: false,
            external_url: None,
            htpasswd_file: None,
            tokens_file: None,
            signing_key_file: None,
            token_ttl: Duration::from_secs(300),
            reload_interval: Duration::from_secs(5),
            groups: BTreeMap::new(),
            rules: Vec::new(),
            lockout: LockoutConfig::default(),
        }
    }
}

impl AccessConfig {
    /// Checks what serde cannot; `(key, reason)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Policy::compile(&self.rules, &self.groups)?;
        let key = |k: &str| format!("access.{k}");
        if let Some(url) = &self.external_url {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| (key("external_url"), format!("`{url}` is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err((
                    key("external_url"),
                    format!("`{url}` must be an http(s) URL with a host"),
                ));
            }
        }
        if self.token_ttl < Duration::from_secs(10) || self.token_ttl > Duration::from_secs(86400) {
            return Err((key("token_ttl"), "must be between 10s and 24h".into()));
        }
        if self.reload_interval.is_zero() {
            return Err((key("reload_interval"), "must be greater than zero".into()));
        }
        if self.lockout.max_failures > 0
            && (self.lockout.window.is_zero() || self.lockout.duration.is_zero())
        {
            return Err((
                key("lockout"),
                "window and duration must be greater than zero (max_failures: 0 turns lockout off)"
                    .into(),
            ));
        }
        if self.enabled && self.rules.is_empty() {
            return Err((
                key("rules"),
                "access control is enabled but no rule allows anything; add rules (see config/regcache.yaml)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("config key `{key}`: {reason}")]
    Config { key: String, reason: String },
}

/// Who a request is from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Anonymous,
    User(String),
    Token(String),
    /// The subject of a verified client certificate.
    Subject(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Anonymous => f.write_str("anonymous"),
            Identity::User(u) => write!(f, "user:{u}"),
            Identity::Token(t) => write!(f, "token:{t}"),
            Identity::Subject(s) => write!(f, "subject:{s}"),
        }
    }
}

impl Identity {
    fn parse(s: &str) -> Option<Identity> {
        if s == "anonymous" {
            return Some(Identity::Anonymous);
        }
        let (kind, name) = s.split_once(':')?;
        let name = name.to_owned();
        match kind {
            "user" => Some(Identity::User(name)),
            "token" => Some(Identity::Token(name)),
            "subject" => Some(Identity::Subject(name)),
            _ => None,
        }
    }
}

/// What a request's `Authorization` header offers.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// A header this mirror cannot read (another scheme, bad base64).
    Malformed,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, ****)"),
            Credentials::Bearer(_) => f.write_str("Bearer(****)"),
            Credentials::Malformed => f.write_str("Malformed"),
        }
    }
}

impl Credentials {
    /// Reads an `Authorization` header value.
    pub fn parse(header: Option<&[u8]>) -> Credentials {
        let Some(raw) = header else {
            return Credentials::None;
        };
        let Ok(value) = std::str::from_utf8(raw) else {
            return Credentials::Malformed;
        };
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return Credentials::Malformed;
            };
            let Ok(decoded) = String::from_utf8(decoded) else {
                return Credentials::Malformed;
            };
            match decoded.split_once(':') {
                Some((user, password)) => Credentials::Basic {
                    user: user.to_owned(),
                    password: password.to_owned(),
                },
                None => Credentials::Malformed,
            }
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Credentials::Bearer(rest.to_owned())
        } else {
            Credentials::Malformed
        }
    }
}

/// Why presented credentials were refused (a bounded metric label, never the credentials).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Malformed,
    BadPassword,
    UnknownToken,
    ExpiredToken,
    BadRegistryToken,
    /// A registry token this mirror signed, past its lifetime: clients fetch a new one.
    ExpiredRegistryToken,
    Revoked,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Malformed,
        Failure::BadPassword,
        Failure::UnknownToken,
        Failure::ExpiredToken,
        Failure::BadRegistryToken,
        Failure::ExpiredRegistryToken,
        Failure::Revoked,
    ];

    /// Whether this failure looks like guessing. Tokens this mirror signed itself (expired,
    /// or of an identity since removed) do not: many requests of one busy client can carry
    /// the same expired token at once, and must not lock its address out.
    pub fn counts_toward_lockout(self) -> bool {
        !matches!(self, Failure::ExpiredRegistryToken | Failure::Revoked)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::BadPassword => "bad_password",
            Failure::UnknownToken => "unknown_token",
            Failure::ExpiredToken => "expired_token",
            Failure::BadRegistryToken => "bad_registry_token",
            Failure::ExpiredRegistryToken => "expired_registry_token",
            Failure::Revoked => "revoked",
        }
    }
}

/// An authenticated (or anonymous) client.
#[derive(Clone, Debug)]
pub struct Principal {
    pub identity: Identity,
    /// A pull token's own scope, capping what the policy grants.
    ceiling: Option<Vec<Glob>>,
    /// Repository names (as in request paths) a `/token` token grants, when that is how the
    /// client authenticated.
    granted: Option<Vec<String>>,
}

impl Principal {
    pub fn anonymous() -> Principal {
        Principal::plain(Identity::Anonymous)
    }

    /// A client known by its verified certificate's subject.
    pub fn subject(subject: &str) -> Principal {
        Principal::plain(Identity::Subject(subject.to_owned()))
    }

    fn plain(identity: Identity) -> Principal {
        Principal {
            identity,
            ceiling: None,
            granted: None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.identity == Identity::Anonymous
    }

    /// Whether the client authenticated with a `/token` registry token.
    pub fn has_registry_token(&self) -> bool {
        self.granted.is_some()
    }
}

/// The answer to "may this principal pull this repository".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Policy refuses it.
    Denied,
    /// Policy would allow it, but the registry token presented does not name it: the client
    /// should fetch a token with this scope.
    NeedsScope,
}

/// A file re-read when it changes, keeping the last good content.
struct Watched<T> {
    what: &'static str,
    path: PathBuf,
    current: RwLock<Arc<T>>,
    stamp: RwLock<Option<Stamp>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        ino: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

impl<T: Send + Sync + 'static> Watched<T> {
    fn load(
        what: &'static str,
        path: &Path,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Watched<T>, Error> {
        let before = stamp(path);
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
        let value = parse(&text).map_err(|reason| Error::Invalid {
            what,
            path: path.to_owned(),
            reason,
        })?;
        Ok(Watched {
            what,
            path: path.to_owned(),
            current: RwLock::new(Arc::new(value)),
            stamp: RwLock::new(before),
        })
    }

    fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file if it changed; true when new content took effect.
    fn reload(&self, parse: fn(&str) -> Result<T, String>) -> bool {
        let now = stamp(&self.path);
        {
            let mut last = self.stamp.write().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return false;
            }
            *last = now;
        }
        let path = self.path.display().to_string();
        match std::fs::read_to_string(&self.path) {
            Err(e) => {
                tracing::warn!(file = %path, error = %e, "cannot re-read {}; keeping the last good one", self.what);
                false
            }
            Ok(text) => match parse(&text) {
                Err(reason) => {
                    tracing::warn!(file = %path, reason, "{} is invalid; keeping the last good one", self.what);
                    false
                }
                Ok(value) => {
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                    tracing::info!(file = %path, "reloaded {}", self.what);
                    true
                }
            },
        }
    }
}

/// Access control in force.
pub struct Access {
    policy: Policy,
    htpasswd: Option<Watched<Htpasswd>>,
    tokens: Option<Watched<Tokens>>,
    key: jwt::Key,
    lockout: Lockout,
    external_url: Option<String>,
    token_ttl: Duration,
    /// Recent successful password checks (hash of user, password and stored hash), so clients
    /// sending Basic on every request do not pay bcrypt each time.
    verified: moka::future::Cache<[u8; 32], ()>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

fn parse_htpasswd(s: &str) -> Result<Htpasswd, String> {
    Htpasswd::parse(s)
}

fn parse_tokens(s: &str) -> Result<Tokens, String> {
    Tokens::parse(s)
}

impl Access {
    /// Loads files and keys; `None` when access control is off. Starts the reload task (it ends
    /// when the returned value is dropped).
    pub fn start(config: &AccessConfig) -> Result<Option<Arc<Access>>, Error> {
        if !config.enabled {
            return Ok(None);
        }
        let policy = Policy::compile(&config.rules, &config.groups)
            .map_err(|(key, reason)| Error::Config { key, reason })?;
        let htpasswd = config
            .htpasswd_file
            .as_deref()
            .map(|p| Watched::load("htpasswd file", p, parse_htpasswd))
            .transpose()?;
        let tokens = config
            .tokens_file
            .as_deref()
            .map(|p| Watched::load("tokens file", p, parse_tokens))
            .transpose()?;
        let key = match &config.signing_key_file {
            None => jwt::Key::generate(),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| Error::Read {
                    what: "signing key file",
                    path: path.clone(),
                    source,
                })?;
                jwt::Key::from_bytes(bytes.trim_ascii()).map_err(|reason| Error::Invalid {
                    what: "signing key file",
                    path: path.clone(),
                    reason,
                })?
            }
        };
        let access = Arc::new(Access {
            policy,
            htpasswd,
            tokens,
            key,
            lockout: Lockout::new(config.lockout.clone()),
            external_url: config
                .external_url
                .as_deref()
                .map(|u| u.trim_end_matches('/').to_owned()),
            token_ttl: config.token_ttl,
            verified: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        });
        if access.htpasswd.is_some() || access.tokens.is_some() {
            let weak = Arc::downgrade(&access);
            let interval = config.reload_interval;
            tokio::spawn(reload_loop(weak, interval));
        }
        Ok(Some(access))
    }

    /// The configured external URL, if any.
    /// Whether `p` is in the `admins` group (`access.groups.admins`), the only identities the
    /// admin endpoints answer.
    pub fn is_admin(&self, p: &Principal) -> bool {
        self.policy.is_admin(&p.identity)
    }

    /// Whether `user` is a user of the htpasswd file: only known names are worth logging after
    /// a failed login (a client may have typed its password, or a token, into the name).
    pub fn knows_user(&self, user: &str) -> bool {
        self.htpasswd
            .as_ref()
            .is_some_and(|file| file.get().contains(user))
    }

    pub fn external_url(&self) -> Option<&str> {
        self.external_url.as_deref()
    }

    pub fn token_ttl(&self) -> Duration {
        self.token_ttl
    }

    pub fn lockout(&self) -> &Lockout {
        &self.lockout
    }

    /// Who the credentials belong to. `Credentials::None` is the anonymous principal; whether
    /// anonymous may do anything is the policy's call.
    pub async fn authenticate(&self, creds: Credentials) -> Result<Principal, Failure> {
        match creds {
            Credentials::None => Ok(Principal::anonymous()),
            Credentials::Malformed => Err(Failure::Malformed),
            Credentials::Basic { password, .. } if password.starts_with(tokens::PREFIX) => {
                self.pull_token(&password)
            }
            Credentials::Basic { user, password } => self.password(user, password).await,
            Credentials::Bearer(t) if t.starts_with(tokens::PREFIX) => self.pull_token(&t),
            Credentials::Bearer(t) => self.registry_token(&t),
        }
    }

    async fn password(&self, user: String, password: String) -> Result<Principal, Failure> {
        let Some(file) = &self.htpasswd else {
            return Err(Failure::BadPassword);
        };
        let users = file.get();
        let stored = users.hash_of(&user).unwrap_or_default();
        let mut h = Sha256::new();
        for part in [user.as_bytes(), password.as_bytes(), stored.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let cache_key: [u8; 32] = h.finalize().into();
        if self.verified.get(&cache_key).await.is_some() {
            return Ok(Principal::plain(Identity::User(user)));
        }
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || users.verify(&check_user, &password))
            .await
            .unwrap_or(false);
        if ok {
            self.verified.insert(cache_key, ()).await;
            Ok(Principal::plain(Identity::User(user)))
        } else {
            Err(Failure::BadPassword)
        }
    }

    fn pull_token(&self, presented: &str) -> Result<Principal, Failure> {
        let Some(file) = &self.tokens else {
            return Err(Failure::UnknownToken);
        };
        let tokens = file.get();
        match tokens.lookup(presented, SystemTime::now()) {
            tokens::Lookup::Valid(t) => Ok(Principal {
                identity: Identity::Token(t.name.clone()),
                ceiling: Some(t.scope.clone()),
                granted: None,
            }),
            tokens::Lookup::Expired(_) => Err(Failure::ExpiredToken),
            tokens::Lookup::Unknown => Err(Failure::UnknownToken),
        }
    }

    fn registry_token(&self, presented: &str) -> Result<Principal, Failure> {
        let claims = self
            .key
            .verify(presented, SystemTime::now())
            .map_err(|e| match e {
                jwt::Error::Expired => Failure::ExpiredRegistryToken,
                jwt::Error::Malformed | jwt::Error::Signature | jwt::Error::Audience => {
                    Failure::BadRegistryToken
                }
            })?;
        let identity = Identity::parse(&claims.sub).ok_or(Failure::BadRegistryToken)?;
        let granted = Some(
            claims
                .access
                .iter()
                .filter(|a| a.kind == "repository" && a.actions.iter().any(|x| x == "pull"))
                .map(|a| a.name.clone())
                .collect(),
        );
        // What was removed from the files since the token was issued stops working now.
        let ceiling = match &identity {
            Identity::User(u) => {
                if let Some(file) = &self.htpasswd
                    && !file.get().contains(u)
                {
                    return Err(Failure::Revoked);
                }
                None
            }
            Identity::Token(name) => {
                let tokens = self.tokens.as_ref().ok_or(Failure::Revoked)?.get();
                let t = tokens.by_name(name).ok_or(Failure::Revoked)?;
                if t.is_expired(SystemTime::now()) {
                    return Err(Failure::Revoked);
                }
                Some(t.scope.clone())
            }
            Identity::Anonymous | Identity::Subject(_) => None,
        };
        Ok(Principal {
            identity,
            ceiling,
            granted,
        })
    }

    /// May `p`, connecting from `ip`, pull `target` (`upstream/repository`), requested by the
    /// path name `name`?
    pub fn decide(&self, p: &Principal, ip: IpAddr, target: &str, name: &str) -> Decision {
        let allowed = self.policy.allows(&p.identity, ip, target)
            && p.ceiling
                .as_ref()
                .is_none_or(|c| c.iter().any(|g| g.matches(target)));
        if !allowed {
            return Decision::Denied;
        }
        match &p.granted {
            Some(names) if !names.iter().any(|n| n == name) => Decision::NeedsScope,
            _ => Decision::Allowed,
        }
    }

    /// May `p` from `ip` pull anything at all (the answer to `GET /v2/`).
    pub fn may_pull_anything(&self, p: &Principal, ip: IpAddr) -> bool {
        self.policy.allows_any(&p.identity, ip)
    }

    /// Issues a registry token for `p` covering those of `requested` (`(name, target)`) it may
    /// pull; the rest are left out, as the token spec asks.
    pub fn issue(
        &self,
        p: &Principal,
        ip: IpAddr,
        requested: &[(String, String)],
    ) -> (String, jwt::Claims) {
        let plain = Principal {
            granted: None,
            ..p.clone()
        };
        let mut access: Vec<jwt::Access> = Vec::new();
        for (name, target) in requested {
            if self.decide(&plain, ip, target, name) == Decision::Allowed
                && !access.iter().any(|a| &a.name == name)
            {
                access.push(jwt::Access {
                    kind: "repository".into(),
                    name: name.clone(),
                    actions: vec!["pull".into()],
                });
            }
        }
        self.key.issue(
            &p.identity.to_string(),
            access,
            SystemTime::now(),
            self.token_ttl,
        )
    }
}

async fn reload_loop(access: Weak<Access>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(access) = access.upgrade() else {
            return;
        };
        let result = tokio::task::spawn_blocking(move || {
            if let Some(f) = &access.htpasswd
                && f.reload(parse_htpasswd)
            {
                access.verified.invalidate_all();
            }
            if let Some(f) = &access.tokens {
                f.reload(parse_tokens);
            }
        })
        .await;
        if result.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
        .into_bytes()
    }

    #[test]
    fn credentials_are_read_from_the_header() {
        assert_eq!(Credentials::parse(None), Credentials::None);
        assert_eq!(
            Credentials::parse(Some(&basic("alice", "pa:ss"))),
            Credentials::Basic {
                user: "alice".into(),
                password: "pa:ss".into()
            }
        );
        assert_eq!(
            Credentials::parse(Some(b"Bearer abc")),
            Credentials::Bearer("abc".into())
        );
        assert_eq!(
            Credentials::parse(Some(b"Basic !!!")),
            Credentials::Malformed
        );
        assert_eq!(
            Credentials::parse(Some(b"Digest x")),
            Credentials::Malformed
        );
        assert_eq!(Credentials::parse(Some(b"Bearer")), Credentials::Malformed);
        let shown = format!("{:?}", Credentials::parse(Some(&basic("alice", "hunter2"))));
        assert!(!shown.contains("hunter2"));
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().expect("tempdir"),
            }
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
    }

    fn config(files: &Files, htpasswd: &str, tokens: &str, rules: &str) -> AccessConfig {
        #[derive(Deserialize)]
        struct R {
            rules: Vec<RuleConfig>,
        }
        let r: R = serde_saphyr::from_str(rules).expect("rules yaml");
        AccessConfig {
            enabled: true,
            htpasswd_file: Some(files.write("htpasswd", htpasswd)),
            tokens_file: Some(files.write("tokens", tokens)),
            rules: r.rules,
            reload_interval: Duration::from_millis(20),
            ..AccessConfig::default()
        }
    }

    const RULES: &str = r#"
rules:
  - who: [user:alice]
    repositories: ["docker.io/library/*"]
  - who: [token:ci]
    repositories: ["**"]
"#;

    #[tokio::test]
    async fn users_tokens_and_registry_tokens_authenticate() {
        let files = Files::new();
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let ci = tokens::create("ci", None, &["ghcr.io/**".into()]).expect("token");
        let access = Access::start(&config(&files, &format!("alice:{hash}\n"), &ci.line, RULES))
            .expect("starts")
            .expect("enabled");
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let alice = access
            .authenticate(Credentials::parse(Some(&basic("alice", "s3cret"))))
            .await
            .expect("alice");
        assert_eq!(alice.identity, Identity::User("alice".into()));
        // Cached second check.
        assert!(
            access
                .authenticate(Credentials::parse(Some(&basic("alice", "s3cret"))))
                .await
                .is_ok()
        );
        assert_eq!(
            access
                .authenticate(Credentials::parse(Some(&basic("alice", "nope"))))
                .await
                .unwrap_err(),
            Failure::BadPassword
        );
        assert_eq!(
            access.decide(&alice, ip, "docker.io/library/alpine", "alpine"),
            Decision::Allowed
        );
        assert_eq!(
            access.decide(&alice, ip, "ghcr.io/acme/app", "ghcr.io/acme/app"),
            Decision::Denied
        );
        // The pull token: policy allows `**`, its own scope caps it to ghcr.io.
        let token = access
            .authenticate(Credentials::Bearer(ci.token.clone()))
            .await
            .expect("token");
        assert_eq!(
            access.decide(&token, ip, "ghcr.io/acme/app", "ghcr.io/acme/app"),
            Decision::Allowed
        );
        assert_eq!(
            access.decide(&token, ip, "docker.io/library/alpine", "alpine"),
            Decision::Denied
        );
        assert_eq!(
            access
                .authenticate(Credentials::Basic {
                    user: "whatever".into(),
                    password: ci.token.clone()
                })
                .await
                .expect("token as password")
                .identity,
            Identity::Token("ci".into())
        );
        // The token dance: only allowed scopes are granted.
        let requested = vec![
            ("alpine".to_string(), "docker.io/library/alpine".to_string()),
            (
                "ghcr.io/acme/app".to_string(),
                "ghcr.io/acme/app".to_string(),
            ),
        ];
        let (jwt, claims) = access.issue(&alice, ip, &requested);
        assert!(claims.grants_pull("alpine"));
        assert!(!claims.grants_pull("ghcr.io/acme/app"));
        let via_jwt = access
            .authenticate(Credentials::Bearer(jwt))
            .await
            .expect("jwt");
        assert!(via_jwt.has_registry_token());
        assert_eq!(
            access.decide(&via_jwt, ip, "docker.io/library/alpine", "alpine"),
            Decision::Allowed
        );
        assert_eq!(
            access.decide(&via_jwt, ip, "docker.io/library/busybox", "busybox"),
            Decision::NeedsScope
        );
        assert_eq!(
            access
                .authenticate(Credentials::Bearer("a.b.c".into()))
                .await
                .unwrap_err(),
            Failure::BadRegistryToken
        );
        // An expired token of ours is told apart: clients renew it, it is not guessing.
        let (old, _) = access.key.issue(
            "user:alice",
            Vec::new(),
            SystemTime::now() - Duration::from_secs(600),
            Duration::from_secs(300),
        );
        let failure = access
            .authenticate(Credentials::Bearer(old))
            .await
            .unwrap_err();
        assert_eq!(failure, Failure::ExpiredRegistryToken);
        assert!(!failure.counts_toward_lockout());
        assert!(Failure::BadPassword.counts_toward_lockout());
    }

    #[tokio::test]
    async fn files_reload_and_a_bad_file_keeps_the_last_good_one() {
        let files = Files::new();
        let hash = bcrypt::hash("one", 4).expect("hash");
        let cfg = config(&files, &format!("alice:{hash}\n"), "", RULES);
        let access = Access::start(&cfg).expect("starts").expect("enabled");
        let login = |p: &str| Credentials::parse(Some(&basic("alice", p)));
        assert!(access.authenticate(login("one")).await.is_ok());
        // A broken file: the old one stays in force.
        files.write("htpasswd", "alice:{SHA}broken\n");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(access.authenticate(login("one")).await.is_ok());
        // A good new file takes effect, and revokes the old password at once.
        let hash2 = bcrypt::hash("two", 4).expect("hash");
        files.write("htpasswd", &format!("alice:{hash2}\nbob:{hash2}\n"));
        let mut reloaded = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if access.authenticate(login("two")).await.is_ok() {
                reloaded = true;
                break;
            }
        }
        assert!(reloaded, "the new htpasswd file took effect");
        assert!(access.authenticate(login("one")).await.is_err());
        // A new pull token appears in the tokens file.
        let t = tokens::create("ci", None, &["**".into()]).expect("token");
        files.write("tokens", &t.line);
        let mut found = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if access
                .authenticate(Credentials::Bearer(t.token.clone()))
                .await
                .is_ok()
            {
                found = true;
                break;
            }
        }
        assert!(found, "the new token took effect");
    }

    #[test]
    fn start_refuses_bad_files_by_name() {
        let files = Files::new();
        let cfg = config(&files, "alice:plain\n", "", RULES);
        let err = Access::start(&cfg).unwrap_err().to_string();
        assert!(err.contains("htpasswd") && err.contains("line 1"), "{err}");
        assert!(
            Access::start(&AccessConfig::default())
                .expect("off")
                .is_none()
        );
    }

    #[test]
    fn enabled_without_rules_is_refused() {
        let cfg = AccessConfig {
            enabled: true,
            ..AccessConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().0, "access.rules");
    }
}

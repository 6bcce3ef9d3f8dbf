//! Client access control as users meet it: users with Basic, pull tokens as a static Bearer
//! header (containerd's hosts.toml) or Basic password, the registry token dance a Docker or
//! podman client performs, anonymous pulls limited to client networks, 401/403 semantics that
//! leak nothing about refused repositories, lockout of an address that keeps failing, and the
//! audit trail.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::Value;

use super::{ACCEPT_MANIFESTS, assert_error, body, cache_dir, header, within};
use crate::support::fake_upstream::{FakeUpstream, Image};
use crate::support::mirror::{Mirror, MirrorBuilder};

const ALLOWED: &str = "team/app";
const OTHER: &str = "secret/app";
const PASSWORD: &str = "correct horse";

struct Setup {
    up: FakeUpstream,
    image: Image,
    mirror: Mirror,
    token: String,
    expired_token: String,
    _files: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A mirror with users alice (may pull `team/*`), bob (may pull nothing), pull tokens `ci`
/// (team/**) and `old` (expired), and `extra_rules` appended to the rules.
async fn setup(extra_rules: &str, lockout: &str) -> Setup {
    let image = Image::new(2, 2048);
    let up = FakeUpstream::builder()
        .image(ALLOWED, "v1", &image)
        .image(OTHER, "v1", &image)
        .start()
        .await;
    let files = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let htpasswd = files.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\nbob:{hash}\n")).expect("write htpasswd");
    let host = up.host();
    let ci =
        regcache::access::tokens::create("ci", None, &[format!("{host}/team/**")]).expect("token");
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    let old = regcache::access::tokens::create("old", Some(past), &["**".into()]).expect("token");
    let tokens = files.path().join("tokens");
    std::fs::write(&tokens, format!("{}\n{}\n", ci.line, old.line)).expect("write tokens");
    let q = |s: &str| serde_json::to_string(s).expect("string");
    let yaml = format!(
        "  enabled: true\n  htpasswd_file: {}\n  tokens_file: {}\n{lockout}  rules:\n    - who: [user:alice, token:ci, token:old]\n      repositories: [{}]\n{extra_rules}",
        q(&htpasswd.to_string_lossy()),
        q(&tokens.to_string_lossy()),
        q(&format!("{host}/team/*")),
    );
    let cache = cache_dir();
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&host, &up.url())
        .access(&yaml)
        .start()
        .await;
    Setup {
        up,
        image,
        mirror,
        token: ci.token,
        expired_token: old.token,
        _files: files,
        _cache: cache,
    }
}

impl Setup {
    fn upstream_saw(&self, repo: &str) -> bool {
        self.up
            .requests()
            .iter()
            .any(|r| r.path.starts_with(&format!("/v2/{repo}/")))
    }

    async fn manifest(&self, repo: &str, auth: Option<&str>) -> reqwest::Response {
        let mut headers = vec![("accept", ACCEPT_MANIFESTS)];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        self.mirror
            .request(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/v1"),
                &headers,
            )
            .await
    }

    async fn blob(&self, repo: &str, auth: Option<&str>) -> reqwest::Response {
        let digest = &self.image.layers[0].digest;
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        self.mirror
            .request(
                reqwest::Method::GET,
                &format!("/v2/{repo}/blobs/{digest}"),
                &headers,
            )
            .await
    }

    /// Asserts manifest and blob of `repo` pull with `auth`, byte for byte.
    async fn pulls(&self, repo: &str, auth: Option<&str>, what: &str) {
        let m = self.manifest(repo, auth).await;
        assert_eq!(m.status(), StatusCode::OK, "{what}: manifest");
        assert_eq!(
            body(m).await,
            self.image.manifest.bytes,
            "{what}: manifest bytes"
        );
        let b = self.blob(repo, auth).await;
        assert_eq!(b.status(), StatusCode::OK, "{what}: blob");
        assert_eq!(
            body(b).await,
            self.image.layers[0].bytes,
            "{what}: blob bytes"
        );
    }

    /// Asserts manifest and blob of `repo` are refused with `status`/`code`.
    async fn refused(
        &self,
        repo: &str,
        auth: Option<&str>,
        status: StatusCode,
        code: &str,
        what: &str,
    ) {
        assert_error(
            self.manifest(repo, auth).await,
            status,
            code,
            &format!("{what}: manifest"),
        )
        .await;
        assert_error(
            self.blob(repo, auth).await,
            status,
            code,
            &format!("{what}: blob"),
        )
        .await;
    }
}

fn challenge_of(response: &reqwest::Response) -> String {
    header(response, "www-authenticate").expect("a 401 carries a challenge")
}

/// `key="value"` from a Bearer challenge.
fn param(challenge: &str, key: &str) -> Option<String> {
    let start = challenge.find(&format!("{key}=\""))? + key.len() + 2;
    let end = challenge[start..].find('"')? + start;
    Some(challenge[start..end].to_owned())
}

#[tokio::test]
async fn each_credential_kind_pulls_what_it_is_allowed_and_nothing_else() {
    let s = setup("", "").await;
    let alice = basic("alice", PASSWORD);
    let bob = basic("bob", PASSWORD);
    let bearer = format!("Bearer {}", s.token);
    let token_as_password = basic("ci", &s.token);
    s.pulls(ALLOWED, Some(&alice), "alice with Basic").await;
    s.pulls(ALLOWED, Some(&bearer), "pull token as static Bearer header")
        .await;
    s.pulls(
        ALLOWED,
        Some(&token_as_password),
        "pull token as Basic password",
    )
    .await;
    for (auth, what) in [(&alice, "alice"), (&bob, "bob"), (&bearer, "pull token")] {
        s.refused(OTHER, Some(auth), StatusCode::FORBIDDEN, "DENIED", what)
            .await;
    }
    s.refused(
        ALLOWED,
        Some(&bob),
        StatusCode::FORBIDDEN,
        "DENIED",
        "bob is known but has no rule",
    )
    .await;
    // No or bad credentials: 401 with a challenge naming the token endpoint and the scope.
    let expired = format!("Bearer {}", s.expired_token);
    let wrong = basic("alice", "wrong");
    let unknown = format!("Bearer rcp_{}", "x".repeat(43));
    for (auth, what) in [
        (None, "no credentials"),
        (Some(wrong.as_str()), "wrong password"),
        (Some(expired.as_str()), "expired pull token"),
        (Some(unknown.as_str()), "unknown pull token"),
        (Some("Bearer not.a.token"), "forged registry token"),
    ] {
        let r = s.manifest(ALLOWED, auth).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        let c = challenge_of(&r);
        assert!(c.starts_with("Bearer "), "{what}: {c}");
        assert_eq!(
            param(&c, "realm"),
            Some(format!("{}/token", s.mirror.url())),
            "{what}"
        );
        assert_eq!(param(&c, "service").as_deref(), Some("regcache"));
        assert_eq!(
            param(&c, "scope"),
            Some(format!("repository:{ALLOWED}:pull"))
        );
        assert_error(r, StatusCode::UNAUTHORIZED, "UNAUTHORIZED", what).await;
    }
    // Nothing about refused repositories reached the upstream.
    assert!(
        !s.upstream_saw(OTHER),
        "a refused repository is never fetched"
    );
    assert!(
        s.mirror
            .metric("regcache_auth_refused_total", &[("answer", "denied")])
            .await
            >= 8.0
    );
    assert!(
        s.mirror
            .metric(
                "regcache_auth_failures_total",
                &[("reason", "bad_password")]
            )
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_refused_repository_looks_the_same_whether_it_exists_or_not() {
    let s = setup("", "").await;
    let alice = basic("alice", PASSWORD);
    let existing = s.manifest(OTHER, Some(&alice)).await;
    let missing = s.manifest("secret/nothing-here", Some(&alice)).await;
    assert_eq!(existing.status(), missing.status());
    assert_eq!(body(existing).await, body(missing).await);
    let existing = s.manifest(OTHER, None).await;
    let missing = s.manifest("secret/nothing-here", None).await;
    assert_eq!(existing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(existing.status(), missing.status());
    assert!(s.up.requests().is_empty(), "the upstream was never asked");
}

#[tokio::test]
async fn the_registry_token_dance_works_as_a_client_does_it() {
    let s = setup("", "").await;
    let client = s.mirror.client();
    // 1. Probe /v2/: a challenge.
    let probe = s.mirror.get("/v2/").await;
    assert_eq!(probe.status(), StatusCode::UNAUTHORIZED);
    let c = challenge_of(&probe);
    let realm = param(&c, "realm").expect("realm");
    let service = param(&c, "service").expect("service");
    // 2. Ask the realm for a token, with Basic credentials and two scopes.
    let get_token = |auth: Option<String>| {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("service", &service)
            .append_pair("scope", &format!("repository:{ALLOWED}:pull"))
            .append_pair("scope", &format!("repository:{OTHER}:pull"))
            .finish();
        let mut req = client.get(format!("{realm}?{query}"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    let resp = within("token", get_token(Some(basic("alice", PASSWORD))))
        .await
        .expect("token response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "cache-control").as_deref(), Some("no-store"));
    let json: Value = serde_json::from_slice(&body(resp).await).expect("json");
    let token = json["token"].as_str().expect("token").to_owned();
    assert_eq!(json["access_token"].as_str(), Some(token.as_str()));
    assert!(json["expires_in"].as_u64().is_some_and(|e| e > 0));
    assert!(json["issued_at"].as_str().is_some());
    // 3. Pull with the token; only the allowed scope was granted.
    let bearer = format!("Bearer {token}");
    s.pulls(ALLOWED, Some(&bearer), "registry token").await;
    let base = s
        .mirror
        .request(reqwest::Method::GET, "/v2/", &[("authorization", &bearer)])
        .await;
    assert_eq!(base.status(), StatusCode::OK);
    s.refused(
        OTHER,
        Some(&bearer),
        StatusCode::FORBIDDEN,
        "DENIED",
        "scope not granted",
    )
    .await;
    let r = s.manifest("team/other", Some(&bearer)).await;
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "allowed but not in this token"
    );
    assert!(challenge_of(&r).contains("insufficient_scope"));
    // A tampered token is refused.
    let mut tampered = token.clone();
    tampered.insert(tampered.find('.').expect("jwt") + 3, 'x');
    let r = s
        .manifest(ALLOWED, Some(&format!("Bearer {tampered}")))
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A pull token works at the realm too; bad credentials get a Basic challenge.
    let resp = within("token", get_token(Some(basic("ci", &s.token))))
        .await
        .expect("token response");
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = within("token", get_token(Some(basic("alice", "nope"))))
        .await
        .expect("token response");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&resp, "www-authenticate").is_some_and(|c| c.starts_with("Basic")));
    // Anonymous, with no anonymous rule: refused.
    let resp = within("token", get_token(None))
        .await
        .expect("token response");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(!s.upstream_saw(OTHER));
}

#[tokio::test]
async fn anonymous_pulls_only_where_a_rule_opts_in_for_the_client_network() {
    let image = Image::new(1, 1024);
    let up = FakeUpstream::builder()
        .image(ALLOWED, "v1", &image)
        .image("team/other", "v1", &image)
        .start()
        .await;
    let cache = cache_dir();
    let host = up.host();
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&host, &up.url())
        .access(&format!(
            "  enabled: true\n  rules:\n    - who: [anonymous]\n      networks: [\"127.0.0.0/8\"]\n      repositories: [\"{host}/team/app\"]\n    - who: [anonymous]\n      networks: [\"10.0.0.0/8\"]\n      repositories: [\"**\"]\n"
        ))
        .start()
        .await;
    assert_eq!(
        mirror.get("/v2/").await.status(),
        StatusCode::OK,
        "a Docker daemon's probe"
    );
    let r = mirror.get(&format!("/v2/{ALLOWED}/manifests/v1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = mirror
        .get(&format!("/v2/{ALLOWED}/blobs/{}", image.layers[0].digest))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = mirror.get("/v2/team/other/manifests/v1").await;
    assert_error(
        r,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "outside the anonymous rule",
    )
    .await;

    // The same mirror for a network the client is not in: nothing anonymous.
    let cache2 = cache_dir();
    let closed = MirrorBuilder::new(cache2.path())
        .upstream(&host, &up.url())
        .access("  enabled: true\n  rules:\n    - who: [anonymous]\n      networks: [\"10.0.0.0/8\"]\n      repositories: [\"**\"]\n")
        .start()
        .await;
    assert_eq!(closed.get("/v2/").await.status(), StatusCode::UNAUTHORIZED);
    let r = closed.get(&format!("/v2/{ALLOWED}/manifests/v1")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(closed.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(closed.get("/metrics").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_locked_out() {
    let s = setup(
        "",
        "  lockout:\n    max_failures: 3\n    window: 1m\n    duration: 1m\n",
    )
    .await;
    let wrong = basic("alice", "wrong");
    for _ in 0..3 {
        assert_eq!(
            s.manifest(ALLOWED, Some(&wrong)).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Now even the right password is refused until the lockout ends.
    let r = s.manifest(ALLOWED, Some(&basic("alice", PASSWORD))).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = header(&r, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry > 0 && retry <= 60, "{retry}");
    assert_error(
        r,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        "locked out",
    )
    .await;
    assert_eq!(
        s.mirror.metric("regcache_auth_lockouts_total", &[]).await,
        1.0
    );
    assert!(!s.upstream_saw(ALLOWED));
}

#[tokio::test]
async fn the_token_dance_follows_the_upstream_containerd_names_with_ns() {
    let image = Image::new(1, 1024);
    let default = FakeUpstream::builder().start().await;
    let named = FakeUpstream::builder()
        .image(ALLOWED, "v1", &image)
        .start()
        .await;
    let files = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let htpasswd = files.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).expect("write htpasswd");
    let cache = cache_dir();
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&default.host(), &default.url())
        .upstream(&named.host(), &named.url())
        .default_upstream(&default.host())
        .access(&format!(
            "  enabled: true\n  htpasswd_file: {}\n  rules:\n    - who: [user:alice]\n      repositories: [\"{}/team/*\"]\n",
            serde_json::to_string(&htpasswd.to_string_lossy()).expect("string"),
            named.host()
        ))
        .start()
        .await;
    let path = format!("/v2/{ALLOWED}/manifests/v1?ns={}", named.host());
    let r = mirror.get(&path).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let c = challenge_of(&r);
    let realm = param(&c, "realm").expect("realm");
    assert!(realm.contains("?ns="), "{realm}");
    let scope = param(&c, "scope").expect("scope");
    // As containerd does: keep the realm's query, add service and scope.
    let url = format!(
        "{realm}&{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("service", "regcache")
            .append_pair("scope", &scope)
            .finish()
    );
    let resp = within(
        "token",
        mirror
            .client()
            .get(url)
            .header("authorization", basic("alice", PASSWORD))
            .send(),
    )
    .await
    .expect("token response");
    assert_eq!(resp.status(), StatusCode::OK);
    let json: Value = serde_json::from_slice(&body(resp).await).expect("json");
    let token = json["token"].as_str().expect("token");
    let r = mirror
        .request(
            reqwest::Method::GET,
            &path,
            &[
                ("authorization", &format!("Bearer {token}")),
                ("accept", ACCEPT_MANIFESTS),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, image.manifest.bytes);
}

#[tokio::test]
async fn the_cross_repository_rule_holds_per_identity() {
    // bob may pull secret/*: his pull caches secret/app's layer. alice may pull team/*, and
    // asks for that layer by digest through team/app, which does not hold it upstream.
    let private = Image::new(1, 4096);
    let public = Image::new(1, 4096);
    let up = FakeUpstream::builder()
        .image(OTHER, "v1", &private)
        .image(ALLOWED, "v1", &public)
        .start()
        .await;
    let files = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let htpasswd = files.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\nbob:{hash}\n")).expect("write htpasswd");
    let host = up.host();
    let cache = cache_dir();
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&host, &up.url())
        .access(&format!(
            "  enabled: true\n  htpasswd_file: {}\n  rules:\n    - who: [user:alice]\n      repositories: [\"{host}/team/*\"]\n    - who: [user:bob]\n      repositories: [\"{host}/secret/*\"]\n",
            serde_json::to_string(&htpasswd.to_string_lossy()).expect("string"),
        ))
        .start()
        .await;
    let layer = &private.layers[0];
    let bob = basic("bob", PASSWORD);
    let r = mirror
        .request(
            reqwest::Method::GET,
            &format!("/v2/{OTHER}/blobs/{}", layer.digest),
            &[("authorization", &bob)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, layer.bytes, "bob's pull cached the layer");
    let alice = basic("alice", PASSWORD);
    let r = mirror
        .request(
            reqwest::Method::GET,
            &format!("/v2/{ALLOWED}/blobs/{}", layer.digest),
            &[("authorization", &alice)],
        )
        .await;
    assert_error(
        r,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
        "alice asking for bob's cached layer through her repository",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_answers_the_admins_group_only() {
    let up = FakeUpstream::builder().start().await;
    let files = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let htpasswd = files.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\nops:{hash}\n")).expect("write htpasswd");
    let q = |s: &str| serde_json::to_string(s).expect("string");
    let yaml = format!(
        "  enabled: true\n  htpasswd_file: {}\n  groups:\n    admins: [\"user:ops\"]\n  rules:\n    - who: [user:alice, anonymous]\n      repositories: [\"**\"]\n",
        q(&htpasswd.to_string_lossy()),
    );
    let cache = cache_dir();
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&up.host(), &up.url())
        .access(&yaml)
        .credentials_admin_endpoint(true)
        .start()
        .await;
    let get = |auth: Option<String>| {
        let mut request = mirror
            .client()
            .get(format!("{}/admin/credentials", mirror.url()));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let anonymous = within("anonymous", get(None)).await.expect("answers");
    assert_eq!(
        anonymous.status(),
        StatusCode::UNAUTHORIZED,
        "anonymous pull rights are not admin rights"
    );
    let puller = within("alice", get(Some(basic("alice", PASSWORD))))
        .await
        .expect("answers");
    assert_eq!(
        puller.status(),
        StatusCode::FORBIDDEN,
        "a puller is no admin"
    );
    let admin = within("ops", get(Some(basic("ops", PASSWORD))))
        .await
        .expect("answers");
    assert_eq!(admin.status(), StatusCode::OK);
    mirror.stop().await;
}

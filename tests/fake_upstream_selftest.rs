//! Checks the fake upstream itself with a plain HTTP client, so that when a mirror test fails
//! the fault is known to be the mirror's, not the fake's.

mod support;

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Client, Response, StatusCode, redirect};
use serde_json::Value;
use support::fake_upstream::{
    FakeUpstream, Fault, Image, Index, OCI_INDEX, OCI_MANIFEST, TOKEN_SERVICE, sha256_digest,
};

/// Every test request gives up after this long rather than hanging the suite.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn client() -> Client {
    Client::builder()
        .redirect(redirect::Policy::none())
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("a plain HTTP client builds")
}

async fn get(url: &str) -> Response {
    client().get(url).send().await.expect("the fake answers")
}

async fn head(url: &str) -> Response {
    client().head(url).send().await.expect("the fake answers")
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("response has a {name} header"))
        .to_str()
        .expect("header is text")
}

async fn json(response: Response) -> Value {
    let bytes = response.bytes().await.expect("body arrives whole");
    serde_json::from_slice(&bytes).expect("body is JSON")
}

async fn error_code(response: Response) -> String {
    let body = json(response).await;
    body["errors"][0]["code"]
        .as_str()
        .expect("an OCI error body")
        .to_owned()
}

#[tokio::test]
async fn ping_answers_with_the_api_version_header() {
    let up = FakeUpstream::builder().start().await;
    assert!(up.url().starts_with("http://127.0.0.1:"));
    assert_eq!(up.url(), format!("http://{}", up.host()));

    let response = get(&format!("{}/v2/", up.url())).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "docker-distribution-api-version"),
        "registry/2.0"
    );
}

#[tokio::test]
async fn serves_an_image_by_tag_and_by_digest_with_the_spec_headers() {
    let image = Image::new(2, 1000);
    let up = FakeUpstream::builder()
        .image("library/alpine", "latest", &image)
        .start()
        .await;
    let base = format!("{}/v2/library/alpine", up.url());

    for reference in ["latest", image.manifest.digest.as_str()] {
        let response = get(&format!("{base}/manifests/{reference}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers().clone();
        assert_eq!(header(&headers, "content-type"), OCI_MANIFEST);
        assert_eq!(
            header(&headers, "content-length"),
            image.manifest.size().to_string()
        );
        assert_eq!(
            header(&headers, "docker-content-digest"),
            image.manifest.digest
        );
        let body = response.bytes().await.expect("manifest body");
        assert_eq!(body, image.manifest.bytes);
    }

    // HEAD is how containerd resolves a tag: same headers, no body.
    let response = head(&format!("{base}/manifests/latest")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(
        header(&headers, "docker-content-digest"),
        image.manifest.digest
    );
    assert_eq!(
        header(&headers, "content-length"),
        image.manifest.size().to_string()
    );
    assert!(response.bytes().await.expect("empty body").is_empty());

    let manifest: Value = serde_json::from_slice(&image.manifest.bytes).expect("manifest JSON");
    assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(2));
    for blob in image.blobs() {
        let url = format!("{base}/blobs/{}", blob.digest);
        let response = get(&url).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(response.headers(), "docker-content-digest"),
            blob.digest
        );
        let body = response.bytes().await.expect("blob body");
        assert_eq!(sha256_digest(&body), blob.digest);

        let response = head(&url).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(response.headers(), "content-length"),
            blob.size().to_string()
        );
    }
    assert_eq!(up.gets_of_manifest("latest"), 1);
    assert_eq!(up.heads_of_manifest("latest"), 1);
    assert_eq!(up.gets_of_blob(&image.config.digest), 1);
}

#[tokio::test]
async fn layers_are_gzipped_tars_whose_digests_the_config_lists() {
    let image = Image::new(2, 70_000);
    let config: Value = serde_json::from_slice(&image.config.bytes).expect("config JSON");
    let dir = tempfile::tempdir().expect("temp dir");
    for (n, layer) in image.layers.iter().enumerate() {
        let path = dir.path().join(format!("layer-{n}.tar.gz"));
        std::fs::write(&path, &layer.bytes).expect("write layer");
        let tar = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("gzip runs");
        assert!(tar.status.success(), "gzip accepts the layer");
        assert_eq!(sha256_digest(&tar.stdout), image.diff_ids[n]);
        assert_eq!(config["rootfs"]["diff_ids"][n], image.diff_ids[n].as_str());

        let listing = std::process::Command::new("tar")
            .arg("-tvzf")
            .arg(&path)
            .output()
            .expect("tar runs");
        assert!(listing.status.success(), "tar accepts the layer");
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing.contains("70000 ") && listing.contains(&format!("layer-{n}.bin")),
            "{listing}"
        );
    }
    // Fresh bytes every time, so two images never share a layer by accident.
    assert_ne!(image.layers[0].digest, image.layers[1].digest);
}

#[tokio::test]
async fn serves_an_index_over_two_platforms() {
    let index = Index::two_platforms(1, 100);
    let up = FakeUpstream::builder()
        .index("a/b/c", "multi", &index)
        .start()
        .await;
    let base = format!("{}/v2/a/b/c", up.url());

    let response = get(&format!("{base}/manifests/multi")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(response.headers(), "content-type"), OCI_INDEX);
    let body = json(response).await;
    let manifests = body["manifests"].as_array().expect("manifests array");
    assert_eq!(manifests.len(), 2);
    for (entry, image) in manifests.iter().zip(&index.images) {
        assert_eq!(entry["digest"], image.manifest.digest.as_str());
        assert_eq!(
            entry["platform"]["architecture"],
            image.architecture.as_str()
        );
        let response = get(&format!("{base}/manifests/{}", image.manifest.digest)).await;
        assert_eq!(response.status(), StatusCode::OK);
        for blob in image.blobs() {
            let response = head(&format!("{base}/blobs/{}", blob.digest)).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    assert_eq!(index.images[1].architecture, "arm64");
}

#[tokio::test]
async fn blob_ranges_answer_206_with_content_range() {
    let bytes: Vec<u8> = (0..100u8).collect();
    let up = FakeUpstream::builder()
        .blob("library/alpine", bytes.clone())
        .start()
        .await;
    let url = format!(
        "{}/v2/library/alpine/blobs/{}",
        up.url(),
        sha256_digest(&bytes)
    );
    let ranged = |range: &'static str| {
        let url = url.clone();
        async move {
            client()
                .get(&url)
                .header("range", range)
                .send()
                .await
                .expect("the fake answers")
        }
    };

    for (range, first, last) in [
        ("bytes=2-5", 2, 5),
        ("bytes=90-", 90, 99),
        ("bytes=-3", 97, 99),
        ("bytes=95-500", 95, 99),
    ] {
        let response = ranged(range).await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(response.headers(), "content-range"),
            format!("bytes {first}-{last}/100")
        );
        let body = response.bytes().await.expect("range body");
        assert_eq!(&body[..], &bytes[first..=last], "{range}");
    }

    let response = ranged("bytes=100-").await;
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(response.headers(), "content-range"), "bytes */100");

    // A range the fake does not understand is ignored, as RFC 9110 allows.
    let response = ranged("bytes=1-2,5-6").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.expect("body").len(), 100);
}

#[tokio::test]
async fn content_is_per_repository_and_unknowns_use_the_spec_codes() {
    let up = FakeUpstream::builder().start().await;
    let digest = up.add_blob("a/b/c", &b"only in a/b/c"[..]);
    let tricky = up.add_blob("x/blobs/y", &b"a name with a marker inside"[..]);

    let response = get(&format!("{}/v2/a/b/c/blobs/{digest}", up.url())).await;
    assert_eq!(response.status(), StatusCode::OK);

    let response = get(&format!("{}/v2/library/alpine/blobs/{digest}", up.url())).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "BLOB_UNKNOWN");

    let response = get(&format!("{}/v2/x/blobs/y/blobs/{tricky}", up.url())).await;
    assert_eq!(response.status(), StatusCode::OK);

    let response = get(&format!("{}/v2/a/b/c/manifests/latest", up.url())).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        header(response.headers(), "content-type"),
        "application/json"
    );
    assert_eq!(error_code(response).await, "MANIFEST_UNKNOWN");

    let response = get(&format!("{}/v2/nobody/tags/list", up.url())).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "NAME_UNKNOWN");

    up.remove_blob("a/b/c", &digest);
    let response = get(&format!("{}/v2/a/b/c/blobs/{digest}", up.url())).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn lists_tags_and_answers_referrers_with_an_empty_index() {
    let up = FakeUpstream::builder()
        .manifest("library/alpine", "3.19", OCI_MANIFEST, &b"{}"[..])
        .manifest("library/alpine", "3.20", OCI_MANIFEST, &b"{ }"[..])
        .manifest("library/alpine", "latest", OCI_MANIFEST, &b"{ }"[..])
        .start()
        .await;

    let response = get(&format!("{}/v2/library/alpine/tags/list", up.url())).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    assert_eq!(
        body,
        serde_json::json!({ "name": "library/alpine", "tags": ["3.19", "3.20", "latest"] })
    );

    let response = get(&format!("{}/v2/library/alpine/tags/list?n=2", up.url())).await;
    assert_eq!(
        header(response.headers(), "link"),
        "</v2/library/alpine/tags/list?n=2&last=3.20>; rel=\"next\""
    );
    assert_eq!(
        json(response).await["tags"],
        serde_json::json!(["3.19", "3.20"])
    );
    let response = get(&format!(
        "{}/v2/library/alpine/tags/list?n=2&last=3.20",
        up.url()
    ))
    .await;
    assert!(response.headers().get("link").is_none());
    assert_eq!(json(response).await["tags"], serde_json::json!(["latest"]));

    let digest = sha256_digest(b"{}");
    let response = get(&format!(
        "{}/v2/library/alpine/referrers/{digest}",
        up.url()
    ))
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(response.headers(), "content-type"), OCI_INDEX);
    let body = json(response).await;
    assert_eq!(body["manifests"], serde_json::json!([]));
    assert_eq!(body["schemaVersion"], 2);
}

#[tokio::test]
async fn moving_and_removing_a_tag_shows_in_the_next_answer() {
    let up = FakeUpstream::builder()
        .manifest("library/alpine", "latest", OCI_MANIFEST, &b"{\"v\":1}"[..])
        .start()
        .await;
    let url = format!("{}/v2/library/alpine/manifests/latest", up.url());
    let old = sha256_digest(b"{\"v\":1}");
    assert_eq!(
        header(head(&url).await.headers(), "docker-content-digest"),
        old
    );

    let new = up.set_manifest("library/alpine", "latest", OCI_MANIFEST, &b"{\"v\":2}"[..]);
    assert_ne!(new, old);
    assert_eq!(
        header(head(&url).await.headers(), "docker-content-digest"),
        new
    );
    // The old manifest stays reachable by digest, as on a real registry.
    let by_digest = format!("{}/v2/library/alpine/manifests/{old}", up.url());
    assert_eq!(get(&by_digest).await.status(), StatusCode::OK);

    up.remove_tag("library/alpine", "latest");
    assert_eq!(head(&url).await.status(), StatusCode::NOT_FOUND);
    up.remove_manifest("library/alpine", &old);
    assert_eq!(get(&by_digest).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn basic_auth_challenges_until_the_credentials_match() {
    let up = FakeUpstream::builder()
        .basic_auth("alice", "s3cret")
        .manifest("library/alpine", "latest", OCI_MANIFEST, &b"{}"[..])
        .start()
        .await;
    let url = format!("{}/v2/library/alpine/manifests/latest", up.url());

    let response = get(&url).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(response.headers(), "www-authenticate"),
        "Basic realm=\"fake\""
    );
    assert_eq!(error_code(response).await, "UNAUTHORIZED");

    let wrong = client()
        .get(&url)
        .basic_auth("alice", Some("guess"))
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let right = client()
        .get(&url)
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(right.status(), StatusCode::OK);
    assert_eq!(
        up.requests()[2].header("authorization"),
        Some("Basic YWxpY2U6czNjcmV0")
    );
}

async fn fetch_token(
    up: &FakeUpstream,
    scope: &str,
    credentials: Option<(&str, &str)>,
) -> Response {
    // Encoded as clients do (`repository%3Alibrary%2Falpine%3Apull`), so the fake's decoding is
    // exercised too.
    let scope: String = scope
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let url = format!(
        "{}/token?service={TOKEN_SERVICE}&scope={scope}&account=alice",
        up.url()
    );
    let mut request = client().get(url);
    if let Some((user, pass)) = credentials {
        request = request.basic_auth(user, Some(pass));
    }
    request.send().await.expect("the token endpoint answers")
}

#[tokio::test]
async fn bearer_tokens_are_issued_for_credentials_and_scoped_to_a_repository() {
    let up = FakeUpstream::builder()
        .bearer_auth("alice", "s3cret")
        .token_expires_in(Duration::from_secs(42))
        .manifest("library/alpine", "latest", OCI_MANIFEST, &b"{}"[..])
        .manifest("library/busybox", "latest", OCI_MANIFEST, &b"{}"[..])
        .start()
        .await;
    let alpine = format!("{}/v2/library/alpine/manifests/latest", up.url());
    let busybox = format!("{}/v2/library/busybox/manifests/latest", up.url());

    let response = get(&alpine).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(response.headers(), "www-authenticate"),
        format!(
            "Bearer realm=\"{}/token\",service=\"fake-registry\",scope=\"repository:library/alpine:pull\"",
            up.url()
        )
    );
    let response = get(&format!("{}/v2/", up.url())).await;
    assert_eq!(
        header(response.headers(), "www-authenticate"),
        format!(
            "Bearer realm=\"{}/token\",service=\"fake-registry\"",
            up.url()
        )
    );

    let scope = "repository:library/alpine:pull";
    assert_eq!(
        fetch_token(&up, scope, None).await.status(),
        StatusCode::UNAUTHORIZED,
        "no anonymous tokens unless asked for"
    );
    assert_eq!(
        fetch_token(&up, scope, Some(("alice", "nope")))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let response = fetch_token(&up, scope, Some(("alice", "s3cret"))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    let token = body["token"].as_str().expect("token field").to_owned();
    assert_eq!(body["access_token"], token.as_str());
    assert_eq!(body["expires_in"], 42);
    assert_eq!(up.token_requests(), 3);

    let with_token = |url: String| {
        let token = token.clone();
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("the fake answers")
        }
    };
    assert_eq!(with_token(alpine.clone()).await.status(), StatusCode::OK);
    assert_eq!(
        with_token(format!("{}/v2/", up.url())).await.status(),
        StatusCode::OK
    );
    let response = with_token(busybox.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        header(response.headers(), "www-authenticate")
            .contains("scope=\"repository:library/busybox:pull\",error=\"insufficient_scope\"")
    );

    up.expire_tokens();
    assert_eq!(with_token(alpine).await.status(), StatusCode::UNAUTHORIZED);
    // Token requests are counted apart from API requests, though both are recorded.
    assert_eq!(up.token_requests(), 3);
    assert_eq!(up.count("GET", "/token"), 3);
}

#[tokio::test]
async fn bearer_tokens_also_come_from_a_password_grant_post_and_anonymously() {
    let up = FakeUpstream::builder()
        .bearer_auth("alice", "s3cret")
        .anonymous_tokens()
        .manifest("a/b", "latest", OCI_MANIFEST, &b"{}"[..])
        .start()
        .await;
    let form = "grant_type=password&username=alice&password=s3cret\
                &scope=repository%3Aa%2Fb%3Apull&service=fake-registry&client_id=containerd-client";
    let response = client()
        .post(format!("{}/token", up.url()))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("the token endpoint answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(up.requests()[0].body, form.as_bytes());
    let token = json(response).await["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned();
    let url = format!("{}/v2/a/b/manifests/latest", up.url());
    let response = client()
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(response.status(), StatusCode::OK);

    let response = fetch_token(&up, "repository:a/b:pull", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let anonymous = json(response).await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let response = client()
        .get(&url)
        .bearer_auth(&anonymous)
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(response.status(), StatusCode::OK);
    // Anonymous is not a licence for wrong credentials.
    let response = fetch_token(&up, "repository:a/b:pull", Some(("alice", "nope"))).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(up.token_requests(), 3);
}

#[tokio::test]
async fn status_faults_apply_to_the_next_k_gets_then_stop() {
    let up = FakeUpstream::builder().start().await;
    let digest = up.add_blob("library/alpine", &b"layer"[..]);
    up.inject(Fault::on_blob(&digest).status(503).times(2));
    let url = format!("{}/v2/library/alpine/blobs/{digest}", up.url());

    // GET-only by default: a HEAD neither sees nor spends the fault.
    assert_eq!(head(&url).await.status(), StatusCode::OK);
    let response = get(&url).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(response).await, "UNAVAILABLE");
    assert_eq!(get(&url).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&url).await.status(), StatusCode::OK);
    assert_eq!(up.gets_of_blob(&digest), 3);

    up.inject(
        Fault::on_path("/v2/library/alpine/manifests/latest")
            .status(429)
            .retry_after(7)
            .any_method(),
    );
    let manifest = format!("{}/v2/library/alpine/manifests/latest", up.url());
    for _ in 0..2 {
        let response = head(&manifest).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(response.headers(), "retry-after"), "7");
    }
    let response = get(&manifest).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(response).await, "TOOMANYREQUESTS");
    up.clear_faults();
    assert_eq!(get(&manifest).await.status(), StatusCode::NOT_FOUND);

    up.inject(Fault::on_manifest("latest").status(403).once());
    let response = get(&manifest).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "DENIED");
}

#[tokio::test]
async fn faults_are_checked_after_the_challenge() {
    let up = FakeUpstream::builder()
        .basic_auth("alice", "s3cret")
        .start()
        .await;
    let digest = up.add_blob("r", &b"x"[..]);
    up.inject(Fault::on_blob(&digest).status(500).once());
    let url = format!("{}/v2/r/blobs/{digest}", up.url());

    // The unauthenticated probe gets the challenge and leaves the fault for the real request.
    assert_eq!(get(&url).await.status(), StatusCode::UNAUTHORIZED);
    let authed = || {
        client()
            .get(&url)
            .basic_auth("alice", Some("s3cret"))
            .send()
    };
    assert_eq!(
        authed().await.expect("answer").status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(authed().await.expect("answer").status(), StatusCode::OK);
}

#[tokio::test]
async fn a_reset_after_n_bytes_is_an_error_not_a_clean_end() {
    let bytes = vec![7u8; 100_000];
    let up = FakeUpstream::builder().start().await;
    let digest = up.add_blob("r", bytes.clone());
    up.inject(Fault::on_blob(&digest).reset_after(1000).once());
    let url = format!("{}/v2/r/blobs/{digest}", up.url());

    let mut response = get(&url).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(response.headers(), "content-length"), "100000");
    let mut received = 0;
    let failure = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => panic!("the body ended cleanly after {received} bytes"),
            Err(e) => break e,
        }
    };
    assert_eq!(received, 1000, "{failure}");

    // Spent: the next GET gets the whole blob.
    let body = get(&url).await.bytes().await.expect("whole body");
    assert_eq!(body.len(), bytes.len());

    // A reset before any body byte still delivers the headers first.
    up.inject(Fault::on_blob(&digest).reset_after(0).once());
    let response = get(&url).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.is_err());
}

#[tokio::test]
async fn wrong_bytes_keep_the_length_and_break_the_digest() {
    let up = FakeUpstream::builder().start().await;
    let digest = up.add_blob("r", &b"the right bytes"[..]);
    up.inject(Fault::on_blob(&digest).wrong_bytes().once());
    let url = format!("{}/v2/r/blobs/{digest}", up.url());

    let response = get(&url).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(response.headers(), "docker-content-digest"), digest);
    let body = response.bytes().await.expect("body");
    assert_eq!(body.len(), b"the right bytes".len());
    assert_ne!(sha256_digest(&body), digest);

    let body = get(&url).await.bytes().await.expect("body");
    assert_eq!(sha256_digest(&body), digest);
}

#[tokio::test]
async fn a_delay_holds_back_the_headers() {
    let up = FakeUpstream::builder()
        .fault(
            Fault::on_path("/v2/")
                .delay(Duration::from_millis(300))
                .once(),
        )
        .start()
        .await;
    let started = std::time::Instant::now();
    assert_eq!(
        get(&format!("{}/v2/", up.url())).await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    let started = std::time::Instant::now();
    assert_eq!(
        get(&format!("{}/v2/", up.url())).await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn a_throttled_body_can_be_watched_in_progress() {
    let bytes: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let up = FakeUpstream::builder().start().await;
    let digest = up.add_blob("r", bytes.clone());
    up.inject(Fault::on_blob(&digest).throttle(1000, Duration::from_millis(150)));
    let url = format!("{}/v2/r/blobs/{digest}", up.url());

    let started = std::time::Instant::now();
    let mut response = get(&url).await;
    let first = response
        .chunk()
        .await
        .expect("first chunk")
        .expect("not the end yet");
    assert!(first.len() <= 1000);
    assert!(
        up.blob_bytes_sent(&digest) < 4000,
        "the rest is still to come"
    );
    let mut body = first.to_vec();
    while let Some(chunk) = response.chunk().await.expect("body continues") {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body, bytes);
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(
        up.wait_until(Duration::from_secs(5), |up| up.blob_bytes_sent(&digest)
            == 4000)
            .await
    );
}

#[tokio::test]
async fn a_redirect_to_a_blob_cdn_shows_which_credentials_followed() {
    let bytes = b"layer served by the cdn".to_vec();
    let cdn = FakeUpstream::builder()
        .blob_cdn()
        .blob("anywhere", bytes.clone())
        .start()
        .await;
    let up = FakeUpstream::builder()
        .basic_auth("alice", "s3cret")
        .blob("library/alpine", bytes.clone())
        .start()
        .await;
    let digest = sha256_digest(&bytes);
    up.inject(Fault::on_blob(&digest).redirect_to(&cdn.url()));
    let path = format!("/v2/library/alpine/blobs/{digest}");

    let response = client()
        .get(format!("{}{path}", up.url()))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        header(response.headers(), "location"),
        format!("{}{path}", cdn.url())
    );

    // A client that follows redirects the way it should drops the credentials across hosts.
    let following = Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client");
    let response = following
        .get(format!("{}{path}", up.url()))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("the redirect is followed");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.expect("body"), bytes);
    let seen = cdn.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, path);
    assert_eq!(seen[0].header("authorization"), None);

    // And the CDN does record the header when one arrives.
    let response = client()
        .get(format!("{}/cdn/{digest}?sig=1", cdn.url()))
        .header(AUTHORIZATION, "Basic leaked")
        .send()
        .await
        .expect("the cdn answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        cdn.requests()[1].header("authorization"),
        Some("Basic leaked")
    );
    assert_eq!(
        cdn.gets_of_blob(&digest),
        1,
        "only /blobs/ paths count as blob GETs"
    );
}

#[tokio::test]
async fn down_answers_503_until_it_is_up_again() {
    let up = FakeUpstream::builder().start().await;
    let url = format!("{}/v2/", up.url());
    up.set_down(true);
    let response = get(&url).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(response).await, "UNAVAILABLE");
    up.set_down(false);
    assert_eq!(get(&url).await.status(), StatusCode::OK);
    assert_eq!(
        up.count("get", "/v2/"),
        2,
        "requests while down are recorded"
    );
}

#[tokio::test]
async fn refusing_closes_even_pooled_connections_and_reopens_on_the_same_port() {
    let up = FakeUpstream::builder().start().await;
    let url = format!("{}/v2/", up.url());
    let pooled = client();
    let send = || pooled.get(&url).send();
    assert_eq!(send().await.expect("answer").status(), StatusCode::OK);

    up.set_refusing(true).await;
    let failure = send().await.expect_err("nothing listens");
    assert!(failure.is_connect(), "{failure:?}");

    up.set_refusing(false).await;
    assert_eq!(send().await.expect("answer").status(), StatusCode::OK);
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let up = FakeUpstream::builder().start().await;
    let url = format!("{}/v2/", up.url());
    assert_eq!(get(&url).await.status(), StatusCode::OK);
    up.shutdown().await;
    let failure = client()
        .get(&url)
        .send()
        .await
        .expect_err("nothing listens");
    assert!(failure.is_connect(), "{failure}");
}

#[tokio::test]
async fn dropping_the_handle_stops_it() {
    let up = FakeUpstream::builder().start().await;
    let url = format!("{}/v2/", up.url());
    assert_eq!(get(&url).await.status(), StatusCode::OK);
    drop(up);
    // The listener closes once the runtime runs the aborted task: soon, but not synchronously.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client().get(&url).send().await {
            Err(failure) if failure.is_connect() => break,
            _ if tokio::time::Instant::now() > deadline => panic!("still listening after 5s"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test]
async fn records_method_path_query_and_headers() {
    let up = FakeUpstream::builder()
        .manifest("library/alpine", "latest", OCI_MANIFEST, &b"{}"[..])
        .start()
        .await;
    let response = client()
        .head(format!(
            "{}/v2/library/alpine/manifests/latest?ns=docker.io",
            up.url()
        ))
        .header("accept", OCI_MANIFEST)
        .header("accept", OCI_INDEX)
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(response.status(), StatusCode::OK);

    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(seen[0].path, "/v2/library/alpine/manifests/latest");
    assert_eq!(seen[0].query.as_deref(), Some("ns=docker.io"));
    assert_eq!(seen[0].query_param("ns").as_deref(), Some("docker.io"));
    let accepts: Vec<_> = seen[0].headers.get_all("accept").iter().collect();
    assert_eq!(accepts.len(), 2, "repeated header lines are kept apart");
    assert_eq!(up.count("HEAD", "/v2/library/"), 1);
    assert_eq!(up.count("GET", "/v2/library/"), 0);
    assert_eq!(up.heads_of_manifest("latest"), 1);

    up.clear_requests();
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn speaks_http2_with_prior_knowledge() {
    let up = FakeUpstream::builder().start().await;
    let digest = up.add_blob("r", &b"over h2"[..]);
    let response = Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client")
        .get(format!("{}/v2/r/blobs/{digest}", up.url()))
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.bytes().await.expect("body"), &b"over h2"[..]);
}

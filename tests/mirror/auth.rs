//! Upstream authentication: the mirror logs in with its configured credentials (Bearer token
//! flow or Basic), reuses what it got, keeps the registry's credentials away from the blob CDN
//! it is redirected to, and reports its own rejected credentials as an upstream failure, never
//! as the client's.

use reqwest::StatusCode;

use super::{assert_error, cache_dir, header, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image, RecordedRequest};
use crate::support::mirror::{Mirror, MirrorBuilder};

const REPO: &str = "team/app";

/// Requests to the registry API for [`REPO`].
fn api_requests(up: &FakeUpstream) -> Vec<RecordedRequest> {
    up.requests()
        .into_iter()
        .filter(|r| r.path.starts_with(&format!("/v2/{REPO}/")))
        .collect()
}

async fn mirror_with_credentials(
    up: &FakeUpstream,
    dir: &tempfile::TempDir,
    password: &str,
) -> Mirror {
    MirrorBuilder::new(dir.path())
        .upstream_with_credentials(&up.host(), &up.url(), "bot", password)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bearer_token_is_fetched_once_with_the_configured_credentials_and_reused() {
    let image = Image::new(2, 20_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "s3cret")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_with_credentials(&up, &dir, "s3cret").await;

    let pulled = within(
        "a pull through a token-protected upstream",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    assert_eq!(pulled[0].body, image.manifest.bytes);
    assert_eq!(up.token_requests(), 1, "one token for the whole pull");
    let token_request = up
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .expect("the token endpoint was asked");
    let presented = token_request
        .header("authorization")
        .map(str::to_owned)
        .or_else(|| {
            (!token_request.body.is_empty())
                .then(|| String::from_utf8_lossy(&token_request.body).into_owned())
        });
    assert!(
        presented.is_some(),
        "the token request carries the configured credentials"
    );

    let api = api_requests(&up);
    let anonymous = api
        .iter()
        .filter(|r| r.header("authorization").is_none())
        .count();
    assert_eq!(
        anonymous, 1,
        "only the first request goes without the token"
    );
    for request in api.iter().skip(1) {
        let auth = request.header("authorization").unwrap_or_default();
        assert!(
            auth.starts_with("Bearer "),
            "{} {} carries the token, got {auth:?}",
            request.method,
            request.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_public_token_registry_works_without_credentials() {
    let image = Image::new(1, 20_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "s3cret")
        .anonymous_tokens()
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = MirrorBuilder::new(dir.path())
        .upstream(&up.host(), &up.url())
        .start()
        .await;

    within(
        "an anonymous pull through a token-protected upstream",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    assert_eq!(up.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_credentials_are_sent_once_the_upstream_asks_for_them() {
    let image = Image::new(2, 20_000);
    let up = FakeUpstream::builder()
        .basic_auth("bot", "s3cret")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_with_credentials(&up, &dir, "s3cret").await;

    within(
        "a pull through a Basic-protected upstream",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    let api = api_requests(&up);
    assert_eq!(
        api.iter()
            .filter(|r| r.header("authorization").is_none())
            .count(),
        1,
        "only the first request goes without credentials"
    );
    for request in api.iter().skip(1) {
        let auth = request.header("authorization").unwrap_or_default();
        assert!(
            auth.starts_with("Basic "),
            "{} {} carries Basic credentials, got {auth:?}",
            request.method,
            request.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_mirror_credentials_are_an_upstream_failure_not_a_client_one() {
    let image = Image::new(1, 1000);
    let bearer = FakeUpstream::builder()
        .bearer_auth("bot", "right")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let basic = FakeUpstream::builder()
        .basic_auth("bot", "right")
        .image(REPO, "v1", &image)
        .start()
        .await;
    for (scheme, up) in [("Bearer", &bearer), ("Basic", &basic)] {
        let dir = cache_dir();
        let mirror = mirror_with_credentials(up, &dir, "wrong").await;
        for path in [
            format!("/v2/{REPO}/manifests/v1"),
            format!("/v2/{REPO}/blobs/{}", image.layers[0].digest),
        ] {
            let response = mirror.get(&path).await;
            assert_eq!(
                header(&response, "www-authenticate"),
                None,
                "{scheme}: the client is not asked to log in"
            );
            assert_error(
                response,
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("{scheme}: GET {path} with wrong mirror credentials"),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_redirected_to_a_cdn_are_fetched_without_the_registry_credentials() {
    let image = Image::new(2, 50_000);
    let mut cdn = FakeUpstream::builder().blob_cdn();
    for blob in image.blobs() {
        cdn = cdn.blob("any", blob.bytes.clone());
    }
    let cdn = cdn.start().await;
    let mut up = FakeUpstream::builder()
        .bearer_auth("bot", "s3cret")
        .image(REPO, "v1", &image);
    for blob in image.blobs() {
        up = up.fault(Fault::on_blob(&blob.digest).redirect_to(&cdn.url()));
    }
    let up = up.start().await;
    let dir = cache_dir();
    let mirror = mirror_with_credentials(&up, &dir, "s3cret").await;

    let pulled = within(
        "a pull with blobs on a CDN",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    assert_eq!(pulled.len(), 1 + image.blobs().count());
    let cdn_gets: Vec<RecordedRequest> = cdn
        .requests()
        .into_iter()
        .filter(|r| r.method == reqwest::Method::GET)
        .collect();
    assert_eq!(
        cdn_gets.len(),
        image.blobs().count(),
        "every blob came from the CDN"
    );
    for request in &cdn_gets {
        assert_eq!(
            request.header("authorization"),
            None,
            "the CDN got the registry's credentials on {}",
            request.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_challenge_from_the_cdn_a_blob_was_redirected_to_gets_no_credentials() {
    let image = Image::new(1, 20_000);
    let layer = image.layers[0].clone();
    // The CDN answers 401 with a Bearer challenge naming its own token realm.
    let cdn = FakeUpstream::builder()
        .blob_cdn()
        .bearer_auth("someone", "else")
        .blob("any", layer.bytes.clone())
        .fault(Fault::on_any().status(401))
        .start()
        .await;
    // The registry itself asks for nothing before redirecting, so the CDN's is the first
    // challenge the mirror sees.
    let up = FakeUpstream::builder()
        .image(REPO, "v1", &image)
        .fault(Fault::on_blob(&layer.digest).redirect_to(&cdn.url()))
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_with_credentials(&up, &dir, "s3cret").await;

    let response = mirror
        .get(&format!("/v2/{REPO}/blobs/{}", layer.digest))
        .await;
    assert_ne!(
        response.status(),
        StatusCode::OK,
        "the CDN refused the blob"
    );
    let to_cdn = cdn.requests();
    assert!(!to_cdn.is_empty(), "the blob request reached the CDN");
    for request in &to_cdn {
        assert_eq!(
            request.header("authorization"),
            None,
            "the CDN got the registry's credentials on {}",
            request.path
        );
        assert!(
            !request.path.starts_with("/token"),
            "the mirror asked the CDN's realm for a token"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_is_replaced_and_the_pull_goes_on() {
    let image = Image::new(2, 20_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "s3cret")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_with_credentials(&up, &dir, "s3cret").await;

    let response = mirror.get(&format!("/v2/{REPO}/manifests/v1")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(up.token_requests(), 1);

    // The registry revokes or expires the token before the mirror expected.
    up.expire_tokens();
    for layer in &image.layers {
        let bytes = super::get_blob(&mirror, REPO, &layer.digest).await;
        assert_eq!(bytes, layer.bytes);
    }
    assert_eq!(up.token_requests(), 2, "one new token, then reused");
}

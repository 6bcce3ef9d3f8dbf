//! Upstream credentials from a mounted `kubernetes.io/dockerconfigjson` Secret: the mirror logs
//! in with what the Secret holds (Basic, token endpoint, identity token, registry token), follows
//! the kubelet's rotation of the volume without a restart and without a failed pull, keeps the
//! last good credentials when a new version does not parse, drops tokens obtained with replaced
//! credentials, and lets the config file's own credentials win.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine as _;
use reqwest::StatusCode;

use super::{cache_dir, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Fault, Image, RecordedRequest};
use crate::support::mirror::{Mirror, MirrorBuilder};
use crate::support::secret::{SecretVolume, dockerconfigjson};

const REPO: &str = "team/app";

/// The passwords presented to the token endpoint (Basic on GET, the form's password or
/// refresh token on POST), in order.
fn token_passwords(up: &FakeUpstream) -> Vec<String> {
    up.requests()
        .into_iter()
        .filter(|r| r.path == "/token")
        .filter_map(|r| presented_password(&r))
        .collect()
}

fn presented_password(r: &RecordedRequest) -> Option<String> {
    if let Some(basic) = r
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return Some(text.split_once(':')?.1.to_owned());
    }
    let form = String::from_utf8_lossy(&r.body).into_owned();
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "password" || k == "refresh_token").then(|| v.to_owned())
    })
}

/// Polls the mirror's metrics until `metric` reaches `value`.
async fn wait_for_metric(mirror: &Mirror, metric: &str, value: f64) {
    within(&format!("{metric} reaching {value}"), async {
        loop {
            if mirror.metric(metric, &[]).await >= value {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn volume(dir: &tempfile::TempDir, up: &FakeUpstream, password: &str) -> SecretVolume {
    SecretVolume::create(
        &dir.path().join("secret"),
        &dockerconfigjson(&[(&up.host(), "bot", password)]),
    )
}

async fn mirror_with_secret(
    up: &FakeUpstream,
    dir: &tempfile::TempDir,
    secret: &SecretVolume,
) -> Mirror {
    MirrorBuilder::new(&dir.path().join("cache"))
        .upstream(&up.host(), &up.url())
        .credentials_from(secret.dir())
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mounted_secret_logs_the_mirror_in_to_a_token_registry() {
    let image = Image::new(2, 20_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "from-secret")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let secret = volume(&dir, &up, "from-secret");
    let mirror = mirror_with_secret(&up, &dir, &secret).await;

    let pulled = within(
        "a pull with credentials from a secret",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    assert_eq!(pulled[0].body, image.manifest.bytes);
    assert_eq!(token_passwords(&up), vec!["from-secret".to_owned()]);
    assert_eq!(
        mirror
            .metric("regcache_credentials_reloads_total", &[])
            .await,
        1.0
    );
    assert_eq!(
        mirror
            .metric("regcache_credentials_reload_errors_total", &[])
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_credentials_apply_to_their_path_prefix_only() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .basic_auth("bot", "team-pw")
        .image(REPO, "v1", &image)
        .image("other/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let secret = SecretVolume::create(
        &dir.path().join("secret"),
        &dockerconfigjson(&[(&format!("https://{}/v2/team", up.host()), "bot", "team-pw")]),
    );
    let mirror = mirror_with_secret(&up, &dir, &secret).await;

    within(
        "a pull under the key's path",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    let other = mirror.get("/v2/other/app/manifests/v1").await;
    assert_ne!(other.status(), StatusCode::OK);
    let other_requests: Vec<RecordedRequest> = up
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v2/other/"))
        .collect();
    assert!(!other_requests.is_empty());
    assert!(
        other_requests
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "team/'s credentials were sent for other/"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_token_is_exchanged_at_the_realm() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "refresh-me")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let auth = crate::support::secret::auth("bot", "");
    let secret = SecretVolume::create(
        &dir.path().join("secret"),
        &serde_json::json!({"auths": {up.host(): {"auth": auth, "identitytoken": "refresh-me"}}})
            .to_string(),
    );
    let mirror = mirror_with_secret(&up, &dir, &secret).await;
    within(
        "a pull with an identity token",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    let token_request = up
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .expect("the token endpoint was asked");
    assert_eq!(token_request.method, reqwest::Method::POST);
    let form = String::from_utf8_lossy(&token_request.body).into_owned();
    assert!(form.contains("grant_type=refresh_token"), "{form}");
    assert!(token_request.header("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_token_is_sent_as_the_bearer_token() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "pw")
        .image(REPO, "v1", &image)
        .start()
        .await;
    // A token issued out of band, as a cloud provider's helper would write it.
    let token = reqwest::Client::new()
        .get(format!(
            "{}/token?service=x&scope=repository:{REPO}:pull",
            up.url()
        ))
        .basic_auth("bot", Some("pw"))
        .send()
        .await
        .expect("token endpoint")
        .bytes()
        .await
        .expect("token body");
    let token: serde_json::Value = serde_json::from_slice(&token).expect("token JSON");
    let token = token["token"].as_str().expect("a token").to_owned();
    let issued = up.token_requests();
    let dir = cache_dir();
    let secret = SecretVolume::create(
        &dir.path().join("secret"),
        &serde_json::json!({"auths": {up.host(): {"registrytoken": token}}}).to_string(),
    );
    let mirror = mirror_with_secret(&up, &dir, &secret).await;
    within(
        "a pull with a registry token",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    assert_eq!(up.token_requests(), issued, "the mirror fetched no token");
    let api: Vec<RecordedRequest> = up
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v2/"))
        .collect();
    assert!(
        api.iter()
            .all(|r| r.header("authorization") == Some(&format!("Bearer {token}"))),
        "every request carries the registry token"
    );
}

/// Lists `REPO`'s tags in a loop from several tasks until told to stop, counting successes and
/// returning failures. A tag list is passed through, never cached or served stale, so every
/// request reaches the upstream with the credentials of the moment.
fn storm(
    mirror: &Arc<Mirror>,
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..6)
        .map(|_| {
            let (mirror, stop, ok) = (mirror.clone(), stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = mirror.get(&format!("/v2/{REPO}/tags/list")).await;
                    let status = response.status();
                    if status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let body = response.text().await.unwrap_or_default();
                        failures.push(format!("{status}: {body}"));
                    }
                }
                failures
            })
        })
        .collect()
}

async fn wait_for_more(ok: &AtomicUsize, more: usize) {
    let target = ok.load(Ordering::Relaxed) + more;
    within("more successful pulls", async {
        while ok.load(Ordering::Relaxed) < target {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_during_a_pull_storm_fails_no_pull() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "pw-1")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mut secret = volume(&dir, &up, "pw-1");
    let mirror = Arc::new(
        MirrorBuilder::new(&dir.path().join("cache"))
            .upstream(&up.host(), &up.url())
            .credentials_from(secret.dir())
            .start()
            .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks = storm(&mirror, &stop, &ok);
    wait_for_more(&ok, 30).await;

    // 1. The Secret changes first; the registry accepts only the old password for a while.
    secret.update(&dockerconfigjson(&[(&up.host(), "bot", "pw-2")]));
    wait_for_metric(&mirror, "regcache_credentials_reloads_total", 2.0).await;
    wait_for_more(&ok, 30).await;
    // Then the registry switches, and forgets every token it issued.
    up.set_credentials("bot", "pw-2");
    up.expire_tokens();
    wait_for_more(&ok, 30).await;

    // 2. The registry switches the moment the Secret changes, before the file event arrives.
    secret.update(&dockerconfigjson(&[(&up.host(), "bot", "pw-3")]));
    up.set_credentials("bot", "pw-3");
    up.expire_tokens();
    wait_for_more(&ok, 30).await;
    wait_for_metric(&mirror, "regcache_credentials_reloads_total", 3.0).await;
    wait_for_more(&ok, 30).await;

    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(within("the storm to end", task).await.expect("no panic"));
    }
    assert!(failures.is_empty(), "failed pulls: {failures:?}");
    let presented = token_passwords(&up);
    assert!(presented.contains(&"pw-2".to_owned()), "{presented:?}");
    // Settled: a new token is obtained with the current credentials only.
    up.expire_tokens();
    let before = up.token_requests();
    let response = mirror.get(&format!("/v2/{REPO}/tags/list")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(up.token_requests(), before + 1);
    assert_eq!(
        token_passwords(&up).last().map(String::as_str),
        Some("pw-3")
    );
    assert_eq!(
        mirror
            .metric("regcache_credentials_reload_errors_total", &[])
            .await,
        0.0
    );
}

/// A mirror that pulled with pw-1 from a registry that takes pw-1, after the Secret moved on to
/// pw-2: the mirror holds pw-2, and pw-1 as the one it replaced.
struct Rotated {
    up: FakeUpstream,
    secret: SecretVolume,
    mirror: Mirror,
    /// The tag list of `REPO`: passed through to the upstream on every request.
    tags: String,
    /// Holds the cache and the Secret volume; removed when dropped.
    _dir: tempfile::TempDir,
}

async fn secret_ahead_of_registry(layers: usize) -> Rotated {
    let image = Image::new(layers, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "pw-1")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mut secret = volume(&dir, &up, "pw-1");
    let mirror = mirror_with_secret(&up, &dir, &secret).await;
    let tags = format!("/v2/{REPO}/tags/list");
    assert_eq!(mirror.get(&tags).await.status(), StatusCode::OK);
    secret.update(&dockerconfigjson(&[(&up.host(), "bot", "pw-2")]));
    wait_for_metric(&mirror, "regcache_credentials_reloads_total", 2.0).await;
    Rotated {
        up,
        secret,
        mirror,
        tags,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_outlasts_two_rotations_ends_with_the_credentials_of_the_moment() {
    let Rotated {
        up,
        secret,
        mirror,
        tags,
        _dir,
    } = secret_ahead_of_registry(3).await;
    let host = up.host();
    let secret = std::sync::Mutex::new(secret);
    up.on_token_refusals(vec![
        // pw-2 is refused, and the registry switches to it while the mirror tries pw-1;
        Box::new(|| Some("pw-2".to_owned())),
        // pw-1 is refused, and meanwhile the Secret and the registry both move on to pw-3.
        Box::new(move || {
            secret
                .lock()
                .expect("the secret volume")
                .update(&dockerconfigjson(&[(&host, "bot", "pw-3")]));
            Some("pw-3".to_owned())
        }),
    ]);

    assert_eq!(mirror.get(&tags).await.status(), StatusCode::OK);
    assert_eq!(
        token_passwords(&up),
        ["pw-1", "pw-2", "pw-1", "pw-3"],
        "each attempt presents the credentials the Secret holds at that moment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_refuses_every_credential_is_asked_a_bounded_number_of_times() {
    let Rotated {
        up,
        mirror,
        tags,
        _dir,
        ..
    } = secret_ahead_of_registry(4).await;
    // The registry accepts neither the Secret's credentials nor the ones they replaced.
    up.set_credentials("bot", "pw-9");
    up.expire_tokens();

    let response = mirror.get(&tags).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = response.text().await.unwrap_or_default();
    assert!(
        body.contains("UNAVAILABLE") && body.contains("token"),
        "{body}"
    );
    assert_eq!(
        token_passwords(&up),
        ["pw-1", "pw-2", "pw-1", "pw-2"],
        "the current credentials, the replaced ones, the current ones once more, and no more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_secret_is_ahead_of_its_registry_the_new_credential_is_not_refused_on_every_pull() {
    let Rotated {
        up,
        mirror,
        tags,
        _dir,
        ..
    } = secret_ahead_of_registry(5).await;
    for _ in 0..5 {
        assert_eq!(mirror.get(&tags).await.status(), StatusCode::OK);
    }
    assert_eq!(
        token_passwords(&up),
        ["pw-1", "pw-2", "pw-1"],
        "refused once, then the accepted credentials first (a registry counts failed logins)"
    );
    // The registry catches up: the old credentials are refused once, the new ones used from then on.
    up.set_credentials("bot", "pw-2");
    up.expire_tokens();
    for _ in 0..3 {
        assert_eq!(mirror.get(&tags).await.status(), StatusCode::OK);
    }
    assert_eq!(
        token_passwords(&up),
        ["pw-1", "pw-2", "pw-1", "pw-1", "pw-2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_obtained_with_replaced_credentials_are_dropped() {
    let image = Image::new(2, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "pw-1")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mut secret = volume(&dir, &up, "pw-1");
    let mirror = mirror_with_secret(&up, &dir, &secret).await;
    let response = mirror.get(&format!("/v2/{REPO}/manifests/v1")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(token_passwords(&up), vec!["pw-1".to_owned()]);

    // The registry still honours the old token; the mirror must not keep using it.
    up.set_credentials("bot", "pw-2");
    secret.update(&dockerconfigjson(&[(&up.host(), "bot", "pw-2")]));
    wait_for_metric(&mirror, "regcache_credentials_reloads_total", 2.0).await;
    for layer in &image.layers {
        let bytes = super::get_blob(&mirror, REPO, &layer.digest).await;
        assert_eq!(bytes, layer.bytes);
    }
    assert_eq!(
        token_passwords(&up),
        vec!["pw-1".to_owned(), "pw-2".to_owned()],
        "one new token, obtained with the new credentials, then reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_that_does_not_parse_keeps_the_last_good_credentials() {
    let image = Image::new(2, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "good")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mut secret = volume(&dir, &up, "good");
    let mirror = mirror_with_secret(&up, &dir, &secret).await;
    let response = mirror.get(&format!("/v2/{REPO}/manifests/v1")).await;
    assert_eq!(response.status(), StatusCode::OK);

    secret.update(r#"{"auths": {"broken"#);
    wait_for_metric(&mirror, "regcache_credentials_reload_errors_total", 1.0).await;
    up.expire_tokens();
    for layer in &image.layers {
        let bytes = super::get_blob(&mirror, REPO, &layer.digest).await;
        assert_eq!(bytes, layer.bytes);
    }
    assert_eq!(
        token_passwords(&up),
        vec!["good".to_owned(), "good".to_owned()]
    );
    assert_eq!(
        mirror
            .metric("regcache_credentials_reloads_total", &[])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_config_files_own_credentials_take_precedence() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "static")
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let secret = volume(&dir, &up, "from-secret");
    let mirror = MirrorBuilder::new(&dir.path().join("cache"))
        .upstream_with_credentials(&up.host(), &up.url(), "bot", "static")
        .credentials_from(secret.dir())
        .start()
        .await;
    within(
        "a pull with static credentials",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    assert_eq!(token_passwords(&up), vec!["static".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_from_a_secret_do_not_follow_a_redirect_to_another_host() {
    let image = Image::new(2, 20_000);
    let mut cdn = FakeUpstream::builder().blob_cdn();
    for blob in image.blobs() {
        cdn = cdn.blob("any", blob.bytes.clone());
    }
    let cdn = cdn.start().await;
    let mut up = FakeUpstream::builder()
        .basic_auth("bot", "s3cret")
        .image(REPO, "v1", &image);
    for blob in image.blobs() {
        up = up.fault(Fault::on_blob(&blob.digest).redirect_to(&cdn.url()));
    }
    let up = up.start().await;
    let dir = cache_dir();
    let secret = volume(&dir, &up, "s3cret");
    let mirror = mirror_with_secret(&up, &dir, &secret).await;
    within(
        "a pull with blobs on a CDN",
        pull_image(mirror.client(), &mirror.url(), REPO, "v1"),
    )
    .await;
    let cdn_gets: Vec<RecordedRequest> = cdn
        .requests()
        .into_iter()
        .filter(|r| r.method == reqwest::Method::GET)
        .collect();
    assert_eq!(cdn_gets.len(), image.blobs().count());
    assert!(
        cdn_gets.iter().all(|r| r.header("authorization").is_none()),
        "the CDN got the registry's credentials"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_endpoint_is_off_by_default_and_masks_values_when_on() {
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "admin-hunter2")
        .start()
        .await;
    let dir = cache_dir();
    let secret = volume(&dir, &up, "admin-hunter2");
    let off = mirror_with_secret(&up, &dir, &secret).await;
    assert_eq!(
        off.get("/admin/credentials").await.status(),
        StatusCode::NOT_FOUND
    );
    off.stop().await;

    let on = MirrorBuilder::new(&dir.path().join("cache"))
        .upstream(&up.host(), &up.url())
        .credentials_from(secret.dir())
        .credentials_admin_endpoint(true)
        .start()
        .await;
    let response = on.get("/admin/credentials").await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body");
    assert!(!text.contains("admin-hunter2"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let row = &json["credentials"][0];
    assert_eq!(row["upstream"], up.host());
    assert_eq!(row["username"], "bot");
    assert_eq!(row["kind"], "basic");
    assert_eq!(row["secret"], "****");
    assert!(
        row["source"]
            .as_str()
            .is_some_and(|s| s.ends_with("secret"))
    );
    assert!(row["loaded_at"].as_str().is_some());
}

//! Credentials never leave the mirror except towards the registry they belong to: the built
//! binary runs a whole scenario at `trace` level (login from a mounted Secret, a pull, a
//! rotation, a Secret that does not parse, credentials the registry refuses, the metrics, the
//! admin endpoint, `credentials list`), and nothing it printed or answered contains a password
//! or the base64 `auth` string.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{cache_dir, pull_image, within};
use crate::support::fake_upstream::{FakeUpstream, Image};
use crate::support::secret::{SecretVolume, auth, dockerconfigjson};

const REPO: &str = "team/app";
const PW_1: &str = "first-Zq8xK2pw";
const PW_2: &str = "second-Lr5vN9pw";
/// Written in a Secret version that does not parse.
const PW_BAD: &str = "broken-Hc3wT7pw";

/// The mirror binary, killed if a test fails before stopping it.
pub struct Server {
    pub child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_regcache"))
}

/// `fields.addr` of the JSON `listening` line, once the log has it.
pub fn wait_for_addr(log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(line)
                && event["fields"]["message"] == "listening"
                && let Some(addr) = event["fields"]["addr"].as_str()
            {
                return addr.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "regcache did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything a client sees of a response: status, headers and body.
async fn seen(response: reqwest::Response) -> String {
    let mut out = format!("{}\n", response.status());
    for (name, value) in response.headers() {
        out.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    out.push_str(&String::from_utf8_lossy(
        &response.bytes().await.unwrap_or_default(),
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_output_of_a_whole_scenario_contains_a_credential() {
    let image = Image::new(2, 20_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", PW_1)
        .image(REPO, "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mut secret = SecretVolume::create(
        &dir.path().join("secret"),
        &dockerconfigjson(&[(&up.host(), "bot", PW_1)]),
    );
    let config = dir.path().join("regcache.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:0\"\n\
             cache: {{dir: {cache:?}}}\n\
             default_upstream: \"{host}\"\n\
             upstreams: [{{name: \"{host}\", url: \"{url}\"}}]\n\
             upstream_client: {{attempts: 1}}\n\
             credentials: {{files: [{secret:?}], admin_endpoint: true}}\n\
             log: {{format: json, level: trace}}\n",
            cache = dir.path().join("cache").display().to_string(),
            host = up.host(),
            url = up.url(),
            secret = secret.dir().display().to_string(),
        ),
    )
    .expect("writing the config");
    let log_path = dir.path().join("regcache.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let server = Server {
        child: Command::new(binary())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting regcache"),
    };
    let addr = wait_for_addr(&log_path);
    let base = format!("http://{addr}");
    let client = crate::support::mirror::client();
    let mut answers = String::new();

    // A pull with the first credentials.
    within("a pull", pull_image(&client, &base, REPO, "v1")).await;
    // Rotation: the Secret and the registry move to the second password.
    secret.update(&dockerconfigjson(&[(&up.host(), "bot", PW_2)]));
    up.set_credentials("bot", PW_2);
    up.expire_tokens();
    let tags = client
        .get(format!("{base}/v2/{REPO}/tags/list"))
        .send()
        .await
        .expect("tags");
    assert_eq!(tags.status(), reqwest::StatusCode::OK);
    answers.push_str(&seen(tags).await);
    // The CLI, as an operator would run it.
    let listed = Command::new(binary())
        .args(["credentials", "list", "--config"])
        .arg(&config)
        .output()
        .expect("credentials list runs");
    let cli = format!(
        "{}{}",
        String::from_utf8_lossy(&listed.stdout),
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(cli.contains("****"), "{cli}");

    // A version that does not parse, with a password in it.
    secret.update(&format!(
        r#"{{"auths":{{"{}":{{"auth":"{PW_BAD}!!"}}}}}}"#,
        up.host()
    ));
    // The registry refuses what the mirror has: the client gets an error, the log a reason.
    up.set_credentials("bot", "something-else");
    up.expire_tokens();
    for path in [
        format!("/v2/{REPO}/tags/list"),
        format!("/v2/{REPO}/manifests/v1"),
        format!("/v2/{REPO}/blobs/sha256:{}", "0".repeat(64)),
        "/metrics".to_owned(),
        "/admin/credentials".to_owned(),
    ] {
        let response = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("the mirror answers");
        answers.push_str(&seen(response).await);
    }
    assert!(
        crate::support::mirror::metric_value(
            &answers,
            "regcache_credentials_reload_errors_total",
            &[]
        ) >= 1.0,
        "the bad version was read and refused: {answers}"
    );
    assert!(answers.contains("\"kind\":\"basic\""), "{answers}");

    // SIGTERM, then everything the mirror wrote.
    let pid = libc::pid_t::try_from(server.child.id()).expect("a pid");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "regcache did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut logged = String::new();
    std::fs::File::open(&log_path)
        .expect("log")
        .read_to_string(&mut logged)
        .expect("log is text");
    assert!(
        logged.contains("\"level\":\"TRACE\""),
        "the log is at trace level"
    );
    assert!(logged.contains("credentials loaded"), "{logged}");
    assert!(logged.contains("cannot load credentials"), "{logged}");

    let everything = format!("{logged}\n{answers}\n{cli}");
    for secret in [
        PW_1.to_owned(),
        PW_2.to_owned(),
        PW_BAD.to_owned(),
        auth("bot", PW_1),
        auth("bot", PW_2),
    ] {
        assert!(
            !everything.contains(&secret),
            "`{secret}` appeared in the mirror's output"
        );
    }
}

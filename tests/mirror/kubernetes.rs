//! Credentials read through the Kubernetes API (`credentials.kubernetes`), against an in-process
//! API server speaking the real list/watch protocol: Secrets selected by name or by label are
//! loaded, follow updates without a restart, keep their last good version when an update does
//! not parse, and take their credentials with them when deleted.

use std::sync::Arc;
use std::time::Duration;

use regcache::credentials::{Credentials, CredentialsConfig, KubernetesConfig, kubernetes};
use regcache::metrics::Metrics;

use super::never_exposed::{Server, binary, wait_for_addr};
use super::{cache_dir, pull_image, within};
use crate::support::fake_kube::FakeKube;
use crate::support::fake_upstream::{FakeUpstream, Image};
use crate::support::secret::dockerconfigjson;

const NAMESPACE: &str = "mirror";
const TYPE: &str = "kubernetes.io/dockerconfigjson";

fn client(api: &FakeKube) -> kube::Client {
    let uri: http::Uri = api.url().parse().expect("a URI");
    kube::Client::try_from(kube::Config::new(uri)).expect("a client for the fake API server")
}

fn set(config: &KubernetesConfig) -> (Arc<Credentials>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let config = CredentialsConfig {
        kubernetes: config.clone(),
        ..CredentialsConfig::default()
    };
    (
        Arc::new(Credentials::new(&config, metrics.clone())),
        metrics,
    )
}

fn password(set: &Credentials, host: &str) -> Option<String> {
    set.resolve(&[host], "team/app")
        .current
        .map(|l| l.credential.secret().expose().to_owned())
}

/// Waits until the credential for `host` is `want`.
async fn wait_for(set: &Credentials, host: &str, want: Option<&str>) {
    within(
        &format!("the credential for {host} becoming {want:?}"),
        async {
            while password(set, host).as_deref() != want {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_selected_by_name_are_watched_through_the_api() {
    let api = FakeKube::start(NAMESPACE).await;
    api.put_secret(
        "ghcr",
        TYPE,
        &[],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[("ghcr.io", "bot", "v1")]),
        )],
    );
    api.put_secret(
        "unrelated",
        TYPE,
        &[],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[("quay.io", "q", "q")]),
        )],
    );
    let config = KubernetesConfig {
        enabled: true,
        namespace: NAMESPACE.into(),
        names: vec!["ghcr".into()],
        label_selector: String::new(),
    };
    let (set, metrics) = set(&config);
    let mut watches = kubernetes::watch(&set, client(&api), NAMESPACE, &config);
    assert!(watches.wait_listed(Duration::from_secs(20)).await);
    assert_eq!(
        password(&set, "ghcr.io").as_deref(),
        Some("v1"),
        "loaded by the first list"
    );
    assert_eq!(
        password(&set, "quay.io"),
        None,
        "only the named Secret is read"
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| r.contains("fieldSelector=metadata.name%3Dghcr")),
        "every request names the Secret, so a Role can too: {:?}",
        api.requests()
    );

    // An update arrives through the watch.
    api.put_secret(
        "ghcr",
        TYPE,
        &[],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[("ghcr.io", "bot", "v2")]),
        )],
    );
    wait_for(&set, "ghcr.io", Some("v2")).await;
    assert!(
        api.requests().iter().any(|r| r.contains("watch=true")),
        "the update came through a watch: {:?}",
        api.requests()
    );
    let rotated = set.resolve(&["ghcr.io"], "team/app");
    assert_eq!(
        rotated
            .previous
            .map(|l| l.credential.secret().expose().to_owned())
            .as_deref(),
        Some("v1"),
        "the replaced credential is kept for the grace period"
    );

    // A version that does not parse keeps the last good one.
    let errors = metrics.credentials_reload_errors.get();
    api.put_secret("ghcr", TYPE, &[], &[(".dockerconfigjson", "{broken")]);
    within("the bad version to be refused", async {
        while metrics.credentials_reload_errors.get() == errors {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(password(&set, "ghcr.io").as_deref(), Some("v2"));
    assert!(
        set.errors()
            .iter()
            .any(|(source, _)| source == "kubernetes:mirror/ghcr")
    );

    // Deleted: its credentials go.
    api.delete_secret("ghcr");
    wait_for(&set, "ghcr.io", None).await;
    watches.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_selected_by_label_are_watched_and_other_types_skipped() {
    let api = FakeKube::start(NAMESPACE).await;
    api.put_secret(
        "a",
        TYPE,
        &[("regcache", "upstream")],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[("a.example.com", "a", "pa")]),
        )],
    );
    api.put_secret(
        "tls",
        "kubernetes.io/tls",
        &[("regcache", "upstream")],
        &[("tls.crt", "x"), ("tls.key", "y")],
    );
    let config = KubernetesConfig {
        enabled: true,
        namespace: NAMESPACE.into(),
        names: vec![],
        label_selector: "regcache=upstream".into(),
    };
    let (set, metrics) = set(&config);
    let watches = kubernetes::watch(&set, client(&api), NAMESPACE, &config);
    wait_for(&set, "a.example.com", Some("pa")).await;
    // A second Secret with the label appears later; one without it is ignored.
    api.put_secret(
        "b",
        TYPE,
        &[("regcache", "upstream")],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[("b.example.com", "b", "pb")]),
        )],
    );
    api.put_secret(
        "c",
        TYPE,
        &[("team", "other")],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[("c.example.com", "c", "pc")]),
        )],
    );
    wait_for(&set, "b.example.com", Some("pb")).await;
    assert_eq!(password(&set, "c.example.com"), None);
    assert_eq!(
        metrics.credentials_reload_errors.get(),
        0,
        "the TLS Secret is no error"
    );
    let sources: Vec<String> = set.all().iter().map(|l| l.source.clone()).collect();
    assert_eq!(sources, vec!["kubernetes:mirror/a", "kubernetes:mirror/b"]);
    watches.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regcache_serve_pulls_with_credentials_from_the_api_and_follows_an_update() {
    let image = Image::new(1, 10_000);
    let up = FakeUpstream::builder()
        .bearer_auth("bot", "api-1")
        .image("team/app", "v1", &image)
        .start()
        .await;
    let api = FakeKube::start(NAMESPACE).await;
    api.put_secret(
        "upstreams",
        TYPE,
        &[],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[(&up.host(), "bot", "api-1")]),
        )],
    );
    let dir = cache_dir();
    // Outside a cluster the client follows KUBECONFIG; the namespace comes from its context.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: mirror, user: {{token: not-checked}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: mirror, namespace: {NAMESPACE}}}}}]\n\
             current-context: fake\n",
            api.url()
        ),
    )
    .expect("writing the kubeconfig");
    let config = dir.path().join("regcache.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:0\"\n\
             cache: {{dir: {cache:?}}}\n\
             default_upstream: \"{host}\"\n\
             upstreams: [{{name: \"{host}\", url: \"{url}\"}}]\n\
             credentials: {{kubernetes: {{enabled: true, names: [upstreams]}}}}\n\
             log: {{format: json, level: info}}\n",
            cache = dir.path().join("cache").display().to_string(),
            host = up.host(),
            url = up.url(),
        ),
    )
    .expect("writing the config");
    let log_path = dir.path().join("regcache.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let _server = Server {
        child: std::process::Command::new(binary())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting regcache"),
    };
    let base = format!("http://{}", wait_for_addr(&log_path));
    let client = crate::support::mirror::client();
    // Start-up waited for the first list: the very first pull carries the credentials.
    within("a pull", pull_image(&client, &base, "team/app", "v1")).await;

    // Rotated through the API: the registry and the Secret change together.
    up.set_credentials("bot", "api-2");
    up.expire_tokens();
    api.put_secret(
        "upstreams",
        TYPE,
        &[],
        &[(
            ".dockerconfigjson",
            &dockerconfigjson(&[(&up.host(), "bot", "api-2")]),
        )],
    );
    within("the rotated Secret to be used", async {
        loop {
            let response = client
                .get(format!("{base}/v2/team/app/tags/list"))
                .send()
                .await
                .expect("the mirror answers");
            if response.status() == reqwest::StatusCode::OK {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with(&format!("/api/v1/namespaces/{NAMESPACE}/secrets")))
    );

    // `credentials list` reads the same Secrets through the API, masked.
    let listed = within(
        "credentials list",
        tokio::process::Command::new(binary())
            .args(["credentials", "list", "--config"])
            .arg(&config)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running regcache credentials list");
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        stdout.contains("kubernetes:") && stdout.contains("bot") && stdout.contains("****"),
        "the API's Secret is listed, masked:\n{stdout}"
    );
    assert!(!stdout.contains("api-2"), "the password stays masked");
}

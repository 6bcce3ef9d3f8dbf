use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine as _;

use super::*;

/// Writes a Secret volume the way the kubelet's atomic writer does: the data in a new
/// timestamped directory, `..data` swapped to it by a rename, the visible key a symlink
/// through `..data`, the old directory removed.
fn kubelet_write(dir: &Path, key: &str, content: &str, version: u32) {
    let stamp = format!("..2026_11_24_14_00_00.{version:09}");
    std::fs::create_dir_all(dir.join(&stamp)).expect("mkdir");
    std::fs::write(dir.join(&stamp).join(key), content).expect("write");
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&stamp, dir.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
    if std::fs::symlink_metadata(dir.join(key)).is_err() {
        std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).expect("key link");
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("remove old version");
    }
}

fn config_json(entries: &[(&str, &str, &str)]) -> String {
    let auths: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(key, user, pass)| {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            ((*key).to_owned(), serde_json::json!({ "auth": auth }))
        })
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

fn set(files: &[&Path]) -> (Credentials, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let config = CredentialsConfig {
        files: files.iter().map(|p| p.to_path_buf()).collect(),
        ..CredentialsConfig::default()
    };
    (Credentials::new(&config, metrics.clone()), metrics)
}

fn password(r: &Resolution) -> Option<String> {
    r.current
        .as_ref()
        .map(|l| l.credential.secret().expose().to_owned())
}

/// Everything logged while `f` runs, as JSON lines.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().expect("log buffer").clone()).expect("utf-8");
    (out, text)
}

#[test]
fn a_mounted_secret_is_read_and_matched_per_host_and_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    kubelet_write(
        dir.path(),
        ".dockerconfigjson",
        &config_json(&[
            ("https://index.docker.io/v1/", "hub", "hub-pw"),
            ("ghcr.io", "gh", "gh-pw"),
            ("ghcr.io/org", "org", "org-pw"),
            ("registry.example.com:5000", "priv", "priv-pw"),
        ]),
        1,
    );
    let (creds, metrics) = set(&[dir.path()]);
    assert!(creds.reload());
    assert_eq!(metrics.credentials_reloads.get(), 1);
    let pw = |hosts: &[&str], repo: &str| password(&creds.resolve(hosts, repo));
    assert_eq!(
        pw(&["docker.io", "registry-1.docker.io"], "library/alpine").as_deref(),
        Some("hub-pw")
    );
    assert_eq!(pw(&["ghcr.io"], "org/app").as_deref(), Some("org-pw"));
    assert_eq!(pw(&["ghcr.io"], "other/app").as_deref(), Some("gh-pw"));
    assert_eq!(
        pw(&["registry.example.com:5000"], "x").as_deref(),
        Some("priv-pw")
    );
    assert_eq!(pw(&["registry.example.com"], "x"), None);
    assert_eq!(pw(&["quay.io"], "x"), None);
    // Nothing changed on disk: a re-read is no reload.
    assert!(!creds.reload());
    assert_eq!(metrics.credentials_reloads.get(), 1);
}

#[test]
fn legacy_dockercfg_and_plain_files_are_sources_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let legacy = dir.path().join("legacy");
    std::fs::create_dir(&legacy).expect("mkdir");
    let auth = base64::engine::general_purpose::STANDARD.encode("old:old-pw");
    kubelet_write(
        &legacy,
        ".dockercfg",
        &format!(r#"{{"quay.io":{{"auth":"{auth}","email":"x"}}}}"#),
        1,
    );
    let file = dir.path().join("config.json");
    std::fs::write(&file, config_json(&[("ghcr.io", "u", "file-pw")])).expect("write");
    let (creds, _) = set(&[&legacy, &file]);
    creds.reload();
    assert_eq!(
        password(&creds.resolve(&["quay.io"], "a")).as_deref(),
        Some("old-pw")
    );
    assert_eq!(
        password(&creds.resolve(&["ghcr.io"], "a")).as_deref(),
        Some("file-pw")
    );
}

#[test]
fn the_earlier_source_wins_an_equally_specific_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&a, config_json(&[("ghcr.io", "a", "a-pw")])).expect("write");
    std::fs::write(
        &b,
        config_json(&[("ghcr.io", "b", "b-pw"), ("ghcr.io/org", "b", "b-org")]),
    )
    .expect("write");
    let (creds, _) = set(&[&a, &b]);
    creds.reload();
    assert_eq!(
        password(&creds.resolve(&["ghcr.io"], "x/y")).as_deref(),
        Some("a-pw")
    );
    // A more specific key wins whichever source holds it.
    assert_eq!(
        password(&creds.resolve(&["ghcr.io"], "org/y")).as_deref(),
        Some("b-org")
    );
}

#[test]
fn a_rotation_replaces_the_credential_and_keeps_the_old_one_for_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ".dockerconfigjson";
    kubelet_write(
        dir.path(),
        key,
        &config_json(&[("ghcr.io", "u", "pw-1"), ("quay.io", "q", "q-pw")]),
        1,
    );
    let (creds, metrics) = set(&[dir.path()]);
    creds.reload();
    let first = creds.resolve(&["ghcr.io"], "a");
    let quay_id = creds.resolve(&["quay.io"], "a").current.expect("quay").id;
    kubelet_write(
        dir.path(),
        key,
        &config_json(&[("ghcr.io", "u", "pw-2"), ("quay.io", "q", "q-pw")]),
        2,
    );
    let (changed, log) = logged(|| creds.reload());
    assert!(changed);
    assert_eq!(metrics.credentials_reloads.get(), 2);
    let second = creds.resolve(&["ghcr.io"], "a");
    assert_eq!(password(&second).as_deref(), Some("pw-2"));
    assert_ne!(
        second.current.as_ref().map(|l| l.id),
        first.current.as_ref().map(|l| l.id),
        "a changed credential gets a new id, so its tokens are not reused"
    );
    assert_eq!(
        second
            .previous
            .as_ref()
            .map(|l| l.credential.secret().expose()),
        Some("pw-1")
    );
    // An unchanged entry keeps its identity (and its cached tokens).
    assert_eq!(
        creds.resolve(&["quay.io"], "a").current.expect("quay").id,
        quay_id
    );
    // The audit line names the source and the keys, never a value.
    assert!(log.contains("regcache::audit"), "{log}");
    assert!(log.contains(r#""changed":"ghcr.io""#), "{log}");
    assert!(log.contains(&dir.path().display().to_string()), "{log}");
    for secret in ["pw-1", "pw-2", "q-pw"] {
        assert!(!log.contains(secret), "{log}");
    }
}

#[test]
fn a_bad_secret_keeps_the_last_good_one_and_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ".dockerconfigjson";
    kubelet_write(
        dir.path(),
        key,
        &config_json(&[("ghcr.io", "u", "good")]),
        1,
    );
    let (creds, metrics) = set(&[dir.path()]);
    creds.reload();
    let bad_versions = [
        "{not json".to_owned(),
        r#"{"no_auths":{}}"#.to_owned(),
        r#"{"auths":{"ghcr.io":{"auth":"!!!leaked-maybe!!!"}}}"#.to_owned(),
    ];
    for (i, bad) in bad_versions.iter().enumerate() {
        kubelet_write(dir.path(), key, bad, 2 + i as u32);
        let (changed, log) = logged(|| creds.reload());
        assert!(!changed);
        assert_eq!(
            password(&creds.resolve(&["ghcr.io"], "a")).as_deref(),
            Some("good")
        );
        assert_eq!(metrics.credentials_reload_errors.get(), 1 + i as u64);
        assert!(log.contains("ERROR"), "{log}");
        assert!(
            log.contains(".dockerconfigjson"),
            "the file is named: {log}"
        );
        assert!(!log.contains("leaked-maybe"), "{log}");
    }
    assert!(logged(|| creds.reload()).1.contains("not valid base64"));
    // The secret deleted altogether: still the last good one.
    std::fs::remove_dir_all(dir.path()).expect("rm");
    creds.reload();
    assert_eq!(
        password(&creds.resolve(&["ghcr.io"], "a")).as_deref(),
        Some("good")
    );
    assert_eq!(metrics.credentials_reloads.get(), 1);
}

#[test]
fn a_removed_registry_is_audited_and_no_longer_matched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.json");
    std::fs::write(
        &file,
        config_json(&[("ghcr.io", "u", "p"), ("quay.io", "q", "p")]),
    )
    .expect("write");
    let (creds, _) = set(&[&file]);
    let (_, first) = logged(|| creds.reload());
    assert!(first.contains(r#""added":"ghcr.io,quay.io""#), "{first}");
    let mut f = std::fs::File::create(&file).expect("rewrite");
    f.write_all(config_json(&[("quay.io", "q", "p"), ("docker.io", "d", "p")]).as_bytes())
        .expect("write");
    drop(f);
    let (_, log) = logged(|| creds.reload());
    assert!(log.contains(r#""added":"docker.io""#), "{log}");
    assert!(log.contains(r#""removed":"ghcr.io""#), "{log}");
    let r = creds.resolve(&["ghcr.io"], "a");
    assert!(r.current.is_none());
    assert!(r.previous.is_some(), "within the grace period");
}

#[test]
fn debug_output_of_the_set_masks_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.json");
    std::fs::write(&file, config_json(&[("ghcr.io", "u", "hunter2")])).expect("write");
    let (creds, _) = set(&[&file]);
    creds.reload();
    let printed = format!("{:?}", creds.all());
    assert!(
        printed.contains("****") && !printed.contains("hunter2"),
        "{printed}"
    );
}

/// A Secret directory holding v1 for ghcr.io, and its set read once; the periodic re-read is an
/// hour away, so only the file watch (or the watch's own first read) explains a prompt change.
fn watched_secret() -> (tempfile::TempDir, Arc<Credentials>) {
    let dir = tempfile::tempdir().expect("tempdir");
    kubelet_write(
        dir.path(),
        SECRET_KEY,
        &config_json(&[("ghcr.io", "u", "v1")]),
        1,
    );
    let config = CredentialsConfig {
        files: vec![dir.path().to_owned()],
        reload_interval: Duration::from_secs(3600),
        ..CredentialsConfig::default()
    };
    let creds = Arc::new(Credentials::new(&config, Arc::new(Metrics::new())));
    creds.reload();
    (dir, creds)
}

const SECRET_KEY: &str = ".dockerconfigjson";

/// Whether `creds` come to hold `expected` for ghcr.io within 10 s.
async fn comes_to_hold(creds: &Credentials, expected: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(10), async {
        while password(&creds.resolve(&["ghcr.io"], "a")).as_deref() != Some(expected) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn the_watch_follows_a_kubelet_swap() {
    let (dir, creds) = watched_secret();
    let task = creds.watch();
    // Let the watch's first read pass before the swap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    kubelet_write(
        dir.path(),
        SECRET_KEY,
        &config_json(&[("ghcr.io", "u", "v2")]),
        2,
    );
    let seen = comes_to_hold(&creds, "v2").await;
    task.abort();
    assert!(seen, "the swap was noticed through the file watch");
}

#[tokio::test]
async fn a_swap_the_moment_the_watch_starts_is_not_missed() {
    let (dir, creds) = watched_secret();
    let task = creds.watch();
    // Before the watch's task has run at all.
    kubelet_write(
        dir.path(),
        SECRET_KEY,
        &config_json(&[("ghcr.io", "u", "v2")]),
        2,
    );
    let seen = comes_to_hold(&creds, "v2").await;
    task.abort();
    assert!(seen, "the swap was noticed without waiting an hour");
}

#[tokio::test]
async fn a_refresh_rereads_unless_a_read_followed_the_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.json");
    std::fs::write(&file, config_json(&[("ghcr.io", "u", "v1")])).expect("write");
    let (creds, _) = set(&[&file]);
    let refused_early = Instant::now();
    creds.reload();
    std::fs::write(&file, config_json(&[("ghcr.io", "u", "v2")])).expect("write");
    // Read after that refusal: nothing to do for it.
    creds.refresh(refused_early).await;
    assert_eq!(
        password(&creds.resolve(&["ghcr.io"], "a")).as_deref(),
        Some("v1")
    );
    creds.refresh(Instant::now()).await;
    assert_eq!(
        password(&creds.resolve(&["ghcr.io"], "a")).as_deref(),
        Some("v2")
    );
}

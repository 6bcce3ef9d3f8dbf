//! Secrets read through the Kubernetes API instead of a volume: a list-then-watch of the
//! mirror's namespace (kube's `watcher`, with its backoff), selected by name (one watch per name,
//! `fieldSelector=metadata.name=...`, so a Role may name the Secrets) or by label selector.
//! Each Secret of type `kubernetes.io/dockerconfigjson` (or `kubernetes.io/dockercfg`) is one
//! source of the `Credentials` set, labelled `kubernetes:<namespace>/<name>`; a version that
//! does not parse keeps the last good one, and a deleted Secret takes its credentials with it.
//!
//! RBAC the mirror's service account needs, in its namespace: `get`, `list`, `watch` on
//! `secrets` (with `resourceNames` when `names` is used).

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use super::source::{CONFIG_JSON_KEY, DOCKERCFG_KEY, Read};
use super::{Credentials, Format, KubernetesConfig};

const DOCKERCONFIGJSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DOCKERCFG_TYPE: &str = "kubernetes.io/dockercfg";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
}

/// A client from the pod's service account (or `KUBECONFIG` outside a cluster), and the
/// namespace to watch: the configured one, else the pod's own.
pub async fn client(config: &KubernetesConfig) -> Result<(kube::Client, String), Error> {
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    // In a pod, `infer` takes the default namespace from the service account's mount.
    let namespace = if config.namespace.is_empty() {
        kube_config.default_namespace.clone()
    } else {
        config.namespace.clone()
    };
    let client = kube::Client::try_from(kube_config).map_err(|e| Error::Config(e.to_string()))?;
    Ok((client, namespace))
}

/// The running watches.
pub struct Watches {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    listed: Vec<tokio::sync::oneshot::Receiver<()>>,
}

impl Watches {
    /// Waits until every watch has completed its first list (so requests that follow carry
    /// the credentials), or `timeout`; false on timeout.
    pub async fn wait_listed(&mut self, timeout: std::time::Duration) -> bool {
        let listed = futures_util::future::join_all(self.listed.drain(..));
        tokio::time::timeout(timeout, listed).await.is_ok()
    }

    pub fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the watches; each ends when the set is dropped.
pub fn watch(
    set: &Arc<Credentials>,
    client: kube::Client,
    namespace: &str,
    config: &KubernetesConfig,
) -> Watches {
    let selectors: Vec<watcher::Config> = if config.names.is_empty() {
        let mut c = watcher::Config::default();
        if !config.label_selector.is_empty() {
            c = c.labels(&config.label_selector);
        }
        vec![c]
    } else {
        config
            .names
            .iter()
            .map(|name| watcher::Config::default().fields(&format!("metadata.name={name}")))
            .collect()
    };
    let mut watches = Watches {
        tasks: Vec::new(),
        listed: Vec::new(),
    };
    for selector in selectors {
        let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
        let (listed, on_listed) = tokio::sync::oneshot::channel();
        watches.listed.push(on_listed);
        watches.tasks.push(tokio::spawn(run(
            Arc::downgrade(set),
            api,
            selector,
            namespace.to_owned(),
            listed,
        )));
    }
    watches
}

async fn run(
    set: Weak<Credentials>,
    api: kube::Api<Secret>,
    selector: watcher::Config,
    namespace: String,
    listed_once: tokio::sync::oneshot::Sender<()>,
) {
    let mut listed_once = Some(listed_once);
    let stream = watcher::watcher(api, selector).default_backoff();
    futures_util::pin_mut!(stream);
    // Secrets this watch has loaded, to forget those gone when a re-list completes.
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = stream.next().await {
        let Some(set) = set.upgrade() else {
            return;
        };
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(secret)) => {
                if let Some(label) = apply(&set, &namespace, &secret) {
                    listed.insert(label.clone());
                    known.insert(label);
                }
            }
            Ok(Event::InitDone) => {
                for gone in known.difference(&listed) {
                    set.remove(gone);
                }
                known = std::mem::take(&mut listed);
                if let Some(once) = listed_once.take() {
                    let _ = once.send(());
                }
            }
            Ok(Event::Apply(secret)) => {
                if let Some(label) = apply(&set, &namespace, &secret) {
                    known.insert(label);
                }
            }
            Ok(Event::Delete(secret)) => {
                let label = label(&namespace, &secret);
                known.remove(&label);
                set.remove(&label);
            }
            Err(e) => {
                set.metrics.credentials_reload_errors.inc();
                tracing::warn!(namespace, error = %e, "watching Secrets failed; retrying");
            }
        }
    }
}

fn label(namespace: &str, secret: &Secret) -> String {
    format!(
        "kubernetes:{namespace}/{}",
        secret.metadata.name.as_deref().unwrap_or("")
    )
}

/// Loads one Secret into the set; `None` for a Secret that is not a docker config at all
/// (another type under the same label selector), which is skipped without an error.
fn apply(set: &Credentials, namespace: &str, secret: &Secret) -> Option<String> {
    let label = label(namespace, secret);
    let (key, format) = match secret.type_.as_deref() {
        Some(DOCKERCONFIGJSON_TYPE) => (CONFIG_JSON_KEY, Format::ConfigJson),
        Some(DOCKERCFG_TYPE) => (DOCKERCFG_KEY, Format::Dockercfg),
        _ => {
            tracing::debug!(source = %label, "not a docker config Secret; skipped");
            return None;
        }
    };
    let read = match secret.data.as_ref().and_then(|d| d.get(key)) {
        Some(bytes) => Read::parse(&bytes.0, format).map_err(|e| format!("{key}: {e}")),
        None => Err(format!("the Secret has no `{key}` key")),
    };
    set.load(&label, read);
    Some(label)
}

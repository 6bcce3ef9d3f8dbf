//! Upstream credentials from `kubernetes.io/dockerconfigjson` secrets: the file format
//! (`dockerconfig`), which registry key applies to which request (`key`, the kubelet's rules),
//! where the files live (`source`), and the live set (`Credentials`) that re-reads them on a
//! file event or every `reload_interval`, keeps the last good version of a source that stops
//! parsing, and writes one audit line per change (registry keys only, never values). Every
//! credential value is held in a `Secret`, which prints `****`.
//!
//! This module decides which credential a request to an upstream should carry; `upstream`
//! decides how to present it (Basic, token endpoint, bearer) and owns the static
//! `upstreams[].username/password`, which take precedence over anything found here.

pub mod dockerconfig;
pub mod key;
pub mod kubernetes;
mod listing;
pub mod source;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

pub use crate::config::Secret;
use crate::metrics::Metrics;
pub use dockerconfig::{Credential, Entry, Format, ParseError};
pub use key::{KeyError, RegistryKey};
pub use listing::{Listed, list, load_and_list, load_and_list_all, render_table, upstream_hosts};
use source::Source;

/// How long a credential that a reload replaced or removed may still be tried, once, when the
/// upstream refuses its successor: a registry may accept the new password a little after the
/// Secret changed.
pub const GRACE: Duration = Duration::from_secs(120);

/// Events of one secret swap arrive in a burst; one read after they settle is enough.
const DEBOUNCE: Duration = Duration::from_millis(100);

pub use crate::config::{CredentialsConfig, KubernetesConfig};

/// A credential as loaded from a source, with what `credentials list` shows about it.
#[derive(Debug)]
pub struct Loaded {
    pub key: RegistryKey,
    pub credential: Credential,
    /// Where it came from: the configured path, or `kubernetes:<namespace>/<name>`.
    pub source: String,
    /// When this version of the credential was read (kept across reloads that leave it as is).
    pub loaded_at: SystemTime,
    /// Changes whenever the credential for the key changes, so token caches can follow.
    pub id: u64,
}

/// The credential for a request, and the one it replaced if that is still within `GRACE`.
#[derive(Debug, Default, Clone)]
pub struct Resolution {
    pub current: Option<Arc<Loaded>>,
    pub previous: Option<Arc<Loaded>>,
}

struct SourceState {
    fingerprint: [u8; 32],
    entries: Vec<Arc<Loaded>>,
}

struct Retired {
    loaded: Arc<Loaded>,
    until: Instant,
}

/// One source's place in the set: configured files first, in order, then Secrets read
/// through the Kubernetes API as they appear.
struct Slot {
    label: String,
    /// The last good version.
    loaded: Option<SourceState>,
    /// Why the last read failed, if it did.
    error: Option<String>,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    retired: Vec<Retired>,
    last_read: Option<Instant>,
}

impl State {
    /// Keeps a replaced credential for `GRACE`, and drops those past it.
    fn retire(&mut self, loaded: &Arc<Loaded>) {
        let now = Instant::now();
        self.retired.retain(|r| r.until > now);
        self.retired.push(Retired {
            loaded: loaded.clone(),
            until: now + GRACE,
        });
    }

    fn slot(&mut self, label: &str) -> &mut Slot {
        let i = match self.slots.iter().position(|s| s.label == label) {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    label: label.to_owned(),
                    loaded: None,
                    error: None,
                });
                self.slots.len() - 1
            }
        };
        &mut self.slots[i]
    }

    fn entries(&self) -> impl Iterator<Item = &Arc<Loaded>> {
        self.slots
            .iter()
            .filter_map(|s| s.loaded.as_ref())
            .flat_map(|s| &s.entries)
    }
}

/// The live set of credentials from every configured source.
pub struct Credentials {
    sources: Vec<Source>,
    /// Secrets come through the Kubernetes API too.
    from_api: bool,
    interval: Duration,
    state: RwLock<State>,
    /// Serializes reads, so a burst of 401s re-reads once.
    reading: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Credentials {
    /// The set for `config`, not yet read: call `reload` (or `watch`) to load it.
    pub fn new(config: &CredentialsConfig, metrics: Arc<Metrics>) -> Credentials {
        let sources: Vec<Source> = config.files.iter().map(|p| Source::new(p)).collect();
        Credentials {
            state: RwLock::new(State {
                slots: sources
                    .iter()
                    .map(|s| Slot {
                        label: s.label(),
                        loaded: None,
                        error: None,
                    })
                    .collect(),
                ..State::default()
            }),
            sources,
            from_api: config.kubernetes.enabled,
            interval: config.reload_interval,
            reading: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            metrics,
        }
    }

    /// A set with no sources.
    pub fn empty(metrics: Arc<Metrics>) -> Credentials {
        Credentials::new(&CredentialsConfig::default(), metrics)
    }

    pub fn has_sources(&self) -> bool {
        !self.sources.is_empty() || self.from_api
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The best credential for `repo` on any of `hosts` (a registry's names, `name[:port]`):
    /// the most specific key wins, then the earlier source.
    pub fn resolve(&self, hosts: &[&str], repo: &str) -> Resolution {
        let state = self.read_state();
        let current = best(state.entries(), hosts, repo);
        let now = Instant::now();
        let previous = best(
            state
                .retired
                .iter()
                .rev()
                .filter(|r| r.until > now)
                .map(|r| &r.loaded)
                .filter(|l| current.as_ref().is_none_or(|c| c.id != l.id)),
            hosts,
            repo,
        );
        Resolution { current, previous }
    }

    /// Every loaded credential, sources in order.
    pub fn all(&self) -> Vec<Arc<Loaded>> {
        self.read_state().entries().cloned().collect()
    }

    /// Sources whose last read failed, with the reason (never a value from the file).
    pub fn errors(&self) -> Vec<(String, String)> {
        self.read_state()
            .slots
            .iter()
            .filter_map(|s| Some((s.label.clone(), s.error.clone()?)))
            .collect()
    }

    /// Reads every source now. A source that cannot be read or parsed keeps its last good
    /// version; the error is logged with the file and reason, and counted. Returns whether
    /// anything changed.
    pub fn reload(&self) -> bool {
        // Stamped with its start: a read is only as new as the moment it looked at the files.
        let started = Instant::now();
        let mut changed = false;
        for source in &self.sources {
            changed |= self.load(&source.label(), source.read().map_err(|e| e.to_string()));
        }
        self.write_state().last_read = Some(started);
        changed
    }

    /// Takes a fresh read of the source `label`: an error is logged, counted and remembered
    /// while the last good version stays; a good read replaces it unless byte-for-byte the
    /// same. Returns whether anything changed.
    pub fn load(&self, label: &str, read: Result<source::Read, String>) -> bool {
        let read = match read {
            Ok(read) => read,
            Err(error) => {
                self.metrics.credentials_reload_errors.inc();
                let kept = {
                    let mut state = self.write_state();
                    let slot = state.slot(label);
                    slot.error = Some(error.clone());
                    slot.loaded.is_some()
                };
                tracing::error!(
                    source = label,
                    error = %error,
                    kept_last_good = kept,
                    "cannot load credentials"
                );
                return false;
            }
        };
        let mut state = self.write_state();
        let slot = state.slot(label);
        slot.error = None;
        let old: Vec<Arc<Loaded>> = match &slot.loaded {
            Some(s) if s.fingerprint == read.fingerprint => return false,
            Some(s) => s.entries.clone(),
            None => Vec::new(),
        };
        let now = SystemTime::now();
        let (mut added, mut changed, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        let mut entries = Vec::with_capacity(read.entries.len());
        for entry in read.entries {
            let before = old.iter().find(|o| o.key == entry.key);
            match before {
                Some(b) if b.credential == entry.credential => {
                    entries.push(b.clone());
                    continue;
                }
                Some(_) => changed.push(entry.key.to_string()),
                None => added.push(entry.key.to_string()),
            }
            entries.push(Arc::new(Loaded {
                key: entry.key,
                credential: entry.credential,
                source: label.to_owned(),
                loaded_at: now,
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
            }));
        }
        for o in &old {
            match entries.iter().find(|e| e.key == o.key) {
                Some(e) if e.id == o.id => {}
                Some(_) => state.retire(o),
                None => {
                    removed.push(o.key.to_string());
                    state.retire(o);
                }
            }
        }
        state.slot(label).loaded = Some(SourceState {
            fingerprint: read.fingerprint,
            entries,
        });
        drop(state);
        self.audit(label, &added, &changed, &removed);
        true
    }

    /// Forgets the source `label` altogether (a Secret deleted through the API).
    pub fn remove(&self, label: &str) {
        let mut state = self.write_state();
        let Some(i) = state.slots.iter().position(|s| s.label == label) else {
            return;
        };
        let slot = state.slots.remove(i);
        let removed: Vec<String> = slot
            .loaded
            .iter()
            .flat_map(|s| &s.entries)
            .map(|o| {
                state.retire(o);
                o.key.to_string()
            })
            .collect();
        drop(state);
        self.audit(label, &[], &[], &removed);
    }

    fn audit(&self, label: &str, added: &[String], changed: &[String], removed: &[String]) {
        self.metrics.credentials_reloads.inc();
        tracing::info!(
            target: "regcache::audit",
            source = label,
            added = %added.join(","),
            changed = %changed.join(","),
            removed = %removed.join(","),
            "credentials loaded"
        );
    }

    /// Re-reads the sources because an upstream refused a credential at `refused_at`: a
    /// rotated Secret may be on disk before its file event arrives. Requests refused together
    /// wait for one read: whoever finds a read newer than its refusal skips its own.
    pub async fn refresh(&self, refused_at: Instant) {
        if self.sources.is_empty() {
            return;
        }
        let _reading = self.reading.lock().await;
        if self.read_state().last_read.is_some_and(|l| l >= refused_at) {
            return;
        }
        // A few small files: cheaper than a trip to the blocking pool.
        self.reload();
    }

    /// Watches the sources' directories and re-reads on any event there, and every
    /// `reload_interval` in any case. The task ends when the set is dropped.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Credentials> = Arc::downgrade(self);
        let interval = self.interval;
        let dirs: Vec<PathBuf> = self
            .sources
            .iter()
            .map(|s| s.watch_dir().to_owned())
            .collect();
        // The watch is in place before this returns, so no change after it goes unnoticed; the
        // task's first read covers one made between the caller's first read and now.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = start_watcher(&dirs, tx);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(()) = rx.recv() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        while rx.try_recv().is_ok() {}
                    }
                }
                let Some(credentials) = weak.upgrade() else {
                    break;
                };
                let _reading = credentials.reading.lock().await;
                credentials.reload();
            }
            drop(watcher);
        })
    }
}

/// A file watcher on `dirs` that sends on `tx`; `None` (and a warning) where the platform or
/// the directory does not allow one: the periodic re-read still follows changes.
fn start_watcher(
    dirs: &[PathBuf],
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    if dirs.is_empty() {
        return None;
    }
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                // Full means a read is already due.
                let _ = tx.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch credential files; re-reading on the interval only");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a credential source; re-reading it on the interval only");
        }
    }
    Some(watcher)
}

fn best<'a>(
    candidates: impl Iterator<Item = &'a Arc<Loaded>>,
    hosts: &[&str],
    repo: &str,
) -> Option<Arc<Loaded>> {
    let mut best: Option<(key::Specificity, &Arc<Loaded>)> = None;
    for loaded in candidates {
        let fit = hosts
            .iter()
            .filter_map(|h| loaded.key.matches(h, repo))
            .max();
        if let Some(fit) = fit
            && best.as_ref().is_none_or(|(b, _)| fit > *b)
        {
            best = Some((fit, loaded));
        }
    }
    best.map(|(_, l)| l.clone())
}

#[cfg(test)]
mod tests;

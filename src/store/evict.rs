//! Keeping the cache within bounds: the `cache.limits` config, least-recently-used eviction past
//! the high watermark down to the low one, per-upstream quotas and a maximum age for unused
//! content, plus the maintenance passes `reconcile` (index vs. disk) and `verify` (rehash).
//!
//! Eviction never removes a pinned blob (`pins/`) or one that is open: being read by a client or
//! just written by a download. Removing a blob removes its manifest media-type record first, so a
//! manifest is either complete or a miss; repository links and tag records stay, and the next
//! request refetches the content. An open file that is unlinked keeps its bytes for whoever has
//! it open, so nothing served is ever cut short.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{Error, Result, Store, now_ms};
use crate::metrics::Metrics;
use crate::oci::{Digest, DigestHasher, RegistryHost};

/// `cache.limits`: everything off by default (the cache grows without bound, as before).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest the cache may grow: bytes (`50GiB`) or a share of its filesystem (`80%`).
    pub max_size: Option<SizeLimit>,
    /// Share of `max_size` past which eviction starts.
    pub high_watermark: Percent,
    /// Share of `max_size` eviction brings the cache back down to.
    pub low_watermark: Percent,
    /// Bytes each upstream's content may take (content shared by upstreams counts for each).
    pub upstream_quotas: BTreeMap<String, ByteSize>,
    /// Content not served for this long is evicted.
    #[serde(with = "humantime_serde")]
    pub max_unused_age: Option<Duration>,
    /// How often limits are checked (storing new content also triggers a check).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_size: None,
            high_watermark: Percent(90.0),
            low_watermark: Percent(80.0),
            upstream_quotas: BTreeMap::new(),
            max_unused_age: None,
            check_interval: Duration::from_secs(30),
        }
    }
}

impl LimitsConfig {
    /// Checks what serde cannot; the error names the key under `cache.limits` and the reason.
    pub fn validate(&self, upstreams: &[RegistryHost]) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((k.to_owned(), r));
        if let Some(SizeLimit::Share(p)) = self.max_size
            && !(p > 0.0 && p <= 100.0)
        {
            return bad(
                "max_size",
                format!("{p}% is not a share between 0% and 100%"),
            );
        }
        if self.max_size == Some(SizeLimit::Bytes(0)) {
            return bad("max_size", "must be greater than zero".into());
        }
        for (key, p) in [
            ("high_watermark", self.high_watermark),
            ("low_watermark", self.low_watermark),
        ] {
            if !(p.0 > 0.0 && p.0 <= 100.0) {
                return bad(key, format!("{p} is not between 0% and 100%"));
            }
        }
        if self.low_watermark.0 >= self.high_watermark.0 {
            return bad(
                "low_watermark",
                format!(
                    "{} must be below high_watermark ({})",
                    self.low_watermark, self.high_watermark
                ),
            );
        }
        for name in self.upstream_quotas.keys() {
            let known = name
                .parse::<RegistryHost>()
                .is_ok_and(|h| upstreams.contains(&h));
            if !known {
                return bad(
                    "upstream_quotas",
                    format!("`{name}` is not one of the configured upstreams' names"),
                );
            }
        }
        if self.check_interval.is_zero() {
            return bad("check_interval", "must be greater than zero".into());
        }
        Ok(())
    }

    /// The configured bytes, resolving a share against the filesystem holding `dir`.
    pub fn max_bytes(&self, dir: &Path) -> Option<u64> {
        match self.max_size? {
            SizeLimit::Bytes(b) => Some(b),
            SizeLimit::Share(p) => filesystem_size(dir)
                .ok()
                .map(|total| (total as f64 * p / 100.0) as u64),
        }
    }
}

/// A size limit: bytes, or a share of the cache's filesystem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SizeLimit {
    Bytes(u64),
    Share(f64),
}

impl FromStr for SizeLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage"))?;
            return Ok(SizeLimit::Share(p));
        }
        s.parse::<ByteSize>()
            .map(|b| SizeLimit::Bytes(b.as_u64()))
            .map_err(|_| format!("`{s}` is neither a size (50GiB) nor a share of the disk (80%)"))
    }
}

impl<'de> Deserialize<'de> for SizeLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(SizeLimit::Bytes(b)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A percentage written `90%`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent(pub f64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.trim()
            .strip_suffix('%')
            .and_then(|p| p.trim().parse().ok())
            .map(Percent)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a percentage like 90%")))
    }
}

fn filesystem_size(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_blocks as u64 * stat.f_frsize as u64)
}

/// Why content was evicted (the metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The cache passed its high watermark.
    Size,
    /// An upstream passed its quota.
    Quota,
    /// Not served within `max_unused_age`.
    Age,
    /// `regcache cache gc`.
    Manual,
}

impl Reason {
    pub const ALL: [Reason; 4] = [Reason::Size, Reason::Quota, Reason::Age, Reason::Manual];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Quota => "quota",
            Reason::Age => "age",
            Reason::Manual => "manual",
        }
    }
}

/// What an eviction pass removed, by reason: (objects, bytes).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub by_reason: BTreeMap<Reason, (u64, u64)>,
    /// Candidates kept because they were pinned or open.
    pub skipped: u64,
}

impl Evicted {
    pub fn objects(&self) -> u64 {
        self.by_reason.values().map(|v| v.0).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.by_reason.values().map(|v| v.1).sum()
    }

    fn count(&mut self, reason: Reason, bytes: u64) {
        let v = self.by_reason.entry(reason).or_default();
        v.0 += 1;
        v.1 += bytes;
    }
}

impl Evicted {
    /// Lines for an operator: what went, by reason, and the cache before and after.
    pub fn report(&self, before: u64, after: u64, objects: u64) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for (reason, (n, bytes)) in &self.by_reason {
            let _ = writeln!(
                out,
                "evicted {n} objects ({}) [{}]",
                ByteSize::b(*bytes).display().iec(),
                reason.as_str()
            );
        }
        if self.skipped > 0 {
            let _ = writeln!(out, "kept {} pinned or open objects", self.skipped);
        }
        let _ = writeln!(
            out,
            "cache: {} -> {} in {objects} objects",
            ByteSize::b(before).display().iec(),
            ByteSize::b(after).display().iec()
        );
        out
    }
}

/// What `cache gc` asks for: evict down to a size, or apply the configured limits once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcTarget {
    Bytes(u64),
    Limits,
}

const GC_REQUEST: &str = "gc.request";
const GC_RESULT: &str = "gc.result";
/// Least time between two eviction passes woken by stored content.
const MIN_PASS_GAP: Duration = Duration::from_millis(250);
/// How often a serving mirror looks for a `cache gc` request.
const GC_POLL: Duration = Duration::from_secs(1);

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Verification {
    pub checked: u64,
    pub bytes: u64,
    /// Digests whose content did not hash to their name, now under `quarantine/`.
    pub corrupt: Vec<Digest>,
}

impl Store {
    /// Removes one blob unless it is pinned or open; the bytes freed, or `None` if kept.
    fn evict(&self, digest: &Digest) -> Result<Option<u64>> {
        if self.is_pinned(digest) {
            return Ok(None);
        }
        // Holding the index lock: a download storing this digest again waits, and a reader
        // that opens it now keeps a complete file (an unlinked file lives on while open).
        let mut index = self.index.lock();
        if self.is_open(digest) || !index.contains(digest) {
            return Ok(None);
        }
        remove_if_present(&self.layout.manifest_meta(digest))?;
        remove_if_present(&self.layout.blob(digest))?;
        Ok(index.remove(digest).map(|e| e.size))
    }

    /// Least recently used first: (digest, size) of every entry matching `filter`.
    fn lru(&self, filter: impl Fn(&super::Entry) -> bool) -> Vec<(Digest, u64)> {
        let index = self.index.lock();
        let mut v: Vec<(u64, Digest, u64)> = index
            .entries()
            .filter(|(_, e)| filter(e))
            .map(|(d, e)| (e.last_access, d.clone(), e.size))
            .collect();
        drop(index);
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.hex().cmp(b.1.hex())));
        v.into_iter().map(|(_, d, s)| (d, s)).collect()
    }

    /// Evicts least recently used content (matching `filter`) until `used()` is at most
    /// `target`.
    fn evict_down_to(
        &self,
        target: u64,
        reason: Reason,
        filter: impl Fn(&super::Entry) -> bool,
        mut used: u64,
        out: &mut Evicted,
    ) -> Result<()> {
        for (digest, _) in self.lru(filter) {
            if used <= target {
                break;
            }
            match self.evict(&digest)? {
                Some(bytes) => {
                    used = used.saturating_sub(bytes);
                    out.count(reason, bytes);
                    tracing::debug!(%digest, bytes, reason = reason.as_str(), "evicted");
                }
                None => out.skipped += 1,
            }
        }
        Ok(())
    }

    /// One pass of the configured limits: age, then quotas, then size.
    pub fn enforce(&self, limits: &LimitsConfig) -> Result<Evicted> {
        let mut out = Evicted::default();
        if let Some(age) = limits.max_unused_age {
            let cutoff =
                now_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            for (digest, _) in self.lru(|e| e.last_access < cutoff) {
                match self.evict(&digest)? {
                    Some(bytes) => out.count(Reason::Age, bytes),
                    None => out.skipped += 1,
                }
            }
        }
        let (high, low) = (
            limits.high_watermark.0 / 100.0,
            limits.low_watermark.0 / 100.0,
        );
        for (name, quota) in &limits.upstream_quotas {
            let Ok(upstream) = name.parse::<RegistryHost>() else {
                continue;
            };
            let used: u64 = self
                .index
                .lock()
                .entries()
                .filter(|(_, e)| e.upstreams.contains(&upstream))
                .map(|(_, e)| e.size)
                .sum();
            let quota = quota.as_u64() as f64;
            if used as f64 > quota * high {
                self.evict_down_to(
                    (quota * low) as u64,
                    Reason::Quota,
                    |e| e.upstreams.contains(&upstream),
                    used,
                    &mut out,
                )?;
            }
        }
        if let Some(max) = limits.max_bytes(self.root()) {
            let used = self.usage().0;
            if used as f64 > max as f64 * high {
                self.evict_down_to(
                    (max as f64 * low) as u64,
                    Reason::Size,
                    |_| true,
                    used,
                    &mut out,
                )?;
            }
        }
        if out.objects() > 0 {
            let (bytes, objects) = self.usage();
            tracing::info!(
                evicted_objects = out.objects(),
                evicted_bytes = out.bytes(),
                kept_pinned_or_open = out.skipped,
                cache_bytes = bytes,
                cache_objects = objects,
                "evicted least recently used content"
            );
        }
        Ok(out)
    }

    /// Runs a `cache gc`: the report, or why nothing could be done.
    pub fn run_gc(
        &self,
        target: GcTarget,
        limits: &LimitsConfig,
    ) -> Result<(Evicted, String), String> {
        let (before, _) = self.usage();
        let evicted = match target {
            GcTarget::Bytes(t) => self.gc(t).map_err(|e| e.to_string())?,
            GcTarget::Limits => {
                if limits.max_size.is_none()
                    && limits.upstream_quotas.is_empty()
                    && limits.max_unused_age.is_none()
                {
                    return Err("no limit is configured (cache.limits); pass --target SIZE".into());
                }
                let e = self.enforce(limits).map_err(|e| e.to_string())?;
                self.flush_index().map_err(|e| e.to_string())?;
                e
            }
        };
        let (after, objects) = self.usage();
        let report = evicted.report(before, after, objects);
        Ok((evicted, report))
    }

    /// Asks the running mirror to run a `cache gc` (`index/gc.request`) and waits up to
    /// `timeout` for its report.
    pub fn request_gc(
        &self,
        target: GcTarget,
        timeout: Duration,
    ) -> Result<Result<String, String>> {
        let dir = self.layout.index_dir();
        remove_if_present(&dir.join(GC_RESULT))?;
        let body = match target {
            GcTarget::Bytes(b) => b.to_string(),
            GcTarget::Limits => "limits".to_owned(),
        };
        super::write_atomically(&dir, &dir.join(GC_REQUEST), body.as_bytes())?;
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(text) = std::fs::read_to_string(dir.join(GC_RESULT)) {
                remove_if_present(&dir.join(GC_RESULT))?;
                return Ok(match text.split_once('\n') {
                    Some(("ok", report)) => Ok(report.to_owned()),
                    Some((_, reason)) => Err(reason.trim().to_owned()),
                    None => Err(text),
                });
            }
        }
        remove_if_present(&dir.join(GC_REQUEST))?;
        Ok(Err(format!(
            "the running mirror did not answer within {}s",
            timeout.as_secs()
        )))
    }

    /// A pending `cache gc` request, taken (removed) so it runs once.
    fn take_gc_request(&self) -> Option<GcTarget> {
        let path = self.layout.index_dir().join(GC_REQUEST);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        match text.trim() {
            "limits" => Some(GcTarget::Limits),
            n => n.parse().ok().map(GcTarget::Bytes),
        }
    }

    fn answer_gc(&self, answer: &Result<(Evicted, String), String>) {
        let dir = self.layout.index_dir();
        let text = match answer {
            Ok((_, report)) => format!("ok\n{report}"),
            Err(reason) => format!("error\n{reason}\n"),
        };
        if let Err(e) = super::write_atomically(&dir, &dir.join(GC_RESULT), text.as_bytes()) {
            tracing::warn!(error = %e, "could not answer a cache gc request");
        }
    }

    /// Evicts least recently used content now until the cache holds at most `target` bytes.
    pub fn gc(&self, target: u64) -> Result<Evicted> {
        let mut out = Evicted::default();
        let used = self.usage().0;
        self.evict_down_to(target, Reason::Manual, |_| true, used, &mut out)?;
        self.flush_index()?;
        Ok(out)
    }

    /// Brings the index in line with `blobs/`: adds files it does not know (their access time
    /// taken from the file), forgets entries whose file is gone. Runs in the background after
    /// start-up; returns (added, forgotten).
    pub fn reconcile(&self) -> Result<(u64, u64)> {
        let mut seen = std::collections::HashSet::new();
        let mut added = 0;
        for (digest, path) in self.stored_files()? {
            seen.insert(digest.clone());
            if self.index.lock().contains(&digest) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let at = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
            let mut index = self.index.lock();
            if !index.contains(&digest) {
                index.insert(&digest, meta.len(), at);
                added += 1;
            }
        }
        let unseen: Vec<Digest> = self
            .index
            .lock()
            .entries()
            .filter(|(d, _)| !seen.contains(*d))
            .map(|(d, _)| d.clone())
            .collect();
        let mut forgotten = 0;
        for digest in unseen {
            let mut index = self.index.lock();
            // Stored while the scan ran?
            if !self.layout.blob(&digest).exists() && index.remove(&digest).is_some() {
                forgotten += 1;
            }
        }
        if added > 0 {
            self.attribute_upstreams();
        }
        self.flush_index()?;
        Ok((added, forgotten))
    }

    /// Credits content the scan found to the upstreams whose repositories link it, so quotas
    /// and `cache stats` cover a cache written before the index existed.
    fn attribute_upstreams(&self) {
        fn walk(dir: &Path, upstream: &RegistryHost, store: &Store) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if entry.file_name() != "_links" {
                    walk(&path, upstream, store);
                    continue;
                }
                for alg in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    let alg_name = alg.file_name().to_string_lossy().into_owned();
                    for link in std::fs::read_dir(alg.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let name = link.file_name().to_string_lossy().into_owned();
                        if let Ok(digest) = format!("{alg_name}:{name}").parse::<Digest>() {
                            store.index.lock().add_upstream(&digest, upstream);
                        }
                    }
                }
            }
        }
        let repos = self.root().join("repos");
        for up in std::fs::read_dir(&repos).into_iter().flatten().flatten() {
            if let Ok(upstream) = up.file_name().to_string_lossy().parse::<RegistryHost>() {
                walk(&up.path(), &upstream, self);
            }
        }
    }

    /// Every file under `blobs/` whose path names a valid digest.
    fn stored_files(&self) -> Result<Vec<(Digest, std::path::PathBuf)>> {
        let mut out = Vec::new();
        let blobs = self.layout.blobs_dir();
        let algs = match std::fs::read_dir(&blobs) {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("list", &blobs)(e)),
        };
        for alg in algs.flatten() {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            for shard in std::fs::read_dir(alg.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for file in std::fs::read_dir(shard.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let name = file.file_name().to_string_lossy().into_owned();
                    if let Ok(digest) = format!("{alg_name}:{name}").parse::<Digest>() {
                        out.push((digest, file.path()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Rehashes every stored blob. One that does not match its digest is moved to
    /// `quarantine/` (never served again, kept for inspection) and dropped from the index.
    /// `progress` is called after each blob with (checked, total).
    pub fn verify(&self, mut progress: impl FnMut(u64, u64)) -> Result<Verification> {
        let files = self.stored_files()?;
        let total = files.len() as u64;
        let mut out = Verification::default();
        let mut buf = vec![0u8; 1 << 20];
        for (digest, path) in files {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", &path)(e)),
            };
            let mut hasher = DigestHasher::new(digest.algorithm());
            loop {
                let n = io::Read::read(&mut file, &mut buf).map_err(Error::io("read", &path))?;
                if n == 0 {
                    break;
                }
                out.bytes += n as u64;
                hasher.update(&buf[..n]);
            }
            out.checked += 1;
            if hasher.finish() != digest {
                self.quarantine(&digest)?;
                tracing::error!(%digest, "stored content does not match its digest; quarantined");
                out.corrupt.push(digest);
            }
            progress(out.checked, total);
        }
        self.flush_index()?;
        Ok(out)
    }

    fn quarantine(&self, digest: &Digest) -> Result<()> {
        let dest = self.layout.quarantine(digest);
        let parent = dest.parent().expect("quarantine paths have a parent");
        std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
        let mut index = self.index.lock();
        remove_if_present(&self.layout.manifest_meta(digest))?;
        let blob = self.layout.blob(digest);
        std::fs::rename(&blob, &dest).map_err(Error::io("quarantine", &blob))?;
        index.remove(digest);
        Ok(())
    }

    /// Per upstream: (objects, bytes) of the content it references; `""` for content whose
    /// upstream is unknown (found by a scan).
    pub fn usage_by_upstream(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let index = self.index.lock();
        for (_, e) in index.entries() {
            if e.upstreams.is_empty() {
                let v = out.entry(String::new()).or_default();
                v.0 += 1;
                v.1 += e.size;
            }
            for up in &e.upstreams {
                let v = out.entry(up.to_string()).or_default();
                v.0 += 1;
                v.1 += e.size;
            }
        }
        out
    }

    /// What the index knows of `digest`.
    pub fn entry(&self, digest: &Digest) -> Option<super::Entry> {
        self.index.lock().get(digest).cloned()
    }

    /// Stored digests, least recently used first.
    pub fn access_order(&self) -> Vec<Digest> {
        self.lru(|_| true).into_iter().map(|(d, _)| d).collect()
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// How often a serving mirror rescans `blobs/` for content it did not store itself.
const RESCAN_INTERVAL: Duration = Duration::from_secs(3600);

/// The background task of a serving mirror: reconciles the index with the disk (at start, then
/// hourly), and checks the limits every `check_interval` or when content was stored, flushing
/// access times each time. Ends (after a last flush) when `stop` resolves.
pub async fn run(
    store: Store,
    limits: LimitsConfig,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let reconcile = {
        let store = store.clone();
        async move {
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || store.reconcile()).await {
                Ok(Ok((added, forgotten))) => tracing::info!(
                    added,
                    forgotten,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "access index reconciled with the disk"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not reconcile the access index with the disk")
                }
                Err(e) => tracing::warn!(error = %e, "the access index scan failed"),
            }
        }
    };
    let work = async {
        reconcile.await;
        let mut scanned = tokio::time::Instant::now();
        loop {
            if scanned.elapsed() >= RESCAN_INTERVAL {
                // Content other processes stored (seeding beside the mirror) or an operator
                // removed by hand comes into the index.
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.reconcile()).await {
                    Ok(Ok((added, forgotten))) if added + forgotten > 0 => {
                        tracing::info!(added, forgotten, "access index updated from the disk")
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not rescan the cache"),
                    Err(e) => tracing::warn!(error = %e, "the cache rescan failed"),
                }
                scanned = tokio::time::Instant::now();
            }
            let pass = {
                let store = store.clone();
                let limits = limits.clone();
                tokio::task::spawn_blocking(move || {
                    let evicted = store.enforce(&limits);
                    let flushed = store.flush_index();
                    // statvfs for a share of the filesystem: off the async threads.
                    let limit = limits.max_bytes(store.root()).unwrap_or(0);
                    (evicted, flushed, limit)
                })
            };
            match pass.await {
                Ok((evicted, flushed, limit)) => {
                    metrics
                        .cache_limit_bytes
                        .set(i64::try_from(limit).unwrap_or(i64::MAX));
                    match evicted {
                        Ok(evicted) => record(&metrics, &evicted),
                        Err(e) => tracing::warn!(error = %e, "eviction failed"),
                    }
                    if let Err(e) = flushed {
                        tracing::warn!(error = %e, "could not write access times");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the eviction task failed"),
            }
            let (bytes, objects) = store.usage();
            metrics
                .cache_size_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            metrics
                .cache_objects
                .set(i64::try_from(objects).unwrap_or(i64::MAX));
            let next_check = tokio::time::Instant::now() + limits.check_interval;
            // A burst of stored blobs wakes one pass, not one each.
            tokio::time::sleep(MIN_PASS_GAP.min(limits.check_interval)).await;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_check) => break,
                    _ = store.added.notified() => break,
                    _ = tokio::time::sleep(GC_POLL) => {}
                }
                let s = store.clone();
                let l = limits.clone();
                let gc = tokio::task::spawn_blocking(move || {
                    let target = s.take_gc_request()?;
                    let answer = s.run_gc(target, &l);
                    s.answer_gc(&answer);
                    Some(answer)
                });
                if let Ok(Some(Ok((evicted, _)))) = gc.await {
                    record(&metrics, &evicted);
                    tracing::info!(
                        evicted_objects = evicted.objects(),
                        evicted_bytes = evicted.bytes(),
                        "cache gc requested by an operator"
                    );
                }
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = stop => {}
    }
    let store2 = store.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store2.flush_index()).await {
        tracing::warn!(error = %e, "could not write access times at shutdown");
    }
}

/// Adds an eviction pass to the metrics.
pub fn record(metrics: &Metrics, evicted: &Evicted) {
    for (reason, (objects, bytes)) in &evicted.by_reason {
        metrics
            .evictions
            .with_label_values(&[reason.as_str()])
            .inc_by(*objects);
        metrics
            .evicted_bytes
            .with_label_values(&[reason.as_str()])
            .inc_by(*bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::Layout;
    use super::*;
    use crate::oci::Algorithm;
    use bytes::Bytes;

    async fn put(store: &Store, n: u8, size: usize) -> Digest {
        let body = vec![n; size];
        let digest = Digest::of(Algorithm::Sha256, &body);
        let mut ingest = store.begin_ingest(&digest).expect("begin");
        ingest
            .append(vec![Bytes::from(body)])
            .await
            .expect("append");
        ingest.commit(Some(size as u64)).await.expect("commit");
        digest
    }

    fn limits(max: u64) -> LimitsConfig {
        LimitsConfig {
            max_size: Some(SizeLimit::Bytes(max)),
            ..LimitsConfig::default()
        }
    }

    #[tokio::test]
    async fn least_recently_used_goes_first_but_never_pinned_or_open_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut digests = Vec::new();
        for n in 0..5 {
            digests.push(put(&store, n, 100).await);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        // 1 is pinned, 2 is open by a reader (which made it recent), 0 is read again last.
        store.pin(&digests[1]).expect("pin");
        let reader = store
            .open_blob(&digests[2])
            .await
            .expect("open")
            .expect("stored");
        tokio::time::sleep(Duration::from_millis(3)).await;
        drop(store.open_blob(&digests[0]).await.expect("open"));
        // 500 bytes against a 250-byte limit: down to 80% (200 bytes). In LRU order: 1 (pinned,
        // kept), 3 and 4 (evicted), 2 (open, kept), 0 (evicted: still above 200 bytes).
        let evicted = store.enforce(&limits(250)).expect("enforce");
        assert_eq!(evicted.by_reason.get(&Reason::Size), Some(&(3, 300)));
        assert_eq!(evicted.skipped, 2);
        for (i, d) in digests.iter().enumerate() {
            let kept = store.open_blob(d).await.expect("open").is_some();
            assert_eq!(kept, i == 1 || i == 2, "blob {i}");
        }
        assert_eq!(store.usage(), (200, 2));
        drop(reader);
        // Nothing more to do below the high watermark.
        assert_eq!(store.enforce(&limits(250)).expect("enforce").objects(), 0);
    }

    #[tokio::test]
    async fn access_order_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c);
        {
            let store = Store::open(dir.path()).expect("open");
            a = put(&store, 1, 10).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
            b = put(&store, 2, 10).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
            c = put(&store, 3, 10).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
            drop(store.open_blob(&a).await.expect("read"));
            store.flush_index().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.access_order(), vec![b.clone(), c.clone(), a.clone()]);
        let gc = store.gc(10).expect("gc");
        assert_eq!(gc.by_reason.get(&Reason::Manual), Some(&(2, 20)));
        assert!(store.open_blob(&a).await.expect("open").is_some());
    }

    #[tokio::test]
    async fn the_scan_finds_what_the_index_missed_and_forgets_what_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b);
        {
            let store = Store::open(dir.path()).expect("open");
            a = put(&store, 1, 10).await;
            b = put(&store, 2, 20).await;
            let hub: RegistryHost = "docker.io".parse().expect("host");
            let repo: crate::oci::RepoName = "team/app".parse().expect("repo");
            store.link(&hub, &repo, &b).await.expect("link");
        }
        std::fs::remove_dir_all(dir.path().join("index")).expect("lose the index");
        std::fs::remove_file(Layout::new(dir.path()).blob(&a)).expect("lose a blob");
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.usage(), (0, 0));
        assert_eq!(store.reconcile().expect("scan"), (1, 0));
        assert_eq!(store.usage(), (20, 1));
        let hub: RegistryHost = "docker.io".parse().expect("host");
        assert_eq!(store.entry(&b).map(|e| e.upstreams), Some(vec![hub]));
    }

    #[tokio::test]
    async fn age_and_quota_limits_evict_only_what_they_cover() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let hub: RegistryHost = "docker.io".parse().expect("host");
        let repo: crate::oci::RepoName = "library/x".parse().expect("repo");
        let a = put(&store, 1, 100).await;
        let b = put(&store, 2, 100).await;
        let c = put(&store, 3, 100).await;
        store.link(&hub, &repo, &a).await.expect("link");
        store.link(&hub, &repo, &b).await.expect("link");
        let mut quota = LimitsConfig::default();
        quota
            .upstream_quotas
            .insert("docker.io".into(), ByteSize::b(150));
        let evicted = store.enforce(&quota).expect("enforce");
        assert_eq!(evicted.by_reason.get(&Reason::Quota), Some(&(1, 100)));
        assert!(store.entry(&a).is_none(), "the older docker.io blob goes");
        assert!(store.entry(&c).is_some(), "other upstreams' content stays");

        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(store.open_blob(&c).await.expect("read"));
        let age = LimitsConfig {
            max_unused_age: Some(Duration::from_millis(200)),
            ..LimitsConfig::default()
        };
        let evicted = store.enforce(&age).expect("enforce");
        assert_eq!(evicted.by_reason.get(&Reason::Age), Some(&(1, 100)));
        assert!(store.entry(&b).is_none());
        assert!(store.entry(&c).is_some(), "just served");
    }

    #[tokio::test]
    async fn verify_quarantines_a_flipped_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let good = put(&store, 1, 1000).await;
        let bad = put(&store, 2, 1000).await;
        let path = Layout::new(dir.path()).blob(&bad);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[500] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let report = store.verify(|_, _| {}).expect("verify");
        assert_eq!(report.checked, 2);
        assert_eq!(report.corrupt, vec![bad.clone()]);
        assert!(store.open_blob(&bad).await.expect("open").is_none());
        assert!(store.open_blob(&good).await.expect("open").is_some());
        assert!(Layout::new(dir.path()).quarantine(&bad).is_file());
        assert_eq!(store.usage(), (1000, 1));
    }

    #[test]
    fn a_second_process_cannot_take_a_cache_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _serving = Store::open(dir.path()).expect("open");
        let busy = Store::open_with(dir.path(), super::super::Access::Exclusive)
            .err()
            .expect("refused while in use");
        assert!(matches!(busy, Error::Busy(_)), "{busy}");
        Store::open_with(dir.path(), super::super::Access::ReadOnly).expect("read-only is fine");
        let seeding =
            Store::open_with(dir.path(), super::super::Access::Shared).expect("shared is fine");
        let d = Digest::of(Algorithm::Sha256, b"seeded");
        seeding.pin(&d).expect("pin beside the mirror");
    }
}

//! The `regcache cache` commands an operator runs beside (or instead of) the mirror: `stats`
//! (what the cache holds, by upstream, and the running mirror's hit ratio from its `/metrics`),
//! `verify` (rehash everything, quarantine what is corrupt) and `gc` (evict now). They work on
//! the store through its public API and print plain text; `main.rs` only maps results to exit
//! codes.

use std::fmt::Write as _;
use std::time::Duration;

use bytesize::ByteSize;

use crate::config::Config;
use crate::store::{self, Access, GcTarget, SizeLimit, Store};

/// `regcache cache stats`: the index's view of the cache, plus the hit ratio since the running
/// mirror started when its `/metrics` answers at `metrics_url`.
pub async fn stats(
    config: &Config,
    metrics_url: Option<&str>,
    scan: bool,
) -> Result<String, store::Error> {
    let dir = config.cache.dir.clone();
    let store = tokio::task::spawn_blocking(move || -> Result<Store, store::Error> {
        let store = Store::open_with(&dir, Access::ReadOnly)?;
        if scan {
            store.reconcile()?;
        }
        Ok(store)
    })
    .await??;
    let (bytes, objects) = store.usage();
    let mut out = String::new();
    if objects == 0 && !scan && has_blobs(&config.cache.dir) {
        let _ = writeln!(
            out,
            "note: the access index is empty but blobs/ is not (a cache from before the index, or \
             a mirror that has not finished its first scan); --scan counts from disk"
        );
    }
    let _ = writeln!(out, "cache:    {}", config.cache.dir.display());
    let _ = writeln!(
        out,
        "size:     {} ({bytes} bytes)",
        ByteSize::b(bytes).display().iec()
    );
    let _ = writeln!(out, "objects:  {objects}");
    if let Some(max) = config.cache.limits.max_bytes(&config.cache.dir) {
        let _ = writeln!(
            out,
            "limit:    {} (evicting past {}, down to {}); {:.1}% used",
            ByteSize::b(max).display().iec(),
            config.cache.limits.high_watermark,
            config.cache.limits.low_watermark,
            bytes as f64 * 100.0 / max.max(1) as f64
        );
    } else {
        let _ = writeln!(out, "limit:    none (cache.limits.max_size is not set)");
    }
    let _ = writeln!(
        out,
        "by upstream (content shared by upstreams counts for each):"
    );
    for (upstream, (objects, bytes)) in store.usage_by_upstream() {
        let name = if upstream.is_empty() {
            "(unknown: found on disk by a scan)".to_owned()
        } else {
            upstream
        };
        let quota = config
            .cache
            .limits
            .upstream_quotas
            .get(&name)
            .map(|q| format!(" of {} quota", q.display().iec()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {name}: {} in {objects} objects{quota}",
            ByteSize::b(bytes).display().iec()
        );
    }
    let url = metrics_url
        .map(str::to_owned)
        .unwrap_or_else(|| format!("http://{}/metrics", config.listen));
    match hit_ratio(&url).await {
        Ok(lines) => {
            let _ = writeln!(out, "hit ratio since the mirror started ({url}):");
            out.push_str(&lines);
        }
        Err(reason) => {
            let _ = writeln!(out, "hit ratio: unavailable ({reason})");
        }
    }
    Ok(out)
}

fn has_blobs(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Hits, coalesced requests and misses by kind from a running mirror's metrics.
async fn hit_ratio(url: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|_| format!("no mirror answered at {url}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    for kind in ["manifest", "tag", "blob"] {
        let get = |metric: &str| sample(&text, metric, kind);
        let (hits, coalesced, misses) = (
            get("regcache_cache_hits_total"),
            get("regcache_cache_coalesced_total"),
            get("regcache_cache_misses_total"),
        );
        let total = hits + coalesced + misses;
        let ratio = if total > 0.0 {
            format!("{:.1}%", hits * 100.0 / total)
        } else {
            "n/a".to_owned()
        };
        let _ = writeln!(
            out,
            "  {kind}: {ratio} ({hits} hits, {coalesced} coalesced, {misses} misses)"
        );
    }
    Ok(out)
}

fn sample(text: &str, metric: &str, kind: &str) -> f64 {
    let series = format!("{metric}{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What `verify` found, for printing and the exit code.
pub struct VerifyOutcome {
    pub report: String,
    pub corrupt: usize,
}

/// `regcache cache verify`: rehashes every stored blob; corrupt ones are quarantined.
/// `progress` receives a line now and then for long runs.
pub fn verify(
    config: &Config,
    mut progress: impl FnMut(&str),
) -> Result<VerifyOutcome, store::Error> {
    let (store, online) = match Store::open_with(&config.cache.dir, Access::Exclusive) {
        Ok(s) => (s, false),
        // The mirror runs: verify beside it. Quarantined files disappear from under it (the
        // next request refetches them); its index forgets them at its next scan.
        Err(store::Error::Busy(_)) => {
            (Store::open_with(&config.cache.dir, Access::ReadOnly)?, true)
        }
        Err(e) => return Err(e),
    };
    if !online {
        store.reconcile()?;
    }
    let started = std::time::Instant::now();
    let mut last = started;
    let result = store.verify(|checked, total| {
        if last.elapsed() >= Duration::from_secs(5) {
            last = std::time::Instant::now();
            progress(&format!("verified {checked} of {total} objects"));
        }
    })?;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "verified {} objects ({}) in {:.1}s",
        result.checked,
        ByteSize::b(result.bytes).display().iec(),
        started.elapsed().as_secs_f64()
    );
    for digest in &result.corrupt {
        let _ = writeln!(
            report,
            "CORRUPT {digest}: moved to {}",
            config
                .cache
                .dir
                .join("quarantine")
                .join(digest.algorithm().as_str())
                .join(digest.hex())
                .display()
        );
    }
    if result.corrupt.is_empty() {
        report.push_str("all content matches its digest\n");
    } else {
        let _ = writeln!(
            report,
            "{} corrupt objects quarantined; they are never served again and are refetched on demand",
            result.corrupt.len()
        );
    }
    Ok(VerifyOutcome {
        report,
        corrupt: result.corrupt.len(),
    })
}

/// `regcache cache gc [--target SIZE]`: evicts least recently used content now, down to
/// `target` (bytes or a share of the filesystem), or applies the configured limits once. With
/// the mirror running, the mirror does it (asked through `index/gc.request`) and reports back.
pub fn gc(config: &Config, target: Option<&str>) -> Result<String, GcError> {
    let target = match target {
        Some(t) => {
            let limit: SizeLimit = t.parse().map_err(GcError::Target)?;
            let limits = crate::store::LimitsConfig {
                max_size: Some(limit),
                ..Default::default()
            };
            GcTarget::Bytes(limits.max_bytes(&config.cache.dir).ok_or_else(|| {
                GcError::Target(format!(
                    "cannot size the filesystem of {}",
                    config.cache.dir.display()
                ))
            })?)
        }
        None => GcTarget::Limits,
    };
    match Store::open_with(&config.cache.dir, Access::Exclusive) {
        Ok(store) => {
            store.reconcile()?;
            let (_, report) = store
                .run_gc(target, &config.cache.limits)
                .map_err(GcError::Refused)?;
            Ok(report)
        }
        Err(store::Error::Busy(_)) => {
            let store = Store::open_with(&config.cache.dir, Access::ReadOnly)?;
            let report = store
                .request_gc(target, Duration::from_secs(300))?
                .map_err(GcError::Refused)?;
            Ok(format!("done by the running mirror:\n{report}"))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("--target: {0}")]
    Target(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

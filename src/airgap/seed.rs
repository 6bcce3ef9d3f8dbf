//! `regcache seed`: pulls images (the index, every child or the chosen platforms, configs and
//! layers) into the cache through the mirror's own verified paths, `Cache::manifest` and
//! `Cache::fetch_blob`, so a seeded object is exactly what a client's miss would have stored.
//! Present objects are skipped; tags get their records, so they resolve offline.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;

use super::{Descriptor, Error, ManifestDoc, Platform, Progress, Target, platform_list, wanted};
use crate::cache::{Cache, Outcome};
use crate::oci::media_type::Accept;
use crate::oci::{Digest, Reference};
use crate::store::TagRecord;

pub struct SeedOptions {
    /// Platforms to keep from an index; empty keeps every child.
    pub platforms: Vec<Platform>,
    /// Pin what was seeded, so eviction never removes it.
    pub pin: bool,
    /// Objects downloaded at once.
    pub jobs: usize,
}

#[derive(Debug, Default)]
pub struct SeedReport {
    pub images: usize,
    /// Manifests and blobs the seeded images consist of.
    pub objects: u64,
    /// Of those, downloaded now (the rest were present).
    pub fetched: u64,
    pub bytes_fetched: u64,
    /// One line per image that failed, naming it and why.
    pub failures: Vec<String>,
}

/// What one image consists of, its manifests already in the cache.
struct Plan {
    target: Target,
    /// Digest, size, and whether it was downloaded now.
    manifests: Vec<(Digest, u64, bool)>,
    blobs: Vec<Descriptor>,
}

/// Seeds `images` into the cache. Unparseable references fail before anything is fetched;
/// an image that fails later is reported in `failures` while the others go on.
pub async fn seed(
    cache: &Cache,
    images: &[String],
    options: &SeedOptions,
    progress: &dyn Progress,
) -> Result<SeedReport, Error> {
    let targets = images
        .iter()
        .map(|i| Target::resolve(cache, i))
        .collect::<Result<Vec<_>, _>>()?;
    for t in &targets {
        if t.upstream.is_offline() {
            return Err(Error::Offline {
                image: t.canonical.clone(),
                upstream: t.upstream.name().clone(),
            });
        }
    }
    let jobs = options.jobs.max(1);
    let mut report = SeedReport {
        images: targets.len(),
        ..SeedReport::default()
    };
    let mut failed = BTreeSet::new();

    let planned: Vec<Result<Plan, Error>> = futures_util::stream::iter(targets)
        .map(|t| plan(cache, t, &options.platforms))
        .buffer_unordered(jobs)
        .collect()
        .await;
    let mut plans = Vec::new();
    let mut scheduled = HashSet::new();
    let mut downloads = Vec::new();
    for p in planned {
        let plan = match p {
            Ok(plan) => plan,
            Err(e) => {
                let line = super::describe(&e);
                progress.note(&format!("failed: {line}"));
                failed.insert(line);
                continue;
            }
        };
        let new_blobs: Vec<&Descriptor> = plan
            .blobs
            .iter()
            .filter(|d| scheduled.insert(d.digest.clone()))
            .collect();
        progress.add_work(
            (plan.manifests.len() + new_blobs.len()) as u64,
            plan.manifests.iter().map(|m| m.1).sum::<u64>()
                + new_blobs.iter().map(|d| d.size).sum::<u64>(),
        );
        for (digest, size, fetched) in &plan.manifests {
            report.objects += 1;
            if *fetched {
                report.fetched += 1;
                report.bytes_fetched += size;
            }
            progress.advance(*size);
            progress.object_done(&plan.target.canonical, "manifest", digest, *size, *fetched);
        }
        for d in new_blobs {
            downloads.push((plan.target.clone(), d.clone()));
        }
        plans.push(plan);
    }

    let fetched_bytes = AtomicU64::new(0);
    let results: Vec<(String, Digest, Result<bool, crate::cache::Error>)> =
        futures_util::stream::iter(downloads)
            .map(|(target, d)| {
                let fetched_bytes = &fetched_bytes;
                async move {
                    let mut reported = 0;
                    let result = cache
                        .fetch_blob(&target.upstream, &target.repo, &d.digest, |written| {
                            let written = written.min(d.size);
                            if written > reported {
                                progress.advance(written - reported);
                                reported = written;
                            }
                        })
                        .await;
                    if let Ok(fetched) = &result {
                        progress.advance(d.size.saturating_sub(reported));
                        if *fetched {
                            fetched_bytes.fetch_add(d.size, Ordering::Relaxed);
                        }
                        let kind = if d
                            .media_type
                            .as_deref()
                            .is_some_and(|m| m.contains("config"))
                        {
                            "config"
                        } else {
                            "blob"
                        };
                        progress.object_done(&target.canonical, kind, &d.digest, d.size, *fetched);
                    }
                    (target.canonical, d.digest, result)
                }
            })
            .buffer_unordered(jobs)
            .collect()
            .await;
    let mut blob_failures: HashMap<Digest, String> = HashMap::new();
    for (_, digest, result) in results {
        report.objects += 1;
        match result {
            Ok(true) => report.fetched += 1,
            Ok(false) => {}
            Err(e) => {
                blob_failures.insert(digest.clone(), format!("{digest}: {}", super::describe(&e)));
            }
        }
    }
    report.bytes_fetched += fetched_bytes.load(Ordering::Relaxed);

    // Stored content is synced into place a moment after it is verified: wait for it, so the
    // command's exit means everything is on disk.
    cache.drain(std::time::Duration::from_secs(600)).await;

    for plan in &plans {
        // A layer shared with another image failed there: this image is incomplete too.
        let broken: Vec<&String> = plan
            .blobs
            .iter()
            .filter_map(|d| blob_failures.get(&d.digest))
            .collect();
        if !broken.is_empty() {
            let line = format!(
                "{}: {}",
                plan.target.canonical,
                broken
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            progress.note(&format!("failed: {line}"));
            failed.insert(line);
            continue;
        }
        // Verified is not stored: check each blob really is in place (another process that
        // sweeps `ingest/` while a download is renamed would leave it missing).
        let missing: Vec<String> = plan
            .blobs
            .iter()
            .filter(|d| !cache.store().has_blob(&d.digest))
            .map(|d| format!("{}: not in the cache after its download", d.digest))
            .collect();
        if !missing.is_empty() {
            let line = format!("{}: {}", plan.target.canonical, missing.join("; "));
            progress.note(&format!("failed: {line}"));
            failed.insert(line);
            continue;
        }
        if options.pin {
            let store = cache.store();
            for digest in plan
                .manifests
                .iter()
                .map(|m| &m.0)
                .chain(plan.blobs.iter().map(|d| &d.digest))
            {
                store.pin(digest).map_err(|e| Error::Io {
                    op: "pin",
                    path: store.root().join("pins"),
                    source: e,
                })?;
            }
        }
        progress.note(&format!(
            "seeded {} ({} manifests, {} blobs{})",
            plan.target.canonical,
            plan.manifests.len(),
            plan.blobs.len(),
            if options.pin { ", pinned" } else { "" }
        ));
    }
    progress.finish();
    report.failures = failed.into_iter().collect();
    Ok(report)
}

/// Resolves an image's manifests (storing them) and lists the blobs it needs.
async fn plan(cache: &Cache, target: Target, platforms: &[Platform]) -> Result<Plan, Error> {
    let image = target.canonical.clone();
    let cache_error = |source| Error::Cache {
        image: image.clone(),
        source,
    };
    let reference = match (&target.digest, &target.tag) {
        (Some(d), _) => Reference::Digest(d.clone()),
        (None, Some(t)) => Reference::Tag(t.clone()),
        (None, None) => unreachable!("ImageRef always has a tag or a digest"),
    };
    let accept = Accept::any_manifest();
    let top = cache
        .manifest(&target.upstream, &target.repo, &reference, &accept, false)
        .await
        .map_err(cache_error)?;
    if let (Some(tag), Some(_)) = (&target.tag, &target.digest) {
        // `name:tag@digest`: the operator pins the tag to this digest, offline included.
        let record = TagRecord {
            digest: top.digest.clone(),
            media_type: top.media_type.clone(),
            size: top.size,
        };
        cache
            .store()
            .put_tag(target.upstream.name(), &target.repo, tag, &record)
            .await?;
    }
    let mut manifests = Vec::new();
    let mut blobs = Vec::new();
    let mut queue = vec![top];
    while let Some(m) = queue.pop() {
        let body = m.body.clone().unwrap_or_default();
        let doc = ManifestDoc::parse(&image, &m.digest, &body)?;
        manifests.push((m.digest.clone(), m.size, m.outcome == Outcome::Miss));
        if doc.is_index(&m.media_type) {
            let children: Vec<&Descriptor> = doc
                .manifests
                .iter()
                .filter(|c| wanted(platforms, c))
                .collect();
            if children.is_empty() {
                return Err(Error::NoPlatform {
                    image: image.clone(),
                    platforms: platform_list(platforms),
                });
            }
            // Nested indexes are rare; two levels are all any registry produces.
            if manifests.len() > 1024 {
                return Err(Error::InvalidManifest {
                    image: image.clone(),
                    digest: m.digest.clone(),
                    reason: "more than 1024 manifests in one image".into(),
                });
            }
            for child in children {
                let child = cache
                    .manifest(
                        &target.upstream,
                        &target.repo,
                        &Reference::Digest(child.digest.clone()),
                        &accept,
                        false,
                    )
                    .await
                    .map_err(cache_error)?;
                queue.push(child);
            }
        } else {
            blobs.extend(doc.blobs().cloned());
        }
    }
    Ok(Plan {
        target,
        manifests,
        blobs,
    })
}

impl std::fmt::Display for SeedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images, {} objects: {} downloaded ({}), {} already present",
            self.images,
            self.objects,
            self.fetched,
            bytesize::ByteSize::b(self.bytes_fetched),
            self.objects - self.fetched
        )
    }
}

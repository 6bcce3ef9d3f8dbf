//! Manifests: by digest they are immutable and cached for good; by tag they resolve through a
//! tag record that is trusted for `tag_ttl`, then revalidated with an upstream HEAD (which
//! Docker Hub does not count against its rate limit). While the upstream fails, the last known
//! digest is served stale, and counted.

use std::sync::Arc;

use bytes::Bytes;
use http::Method;

use super::{Cache, Error};
use crate::oci::media_type::Accept;
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::store::TagRecord;
use crate::upstream::{self, Upstream};

/// How a request was answered, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// The body, for GET.
    pub body: Option<Bytes>,
    pub outcome: Outcome,
}

impl Cache {
    /// Answers a manifest GET or HEAD. Concurrent identical requests share one answer.
    pub async fn manifest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
        accept: &Accept,
        head: bool,
    ) -> Result<Manifest, Error> {
        let key = format!(
            "{}\n{}\n{}\n{}\n{}",
            upstream.name(),
            repo,
            reference,
            head,
            accept.ranges().join(",")
        );
        let result = self
            .manifest_flights
            .try_get_with(key.clone(), async {
                let answer = match reference {
                    Reference::Digest(d) => self.manifest_by_digest(upstream, repo, d, head).await,
                    Reference::Tag(t) => {
                        self.manifest_by_tag(upstream, repo, t, accept, head).await
                    }
                };
                answer.map(Arc::new)
            })
            .await;
        self.manifest_flights.invalidate(&key).await;
        let manifest = result.map_err(Error::Fill)?;
        let kind = if matches!(reference, Reference::Tag(_)) {
            "tag"
        } else {
            "manifest"
        };
        match manifest.outcome {
            Outcome::Hit => self.metrics.cache_hits.with_label_values(&[kind]).inc(),
            Outcome::Miss => self.metrics.cache_misses.with_label_values(&[kind]).inc(),
            Outcome::Stale => {
                self.metrics.cache_hits.with_label_values(&[kind]).inc();
                self.metrics
                    .stale_served
                    .with_label_values(&[upstream.name().as_str()])
                    .inc();
            }
        }
        Ok(Arc::unwrap_or_clone(manifest))
    }

    /// The tag was just confirmed with its upstream as `record`: trust it for `tag_ttl`.
    async fn mark_fresh(&self, upstream: &Upstream, repo: &RepoName, tag: &Tag, record: TagRecord) {
        let key = tag_key(upstream, repo, tag);
        self.tag_checked
            .insert(key, (record, tokio::time::Instant::now()))
            .await;
    }

    /// A stored manifest, from memory when it was read recently: manifests are small and
    /// immutable, and clients ask for the same few over and over.
    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<(String, Bytes)>, Error> {
        if let Some(hit) = self.recent_manifests.get(digest).await {
            // Keeps its place in the eviction order like a disk hit.
            self.store.touch(digest);
            return Ok(Some(hit));
        }
        let stored = self.store.get_manifest(digest).await?;
        if let Some(m) = &stored {
            self.recent_manifests
                .insert(digest.clone(), m.clone())
                .await;
        }
        Ok(stored)
    }

    async fn manifest_by_digest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        head: bool,
    ) -> Result<Manifest, Error> {
        if upstream.is_offline() && !self.store.is_linked(upstream.name(), repo, digest).await {
            return Err(Error::ManifestUnknown);
        }
        if let Some((media_type, body)) = self.stored_manifest(digest).await? {
            if !self.store.is_linked(upstream.name(), repo, digest).await {
                // Cross-repository rule: confirm this repository has it before serving it.
                upstream
                    .manifest(
                        Method::HEAD,
                        repo,
                        &digest.to_string(),
                        &Accept::any_manifest(),
                        self.max_manifest_size,
                    )
                    .await
                    .map_err(Error::from_manifest_upstream)?;
                self.link_confirmed(upstream, repo, digest).await?;
            }
            return Ok(Manifest {
                media_type,
                digest: digest.clone(),
                size: body.len() as u64,
                body: (!head).then_some(body),
                outcome: Outcome::Hit,
            });
        }
        if upstream.is_offline() {
            return Err(Error::ManifestUnknown);
        }
        // A HEAD is answered from the upstream's HEAD; only a GET brings the content home.
        let method = if head { Method::HEAD } else { Method::GET };
        let accept_all = Accept::any_manifest();
        let resp = upstream
            .manifest(
                method,
                repo,
                &digest.to_string(),
                &accept_all,
                self.max_manifest_size,
            )
            .await
            .map_err(Error::from_manifest_upstream)?;
        self.take_manifest(upstream, repo, resp, Some(digest), head)
            .await
    }

    async fn manifest_by_tag(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
        head: bool,
    ) -> Result<Manifest, Error> {
        let key = tag_key(upstream, repo, tag);
        if upstream.is_offline() {
            // The last record is the truth, whatever its age; the client's Accept cannot be
            // negotiated with anyone, so what was recorded is what it gets.
            let Some(record) = self.store.get_tag(upstream.name(), repo, tag).await else {
                return Err(Error::ManifestUnknown);
            };
            return self
                .answer_from_record(upstream, repo, &record, head, Outcome::Hit)
                .await;
        }
        if let Some((record, checked)) = self.tag_checked.get(&key).await
            && checked.elapsed() < self.tag_ttl
            && accept.accepts(&record.media_type)
        {
            return self
                .answer_from_record(upstream, repo, &record, head, Outcome::Hit)
                .await;
        }
        let record = match self.store.get_tag(upstream.name(), repo, tag).await {
            None => {
                return self
                    .fetch_tag(upstream, repo, tag, accept, head, true)
                    .await;
            }
            // The client cannot take what the tag record holds: ask the upstream with its
            // Accept, and keep the record for the clients that can.
            Some(r) if !accept.accepts(&r.media_type) => {
                return self
                    .fetch_tag(upstream, repo, tag, accept, head, false)
                    .await;
            }
            Some(r) => r,
        };
        match upstream
            .manifest(
                Method::HEAD,
                repo,
                tag.as_str(),
                accept,
                self.max_manifest_size,
            )
            .await
        {
            Ok(resp) if resp.digest.as_ref() == Some(&record.digest) => {
                self.mark_fresh(upstream, repo, tag, record.clone()).await;
                self.answer_from_record(upstream, repo, &record, head, Outcome::Hit)
                    .await
            }
            // Moved (or the upstream does not say): fetch what the tag is now. If that fetch
            // fails (Docker Hub rate-limits GETs, not HEADs), the last known digest still serves.
            Ok(_) => match self
                .fetch_tag(upstream, repo, tag, accept, head, true)
                .await
            {
                Err(Error::Upstream(e)) => {
                    tracing::warn!(upstream = %upstream.name(), %repo, %tag, error = %e,
                        "upstream failed to serve a moved tag; serving the last known digest");
                    self.answer_from_record(upstream, repo, &record, head, Outcome::Stale)
                        .await
                        .map_err(|_| Error::Upstream(e))
                }
                other => other,
            },
            Err(e) if Error::is_not_found(&e) => {
                self.store.delete_tag(upstream.name(), repo, tag).await?;
                self.tag_checked.invalidate(&key).await;
                Err(Error::ManifestUnknown)
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream.name(), %repo, %tag, error = %e,
                    "upstream failed to revalidate a tag; serving the last known digest");
                match self
                    .answer_from_record(upstream, repo, &record, head, Outcome::Stale)
                    .await
                {
                    Ok(m) => Ok(m),
                    // Nothing stored to fall back on: the upstream's failure is the answer.
                    Err(_) => Err(Error::Upstream(e)),
                }
            }
        }
    }

    async fn answer_from_record(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        record: &TagRecord,
        head: bool,
        outcome: Outcome,
    ) -> Result<Manifest, Error> {
        if head {
            return Ok(Manifest {
                media_type: record.media_type.clone(),
                digest: record.digest.clone(),
                size: record.size,
                body: None,
                outcome,
            });
        }
        if let Some((media_type, body)) = self.stored_manifest(&record.digest).await? {
            return Ok(Manifest {
                media_type,
                digest: record.digest.clone(),
                size: body.len() as u64,
                body: Some(body),
                outcome,
            });
        }
        if outcome == Outcome::Stale {
            return Err(Error::ManifestUnknown);
        }
        let mut m = self
            .manifest_by_digest(upstream, repo, &record.digest, false)
            .await?;
        m.outcome = outcome;
        Ok(m)
    }

    async fn fetch_tag(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
        head: bool,
        record: bool,
    ) -> Result<Manifest, Error> {
        let method = if head { Method::HEAD } else { Method::GET };
        let mut resp = upstream
            .manifest(method, repo, tag.as_str(), accept, self.max_manifest_size)
            .await
            .map_err(Error::from_manifest_upstream)?;
        if head && (resp.digest.is_none() || resp.media_type.is_none()) {
            // Without a digest a HEAD cannot be answered truthfully: fetch the manifest.
            resp = upstream
                .manifest(
                    Method::GET,
                    repo,
                    tag.as_str(),
                    accept,
                    self.max_manifest_size,
                )
                .await
                .map_err(Error::from_manifest_upstream)?;
        }
        let manifest = self.take_manifest(upstream, repo, resp, None, head).await?;
        if record {
            let rec = TagRecord {
                digest: manifest.digest.clone(),
                media_type: manifest.media_type.clone(),
                size: manifest.size,
            };
            match self.store.put_tag(upstream.name(), repo, tag, &rec).await {
                Ok(()) => self.mark_fresh(upstream, repo, tag, rec).await,
                // The manifest is served; the tag is simply fetched again next time.
                Err(e) if e.is_disk_full() => {
                    tracing::warn!(%repo, %tag, error = %e, "the cache's disk is full: tag not recorded")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(manifest)
    }

    /// Verifies and stores a manifest response (GET), or reads its headers (HEAD).
    async fn take_manifest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        resp: upstream::ManifestResponse,
        expected: Option<&Digest>,
        head: bool,
    ) -> Result<Manifest, Error> {
        let invalid = |reason: &str| {
            Error::Upstream(upstream::Error::Invalid {
                upstream: upstream.name().clone(),
                reason: reason.to_owned(),
            })
        };
        let Some(body) = resp.body.filter(|_| !head) else {
            let digest = resp
                .digest
                .or_else(|| expected.cloned())
                .ok_or_else(|| invalid("manifest HEAD without Docker-Content-Digest"))?;
            return Ok(Manifest {
                media_type: resp
                    .media_type
                    .ok_or_else(|| invalid("manifest without Content-Type"))?,
                digest,
                size: resp
                    .length
                    .ok_or_else(|| invalid("manifest HEAD without Content-Length"))?,
                body: None,
                outcome: Outcome::Miss,
            });
        };
        let algorithm = expected
            .or(resp.digest.as_ref())
            .map_or(crate::oci::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &body);
        let claimed = expected.or(resp.digest.as_ref());
        if claimed.is_some_and(|c| c.algorithm() == algorithm && *c != digest) {
            self.metrics
                .digest_mismatches
                .with_label_values(&[upstream.name().as_str()])
                .inc();
            tracing::warn!(upstream = %upstream.name(), %repo, %digest, "upstream manifest does not match its digest; not stored");
            return Err(Error::ManifestDigestMismatch);
        }
        let media_type = match resp.media_type {
            Some(m) if !m.is_empty() => m,
            _ => media_type_of(&body).ok_or_else(|| invalid("manifest without a media type"))?,
        };
        if let Err(e) = self
            .keep_manifest(upstream, repo, &digest, &media_type, &body)
            .await
        {
            if !e.is_disk_full() {
                return Err(e.into());
            }
            // Verified bytes in hand: the client gets them even though they cannot be kept.
            self.metrics.disk_full.inc();
            tracing::warn!(upstream = %upstream.name(), %repo, %digest, error = %e, "the cache's disk is full: manifest served but not kept");
        }
        Ok(Manifest {
            media_type,
            size: body.len() as u64,
            digest,
            body: Some(body),
            outcome: Outcome::Miss,
        })
    }
}

impl Cache {
    /// Stores a verified manifest and links it and everything it references to `repo`.
    async fn keep_manifest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        body: &Bytes,
    ) -> Result<(), crate::store::Error> {
        self.store
            .put_manifest(digest, media_type, body.clone())
            .await?;
        self.store.link(upstream.name(), repo, digest).await?;
        for child in referenced_digests(body) {
            self.store.link(upstream.name(), repo, &child).await?;
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct Descriptor {
    digest: Digest,
}

/// The parts of any manifest kind that name other content.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct References {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

/// Digests a manifest references: fetched through this repository, they belong to it.
fn referenced_digests(body: &[u8]) -> Vec<Digest> {
    let Ok(refs) = serde_json::from_slice::<References>(body) else {
        return Vec::new();
    };
    refs.config
        .into_iter()
        .chain(refs.layers)
        .chain(refs.manifests)
        .chain(refs.blobs)
        .map(|d| d.digest)
        .collect()
}

/// The key of a tag's freshness entry.
fn tag_key(upstream: &Upstream, repo: &RepoName, tag: &Tag) -> String {
    format!("{}\n{}\n{}", upstream.name(), repo, tag)
}

fn media_type_of(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<References>(body).ok()?.media_type
}

//! Blobs: served from the store when this repository is known to reference them, confirmed
//! with the upstream when only another repository fetched them, and otherwise downloaded once
//! through `coalesce` while every asking client streams the download.

use std::sync::Arc;

use super::coalesce::{Flight, GrowingReader};
use super::{Cache, Error};
use crate::oci::{Digest, RepoName};
use crate::store::BlobFile;
use crate::upstream::Upstream;

pub enum Blob {
    /// Verified and stored: serve from disk (ranges allowed).
    Stored(BlobFile),
    /// Downloading: stream it as it arrives; `size` is known once the upstream sent it.
    Filling {
        reader: GrowingReader,
        size: Option<u64>,
        started_here: bool,
    },
    /// A HEAD answered by the upstream, without downloading.
    Remote { size: u64 },
    /// A HEAD answered by a download in progress.
    InFlight { size: u64 },
}

impl Cache {
    /// Answers a blob GET (`head == false`) or HEAD for `repo` on `upstream`.
    pub async fn blob(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        head: bool,
    ) -> Result<Blob, Error> {
        if upstream.is_offline() && !self.store.is_linked(upstream.name(), repo, digest).await {
            return Err(Error::BlobUnknown);
        }
        if let Some(file) = self.store.open_blob(digest).await? {
            self.ensure_linked(upstream, repo, digest, None).await?;
            self.metrics.cache_hits.with_label_values(&["blob"]).inc();
            return Ok(Blob::Stored(file));
        }
        if let Some(flight) = self.flights.get(digest) {
            self.ensure_linked(upstream, repo, digest, Some(&flight))
                .await?;
            if let Some(file) = flight.verified_file() {
                self.metrics.cache_hits.with_label_values(&["blob"]).inc();
                return Ok(Blob::Stored(file));
            }
            if !head {
                self.metrics
                    .cache_coalesced
                    .with_label_values(&["blob"])
                    .inc();
                return self.follow(flight, false).await;
            }
            // A HEAD for a blob that is downloading: the download's size answers it, with no
            // second request to the upstream (clients HEAD a layer right before they GET it).
            if let Ok(Some(size)) = flight.size().await {
                self.metrics
                    .cache_coalesced
                    .with_label_values(&["blob"])
                    .inc();
                return Ok(Blob::InFlight { size });
            }
        }
        if upstream.is_offline() {
            // Linked, but the content is gone (removed by hand or evicted).
            return Err(Error::BlobUnknown);
        }
        self.metrics.cache_misses.with_label_values(&["blob"]).inc();
        if head {
            let size = upstream
                .blob_size(repo, digest)
                .await
                .map_err(Error::from_blob_upstream)?;
            return Ok(Blob::Remote { size });
        }
        let (flight, started_here) = self
            .flights
            .join_or_start(upstream, repo, digest, &self.fill)?;
        if !started_here {
            // Another request started the same download between our checks.
            self.ensure_linked(upstream, repo, digest, Some(&flight))
                .await?;
        }
        self.follow(flight, started_here).await
    }

    /// Makes sure `digest` is stored for `repo` (seeding): downloads it through the same
    /// verified fill as a client's miss, reporting bytes written as they grow. True when it was
    /// downloaded, false when it was already stored.
    pub async fn fetch_blob(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        progress: impl FnMut(u64),
    ) -> Result<bool, Error> {
        match self.blob(upstream, repo, digest, false).await? {
            Blob::Stored(_) => Ok(false),
            Blob::Filling { mut reader, .. } => {
                reader.wait_verified(progress).await?;
                Ok(true)
            }
            Blob::Remote { .. } | Blob::InFlight { .. } => Err(Error::BlobUnknown),
        }
    }

    async fn follow(&self, flight: Arc<Flight>, started_here: bool) -> Result<Blob, Error> {
        let reader = flight.reader(self.metrics.clone());
        match flight.size().await {
            Ok(size) => Ok(Blob::Filling {
                reader,
                size,
                started_here,
            }),
            Err(e) => Err(Error::Fill(e)),
        }
    }

    /// The cross-repository rule: content fetched through one repository is served for another
    /// only after that repository's upstream confirms it has the blob too.
    async fn ensure_linked(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        flight: Option<&Arc<Flight>>,
    ) -> Result<(), Error> {
        if let Some(f) = flight
            && f.upstream.name() == upstream.name()
            && &f.repo == repo
        {
            return Ok(());
        }
        if self.store.is_linked(upstream.name(), repo, digest).await {
            return Ok(());
        }
        upstream
            .blob_size(repo, digest)
            .await
            .map_err(Error::from_blob_upstream)?;
        self.link_confirmed(upstream, repo, digest).await
    }

    /// Records that `repo` references `digest`, once its upstream confirmed it. With the disk
    /// full the record is skipped (the next request asks the upstream again) and the content is
    /// served all the same.
    pub(super) async fn link_confirmed(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), Error> {
        match self.store.link(upstream.name(), repo, digest).await {
            Err(e) if e.is_disk_full() => {
                tracing::warn!(%repo, %digest, error = %e, "the cache's disk is full: repository link not recorded");
                Ok(())
            }
            other => Ok(other?),
        }
    }
}

//! The mirror's policy over `store` and `upstream`: what is a hit, when a tag must be
//! revalidated, when a stale answer may be served, which repository may read which blob, and
//! that concurrent misses share one download (`coalesce`). Knows nothing of HTTP.
//!
//! An offline upstream is answered from the store alone: a tag from its last record whatever
//! its age, content only where this repository is linked to it, and `ManifestUnknown` /
//! `BlobUnknown` for everything else, decided before any upstream call.

mod blobs;
pub mod coalesce;
mod manifests;

use std::sync::Arc;

use tokio::time::Duration;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{self, Store};
use crate::upstream::{self, Upstreams};

pub use blobs::Blob;
pub use manifests::{Manifest, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest unknown to the upstream")]
    ManifestUnknown,
    #[error("blob unknown to the upstream")]
    BlobUnknown,
    #[error("the upstream sent a manifest that does not match its digest")]
    ManifestDigestMismatch,
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The shared download this request followed failed.
    #[error(transparent)]
    Fill(Arc<Error>),
    #[error("the download was abandoned: no client read it within the fill timeout")]
    FillAbandoned,
}

impl Error {
    fn is_not_found(e: &upstream::Error) -> bool {
        matches!(e, upstream::Error::Status { status, .. } if *status == http::StatusCode::NOT_FOUND)
    }

    fn from_manifest_upstream(e: upstream::Error) -> Error {
        if Error::is_not_found(&e) || matches!(e, upstream::Error::Offline { .. }) {
            Error::ManifestUnknown
        } else {
            Error::Upstream(e)
        }
    }

    fn from_blob_upstream(e: upstream::Error) -> Error {
        if Error::is_not_found(&e) || matches!(e, upstream::Error::Offline { .. }) {
            Error::BlobUnknown
        } else {
            Error::Upstream(e)
        }
    }
}

/// Memory for recently served manifests: a few thousand typical ones, small beside the
/// mirror's footprint.
const RECENT_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

pub struct Cache {
    store: Store,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
    flights: Arc<coalesce::Flights>,
    manifest_flights: moka::future::Cache<String, Arc<Manifest>>,
    /// Recently served manifests (media type, body), bounded by total bytes.
    recent_manifests: moka::future::Cache<crate::oci::Digest, (String, bytes::Bytes)>,
    /// Each tag's record and when it was last confirmed with its upstream (`tokio` time, so
    /// tests control it): a fresh tag is answered without touching the disk.
    tag_checked: moka::future::Cache<String, (crate::store::TagRecord, tokio::time::Instant)>,
    tag_ttl: Duration,
    max_manifest_size: u64,
    fill: coalesce::FillParams,
}

impl Cache {
    pub fn new(
        config: &Config,
        store: Store,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
    ) -> Cache {
        Cache {
            fill: coalesce::FillParams {
                store: store.clone(),
                metrics: metrics.clone(),
                fill_timeout: config.cache.fill_timeout,
                attempts: config.upstream_client.attempts,
            },
            store,
            upstreams,
            metrics,
            flights: Arc::default(),
            manifest_flights: moka::future::Cache::builder().max_capacity(10_000).build(),
            recent_manifests: moka::future::Cache::builder()
                .weigher(|_, (media_type, body): &(String, bytes::Bytes)| {
                    u32::try_from(media_type.len() + body.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(RECENT_MANIFEST_BYTES)
                .build(),
            tag_checked: moka::future::Cache::builder().max_capacity(100_000).build(),
            tag_ttl: config.cache.tag_ttl,
            max_manifest_size: config.cache.max_manifest_size.as_u64(),
        }
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits until downloads in progress have been stored (or failed), at most `deadline`, so a
    /// shutdown does not throw away what clients already received.
    pub async fn drain(&self, deadline: Duration) {
        let started = tokio::time::Instant::now();
        while !self.flights.is_empty() {
            if started.elapsed() > deadline {
                tracing::warn!(
                    "shutdown deadline reached with downloads still in progress; they are discarded"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn max_document_size(&self) -> u64 {
        self.max_manifest_size
    }
}

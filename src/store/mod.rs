//! The content-addressed disk store: verified blobs and manifests, in-progress ingests,
//! repository links and tag records. It owns every path under the cache directory and knows
//! nothing of HTTP or upstreams; `cache` decides what to fetch and when to trust it.
//!
//! Invariant: a file appears under `blobs/` only by `rename` from `ingest/`, after its size and
//! digest were checked (`Ingest::commit`, `Store::put_manifest`). Nothing opens a final path for
//! writing.

mod index;
mod ingest;
pub mod layout;
mod pins;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::oci::Digest;

pub use index::TagRecord;
pub use ingest::{Ingest, Verified};
use layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content size does not match: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("a blocking store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A cached blob opened for reading.
pub struct BlobFile {
    pub file: Arc<File>,
    pub size: u64,
}

/// What the store holds, for the size gauges.
#[derive(Default)]
struct Usage {
    bytes: AtomicU64,
    objects: AtomicU64,
}

#[derive(Clone)]
pub struct Store {
    layout: Layout,
    usage: Arc<Usage>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, removes ingest files a crash or kill left
    /// behind, and counts what is stored.
    pub fn open(root: &Path) -> Result<Store> {
        let layout = Layout::new(root);
        let ingest = layout.ingest_dir();
        for dir in [layout.blobs_dir(), ingest.clone()] {
            std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        }
        let entries = std::fs::read_dir(&ingest).map_err(Error::io("list", &ingest))?;
        for entry in entries.flatten() {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(Error::io("remove leftover ingest file", &path))?;
            tracing::info!(path = %path.display(), "removed a partial download left by an earlier run");
        }
        let store = Store {
            layout,
            usage: Arc::default(),
        };
        store.count_usage();
        Ok(store)
    }

    /// Opens (creating if needed) the store at `root` without sweeping `ingest/`: for the
    /// command-line workflows (seed, import), which may run while a `regcache serve` uses the
    /// same directory and must not remove its downloads in progress. Whatever they leave there
    /// after a crash is swept at the next `open`.
    pub fn open_alongside(root: &Path) -> Result<Store> {
        let layout = Layout::new(root);
        for dir in [layout.blobs_dir(), layout.ingest_dir()] {
            std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        }
        let store = Store {
            layout,
            usage: Arc::default(),
        };
        store.count_usage();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Bytes and objects under `blobs/`.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.usage.bytes.load(Ordering::Relaxed),
            self.usage.objects.load(Ordering::Relaxed),
        )
    }

    fn count_usage(&self) {
        fn walk(dir: &Path, bytes: &mut u64, objects: &mut u64) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => walk(&entry.path(), bytes, objects),
                    Ok(t) if t.is_file() => {
                        *objects += 1;
                        *bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                    _ => {}
                }
            }
        }
        let (mut bytes, mut objects) = (0, 0);
        walk(&self.layout.blobs_dir(), &mut bytes, &mut objects);
        self.usage.bytes.store(bytes, Ordering::Relaxed);
        self.usage.objects.store(objects, Ordering::Relaxed);
    }

    fn added(&self, size: u64) {
        self.usage.bytes.fetch_add(size, Ordering::Relaxed);
        self.usage.objects.fetch_add(1, Ordering::Relaxed);
    }

    /// Opens a verified blob, or `None` when it is not stored.
    pub async fn open_blob(&self, digest: &Digest) -> Result<Option<BlobFile>> {
        let path = self.layout.blob(digest);
        tokio::task::spawn_blocking(move || match File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(Error::io("stat", &path))?.len();
                Ok(Some(BlobFile {
                    file: Arc::new(file),
                    size,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open", &path)(e)),
        })
        .await?
    }

    /// Starts a download of `digest` into a temporary file.
    pub fn begin_ingest(&self, digest: &Digest) -> Result<Ingest> {
        Ingest::create(self.clone(), digest.clone())
    }

    /// Stores a manifest held in memory after checking it hashes to `digest`, with the media
    /// type it was served with.
    pub async fn put_manifest(&self, digest: &Digest, media_type: &str, body: Bytes) -> Result<()> {
        let actual = Digest::of(digest.algorithm(), &body);
        if &actual != digest {
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let blob = self.layout.blob(digest);
        let meta = self.layout.manifest_meta(digest);
        let size = body.len() as u64;
        let ingest_dir = self.layout.ingest_dir();
        let media_type = media_type.to_owned();
        let is_new = tokio::task::spawn_blocking(move || -> Result<bool> {
            let is_new = !blob.exists();
            if is_new {
                write_atomically(&ingest_dir, &blob, &body)?;
            }
            // The media type goes in after the content: a manifest counts as stored only when
            // both exist, so a crash between the two leaves a miss, never a typeless hit.
            write_atomically(&ingest_dir, &meta, media_type.as_bytes())?;
            Ok(is_new)
        })
        .await??;
        if is_new {
            self.added(size);
        }
        Ok(())
    }

    /// A stored manifest and its media type.
    pub async fn get_manifest(&self, digest: &Digest) -> Result<Option<(String, Bytes)>> {
        let blob = self.layout.blob(digest);
        let meta = self.layout.manifest_meta(digest);
        tokio::task::spawn_blocking(move || {
            let media_type = match std::fs::read_to_string(&meta) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("read", &meta)(e)),
            };
            match std::fs::read(&blob) {
                Ok(body) => Ok(Some((media_type, Bytes::from(body)))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("read", &blob)(e)),
            }
        })
        .await?
    }
}

/// Writes `bytes` to `dest` through a synced temporary file and a rename, so `dest` is either
/// absent or complete.
fn write_atomically(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = ingest::temp_path(tmp_dir);
    let result = (|| {
        let mut file = File::create(&tmp).map_err(Error::io("create", &tmp))?;
        file.write_all(bytes).map_err(Error::io("write", &tmp))?;
        file.sync_all().map_err(Error::io("sync", &tmp))?;
        rename_into_place(&tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn rename_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("store paths always have a parent");
    std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
    std::fs::rename(tmp, dest).map_err(Error::io("rename into", dest))?;
    // Make the rename itself durable, so a power cut cannot lose a file the index counts.
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn a_verified_ingest_becomes_readable() {
        let (_dir, store) = store();
        let digest = Digest::of(Algorithm::Sha256, b"hello world");
        let mut ingest = store.begin_ingest(&digest).expect("begin");
        ingest
            .append(vec![
                Bytes::from_static(b"hello "),
                Bytes::from_static(b"world"),
            ])
            .await
            .expect("append");
        assert!(
            store.open_blob(&digest).await.expect("open").is_none(),
            "not visible before commit"
        );
        ingest.commit(Some(11)).await.expect("commit");
        let blob = store
            .open_blob(&digest)
            .await
            .expect("open")
            .expect("stored");
        assert_eq!(blob.size, 11);
        assert_eq!(store.usage(), (11, 1));
    }

    #[tokio::test]
    async fn wrong_bytes_or_size_are_never_stored() {
        let (dir, store) = store();
        let digest = Digest::of(Algorithm::Sha256, b"expected");
        let mut ingest = store.begin_ingest(&digest).expect("begin");
        ingest
            .append(vec![Bytes::from_static(b"tampered")])
            .await
            .expect("append");
        let err = ingest.commit(Some(8)).await.expect_err("mismatch");
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");

        let mut ingest = store.begin_ingest(&digest).expect("begin");
        ingest
            .append(vec![Bytes::from_static(b"expec")])
            .await
            .expect("append");
        let err = ingest.commit(Some(8)).await.expect_err("short");
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    expected: 8,
                    actual: 5
                }
            ),
            "{err}"
        );

        assert!(store.open_blob(&digest).await.expect("open").is_none());
        let leftovers = std::fs::read_dir(dir.path().join("ingest"))
            .expect("ingest dir")
            .count();
        assert_eq!(leftovers, 0, "failed ingests leave no temp files");
    }

    #[tokio::test]
    async fn partial_downloads_are_swept_at_start_and_content_survives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let digest = Digest::of(Algorithm::Sha256, b"{}");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .put_manifest(
                    &digest,
                    "application/vnd.oci.image.manifest.v1+json",
                    Bytes::from_static(b"{}"),
                )
                .await
                .expect("put");
            let ingest = store.begin_ingest(&digest).expect("begin");
            // A crash: the temp file stays behind.
            std::mem::forget(ingest);
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .expect("dir")
                .count(),
            1
        );
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .expect("dir")
                .count(),
            0
        );
        let (media_type, body) = store
            .get_manifest(&digest)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(&body[..], b"{}");
        assert_eq!(store.usage(), (2, 1));
    }

    #[tokio::test]
    async fn a_manifest_that_does_not_hash_to_its_digest_is_refused() {
        let (_dir, store) = store();
        let digest = Digest::of(Algorithm::Sha256, b"{}");
        let err = store
            .put_manifest(&digest, "x", Bytes::from_static(b"{ }"))
            .await
            .expect_err("mismatch");
        assert!(matches!(err, Error::DigestMismatch { .. }));
        assert!(store.get_manifest(&digest).await.expect("get").is_none());
    }
}

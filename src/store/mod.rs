//! The content-addressed disk store: verified blobs and manifests, in-progress ingests,
//! repository links and tag records. It owns every path under the cache directory and knows
//! nothing of HTTP or upstreams; `cache` decides what to fetch and when to trust it.
//!
//! Invariant: a file appears under `blobs/` only by `rename` from `ingest/`, after its size and
//! digest were checked (`Ingest::commit`, `Store::put_manifest`). Nothing opens a final path for
//! writing.

mod access;
pub mod evict;
mod index;
mod ingest;
pub mod layout;
mod pins;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::oci::Digest;

pub use access::{Entry, now_ms};
pub use evict::{Evicted, GcTarget, LimitsConfig, Reason, SizeLimit};
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
    #[error(
        "another regcache process is using the cache directory {0} (stop the mirror first, or wait for it to exit)"
    )]
    Busy(PathBuf),
}

impl Error {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// The disk (or the quota of the cache's filesystem) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A cached blob opened for reading.
pub struct BlobFile {
    pub file: Arc<File>,
    pub size: u64,
}

/// How `Store::open_with` treats another process holding the cache directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The mirror: owns the index; waits a few seconds for a previous instance to let go.
    Serve,
    /// `cache gc`/`verify`: owns the index; refuses at once while a mirror runs.
    Exclusive,
    /// `cache stats`: reads the index without writing anything, beside a running mirror.
    ReadOnly,
    /// A command adding content or pins beside a running mirror (seeding): no lock, no sweep of
    /// `ingest/` (the mirror's downloads live there), journal appends but no compaction. The
    /// mirror's periodic scan picks up what it stored.
    Shared,
}

#[derive(Clone)]
pub struct Store {
    layout: Layout,
    index: Arc<access::AccessIndex>,
    /// Open handles of stored blobs, shared by concurrent readers; a live one means the blob is
    /// being read and is not evicted.
    open: Arc<Mutex<HashMap<Digest, Weak<File>>>>,
    /// Wakes the eviction task when content was added.
    added: Arc<tokio::sync::Notify>,
    read_only: bool,
    _lock: Option<Arc<File>>,
}

impl Store {
    /// Opens (creating if needed) the store at `root` for serving, removes ingest files a
    /// crash or kill left behind, and loads the access index.
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_with(root, Access::Serve)
    }

    pub fn open_with(root: &Path, access: Access) -> Result<Store> {
        let layout = Layout::new(root);
        let read_only = access == Access::ReadOnly;
        let owner = matches!(access, Access::Serve | Access::Exclusive);
        if !read_only {
            for dir in [layout.blobs_dir(), layout.ingest_dir(), layout.index_dir()] {
                std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
            }
        }
        let lock = if owner {
            Some(Arc::new(take_lock(&layout, access)?))
        } else {
            None
        };
        if owner {
            let ingest = layout.ingest_dir();
            let entries = std::fs::read_dir(&ingest).map_err(Error::io("list", &ingest))?;
            for entry in entries.flatten() {
                let path = entry.path();
                std::fs::remove_file(&path)
                    .map_err(Error::io("remove leftover ingest file", &path))?;
                tracing::info!(path = %path.display(), "removed a partial download left by an earlier run");
            }
        }
        let index_dir = layout.index_dir();
        let index = access::AccessIndex::load(&index_dir, !read_only, owner)
            .map_err(Error::io("load the access index in", &index_dir))?;
        Ok(Store {
            layout,
            index: Arc::new(index),
            open: Arc::default(),
            added: Arc::default(),
            read_only,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Bytes and objects the access index counts (blobs and manifests).
    pub fn usage(&self) -> (u64, u64) {
        self.index.lock().usage()
    }

    /// Writes batched access times to the journal (and compacts it when large).
    pub fn flush_index(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let dir = self.layout.index_dir();
        self.index
            .flush()
            .map_err(Error::io("write the access journal in", &dir))
    }

    /// Notes a hit on `digest` (e.g. a manifest served from memory), for eviction order.
    pub fn touch(&self, digest: &Digest) {
        self.index.lock().touch(digest, now_ms());
    }

    /// Records newly stored content; the caller has just renamed it into `blobs/`.
    fn added(&self, digest: &Digest, size: u64, handle: Option<&Arc<File>>) {
        let mut index = self.index.lock();
        index.insert(digest, size, now_ms());
        if let Some(handle) = handle {
            self.open
                .lock()
                .expect("open-handle map lock is never poisoned")
                .insert(digest.clone(), Arc::downgrade(handle));
        }
        drop(index);
        self.added.notify_one();
    }

    /// Whether a reader or the download that stored it still holds `digest` open.
    fn is_open(&self, digest: &Digest) -> bool {
        self.open
            .lock()
            .expect("open-handle map lock is never poisoned")
            .get(digest)
            .is_some_and(|w| w.strong_count() > 0)
    }

    /// Opens a verified blob, or `None` when it is not stored.
    /// Whether `digest` is stored as a blob (a quick check, no handle kept).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.layout.blob(digest).is_file()
    }

    pub async fn open_blob(&self, digest: &Digest) -> Result<Option<BlobFile>> {
        let shared = self
            .open
            .lock()
            .expect("open-handle map lock is never poisoned")
            .get(digest)
            .and_then(Weak::upgrade);
        let path = self.layout.blob(digest);
        let file = match shared {
            // Another reader has it open: share the handle (positional reads do not interfere).
            Some(file) => file,
            None => {
                let opened = tokio::task::spawn_blocking(move || match File::open(&path) {
                    Ok(file) => Ok(Some(file)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io("open", &path)(e)),
                })
                .await??;
                let Some(file) = opened else {
                    return Ok(None);
                };
                let file = Arc::new(file);
                let mut open = self
                    .open
                    .lock()
                    .expect("open-handle map lock is never poisoned");
                if open.len() > 4096 {
                    open.retain(|_, w| w.strong_count() > 0);
                }
                open.insert(digest.clone(), Arc::downgrade(&file));
                file
            }
        };
        let size = file
            .metadata()
            .map_err(Error::io("stat", &self.layout.blob(digest)))?
            .len();
        self.touch(digest);
        Ok(Some(BlobFile { file, size }))
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
        let store = self.clone();
        let stored = digest.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            if !blob.exists() {
                write_atomically(&ingest_dir, &blob, &body)?;
                store.added(&stored, size, None);
            }
            // The media type goes in after the content: a manifest counts as stored only when
            // both exist, so a crash between the two leaves a miss, never a typeless hit.
            write_atomically(&ingest_dir, &meta, media_type.as_bytes())?;
            Ok(())
        })
        .await??;
        Ok(())
    }

    /// A stored manifest and its media type.
    pub async fn get_manifest(&self, digest: &Digest) -> Result<Option<(String, Bytes)>> {
        let blob = self.layout.blob(digest);
        let meta = self.layout.manifest_meta(digest);
        let store = self.clone();
        let stored = digest.clone();
        tokio::task::spawn_blocking(move || {
            let media_type = match std::fs::read_to_string(&meta) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("read", &meta)(e)),
            };
            match std::fs::read(&blob) {
                Ok(body) => {
                    store.touch(&stored);
                    Ok(Some((media_type, Bytes::from(body))))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("read", &blob)(e)),
            }
        })
        .await?
    }
}

/// Takes the cache directory's lock (`index/lock`), so two processes never write one index.
fn take_lock(layout: &Layout, access: Access) -> Result<File> {
    let path = layout.index_dir().join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io("open", &path))?;
    // A mirror restarting in place may briefly overlap its predecessor's shutdown.
    let patience = match access {
        Access::Serve => 100,
        _ => 0,
    };
    for attempt in 0..=patience {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if attempt < patience => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Busy(layout.root().to_owned()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path)(e)),
        }
    }
    Err(Error::Busy(layout.root().to_owned()))
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
            // A crash mid-download: the temp file stays behind (written directly, since a
            // leaked `Ingest` would also keep this process's hold on the cache directory).
            std::fs::write(dir.path().join("ingest/0123.part"), b"partial").expect("write");
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

//! One download on its way into the store: a temporary file under `ingest/`, hashed as it is
//! written (on a thread of its own, so bytes are readable as soon as they are written),
//! committed by rename only after its size and digest match. A second, read-only handle lets
//! clients read the bytes already written while the download goes on.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{Error, Result, Store, rename_into_place};
use crate::oci::{Digest, DigestHasher};

/// A fresh name in `dir` for a temporary file.
pub(super) fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!("{:032x}.part", rand::random::<u128>()))
}

/// The file lives in an `Option` so `append` can move it to a blocking thread and back.
pub struct Ingest {
    store: Store,
    digest: Digest,
    path: PathBuf,
    file: Option<File>,
    /// Started by the first `append`.
    hashing: Option<Hashing>,
    reader: Arc<File>,
    written: u64,
    committed: bool,
}

impl Ingest {
    pub(super) fn create(store: Store, digest: Digest) -> Result<Ingest> {
        let path = temp_path(&store.layout.ingest_dir());
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(Error::io("create", &path))?;
        let reader = File::open(&path).map_err(Error::io("open", &path))?;
        Ok(Ingest {
            store,
            digest,
            path,
            file: Some(file),
            hashing: None,
            reader: Arc::new(reader),
            written: 0,
            committed: false,
        })
    }

    /// A read-only handle on the file; positional reads of `0..written()` see the downloaded
    /// bytes, and it stays valid after the commit renames the file.
    pub fn reader(&self) -> Arc<File> {
        self.reader.clone()
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Hands `chunks` to the download's hashing thread and writes them on a blocking thread;
    /// on return they are written and readable through `reader()`. The digest is checked only
    /// by `verify`, so a reader must hold back the last byte until then.
    pub async fn append(&mut self, chunks: Vec<Bytes>) -> Result<u64> {
        let mut file = self.file.take().ok_or_else(|| Error::Io {
            op: "write (after an earlier failure)",
            path: self.path.clone(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        })?;
        let hashing = match &mut self.hashing {
            Some(hashing) => hashing,
            None => self.hashing.insert(
                Hashing::start(self.digest.algorithm())
                    .map_err(Error::io("start hashing", &self.path))?,
            ),
        };
        // Waits while the thread still has a batch queued, which bounds what is held for it;
        // a thread that is gone is reported by `verify`.
        let _ = hashing.feed.send(chunks.clone()).await;
        let path = self.path.clone();
        let (file, n) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut n = 0u64;
            for chunk in &chunks {
                file.write_all(chunk).map_err(Error::io("write", &path))?;
                n += chunk.len() as u64;
            }
            Ok((file, n))
        })
        .await??;
        self.file = Some(file);
        self.written += n;
        Ok(self.written)
    }

    /// Checks size and digest, syncs, and renames into the store. On any mismatch the file is
    /// removed and nothing is stored.
    pub async fn commit(self, expected_size: Option<u64>) -> Result<()> {
        self.verify(expected_size).await?.persist().await
    }

    /// Checks size and digest, once the hashing thread has caught up with the writes. The
    /// bytes are then known good and may be handed out in full; they enter the store only with
    /// `Verified::persist`.
    pub async fn verify(mut self, expected_size: Option<u64>) -> Result<Verified> {
        let file = self.file.take().ok_or_else(|| Error::Io {
            op: "verify (after an earlier failure)",
            path: self.path.clone(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        })?;
        if let Some(expected) = expected_size
            && expected != self.written
        {
            return Err(Error::SizeMismatch {
                expected,
                actual: self.written,
            });
        }
        let actual = match self.hashing.take() {
            Some(hashing) => hashing
                .finish()
                .await
                .map_err(Error::io("hash", &self.path))?,
            None => DigestHasher::new(self.digest.algorithm()).finish(),
        };
        if actual != self.digest {
            return Err(Error::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        Ok(Verified { ingest: self, file })
    }
}

/// The digest of what was written, computed on a thread of the download's own (not the
/// blocking pool, where a thousand slow downloads could hold every thread) that takes the
/// batches in the order they were written.
struct Hashing {
    /// Room for one batch: the next waits until the thread has taken it.
    feed: tokio::sync::mpsc::Sender<Vec<Bytes>>,
    hasher: tokio::sync::oneshot::Receiver<DigestHasher>,
}

impl Hashing {
    fn start(algorithm: crate::oci::Algorithm) -> std::io::Result<Hashing> {
        let (feed, mut batches) = tokio::sync::mpsc::channel::<Vec<Bytes>>(1);
        let (done, hasher) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("regcache-hash".into())
            .stack_size(HASH_THREAD_STACK)
            .spawn(move || {
                let mut hasher = DigestHasher::new(algorithm);
                while let Some(batch) = batches.blocking_recv() {
                    for chunk in &batch {
                        hasher.update(chunk);
                    }
                }
                let _ = done.send(hasher);
            })?;
        Ok(Hashing { feed, hasher })
    }

    /// Ends the feed and waits for the last batch to be hashed.
    async fn finish(self) -> std::io::Result<Digest> {
        drop(self.feed);
        let hasher = self
            .hasher
            .await
            .map_err(|_| std::io::Error::other("the hashing thread ended early"))?;
        Ok(hasher.finish())
    }
}

/// Hashing needs little stack; the default 2 MiB would be reserved per download.
const HASH_THREAD_STACK: usize = 128 * 1024;

/// A download whose size and digest matched, not yet in the store.
pub struct Verified {
    ingest: Ingest,
    file: File,
}

impl Verified {
    /// A read-only handle on the verified bytes (to read a small document back).
    pub fn reader(&self) -> Arc<File> {
        self.ingest.reader()
    }

    pub fn size(&self) -> u64 {
        self.ingest.written
    }

    /// Syncs the file and renames it into the store: the commit point.
    pub async fn persist(mut self) -> Result<()> {
        let tmp = self.ingest.path.clone();
        let dest = self.ingest.store.layout.blob(&self.ingest.digest);
        let file = self.file;
        tokio::task::spawn_blocking(move || {
            file.sync_all().map_err(Error::io("sync", &tmp))?;
            rename_into_place(&tmp, &dest)
        })
        .await??;
        self.ingest.committed = true;
        let ingest = &self.ingest;
        ingest
            .store
            .added(&ingest.digest, ingest.written, Some(&ingest.reader));
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.committed {
            // Unlinking is a single cheap syscall; readers holding `reader()` keep their fd.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

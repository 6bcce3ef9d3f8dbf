//! One download on its way into the store: a temporary file under `ingest/`, hashed as it is
//! written, committed by rename only after its size and digest match. A second, read-only handle
//! lets clients read the bytes already written while the download goes on.

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

/// The writing half lives in `Option`s so `append` can move it to a blocking thread and back.
pub struct Ingest {
    store: Store,
    digest: Digest,
    path: PathBuf,
    writer: Option<(File, DigestHasher)>,
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
        let hasher = DigestHasher::new(digest.algorithm());
        Ok(Ingest {
            store,
            digest,
            path,
            writer: Some((file, hasher)),
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

    /// Writes and hashes `chunks`, each on its own blocking thread so hashing (the costliest
    /// step of a cold pull) runs beside the write instead of after it; on return they are
    /// readable through `reader()`.
    pub async fn append(&mut self, chunks: Vec<Bytes>) -> Result<u64> {
        let (mut file, mut hasher) = self.writer.take().ok_or_else(|| Error::Io {
            op: "write (after an earlier failure)",
            path: self.path.clone(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        })?;
        let path = self.path.clone();
        let to_hash = chunks.clone();
        let hashing = tokio::task::spawn_blocking(move || {
            for chunk in &to_hash {
                hasher.update(chunk);
            }
            hasher
        });
        let writing = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut n = 0u64;
            for chunk in &chunks {
                file.write_all(chunk).map_err(Error::io("write", &path))?;
                n += chunk.len() as u64;
            }
            Ok((file, n))
        });
        let (hashed, written) = tokio::join!(hashing, writing);
        let hasher = hashed?;
        let (file, n) = written??;
        self.writer = Some((file, hasher));
        self.written += n;
        Ok(self.written)
    }

    /// Checks size and digest, syncs, and renames into the store. On any mismatch the file is
    /// removed and nothing is stored.
    pub async fn commit(self, expected_size: Option<u64>) -> Result<()> {
        self.verify(expected_size)?.persist().await
    }

    /// Checks size and digest. The bytes are then known good and may be handed out in full;
    /// they enter the store only with `Verified::persist`.
    pub fn verify(mut self, expected_size: Option<u64>) -> Result<Verified> {
        let (file, hasher) = self.writer.take().ok_or_else(|| Error::Io {
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
        let actual = hasher.finish();
        if actual != self.digest {
            return Err(Error::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        Ok(Verified { ingest: self, file })
    }
}

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

//! Pinned content: digests that eviction never removes, marked by empty files
//! `pins/<alg>/<hex>` under the cache directory. A marker file (rather than a field in the access
//! index) keeps pins readable and editable with `ls`/`touch`/`rm`, survives any index loss, and
//! lets a command write pins while the mirror runs.

use std::io;

use super::Store;
use crate::oci::Digest;

impl Store {
    /// Marks `digest` as never to be evicted. Pinning twice is harmless; the blob need not be
    /// stored yet (a pin may precede the download that fills it).
    pub fn pin(&self, digest: &Digest) -> io::Result<()> {
        let path = self.layout.pin(digest);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        Ok(())
    }

    /// Lets eviction consider `digest` again. Unpinning what is not pinned is harmless.
    pub fn unpin(&self, digest: &Digest) -> io::Result<()> {
        match std::fs::remove_file(self.layout.pin(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `digest` is pinned. An unreadable pins directory counts as pinned, so a
    /// permission problem never turns into an eviction.
    pub fn is_pinned(&self, digest: &Digest) -> bool {
        match std::fs::metadata(self.layout.pin(digest)) {
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::oci::{Algorithm, Digest};
    use crate::store::Store;

    #[test]
    fn pins_are_marker_files_that_come_and_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let d = Digest::of(Algorithm::Sha256, b"pinned");
        assert!(!store.is_pinned(&d));
        store.pin(&d).expect("pin");
        store.pin(&d).expect("pin twice");
        assert!(store.is_pinned(&d));
        assert!(dir.path().join("pins/sha256").join(d.hex()).is_file());
        store.unpin(&d).expect("unpin");
        store.unpin(&d).expect("unpin twice");
        assert!(!store.is_pinned(&d));
    }
}

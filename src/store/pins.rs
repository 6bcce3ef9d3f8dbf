//! Pins: content an operator wants kept whatever the cache's size limit says (seeded images
//! of an air-gapped site). A pin is an empty file `pins/<alg>/<hex>` under the cache
//! directory, so it survives restarts and is visible to anyone listing the directory.

use std::io;
use std::path::PathBuf;

use super::Store;
use crate::oci::Digest;

impl Store {
    fn pin_path(&self, digest: &Digest) -> PathBuf {
        self.root()
            .join("pins")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Pins `digest`; pinning twice is harmless.
    pub fn pin(&self, digest: &Digest) -> io::Result<()> {
        let path = self.pin_path(digest);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map(drop)
    }

    /// Removes the pin of `digest`, if any.
    pub fn unpin(&self, digest: &Digest) -> io::Result<()> {
        match std::fs::remove_file(self.pin_path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.pin_path(digest).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    #[test]
    fn pins_survive_a_reopen_and_can_be_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let digest = Digest::of(Algorithm::Sha256, b"layer");
        let store = Store::open(dir.path()).expect("open");
        assert!(!store.is_pinned(&digest));
        store.pin(&digest).expect("pin");
        store.pin(&digest).expect("pin again");
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.is_pinned(&digest));
        store.unpin(&digest).expect("unpin");
        store.unpin(&digest).expect("unpin again");
        assert!(!store.is_pinned(&digest));
    }
}

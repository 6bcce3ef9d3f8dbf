//! Where everything lives on disk. Paths are derived only from validated types (`Digest`,
//! `RegistryHost`, `RepoName`, `Tag`), so no client string can name a file.
//!
//! ```text
//! <root>/
//!   blobs/<alg>/<hex[0..2]>/<hex>        verified content: layers, configs and manifests
//!   manifests/<alg>/<hex[0..2]>/<hex>    the media type a manifest was served with
//!   ingest/<random>.part                  downloads in progress; removed at start-up
//!   repos/<upstream>/<repo>/_links/<alg>/<hex>   empty: <repo> on <upstream> references <digest>
//!   repos/<upstream>/<repo>/_tags/<tag>          JSON: the digest and media type <tag> resolved to
//!   pins/<alg>/<hex>                      empty: <digest> is never evicted
//!   index/access.snapshot                 access index: size, last access, upstreams per blob
//!   index/access.journal                  appended changes since the snapshot
//!   index/lock                            held (flock) by the process that owns the index
//!   quarantine/<alg>/<hex>                blobs `cache verify` found corrupt; never served
//! ```
//! Repository names cannot start with `_` (spec grammar), so `_links` and `_tags` never collide
//! with a repository path component.

use std::path::{Path, PathBuf};

use crate::oci::{Digest, RegistryHost, RepoName, Tag};

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        sharded(&self.blobs_dir(), digest)
    }

    pub fn manifest_meta(&self, digest: &Digest) -> PathBuf {
        sharded(&self.root.join("manifests"), digest)
    }

    /// Empty marker: `digest` is pinned (never evicted).
    pub fn pin(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("pins")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Blobs `cache verify` found corrupt, kept for inspection, never served.
    pub fn quarantine(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("quarantine")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// The access index: snapshot, journal and the lock a running mirror holds.
    pub fn index_dir(&self) -> PathBuf {
        self.root.join("index")
    }

    pub fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    fn repo(&self, upstream: &RegistryHost, repo: &RepoName) -> PathBuf {
        let mut path = self.root.join("repos").join(upstream.as_str());
        path.extend(repo.components());
        path
    }

    pub fn link(&self, upstream: &RegistryHost, repo: &RepoName, digest: &Digest) -> PathBuf {
        self.repo(upstream, repo)
            .join("_links")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    pub fn tag(&self, upstream: &RegistryHost, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.repo(upstream, repo).join("_tags").join(tag.as_str())
    }

    pub fn tags_dir(&self, upstream: &RegistryHost, repo: &RepoName) -> PathBuf {
        self.repo(upstream, repo).join("_tags")
    }
}

fn sharded(base: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    base.join(digest.algorithm().as_str())
        .join(&hex[..2])
        .join(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        let layout = Layout::new(Path::new("/data"));
        let d = Digest::of(crate::oci::Algorithm::Sha256, b"x");
        let blob = layout.blob(&d);
        assert!(blob.starts_with("/data/blobs/sha256/"));
        assert!(blob.ends_with(d.hex()));
        let up: RegistryHost = "registry.example.com:5000".parse().expect("host");
        let repo: RepoName = "team/app".parse().expect("name");
        let tag: Tag = "v1".parse().expect("tag");
        assert_eq!(
            layout.tag(&up, &repo, &tag),
            Path::new("/data/repos/registry.example.com:5000/team/app/_tags/v1")
        );
    }
}

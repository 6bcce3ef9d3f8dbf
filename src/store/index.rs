//! What the store records beside content: which repository of which upstream references a
//! digest (the links behind the cross-repository rule), and what each tag last resolved to.
//! Both are small files, so they survive a restart without a separate database; losing one
//! costs a revalidation with the upstream, never a wrong answer.

use serde::{Deserialize, Serialize};

use super::{Error, Result, Store, write_atomically};
use crate::oci::{Digest, RegistryHost, RepoName, Tag};

/// What a tag resolved to when it was last fetched or revalidated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

impl Store {
    /// Records that `repo` on `upstream` references `digest`.
    pub async fn link(
        &self,
        upstream: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<()> {
        self.index.lock().add_upstream(digest, upstream);
        let path = self.layout.link(upstream, repo, digest);
        tokio::task::spawn_blocking(move || {
            let parent = path.parent().expect("link paths have a parent");
            std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(Error::io("create", &path))?;
            Ok(())
        })
        .await?
    }

    pub async fn is_linked(
        &self,
        upstream: &RegistryHost,
        repo: &RepoName,
        digest: &Digest,
    ) -> bool {
        tokio::fs::try_exists(self.layout.link(upstream, repo, digest))
            .await
            .unwrap_or(false)
    }

    pub async fn put_tag(
        &self,
        upstream: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<()> {
        let path = self.layout.tag(upstream, repo, tag);
        let tmp_dir = self.layout.ingest_dir();
        let json = serde_json::to_vec(record).expect("a tag record always serializes");
        tokio::task::spawn_blocking(move || write_atomically(&tmp_dir, &path, &json)).await?
    }

    /// The last record for `tag`; an unreadable or corrupt record reads as none (it will be
    /// fetched again), and is logged.
    pub async fn get_tag(
        &self,
        upstream: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
    ) -> Option<TagRecord> {
        let path = self.layout.tag(upstream, repo, tag);
        let bytes = tokio::fs::read(&path).await.ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a corrupt tag record");
                None
            }
        }
    }

    /// The tags recorded for `repo`, sorted; what an offline upstream lists.
    pub async fn tags(&self, upstream: &RegistryHost, repo: &RepoName) -> Result<Vec<Tag>> {
        let dir = self.layout.tags_dir(upstream, repo);
        tokio::task::spawn_blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(Error::io("list", &dir)(e)),
            };
            let mut tags: Vec<Tag> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            tags.sort_by(|a: &Tag, b: &Tag| a.as_str().cmp(b.as_str()));
            Ok(tags)
        })
        .await?
    }

    pub async fn delete_tag(
        &self,
        upstream: &RegistryHost,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<()> {
        let path = self.layout.tag(upstream, repo, tag);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("remove", &path)(e))
            }
            _ => Ok(()),
        }
    }
}

//! The air-gapped workflow: `seed` pulls whole images into the cache through the same verified
//! ingest the mirror uses, `export` writes cached images as an OCI image layout (a directory or
//! a tar) that other tools read too, and `import` verifies such a bundle completely before
//! loading it into another instance's cache. Together with offline upstreams (`cache`), a site
//! without network serves exactly what was carried in.
//!
//! Runs in-process over `cache` and `store`; no HTTP server is involved.

mod bundle;
mod progress;
mod seed;

pub use bundle::{ExportOptions, ExportReport, ImportOptions, ImportReport, export, import};

use std::path::PathBuf;

use serde::Deserialize;

use crate::cache::Cache;
use crate::oci::{Digest, ImageRef, RegistryHost, RepoName, Tag};
use crate::upstream::Upstream;
use crate::{cache, oci, store, upstream};

pub use progress::{Bars, Lines, Progress, Silent};
pub use seed::{SeedOptions, SeedReport, seed};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{reference}` is not an image reference ([host/]name[:tag][@digest]): {source}")]
    Reference {
        reference: String,
        #[source]
        source: oci::reference::Error,
    },
    #[error("`{reference}`: {source}")]
    Select {
        reference: String,
        #[source]
        source: upstream::SelectError,
    },
    #[error("`{platform}` is not a platform (os/architecture[/variant], e.g. linux/amd64)")]
    Platform { platform: String },
    #[error(
        "{image}: upstream {upstream} is configured offline; seed from a config where it is online"
    )]
    Offline {
        image: String,
        upstream: RegistryHost,
    },
    #[error("{image}: {source}")]
    Cache {
        image: String,
        #[source]
        source: cache::Error,
    },
    #[error("{image}: manifest {digest} is not valid JSON for its media type: {reason}")]
    InvalidManifest {
        image: String,
        digest: Digest,
        reason: String,
    },
    #[error("{image}: no manifest in the index matches the platform(s) {platforms}")]
    NoPlatform { image: String, platforms: String },
    #[error(
        "{image}: {digest} is not in the cache; seed the image first (or export the platforms it was seeded with, --platform)"
    )]
    Missing { image: String, digest: Digest },
    #[error("{image}: the tag is not in the cache; seed the image first")]
    TagMissing { image: String },
    #[error("bundle refused, nothing imported: {digest}: {reason}")]
    Corrupt { digest: Digest, reason: String },
    #[error("bundle refused, nothing imported: {reason}")]
    Bundle { reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{failed} image(s) failed (listed above)")]
    Failed { failed: usize },
    #[error("{0}")]
    Usage(String),
}

impl Error {
    fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Io { op, path, source }
    }
}

/// An error with its causes, each once (`Display` of outer errors often repeats the inner one).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

/// Image references from a file, one a line; blank lines and `#` comments are skipped.
pub fn read_image_list(path: &std::path::Path) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path).map_err(Error::io("read", path))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// An image resolved against this instance's upstreams.
#[derive(Clone)]
pub(crate) struct Target {
    /// The full reference, `<upstream>/<repository>[:tag][@digest]`: what the bundle names it.
    pub canonical: String,
    pub upstream: std::sync::Arc<Upstream>,
    pub repo: RepoName,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl Target {
    pub fn resolve(cache: &Cache, reference: &str) -> Result<Target, Error> {
        let reference = reference.trim();
        let parsed: ImageRef = reference.parse().map_err(|source| Error::Reference {
            reference: reference.to_owned(),
            source,
        })?;
        let (upstream, repo) = cache
            .upstreams()
            .select(None, &parsed.name)
            .map_err(|source| Error::Select {
                reference: reference.to_owned(),
                source,
            })?;
        let mut canonical = format!("{}/{}", upstream.name(), repo);
        if let Some(tag) = &parsed.tag {
            canonical.push(':');
            canonical.push_str(tag.as_str());
        }
        if let Some(digest) = &parsed.digest {
            canonical.push('@');
            canonical.push_str(&digest.to_string());
        }
        Ok(Target {
            canonical,
            upstream,
            repo,
            tag: parsed.tag,
            digest: parsed.digest,
        })
    }
}

/// A platform to keep from an index: `os/architecture[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Platform, Error> {
        let bad = || Error::Platform {
            platform: s.to_owned(),
        };
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let architecture = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let variant = parts.next().map(str::to_owned);
        if parts.next().is_some() || variant.as_deref() == Some("") {
            return Err(bad());
        }
        Ok(Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant,
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    fn matches(&self, p: Option<&PlatformDoc>) -> bool {
        p.is_some_and(|p| {
            p.os == self.os
                && p.architecture == self.architecture
                && self
                    .variant
                    .as_ref()
                    .is_none_or(|v| p.variant.as_ref() == Some(v))
        })
    }
}

/// Whether an index child is kept: every child without a filter, else those matching one.
fn wanted(platforms: &[Platform], child: &Descriptor) -> bool {
    platforms.is_empty() || platforms.iter().any(|p| p.matches(child.platform.as_ref()))
}

fn platform_list(platforms: &[Platform]) -> String {
    platforms
        .iter()
        .map(Platform::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Debug, Deserialize)]
struct PlatformDoc {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: Digest,
    size: u64,
    #[serde(default)]
    platform: Option<PlatformDoc>,
    /// Foreign (non-distributable) layers name where they live instead; registries do not
    /// serve them, so they are neither seeded nor exported.
    #[serde(default)]
    urls: Vec<String>,
}

/// What seed, export and import read of any manifest kind.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

impl ManifestDoc {
    fn parse(image: &str, digest: &Digest, body: &[u8]) -> Result<ManifestDoc, Error> {
        serde_json::from_slice(body).map_err(|e| Error::InvalidManifest {
            image: image.to_owned(),
            digest: digest.clone(),
            reason: e.to_string(),
        })
    }

    fn is_index(&self, media_type: &str) -> bool {
        media_type == oci::media_type::OCI_INDEX
            || media_type == oci::media_type::DOCKER_MANIFEST_LIST
            || !self.manifests.is_empty()
    }

    /// The config and layers an image manifest needs, foreign layers left out.
    fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config
            .iter()
            .chain(&self.layers)
            .filter(|d| d.urls.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p: Platform = "linux/arm64/v8".parse().expect("valid");
        let doc = |os: &str, arch: &str, variant: Option<&str>| PlatformDoc {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        };
        assert!(p.matches(Some(&doc("linux", "arm64", Some("v8")))));
        assert!(!p.matches(Some(&doc("linux", "arm64", None))));
        let p: Platform = "linux/amd64".parse().expect("valid");
        assert!(p.matches(Some(&doc("linux", "amd64", Some("v3")))));
        assert!(!p.matches(None));
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "a/b/"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }
}

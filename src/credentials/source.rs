//! A configured credential source on disk: a dockerconfigjson file, or a directory holding
//! `.dockerconfigjson` (or the legacy `.dockercfg`), as a Secret volume mounts it.
//!
//! The kubelet updates a mounted Secret by writing a new timestamped directory and swapping the
//! `..data` symlink to it in one rename; the visible `.dockerconfigjson` is a symlink through
//! `..data`. Each read opens the path afresh, so it always sees one complete version, old or
//! new, never a mix.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::dockerconfig::{self, Entry, Format, ParseError};

/// Secrets are at most 1 MiB in Kubernetes; a larger file is not a credential file.
const MAX_FILE_SIZE: u64 = 1024 * 1024;

pub const CONFIG_JSON_KEY: &str = ".dockerconfigjson";
pub const DOCKERCFG_KEY: &str = ".dockercfg";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("directory {dir} holds neither {CONFIG_JSON_KEY} nor {DOCKERCFG_KEY}")]
    NoKey { dir: PathBuf },
    #[error("{path} is larger than 1MiB, the largest Secret Kubernetes stores")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

impl SourceError {
    /// The file (or the key in the directory) is missing.
    fn is_not_found(&self) -> bool {
        match self {
            SourceError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            SourceError::NoKey { .. } => true,
            SourceError::TooLarge { .. } | SourceError::Parse { .. } => false,
        }
    }
}

/// What one read of a source found.
pub struct Read {
    pub entries: Vec<Entry>,
    /// SHA-256 of the bytes, to tell a periodic re-read that found nothing new.
    pub fingerprint: [u8; 32],
}

impl Read {
    /// Parses a whole document (a file's bytes, a Secret's data).
    pub fn parse(bytes: &[u8], format: Format) -> Result<Read, ParseError> {
        Ok(Read {
            entries: dockerconfig::parse(bytes, format)?,
            fingerprint: Sha256::digest(bytes).into(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Source {
    path: PathBuf,
}

impl Source {
    pub fn new(path: &Path) -> Source {
        Source {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How logs, audit lines and `credentials list` name it.
    pub fn label(&self) -> String {
        self.path.display().to_string()
    }

    /// The directory to watch for changes: the mount itself, or a file's parent (a replaced
    /// file is a new inode, which a watch on the file alone would lose).
    pub fn watch_dir(&self) -> &Path {
        if self.path.is_dir() {
            &self.path
        } else {
            self.path.parent().unwrap_or(Path::new("."))
        }
    }

    pub fn read(&self) -> Result<Read, SourceError> {
        match self.read_once() {
            // The kubelet deletes the version it has just replaced: a read that followed
            // `..data` a moment before the swap can find its file gone. The new version is
            // in place by then, so one more read settles it.
            Err(e) if e.is_not_found() => self.read_once(),
            read => read,
        }
    }

    fn read_once(&self) -> Result<Read, SourceError> {
        let (path, format) = self.resolve()?;
        let bytes = read_capped(&path)?;
        let entries = dockerconfig::parse(&bytes, format).map_err(|source| SourceError::Parse {
            path: path.clone(),
            source,
        })?;
        Ok(Read {
            entries,
            fingerprint: Sha256::digest(&bytes).into(),
        })
    }

    /// The file to read and its format.
    fn resolve(&self) -> Result<(PathBuf, Format), SourceError> {
        let meta = std::fs::metadata(&self.path).map_err(|source| SourceError::Io {
            path: self.path.clone(),
            source,
        })?;
        if !meta.is_dir() {
            let format = if self.path.file_name().is_some_and(|n| n == DOCKERCFG_KEY) {
                Format::Dockercfg
            } else {
                Format::ConfigJson
            };
            return Ok((self.path.clone(), format));
        }
        for (name, format) in [
            (CONFIG_JSON_KEY, Format::ConfigJson),
            (DOCKERCFG_KEY, Format::Dockercfg),
        ] {
            let path = self.path.join(name);
            if path.is_file() {
                return Ok((path, format));
            }
        }
        Err(SourceError::NoKey {
            dir: self.path.clone(),
        })
    }
}

fn read_capped(path: &Path) -> Result<Vec<u8>, SourceError> {
    let io = |source| SourceError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

//! Bundles: OCI image layouts (a directory, or a tar of one when the name ends in `.tar`)
//! carrying cached images across an air gap. `index.json` names each image by its full
//! reference (`org.opencontainers.image.ref.name`), so `skopeo copy oci:bundle:<ref>` reads it
//! too, and `import` knows which upstream, repository and tag each image belongs to.
//!
//! Export reads the store only (never an upstream) and writes under a temporary name, renamed
//! at the end. Import stages every blob through `Ingest` (hashed, size-checked), checks that
//! every manifest reachable from `index.json` is present with the size its parent names, and
//! only then stores anything: a corrupt or truncated bundle imports nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Descriptor, Error, ManifestDoc, Platform, Progress, Target, platform_list, wanted};
use crate::cache::Cache;
use crate::oci::Digest;
use crate::oci::media_type::OCI_INDEX;
use crate::store::{TagRecord, Verified};

/// The annotation naming an image in an OCI layout.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Set when an index was exported with `--platform`: the children that are in the bundle.
const PLATFORMS: &str = "io.regcache.platforms";
/// Largest `index.json` or manifest read from a bundle.
const MAX_DOCUMENT: u64 = 8 * 1024 * 1024;
const COPY_CHUNK: usize = 1024 * 1024;

#[derive(Default)]
pub struct ExportOptions {
    /// Platforms to keep from an index; empty keeps every child (all must be cached).
    pub platforms: Vec<Platform>,
}

#[derive(Debug, Default)]
pub struct ExportReport {
    pub images: usize,
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Default)]
pub struct ImportOptions {
    /// Pin what is imported, so eviction never removes it.
    pub pin: bool,
}

#[derive(Debug, Default)]
pub struct ImportReport {
    pub images: Vec<String>,
    pub objects: u64,
    /// Of those, not in the cache before.
    pub new_objects: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutIndex {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    manifests: Vec<IndexEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayout {
    image_layout_version: String,
}

/// What goes into a bundle: documents from memory, blobs from the store.
enum Content {
    Document(Bytes),
    Blob(Arc<File>),
}

/// Writes the cached `images` as an OCI image layout at `output` (a tar when it ends in `.tar`).
/// The files are written on this thread (`block_in_place`): call it on a multi-threaded runtime.
pub async fn export(
    cache: &Cache,
    images: &[String],
    output: &Path,
    options: &ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport, Error> {
    if output.exists() {
        return Err(Error::Usage(format!(
            "{} already exists; remove it or choose another --output",
            output.display()
        )));
    }
    let targets = images
        .iter()
        .map(|i| Target::resolve(cache, i))
        .collect::<Result<Vec<_>, _>>()?;
    let store = cache.store();
    let mut entries = Vec::new();
    // Digest -> content and size, in the order first met (deduplicated across images).
    let mut contents: Vec<(Digest, u64, Content)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for target in &targets {
        let image = target.canonical.clone();
        let missing = |digest: &Digest| Error::Missing {
            image: image.clone(),
            digest: digest.clone(),
        };
        let top = match (&target.digest, &target.tag) {
            (Some(d), _) => d.clone(),
            (None, Some(tag)) => {
                store
                    .get_tag(target.upstream.name(), &target.repo, tag)
                    .await
                    .ok_or_else(|| Error::TagMissing {
                        image: image.clone(),
                    })?
                    .digest
            }
            (None, None) => unreachable!("ImageRef always has a tag or a digest"),
        };
        let (top_type, top_body) = store
            .get_manifest(&top)
            .await?
            .ok_or_else(|| missing(&top))?;
        let mut annotations = BTreeMap::from([(REF_NAME.to_owned(), image.clone())]);
        if !options.platforms.is_empty() {
            annotations.insert(PLATFORMS.to_owned(), platform_list(&options.platforms));
        }
        entries.push(IndexEntry {
            media_type: top_type.clone(),
            digest: top.clone(),
            size: top_body.len() as u64,
            annotations,
        });
        let mut queue = vec![(top, top_type, top_body)];
        let mut objects = 0u64;
        let mut bytes = 0u64;
        while let Some((digest, media_type, body)) = queue.pop() {
            let doc = ManifestDoc::parse(&image, &digest, &body)?;
            objects += 1;
            bytes += body.len() as u64;
            if seen.insert(digest.clone()) {
                contents.push((digest.clone(), body.len() as u64, Content::Document(body)));
            }
            if doc.is_index(&media_type) {
                let children: Vec<&Descriptor> = doc
                    .manifests
                    .iter()
                    .filter(|c| wanted(&options.platforms, c))
                    .collect();
                if children.is_empty() {
                    return Err(Error::NoPlatform {
                        image: image.clone(),
                        platforms: platform_list(&options.platforms),
                    });
                }
                for child in children {
                    let (t, b) = store
                        .get_manifest(&child.digest)
                        .await?
                        .ok_or_else(|| missing(&child.digest))?;
                    queue.push((child.digest.clone(), t, b));
                }
            } else {
                for blob in doc.blobs() {
                    let file = store
                        .open_blob(&blob.digest)
                        .await?
                        .ok_or_else(|| missing(&blob.digest))?;
                    objects += 1;
                    bytes += file.size;
                    if seen.insert(blob.digest.clone()) {
                        contents.push((blob.digest.clone(), file.size, Content::Blob(file.file)));
                    }
                }
            }
        }
        progress.note(&format!(
            "exporting {image} ({objects} objects, {})",
            bytesize::ByteSize::b(bytes)
        ));
    }
    let index = LayoutIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_owned()),
        manifests: entries,
    };
    let index = serde_json::to_vec_pretty(&index).expect("an index always serializes");
    let layout = serde_json::to_vec(&OciLayout {
        image_layout_version: "1.0.0".into(),
    })
    .expect("a layout file always serializes");
    let mut report = ExportReport {
        images: targets.len(),
        ..ExportReport::default()
    };
    report.objects = contents.len() as u64;
    report.bytes = contents.iter().map(|c| c.1).sum();
    progress.add_work(report.objects, report.bytes);
    let output = output.to_owned();
    let tar = output.extension().is_some_and(|e| e == "tar");
    let partial = output.with_file_name(format!(
        ".{}.partial",
        output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result = tokio::task::block_in_place(|| {
        let mut sink: Box<dyn LayoutSink> = if tar {
            Box::new(TarSink::create(&partial)?)
        } else {
            Box::new(DirSink::create(&partial)?)
        };
        for (digest, size, content) in contents {
            let path = format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex());
            match content {
                Content::Document(body) => sink.add(&path, size, &mut &body[..])?,
                Content::Blob(file) => sink.add(&path, size, &mut FileReader::new(file))?,
            }
            progress.advance(size);
            progress.object_done("bundle", "object", &digest, size, true);
        }
        // index.json goes last: a tar cut short lacks it, so it cannot pass for a bundle.
        sink.add("oci-layout", layout.len() as u64, &mut &layout[..])?;
        sink.add("index.json", index.len() as u64, &mut &index[..])?;
        sink.finish()?;
        std::fs::rename(&partial, &output).map_err(Error::io("rename into", &output))
    });
    progress.finish();
    if result.is_err() {
        if partial.is_dir() {
            let _ = std::fs::remove_dir_all(&partial);
        } else {
            let _ = std::fs::remove_file(&partial);
        }
    }
    result.map(|()| report)
}

/// Reads a shared `File` from the start with positional reads.
struct FileReader {
    file: Arc<File>,
    pos: u64,
}

impl FileReader {
    fn new(file: Arc<File>) -> FileReader {
        FileReader { file, pos: 0 }
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

trait LayoutSink {
    fn add(&mut self, path: &str, size: u64, content: &mut dyn Read) -> Result<(), Error>;
    fn finish(self: Box<Self>) -> Result<(), Error>;
}

struct DirSink {
    root: PathBuf,
}

impl DirSink {
    fn create(root: &Path) -> Result<DirSink, Error> {
        std::fs::create_dir_all(root).map_err(Error::io("create", root))?;
        Ok(DirSink {
            root: root.to_owned(),
        })
    }
}

impl LayoutSink for DirSink {
    fn add(&mut self, path: &str, _size: u64, content: &mut dyn Read) -> Result<(), Error> {
        let dest = self.root.join(path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
        }
        let mut file = File::create(&dest).map_err(Error::io("create", &dest))?;
        std::io::copy(content, &mut file).map_err(Error::io("write", &dest))?;
        file.sync_all().map_err(Error::io("sync", &dest))
    }

    fn finish(self: Box<Self>) -> Result<(), Error> {
        Ok(())
    }
}

struct TarSink {
    path: PathBuf,
    builder: tar::Builder<std::io::BufWriter<File>>,
    dirs: std::collections::HashSet<String>,
}

impl TarSink {
    fn create(path: &Path) -> Result<TarSink, Error> {
        let file = File::create(path).map_err(Error::io("create", path))?;
        Ok(TarSink {
            path: path.to_owned(),
            builder: tar::Builder::new(std::io::BufWriter::with_capacity(COPY_CHUNK, file)),
            dirs: Default::default(),
        })
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(0);
        header
    }
}

impl LayoutSink for TarSink {
    fn add(&mut self, path: &str, size: u64, content: &mut dyn Read) -> Result<(), Error> {
        let io = |e| Error::Io {
            op: "write",
            path: self.path.clone(),
            source: e,
        };
        // Parent directories first, for tools that do not create them on extraction.
        let mut dir = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            dir.push_str(component);
            dir.push('/');
            if self.dirs.insert(dir.clone()) {
                let mut h = TarSink::header(tar::EntryType::Directory, 0, 0o755);
                self.builder
                    .append_data(&mut h, &dir, std::io::empty())
                    .map_err(io)?;
            }
        }
        let mut h = TarSink::header(tar::EntryType::Regular, size, 0o644);
        self.builder
            .append_data(&mut h, path, content.take(size))
            .map_err(io)
    }

    fn finish(self: Box<Self>) -> Result<(), Error> {
        let path = self.path.clone();
        let writer = self
            .builder
            .into_inner()
            .map_err(Error::io("write", &path))?;
        let file = writer
            .into_inner()
            .map_err(|e| Error::io("write", &path)(e.into_error()))?;
        file.sync_all().map_err(Error::io("sync", &path))
    }
}

/// A bundle's blobs, hashed and size-checked into the store's ingest area, not yet stored.
struct Staged {
    blobs: HashMap<Digest, Verified>,
    index: Option<Bytes>,
    layout: Option<Bytes>,
}

/// Loads the bundle at `bundle` (an OCI layout directory or a tar of one) into the cache. The
/// bundle is read on this thread (`block_in_place`): call it on a multi-threaded runtime.
pub async fn import(
    cache: &Cache,
    bundle: &Path,
    options: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ImportReport, Error> {
    let store = cache.store().clone();
    let staged = {
        let bundle = bundle.to_owned();
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(move || {
            if bundle.is_dir() {
                stage_dir(&handle, &store, &bundle, progress)
            } else {
                stage_tar(&handle, &store, &bundle, progress)
            }
        })?
    };
    let index = staged.index.as_ref().ok_or_else(|| Error::Bundle {
        reason: "there is no index.json: the bundle is truncated or not an OCI image layout".into(),
    })?;
    if let Some(layout) = &staged.layout {
        let layout: OciLayout = serde_json::from_slice(layout).map_err(|e| Error::Bundle {
            reason: format!("oci-layout is not valid: {e}"),
        })?;
        if layout.image_layout_version != "1.0.0" {
            return Err(Error::Bundle {
                reason: format!(
                    "image layout version {} is not supported (1.0.0 is)",
                    layout.image_layout_version
                ),
            });
        }
    }
    let index: LayoutIndex = serde_json::from_slice(index).map_err(|e| Error::Bundle {
        reason: format!("index.json is not an OCI index: {e}"),
    })?;

    // Check everything reachable before storing anything.
    let read_document = |digest: &Digest, expected: u64| -> Result<Bytes, Error> {
        let corrupt = |reason: String| Error::Corrupt {
            digest: digest.clone(),
            reason,
        };
        let verified = staged
            .blobs
            .get(digest)
            .ok_or_else(|| corrupt("missing from the bundle".into()))?;
        if verified.size() != expected {
            return Err(corrupt(format!(
                "{} bytes, but its parent says {expected}",
                verified.size()
            )));
        }
        if expected > MAX_DOCUMENT {
            return Err(corrupt(format!("a manifest over {MAX_DOCUMENT} bytes")));
        }
        let mut body = vec![0; expected as usize];
        verified
            .reader()
            .read_exact_at(&mut body, 0)
            .map_err(|e| corrupt(format!("cannot be read back: {e}")))?;
        Ok(Bytes::from(body))
    };
    struct Load {
        target: Target,
        top: (Digest, String, u64),
        manifests: Vec<(Digest, String, Bytes)>,
        blobs: Vec<Digest>,
    }
    let mut loads = Vec::new();
    for entry in &index.manifests {
        let name = entry
            .annotations
            .get(REF_NAME)
            .ok_or_else(|| Error::Bundle {
                reason: format!(
                    "index.json entry {} has no {REF_NAME} annotation naming its image",
                    entry.digest
                ),
            })?;
        let target = Target::resolve(cache, name).map_err(|e| Error::Bundle {
            reason: format!("index.json names {name}: {e}"),
        })?;
        let platforms: Vec<Platform> = match entry.annotations.get(PLATFORMS) {
            Some(list) => list
                .split(',')
                .map(|p| p.trim().parse())
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let mut manifests = Vec::new();
        let mut blobs = Vec::new();
        let mut queue = vec![(
            entry.digest.clone(),
            Some(entry.media_type.clone()),
            entry.size,
        )];
        while let Some((digest, media_type, size)) = queue.pop() {
            let body = read_document(&digest, size)?;
            let doc = ManifestDoc::parse(name, &digest, &body)?;
            let media_type = media_type
                .or_else(|| own_media_type(&body))
                .ok_or_else(|| Error::Corrupt {
                    digest: digest.clone(),
                    reason: "a manifest without a media type".into(),
                })?;
            if doc.is_index(&media_type) {
                for child in doc.manifests.iter().filter(|c| wanted(&platforms, c)) {
                    queue.push((child.digest.clone(), child.media_type.clone(), child.size));
                }
            } else {
                for blob in doc.blobs() {
                    let verified =
                        staged
                            .blobs
                            .get(&blob.digest)
                            .ok_or_else(|| Error::Corrupt {
                                digest: blob.digest.clone(),
                                reason: format!("missing from the bundle (needed by {name})"),
                            })?;
                    if verified.size() != blob.size {
                        return Err(Error::Corrupt {
                            digest: blob.digest.clone(),
                            reason: format!(
                                "{} bytes, but manifest {digest} says {}",
                                verified.size(),
                                blob.size
                            ),
                        });
                    }
                    blobs.push(blob.digest.clone());
                }
            }
            manifests.push((digest, media_type, body));
        }
        loads.push(Load {
            top: (entry.digest.clone(), entry.media_type.clone(), entry.size),
            target,
            manifests,
            blobs,
        });
    }

    // Everything checked out: store it.
    progress.add_work(
        loads
            .iter()
            .map(|l| (l.manifests.len() + l.blobs.len()) as u64)
            .sum(),
        0,
    );
    let mut report = ImportReport::default();
    let mut staged = staged.blobs;
    let store = cache.store();
    for load in &loads {
        let up = load.target.upstream.name();
        let image = &load.target.canonical;
        for (digest, media_type, body) in &load.manifests {
            let new = store.get_manifest(digest).await?.is_none();
            store.put_manifest(digest, media_type, body.clone()).await?;
            staged.remove(digest);
            store.link(up, &load.target.repo, digest).await?;
            count(
                &mut report,
                progress,
                image,
                "manifest",
                digest,
                body.len() as u64,
                new,
            );
        }
        for digest in &load.blobs {
            let Some(verified) = staged.remove(digest) else {
                // Shared with an image loaded before.
                store.link(up, &load.target.repo, digest).await?;
                continue;
            };
            let size = verified.size();
            let new = store.open_blob(digest).await?.is_none();
            if new {
                verified.persist().await?;
            }
            store.link(up, &load.target.repo, digest).await?;
            count(&mut report, progress, image, "blob", digest, size, new);
        }
        if let Some(tag) = &load.target.tag {
            let (digest, media_type, size) = load.top.clone();
            let record = TagRecord {
                digest,
                media_type,
                size,
            };
            store.put_tag(up, &load.target.repo, tag, &record).await?;
        }
        if options.pin {
            for digest in load.manifests.iter().map(|m| &m.0).chain(load.blobs.iter()) {
                store.pin(digest).map_err(|e| Error::Io {
                    op: "pin",
                    path: store.root().join("pins"),
                    source: e,
                })?;
            }
        }
        progress.note(&format!("imported {image}"));
        report.images.push(image.clone());
    }
    progress.finish();
    Ok(report)
}

fn count(
    report: &mut ImportReport,
    progress: &dyn Progress,
    image: &str,
    kind: &str,
    digest: &Digest,
    size: u64,
    new: bool,
) {
    report.objects += 1;
    if new {
        report.new_objects += 1;
        report.bytes += size;
    }
    progress.object_done(image, kind, digest, size, new);
}

fn own_media_type(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        media_type: Option<String>,
    }
    serde_json::from_slice::<Typed>(body).ok()?.media_type
}

/// The digest a layout path names: `blobs/<alg>/<hex>`.
fn blob_path(path: &str) -> Option<Result<Digest, String>> {
    let rest = path.trim_start_matches("./").strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    if hex.is_empty() {
        return None;
    }
    Some(
        format!("{alg}:{hex}")
            .parse::<Digest>()
            .map_err(|e| format!("{path} does not name a digest: {e}")),
    )
}

/// Hashes `content` into the ingest area under `digest`; `size` is what the container says.
fn stage_blob(
    handle: &tokio::runtime::Handle,
    store: &crate::store::Store,
    digest: &Digest,
    size: u64,
    content: &mut dyn Read,
    progress: &dyn Progress,
) -> Result<Verified, Error> {
    let corrupt = |reason: String| Error::Corrupt {
        digest: digest.clone(),
        reason,
    };
    let mut ingest = store.begin_ingest(digest)?;
    let mut buf = vec![0; COPY_CHUNK];
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(format!("cannot be read: {e}"))),
        };
        handle.block_on(ingest.append(vec![Bytes::copy_from_slice(&buf[..n])]))?;
        progress.advance(n as u64);
    }
    handle
        .block_on(ingest.verify(Some(size)))
        .map_err(|e| match e {
            crate::store::Error::SizeMismatch { expected, actual } => corrupt(format!(
                "the bundle ends inside it (truncated): {actual} of {expected} bytes"
            )),
            crate::store::Error::DigestMismatch { actual, .. } => corrupt(format!(
                "its content does not match its digest (it hashes to {actual})"
            )),
            other => Error::Store(other),
        })
}

fn read_small(path: &str, content: &mut dyn Read) -> Result<Bytes, Error> {
    let mut body = Vec::new();
    content
        .take(MAX_DOCUMENT + 1)
        .read_to_end(&mut body)
        .map_err(|e| Error::Bundle {
            reason: format!("{path} cannot be read: {e}"),
        })?;
    if body.len() as u64 > MAX_DOCUMENT {
        return Err(Error::Bundle {
            reason: format!("{path} is over {MAX_DOCUMENT} bytes"),
        });
    }
    Ok(Bytes::from(body))
}

fn stage_tar(
    handle: &tokio::runtime::Handle,
    store: &crate::store::Store,
    bundle: &Path,
    progress: &dyn Progress,
) -> Result<Staged, Error> {
    let file = File::open(bundle).map_err(Error::io("open", bundle))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    progress.add_work(0, total);
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(COPY_CHUNK, file));
    let mut staged = Staged {
        blobs: HashMap::new(),
        index: None,
        layout: None,
    };
    let mut last = String::from("the start");
    let entries = archive.entries().map_err(|e| Error::Bundle {
        reason: format!("not a tar archive: {e}"),
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Bundle {
            reason: format!("the tar is damaged or truncated after {last}: {e}"),
        })?;
        let path = entry
            .path()
            .map_err(|e| Error::Bundle {
                reason: format!("the tar is damaged after {last}: {e}"),
            })?
            .to_string_lossy()
            .into_owned();
        match entry.header().entry_type() {
            tar::EntryType::Directory => continue,
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            other => {
                return Err(Error::Bundle {
                    reason: format!("{path} is a {other:?} entry; a bundle holds only files"),
                });
            }
        }
        let size = entry.size();
        stage_entry(
            handle,
            store,
            &mut staged,
            &path,
            size,
            &mut entry,
            progress,
        )?;
        last = path;
    }
    Ok(staged)
}

fn stage_dir(
    handle: &tokio::runtime::Handle,
    store: &crate::store::Store,
    bundle: &Path,
    progress: &dyn Progress,
) -> Result<Staged, Error> {
    let mut staged = Staged {
        blobs: HashMap::new(),
        index: None,
        layout: None,
    };
    let mut files = Vec::new();
    for name in ["oci-layout", "index.json"] {
        if bundle.join(name).is_file() {
            files.push(name.to_owned());
        }
    }
    let blobs = bundle.join("blobs");
    if let Ok(algs) = std::fs::read_dir(&blobs) {
        for alg in algs.flatten() {
            let Ok(hexes) = std::fs::read_dir(alg.path()) else {
                continue;
            };
            for hex in hexes.flatten() {
                files.push(format!(
                    "blobs/{}/{}",
                    alg.file_name().to_string_lossy(),
                    hex.file_name().to_string_lossy()
                ));
            }
        }
    }
    let mut sizes = Vec::new();
    for f in &files {
        let path = bundle.join(f);
        let meta = std::fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        if !meta.is_file() {
            return Err(Error::Bundle {
                reason: format!("{f} is not a regular file"),
            });
        }
        sizes.push(meta.len());
    }
    progress.add_work(0, sizes.iter().sum());
    for (f, size) in files.iter().zip(sizes) {
        let path = bundle.join(f);
        let mut file = File::open(&path).map_err(Error::io("open", &path))?;
        stage_entry(handle, store, &mut staged, f, size, &mut file, progress)?;
    }
    Ok(staged)
}

fn stage_entry(
    handle: &tokio::runtime::Handle,
    store: &crate::store::Store,
    staged: &mut Staged,
    path: &str,
    size: u64,
    content: &mut dyn Read,
    progress: &dyn Progress,
) -> Result<(), Error> {
    match path.trim_start_matches("./") {
        "index.json" => staged.index = Some(read_small(path, content)?),
        "oci-layout" => staged.layout = Some(read_small(path, content)?),
        _ => match blob_path(path) {
            Some(Ok(digest)) => {
                let verified = stage_blob(handle, store, &digest, size, content, progress)?;
                staged.blobs.insert(digest, verified);
            }
            Some(Err(reason)) => return Err(Error::Bundle { reason }),
            // Anything else (a README, tool metadata) is not ours to load.
            None => tracing::debug!(path, "ignoring a file that is not part of the layout"),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layout_blob_paths_name_digests() {
        let hex = "a".repeat(64);
        let digest = blob_path(&format!("blobs/sha256/{hex}"))
            .expect("a blob path")
            .expect("a digest");
        assert_eq!(digest.to_string(), format!("sha256:{hex}"));
        assert!(blob_path(&format!("./blobs/sha256/{hex}")).is_some_and(|d| d.is_ok()));
        for bad in [
            "blobs/sha256/../../etc/passwd",
            "blobs/md5/abc",
            "blobs/sha256/ABC",
        ] {
            assert!(blob_path(bad).is_some_and(|d| d.is_err()), "{bad}");
        }
        for other in [
            "index.json",
            "README",
            "blobs/sha256/",
            "x/blobs/sha256/abc",
        ] {
            assert!(blob_path(other).is_none(), "{other}");
        }
    }
}

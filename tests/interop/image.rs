//! Test images, built from nothing as an OCI image layout so pushing them needs no network.
//!
//! Layers are random bytes (incompressible and new on every run, so nothing can come from an
//! earlier run or a shared store), packed as real tar.gz files whose uncompressed digests are the
//! config's `diff_ids` (containerd checks those when it unpacks). Manifests are pretty-printed
//! JSON: a mirror that re-serialised them instead of passing the bytes through would change
//! their digests, and the test would see it.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::process::{COMMAND_TIMEOUT, command, require_tool, run, write};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// One image manifest as written to the layout, with everything it references.
#[derive(Clone, Debug)]
pub struct Image {
    pub arch: String,
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Image {
    /// The manifest, config and layers: every blob a full pull of this image transfers.
    pub fn all_blobs(&self) -> Vec<&Descriptor> {
        let mut blobs = vec![&self.manifest, &self.config];
        blobs.extend(&self.layers);
        blobs
    }
}

/// An image index and the platform images it lists.
#[derive(Clone, Debug)]
pub struct Index {
    pub index: Descriptor,
    pub images: Vec<Image>,
}

impl Index {
    pub fn image(&self, arch: &str) -> &Image {
        self.images
            .iter()
            .find(|image| image.arch == arch)
            .unwrap_or_else(|| panic!("the test index has no {arch} image"))
    }
}

/// A layer shared by several images, so that a blob is reached through more than one manifest.
pub struct Layer {
    descriptor: Descriptor,
    diff_id: String,
}

/// An OCI image layout directory under construction.
pub struct Layout {
    dir: PathBuf,
    work: PathBuf,
    noise: Noise,
    refs: Vec<Value>,
    layers_made: usize,
}

impl Layout {
    pub fn create(dir: &Path, work: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).expect("creating the OCI layout");
        fs::create_dir_all(work).expect("creating the layer work directory");
        write(&dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
        Layout {
            dir: dir.to_owned(),
            work: work.to_owned(),
            noise: Noise::from_clock(),
            refs: Vec::new(),
            layers_made: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Descriptor {
        let digest = sha256_digest(bytes);
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        write(&self.dir.join("blobs/sha256").join(hex), bytes);
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size: bytes.len() as u64,
        }
    }

    /// A gzipped tar layer holding one file of random bytes per entry of `file_sizes`.
    pub fn layer(&mut self, file_sizes: &[usize]) -> Layer {
        self.layers_made += 1;
        let stage = self.work.join(format!("layer-{}", self.layers_made));
        let files = stage.join("rootfs/regcache-interop");
        fs::create_dir_all(&files).expect("creating a layer staging directory");
        for (i, &size) in file_sizes.iter().enumerate() {
            let mut bytes = vec![0; size];
            self.noise.fill(&mut bytes);
            write(&files.join(format!("file-{i}.bin")), bytes);
        }
        // Fixed owner, order and times keep the tar a function of the file contents alone.
        let tar = stage.join("layer.tar");
        run(
            command(&require_tool("tar", "tar"))
                .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
                .args(["--mtime=@0", "-C"])
                .arg(stage.join("rootfs"))
                .arg("-cf")
                .arg(&tar)
                .arg("regcache-interop"),
            COMMAND_TIMEOUT,
        );
        let diff_id = sha256_file(&tar);
        let gzipped = run(
            command(&require_tool("gzip", "gzip"))
                .args(["-n", "-c"])
                .arg(&tar),
            COMMAND_TIMEOUT,
        )
        .stdout;
        Layer {
            descriptor: self.put_blob(OCI_LAYER, &gzipped),
            diff_id,
        }
    }

    /// Writes a config and a manifest for `linux/<arch>` over `layers`.
    pub fn image(&mut self, arch: &str, layers: &[&Layer]) -> Image {
        let config = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": { "Env": ["PATH=/usr/bin:/bin"] },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        });
        let config = self.put_blob(OCI_CONFIG, &to_pretty(&config));
        let layer_descriptors: Vec<Descriptor> =
            layers.iter().map(|l| l.descriptor.clone()).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": layer_descriptors.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        });
        Image {
            arch: arch.to_owned(),
            manifest: self.put_blob(OCI_MANIFEST, &to_pretty(&manifest)),
            config,
            layers: layer_descriptors,
        }
    }

    /// Writes an image index listing `images` by platform.
    pub fn index(&mut self, images: Vec<Image>) -> Index {
        let manifests: Vec<Value> = images
            .iter()
            .map(|image| {
                let mut entry = image.manifest.to_json();
                entry["platform"] = json!({ "architecture": image.arch, "os": "linux" });
                entry
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        Index {
            index: self.put_blob(OCI_INDEX, &to_pretty(&index)),
            images,
        }
    }

    /// Names `descriptor` `name` in the layout's index.json, so `oci:<dir>:<name>` finds it.
    pub fn tag(&mut self, name: &str, descriptor: &Descriptor) {
        let mut entry = descriptor.to_json();
        entry["annotations"] = json!({ REF_NAME: name });
        self.refs.push(entry);
        let index = json!({ "schemaVersion": 2, "manifests": self.refs });
        write(&self.dir.join("index.json"), to_pretty(&index));
    }
}

fn to_pretty(value: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("serialising JSON built in memory")
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn sha256_file(path: &Path) -> String {
    let mut file =
        File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Checks an OCI layout a client pulled into: every blob file hashes to its name, `tag` names
/// `top` (the manifest or index that was pulled), and each of `expected` is there, whole.
pub fn verify_pulled_layout(dir: &Path, tag: &str, top: &Descriptor, expected: &[&Descriptor]) {
    let index: Value = serde_json::from_slice(&crate::process::read(&dir.join("index.json")))
        .expect("index.json of the pulled layout is JSON");
    let named = index["manifests"]
        .as_array()
        .expect("index.json lists manifests")
        .iter()
        .find(|m| m["annotations"][REF_NAME] == tag)
        .unwrap_or_else(|| panic!("the pulled layout has no {tag:?}: {index}"));
    assert_eq!(
        named["digest"], top.digest,
        "the pulled {tag:?} is not what was pushed"
    );
    let blobs = dir.join("blobs/sha256");
    for entry in fs::read_dir(&blobs).expect("listing pulled blobs") {
        let path = entry.expect("listing pulled blobs").path();
        let name = format!("sha256:{}", path.file_name().unwrap().to_string_lossy());
        assert_eq!(
            sha256_file(&path),
            name,
            "pulled blob {} is corrupt",
            path.display()
        );
    }
    for blob in expected {
        let hex = blob.digest.strip_prefix("sha256:").expect("sha256 digest");
        let path = blobs.join(hex);
        let size = fs::metadata(&path)
            .unwrap_or_else(|_| {
                panic!(
                    "the pull did not bring {} ({})",
                    blob.digest, blob.media_type
                )
            })
            .len();
        assert_eq!(
            size, blob.size,
            "pulled blob {} has the wrong size",
            blob.digest
        );
    }
}

/// Checks a `dir:` copy (containers/image's plain directory: `manifest.json` plus one file per
/// blob named by its hex digest): the manifest is the one expected, every blob hashes to its
/// name, and each of `expected` is there, whole.
pub fn verify_pulled_dir(dir: &Path, manifest_digest: &str, expected: &[&Descriptor]) {
    assert_eq!(
        sha256_file(&dir.join("manifest.json")),
        manifest_digest,
        "the pulled manifest in {} is not what was pushed",
        dir.display()
    );
    for entry in fs::read_dir(dir).expect("listing a pulled directory") {
        let path = entry.expect("listing a pulled directory").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "manifest.json" || name == "version" {
            continue;
        }
        assert_eq!(
            sha256_file(&path),
            format!("sha256:{name}"),
            "pulled blob {name} is corrupt"
        );
    }
    for blob in expected {
        let hex = blob.digest.strip_prefix("sha256:").expect("sha256 digest");
        let size = fs::metadata(dir.join(hex))
            .unwrap_or_else(|_| {
                panic!(
                    "the pull did not bring {} ({})",
                    blob.digest, blob.media_type
                )
            })
            .len();
        assert_eq!(
            size, blob.size,
            "pulled blob {} has the wrong size",
            blob.digest
        );
    }
}

/// xorshift64*: fast, seedable filler for layer files. Not for secrets; only for bytes that no
/// compressor can shrink and no earlier run can have produced.
struct Noise(u64);

impl Noise {
    fn from_clock() -> Noise {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64;
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
        Noise(seed | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

//! An in-process fake OCI Distribution registry: the upstream that the mirror pulls from in
//! integration tests.
//!
//! Real registries cannot be told to fail on cue, so this one can: a test states what content to
//! serve per repository, which challenge to require (Basic, or Bearer with a token endpoint) and
//! which faults to inject (a status, a reset after N body bytes, wrong bytes of the right length,
//! a delay before headers, a throttled body, a redirect to another host), and afterwards reads
//! back every request it received. It listens on 127.0.0.1:0 on the test's own tokio runtime,
//! dials nothing, and stops when its handle is dropped or shut down. Delays, throttles and token
//! lifetimes run on tokio's clock, so a test that pauses time controls them too.
//!
//! Order of evaluation for each request, which the fault semantics depend on:
//! 1. the request is recorded (method, path, query, headers), whatever happens next;
//! 2. while [`FakeUpstream::set_down`] is on, the answer is 503 `UNAVAILABLE`;
//! 3. the configured challenge is checked (the token endpoint and a blob CDN have none), so an
//!    unauthenticated probe does not use up a fault meant for the authenticated request;
//! 4. faults are matched, oldest first; at most one fault of each kind applies to a request (a
//!    delay, a replacement response, and on a 200/206 body: wrong bytes, a reset, a throttle),
//!    and only the faults that actually applied are counted down;
//! 5. the request is routed to the content.
//!
//! Names may contain slashes (`library/alpine`, `a/b/c`, even `x/blobs/y`): the route is found
//! by the right-most `/manifests/`, `/blobs/`, `/referrers/` or `/tags/list` marker.
//!
//! Content is per repository on purpose: a blob added to one repository is unknown in another,
//! so tests can tell the mirror's cross-repository rule apart from the upstream's.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// `application/vnd.oci.image.manifest.v1+json`
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `application/vnd.oci.image.index.v1+json`
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `application/vnd.oci.image.config.v1+json`
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// `application/vnd.oci.image.layer.v1.tar+gzip`
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// `application/vnd.docker.distribution.manifest.v2+json`
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// `application/vnd.docker.distribution.manifest.list.v2+json`
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `service` named in the Bearer challenge and expected back at the token endpoint.
pub const TOKEN_SERVICE: &str = "fake-registry";

/// How long an issued token lives unless [`Builder::token_expires_in`] says otherwise.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Cap on a recorded request body; a token form, the only body a pull sends, is a few hundred
/// bytes.
const BODY_LIMIT: usize = 64 * 1024;

/// Pause between the last body bytes of a reset response and the reset itself, so those bytes
/// are flushed to the client before the connection is torn down (otherwise the client would see
/// fewer bytes than the fault promised).
const FLUSH_BEFORE_RESET: Duration = Duration::from_millis(20);

/// How long [`FakeUpstream::set_refusing`] waits for the listener to change state.
const LISTENER_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Run when the token endpoint refuses a request; returns the password the registry accepts
/// from then on, if it changes (issued tokens are forgotten then, as on a real rotation).
pub type OnRefusal = Box<dyn FnOnce() -> Option<String> + Send>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// `sha256:<hex>` of `bytes`, the digest under which the fake serves them.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

// ---------------------------------------------------------------------------------------------
// Test images
// ---------------------------------------------------------------------------------------------

/// One piece of content with its descriptor fields.
#[derive(Clone, Debug)]
pub struct Content {
    pub media_type: String,
    pub digest: String,
    pub bytes: Bytes,
}

impl Content {
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Content {
        let bytes = bytes.into();
        Content {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size(),
        })
    }
}

/// A small but valid OCI image: each layer is a real gzip-compressed tar holding one file of
/// fresh pseudo-random bytes, and the config's `diff_ids` are the digests of the uncompressed
/// tars, so a real client can pull and unpack it through the mirror.
#[derive(Clone, Debug)]
pub struct Image {
    pub os: String,
    pub architecture: String,
    pub manifest: Content,
    pub config: Content,
    pub layers: Vec<Content>,
    /// `sha256:` digests of the uncompressed layer tars, in layer order.
    pub diff_ids: Vec<String>,
}

impl Image {
    /// A linux/amd64 image with `layers` layers, each holding a file of `file_size` bytes.
    pub fn new(layers: usize, file_size: usize) -> Image {
        Image::for_platform("linux", "amd64", layers, file_size)
    }

    pub fn for_platform(os: &str, architecture: &str, layers: usize, file_size: usize) -> Image {
        let mut contents = Vec::with_capacity(layers);
        let mut diff_ids = Vec::with_capacity(layers);
        for n in 0..layers {
            let tar = tar_with_one_file(&format!("layer-{n}.bin"), &pseudo_random_bytes(file_size));
            diff_ids.push(sha256_digest(&tar));
            contents.push(Content::new(OCI_LAYER_GZIP, gzip_stored(&tar)));
        }
        let config = serde_json::json!({
            "architecture": architecture,
            "os": os,
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = Content::new(OCI_CONFIG, to_json_bytes(&config));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": contents.iter().map(Content::descriptor).collect::<Vec<_>>(),
        });
        Image {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            manifest: Content::new(OCI_MANIFEST, to_json_bytes(&manifest)),
            config,
            layers: contents,
            diff_ids,
        }
    }

    /// The config followed by the layers: every blob the manifest references.
    pub fn blobs(&self) -> impl Iterator<Item = &Content> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// An OCI image index over platform-specific images.
#[derive(Clone, Debug)]
pub struct Index {
    pub manifest: Content,
    pub images: Vec<Image>,
}

impl Index {
    pub fn of(images: Vec<Image>) -> Index {
        let manifests: Vec<_> = images
            .iter()
            .map(|image| {
                let mut descriptor = image.manifest.descriptor();
                descriptor["platform"] = serde_json::json!({
                    "architecture": image.architecture,
                    "os": image.os,
                });
                descriptor
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        Index {
            manifest: Content::new(OCI_INDEX, to_json_bytes(&index)),
            images,
        }
    }

    /// linux/amd64 and linux/arm64, each with its own `layers` layers.
    pub fn two_platforms(layers: usize, file_size: usize) -> Index {
        Index::of(vec![
            Image::for_platform("linux", "amd64", layers, file_size),
            Image::for_platform("linux", "arm64", layers, file_size),
        ])
    }
}

fn to_json_bytes(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a serde_json::Value always serializes"))
}

/// Bytes that differ on every call in this process and across processes, so two test images
/// never share a layer by accident (which would hide cross-repository and coalescing bugs).
fn pseudo_random_bytes(len: usize) -> Vec<u8> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let seed = Sha256::new()
        .chain_update(std::process::id().to_le_bytes())
        .chain_update(CALLS.fetch_add(1, Ordering::Relaxed).to_le_bytes())
        .chain_update(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
                .to_le_bytes(),
        )
        .finalize();
    let mut out = Vec::with_capacity(len + 32);
    let mut block = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            &Sha256::new()
                .chain_update(seed)
                .chain_update(block.to_le_bytes())
                .finalize(),
        );
        block += 1;
    }
    out.truncate(len);
    out
}

/// A ustar archive with a single regular file.
fn tar_with_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    fn put(header: &mut [u8], at: usize, field: &[u8]) {
        header[at..at + field.len()].copy_from_slice(field);
    }
    assert!(name.len() < 100, "tar names are limited to 99 bytes");
    let mut header = [0u8; 512];
    put(&mut header, 0, name.as_bytes());
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", data.len()).as_bytes(),
    );
    put(&mut header, 136, b"00000000000\0");
    // The checksum is computed with its own field read as spaces.
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    put(&mut header, 148, format!("{checksum:06o}\0 ").as_bytes());

    let mut tar = header.to_vec();
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    // End of archive: two zero blocks.
    tar.resize(tar.len() + 1024, 0);
    tar
}

/// gzip with "stored" (uncompressed) deflate blocks: valid for every decompressor, and needs no
/// compression library. Layers are random bytes anyway, which would not compress.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(usize::from(u16::MAX)).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let len = u16::try_from(chunk.len()).expect("chunks are at most u16::MAX long");
        out.push(u8::from(last));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    // ISIZE is the input length modulo 2^32 by definition.
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// Which requests a fault applies to. Built with [`Fault::on_path`] and friends.
#[derive(Clone, Debug)]
pub enum Target {
    /// Every request.
    Any,
    /// Requests whose path (without the query) is exactly this.
    Path(String),
    /// Requests for this blob digest, in any repository (`…/blobs/<digest>`).
    Blob(String),
    /// Requests for this manifest reference (tag or digest), in any repository.
    Manifest(String),
}

impl Target {
    fn matches(&self, path: &str) -> bool {
        match self {
            Target::Any => true,
            Target::Path(p) => path == p,
            Target::Blob(digest) => path.ends_with(&format!("/blobs/{digest}")),
            Target::Manifest(reference) => path.ends_with(&format!("/manifests/{reference}")),
        }
    }

    pub fn status(self, status: u16) -> Fault {
        let status = StatusCode::from_u16(status).expect("a fault's status is a valid HTTP status");
        self.fault(Action::Status(status))
    }

    /// Send the headers and the first `bytes` body bytes, then abort the connection: the client
    /// sees an error, never a clean end of body.
    pub fn reset_after(self, bytes: u64) -> Fault {
        self.fault(Action::ResetAfter(bytes))
    }

    /// Serve the right headers and length but every byte inverted, so the digest does not match.
    pub fn wrong_bytes(self) -> Fault {
        self.fault(Action::WrongBytes)
    }

    /// Send the body without `Content-Length` (chunked), as registries behind some proxies and
    /// CDNs do, so the client learns the size only at the end.
    pub fn without_length(self) -> Fault {
        self.fault(Action::WithoutLength)
    }

    /// Wait this long before sending the response headers.
    pub fn delay(self, delay: Duration) -> Fault {
        self.fault(Action::Delay(delay))
    }

    /// Send the body `chunk` bytes at a time, the first at once and then one every `every`.
    pub fn throttle(self, chunk: usize, every: Duration) -> Fault {
        assert!(chunk > 0, "a throttled body needs a chunk size above zero");
        self.fault(Action::Throttle { chunk, every })
    }

    /// Answer 307 with `Location: <base_url><same path>`, e.g. to a [`Builder::blob_cdn`] fake
    /// that then shows which `Authorization` header, if any, followed the redirect.
    pub fn redirect_to(self, base_url: &str) -> Fault {
        self.fault(Action::Redirect(base_url.trim_end_matches('/').to_owned()))
    }

    fn fault(self, action: Action) -> Fault {
        Fault {
            target: self,
            method: Some(Method::GET),
            action,
            remaining: None,
            retry_after: None,
        }
    }
}

#[derive(Clone, Debug)]
enum Action {
    Status(StatusCode),
    Redirect(String),
    Delay(Duration),
    ResetAfter(u64),
    WrongBytes,
    Throttle { chunk: usize, every: Duration },
    WithoutLength,
}

/// At most one fault of each kind applies to a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delay,
    Response,
    Corrupt,
    Reset,
    Throttle,
    Framing,
}

impl Action {
    fn kind(&self) -> Kind {
        match self {
            Action::Status(_) | Action::Redirect(_) => Kind::Response,
            Action::Delay(_) => Kind::Delay,
            Action::ResetAfter(_) => Kind::Reset,
            Action::WrongBytes => Kind::Corrupt,
            Action::Throttle { .. } => Kind::Throttle,
            Action::WithoutLength => Kind::Framing,
        }
    }
}

/// A fault to inject: a [`Target`], an action and how many times. By default a fault applies
/// to GET requests only (the pulls that move content) and forever; see [`Fault::times`],
/// [`Fault::method`] and [`Fault::any_method`].
#[derive(Clone, Debug)]
pub struct Fault {
    target: Target,
    method: Option<Method>,
    action: Action,
    /// `None`: forever.
    remaining: Option<usize>,
    retry_after: Option<u64>,
}

impl Fault {
    pub fn on_any() -> Target {
        Target::Any
    }

    /// The exact path, e.g. `/v2/` or `/token` (the query string is not part of it).
    pub fn on_path(path: &str) -> Target {
        Target::Path(path.to_owned())
    }

    pub fn on_blob(digest: &str) -> Target {
        Target::Blob(digest.to_owned())
    }

    pub fn on_manifest(reference: &str) -> Target {
        Target::Manifest(reference.to_owned())
    }

    /// Apply to the next `count` matching requests only.
    pub fn times(mut self, count: usize) -> Fault {
        self.remaining = Some(count);
        self
    }

    pub fn once(self) -> Fault {
        self.times(1)
    }

    /// Apply to this method instead of GET.
    pub fn method(mut self, method: Method) -> Fault {
        self.method = Some(method);
        self
    }

    pub fn any_method(mut self) -> Fault {
        self.method = None;
        self
    }

    /// Add `Retry-After: <seconds>` to a status fault (429, 503).
    pub fn retry_after(mut self, seconds: u64) -> Fault {
        self.retry_after = Some(seconds);
        self
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.remaining != Some(0)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.target.matches(path)
    }
}

/// A response a fault puts in place of the registry's.
enum Replacement {
    Status {
        status: StatusCode,
        retry_after: Option<u64>,
    },
    Redirect {
        base_url: String,
    },
}

/// The faults chosen for one request, by kind.
#[derive(Default)]
struct Chosen {
    delay: Option<Duration>,
    response: Option<Replacement>,
    corrupt: bool,
    reset_after: Option<u64>,
    throttle: Option<(usize, Duration)>,
    without_length: bool,
}

// ---------------------------------------------------------------------------------------------
// Recorded requests
// ---------------------------------------------------------------------------------------------

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// Empty for GET and HEAD, and for a body over 64 KiB.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of a header, if it is there and readable as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        parse_form(self.query.as_deref().unwrap_or_default())
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Repo {
    tags: BTreeMap<String, String>,
    /// digest -> (media type, bytes)
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Bytes>,
}

#[derive(Clone)]
enum Auth {
    None,
    Basic { user: String, pass: String },
    Bearer { user: String, pass: String },
}

struct Token {
    repositories: Vec<String>,
    expires: Instant,
}

struct State {
    repos: HashMap<String, Repo>,
    auth: Auth,
    anonymous_tokens: bool,
    token_lifetime: Duration,
    tokens: HashMap<String, Token>,
    tokens_issued: u64,
    token_requests: usize,
    faults: Vec<Fault>,
    on_refusal: std::collections::VecDeque<OnRefusal>,
    down: bool,
    blob_cdn: bool,
    requests: Vec<RecordedRequest>,
    /// path -> body bytes handed to the connection so far, to watch a download progress.
    body_bytes_sent: HashMap<String, u64>,
}

impl State {
    fn new() -> State {
        State {
            repos: HashMap::new(),
            auth: Auth::None,
            anonymous_tokens: false,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            tokens: HashMap::new(),
            tokens_issued: 0,
            token_requests: 0,
            faults: Vec::new(),
            on_refusal: std::collections::VecDeque::new(),
            down: false,
            blob_cdn: false,
            requests: Vec::new(),
            body_bytes_sent: HashMap::new(),
        }
    }

    fn repo(&mut self, name: &str) -> &mut Repo {
        self.repos.entry(name.to_owned()).or_default()
    }

    fn add_blob(&mut self, repo: &str, bytes: Bytes) -> String {
        let digest = sha256_digest(&bytes);
        self.repo(repo).blobs.insert(digest.clone(), bytes);
        digest
    }

    fn add_manifest(&mut self, repo: &str, media_type: &str, bytes: Bytes) -> String {
        let digest = sha256_digest(&bytes);
        self.repo(repo)
            .manifests
            .insert(digest.clone(), (media_type.to_owned(), bytes));
        digest
    }

    fn set_manifest(&mut self, repo: &str, tag: &str, media_type: &str, bytes: Bytes) -> String {
        let digest = self.add_manifest(repo, media_type, bytes);
        self.repo(repo).tags.insert(tag.to_owned(), digest.clone());
        digest
    }

    fn add_image(&mut self, repo: &str, image: &Image) {
        for blob in image.blobs() {
            self.add_blob(repo, blob.bytes.clone());
        }
        self.add_manifest(
            repo,
            &image.manifest.media_type,
            image.manifest.bytes.clone(),
        );
    }

    fn add_index(&mut self, repo: &str, index: &Index) {
        for image in &index.images {
            self.add_image(repo, image);
        }
        self.add_manifest(
            repo,
            &index.manifest.media_type,
            index.manifest.bytes.clone(),
        );
    }

    fn tag(&mut self, repo: &str, tag: &str, digest: &str) {
        self.repo(repo)
            .tags
            .insert(tag.to_owned(), digest.to_owned());
    }

    /// Picks, oldest first, the first matching fault of each of `kinds`, and counts it down.
    fn choose_faults(&mut self, method: &Method, path: &str, kinds: &[Kind]) -> Chosen {
        let mut first: Vec<(Kind, usize)> = Vec::new();
        for (i, fault) in self.faults.iter().enumerate() {
            let kind = fault.action.kind();
            if kinds.contains(&kind)
                && fault.matches(method, path)
                && !first.iter().any(|(k, _)| *k == kind)
            {
                first.push((kind, i));
            }
        }
        let mut chosen = Chosen::default();
        for (_, i) in first {
            let fault = &mut self.faults[i];
            if let Some(remaining) = &mut fault.remaining {
                *remaining -= 1;
            }
            match fault.action.clone() {
                Action::Delay(d) => chosen.delay = Some(d),
                Action::Status(status) => {
                    chosen.response = Some(Replacement::Status {
                        status,
                        retry_after: fault.retry_after,
                    });
                }
                Action::Redirect(base_url) => {
                    chosen.response = Some(Replacement::Redirect { base_url });
                }
                Action::WrongBytes => chosen.corrupt = true,
                Action::ResetAfter(n) => chosen.reset_after = Some(n),
                Action::Throttle { chunk, every } => chosen.throttle = Some((chunk, every)),
                Action::WithoutLength => chosen.without_length = true,
            }
        }
        self.faults.retain(|f| f.remaining != Some(0));
        chosen
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken on every recorded request and every body chunk sent, for [`FakeUpstream::wait_until`].
    changed: Notify,
    base_url: String,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this module; the state is still usable
        // for the assertions that follow, so do not cascade the poison into every test.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------
// Builder and handle
// ---------------------------------------------------------------------------------------------

/// Fluent set-up of a [`FakeUpstream`]; everything here can also be changed at run time through
/// the handle.
pub struct Builder {
    state: State,
}

impl Builder {
    /// Serve `bytes` as the manifest tagged `tag` (and by its digest).
    pub fn manifest(
        mut self,
        repo: &str,
        tag: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Self {
        self.state.set_manifest(repo, tag, media_type, bytes.into());
        self
    }

    pub fn blob(mut self, repo: &str, bytes: impl Into<Bytes>) -> Self {
        self.state.add_blob(repo, bytes.into());
        self
    }

    /// The image's blobs and manifest, the manifest tagged `tag`.
    pub fn image(mut self, repo: &str, tag: &str, image: &Image) -> Self {
        self.state.add_image(repo, image);
        self.state.tag(repo, tag, &image.manifest.digest);
        self
    }

    /// Every image of the index (blobs and manifests, by digest) and the index tagged `tag`.
    pub fn index(mut self, repo: &str, tag: &str, index: &Index) -> Self {
        self.state.add_index(repo, index);
        self.state.tag(repo, tag, &index.manifest.digest);
        self
    }

    /// Require `Authorization: Basic` with these credentials on every `/v2/` request.
    pub fn basic_auth(mut self, user: &str, pass: &str) -> Self {
        self.state.auth = Auth::Basic {
            user: user.to_owned(),
            pass: pass.to_owned(),
        };
        self
    }

    /// Require a Bearer token on every `/v2/` request, issued by `GET /token` (Basic
    /// credentials) or `POST /token` (an OAuth2 password grant form) for these credentials,
    /// or for an OAuth2 refresh-token grant whose refresh token is `pass` (an identity token).
    pub fn bearer_auth(mut self, user: &str, pass: &str) -> Self {
        self.state.auth = Auth::Bearer {
            user: user.to_owned(),
            pass: pass.to_owned(),
        };
        self
    }

    /// Let the token endpoint issue tokens to requests without credentials, as public
    /// registries do for public repositories. Wrong credentials are still refused.
    pub fn anonymous_tokens(mut self) -> Self {
        self.state.anonymous_tokens = true;
        self
    }

    /// The `expires_in` of issued tokens, enforced on tokio's clock.
    pub fn token_expires_in(mut self, lifetime: Duration) -> Self {
        self.state.token_lifetime = lifetime;
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.state.faults.push(fault);
        self
    }

    /// Act as the blob host a registry redirects to: any GET or HEAD whose last path segment is
    /// the digest of a blob added in any repository is answered with it, without a challenge or
    /// the `/v2/` API, so the redirect's path and query do not matter.
    pub fn blob_cdn(mut self) -> Self {
        self.state.blob_cdn = true;
        self
    }

    /// Binds 127.0.0.1:0 and serves on the current tokio runtime until the handle is dropped.
    pub async fn start(self) -> FakeUpstream {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding 127.0.0.1:0 for the fake upstream");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            state: Mutex::new(self.state),
            changed: Notify::new(),
            base_url: format!("http://{addr}"),
        });
        let (refusing_tx, refusing_rx) = watch::channel(false);
        let (listening_tx, listening_rx) = watch::channel(true);
        let task = tokio::spawn(accept_loop(
            listener,
            addr,
            Arc::clone(&shared),
            refusing_rx,
            listening_tx,
        ));
        FakeUpstream {
            shared,
            addr,
            refusing: refusing_tx,
            listening: listening_rx,
            task: Some(task),
        }
    }
}

/// A running fake registry. Dropping it stops it (the listener closes as soon as the runtime
/// gets to the aborted task); [`FakeUpstream::shutdown`] waits until it has.
pub struct FakeUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    refusing: watch::Sender<bool>,
    listening: watch::Receiver<bool>,
    task: Option<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl FakeUpstream {
    pub fn builder() -> Builder {
        Builder {
            state: State::new(),
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// `127.0.0.1:PORT`, the registry host as a client names it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and returns once the listener and every connection are closed.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancellation drops the task's future, and with it the listener and connections,
            // before the handle resolves.
            let _ = task.await;
        }
    }

    // --- content ---

    /// Serve `bytes` under `tag` (moving the tag if it existed) and by digest; returns the digest.
    pub fn set_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        self.shared
            .state()
            .set_manifest(repo, tag, media_type, bytes.into())
    }

    /// Serve `bytes` by digest only; returns the digest.
    pub fn add_manifest(&self, repo: &str, media_type: &str, bytes: impl Into<Bytes>) -> String {
        self.shared
            .state()
            .add_manifest(repo, media_type, bytes.into())
    }

    pub fn add_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> String {
        self.shared.state().add_blob(repo, bytes.into())
    }

    pub fn add_image(&self, repo: &str, tag: &str, image: &Image) {
        let mut state = self.shared.state();
        state.add_image(repo, image);
        state.tag(repo, tag, &image.manifest.digest);
    }

    pub fn add_index(&self, repo: &str, tag: &str, index: &Index) {
        let mut state = self.shared.state();
        state.add_index(repo, index);
        state.tag(repo, tag, &index.manifest.digest);
    }

    /// The tag disappears; the manifest stays reachable by digest.
    pub fn remove_tag(&self, repo: &str, tag: &str) {
        self.shared.state().repo(repo).tags.remove(tag);
    }

    /// The manifest and every tag pointing at it disappear.
    pub fn remove_manifest(&self, repo: &str, digest: &str) {
        let mut state = self.shared.state();
        let repo = state.repo(repo);
        repo.manifests.remove(digest);
        repo.tags.retain(|_, d| d != digest);
    }

    pub fn remove_blob(&self, repo: &str, digest: &str) {
        self.shared.state().repo(repo).blobs.remove(digest);
    }

    // --- faults and availability ---

    pub fn inject(&self, fault: Fault) {
        self.shared.state().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// While on, every request (recorded as usual) is answered 503 with the spec's error body:
    /// the upstream is reachable but failing. For an unreachable upstream see
    /// [`FakeUpstream::set_refusing`].
    pub fn set_down(&self, down: bool) {
        self.shared.state().down = down;
    }

    /// While on, the listener is closed and every open connection (including idle pooled ones)
    /// is dropped, so new connections are refused; turning it off listens again on the same
    /// port. Returns once the change has taken effect.
    pub async fn set_refusing(&self, refusing: bool) {
        self.refusing.send_replace(refusing);
        let mut listening = self.listening.clone();
        tokio::time::timeout(
            LISTENER_CHANGE_TIMEOUT,
            listening.wait_for(|l| *l != refusing),
        )
        .await
        .expect("the fake upstream's listener changes state within 5s")
        .expect("the fake upstream's accept loop is running");
    }

    /// Rotates the credentials the registry accepts (Basic, or at the token endpoint): from now
    /// on only these. Tokens already issued stay valid until they expire, as with Distribution.
    pub fn set_credentials(&self, user: &str, pass: &str) {
        let mut state = self.shared.state();
        state.auth = match &state.auth {
            Auth::None => Auth::None,
            Auth::Basic { .. } => Auth::Basic {
                user: user.to_owned(),
                pass: pass.to_owned(),
            },
            Auth::Bearer { .. } => Auth::Bearer {
                user: user.to_owned(),
                pass: pass.to_owned(),
            },
        };
    }

    // --- tokens ---

    /// Runs `actions` one per refused token request, the first on the next refusal, while
    /// that refusal is answered: a rotation that lands exactly while a client is retrying.
    pub fn on_token_refusals(&self, actions: Vec<OnRefusal>) {
        self.shared.state().on_refusal.extend(actions);
    }

    /// Every issued token stops working now, as if it had expired.
    pub fn expire_tokens(&self) {
        self.shared.state().tokens.clear();
    }

    /// The lifetime of tokens issued from now on.
    pub fn set_token_expires_in(&self, lifetime: Duration) {
        self.shared.state().token_lifetime = lifetime;
    }

    /// Requests to the token endpoint (GET and POST), successful or not.
    pub fn token_requests(&self) -> usize {
        self.shared.state().token_requests
    }

    // --- what was received ---

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    /// Forgets recorded requests, the token request count and body byte counts.
    pub fn clear_requests(&self) {
        let mut state = self.shared.state();
        state.requests.clear();
        state.token_requests = 0;
        state.body_bytes_sent.clear();
    }

    /// Requests with this method (case-insensitive) whose path starts with `path_prefix`; an
    /// exact path counts itself (and longer paths it is a prefix of).
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.shared
            .state()
            .requests
            .iter()
            .filter(|r| {
                r.method.as_str().eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix)
            })
            .count()
    }

    /// GETs of this blob in any repository.
    pub fn gets_of_blob(&self, digest: &str) -> usize {
        self.count_matching(&Method::GET, &Target::Blob(digest.to_owned()))
    }

    /// GETs of this manifest reference (tag or digest) in any repository.
    pub fn gets_of_manifest(&self, reference: &str) -> usize {
        self.count_matching(&Method::GET, &Target::Manifest(reference.to_owned()))
    }

    /// HEADs of this manifest reference (tag or digest) in any repository.
    pub fn heads_of_manifest(&self, reference: &str) -> usize {
        self.count_matching(&Method::HEAD, &Target::Manifest(reference.to_owned()))
    }

    /// Body bytes of this blob handed to connections so far, over all requests and
    /// repositories; with a throttle fault this shows a download in progress.
    pub fn blob_bytes_sent(&self, digest: &str) -> u64 {
        let target = Target::Blob(digest.to_owned());
        self.shared
            .state()
            .body_bytes_sent
            .iter()
            .filter(|(path, _)| target.matches(path))
            .map(|(_, n)| n)
            .sum()
    }

    fn count_matching(&self, method: &Method, target: &Target) -> usize {
        self.shared
            .state()
            .requests
            .iter()
            .filter(|r| r.method == method && target.matches(&r.path))
            .count()
    }

    /// Waits until `condition` holds, re-checking after every request and body chunk; false if
    /// `timeout` passed first.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&FakeUpstream) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Register for the wake-up before checking, so a change in between is not lost.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return condition(self);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

enum LoopEvent {
    Accepted(std::io::Result<TcpStream>),
    Refusing(bool),
    Stop,
    Reaped,
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut refusing: watch::Receiver<bool>,
    listening: watch::Sender<bool>,
) {
    let mut listener = Some(listener);
    // Owning the connections here means dropping this task (shutdown, or the handle dropped)
    // aborts them all, so nothing keeps serving after the test let go of the fake.
    let mut connections = JoinSet::new();
    loop {
        let event = match &listener {
            Some(l) => tokio::select! {
                accepted = l.accept() => LoopEvent::Accepted(accepted.map(|(stream, _)| stream)),
                changed = refusing.changed() => match changed {
                    Ok(()) => LoopEvent::Refusing(*refusing.borrow_and_update()),
                    Err(_) => LoopEvent::Stop,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => LoopEvent::Reaped,
            },
            None => match refusing.changed().await {
                Ok(()) => LoopEvent::Refusing(*refusing.borrow_and_update()),
                Err(_) => LoopEvent::Stop,
            },
        };
        match event {
            LoopEvent::Accepted(Ok(stream)) => {
                connections.spawn(serve_connection(stream, Arc::clone(&shared)));
            }
            // Accept errors (e.g. a client that reset before accept) concern one connection only.
            LoopEvent::Accepted(Err(_)) | LoopEvent::Reaped => {}
            LoopEvent::Refusing(true) if listener.is_some() => {
                listener = None;
                connections.abort_all();
                listening.send_replace(false);
            }
            LoopEvent::Refusing(false) if listener.is_none() => {
                listener = Some(rebind(addr).await);
                listening.send_replace(true);
            }
            LoopEvent::Refusing(_) => {}
            LoopEvent::Stop => return,
        }
    }
}

/// Listens again on the port the tests already know. The port was ours a moment ago, so a
/// failure is transient (the socket still closing), hence a few retries.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let mut last_error = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the fake upstream could not listen on {addr} again: {last_error:?}");
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(shared, request).await) }
    });
    // HTTP/1.1 and HTTP/2 with prior knowledge, like a registry behind a modern proxy. A
    // connection error is the client's business (or a reset fault's doing).
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    // Only bodies a registry pull could carry (a token form) are read; a body over the cap is
    // recorded as empty and, for the token endpoint, reads as no credentials.
    let body = if parts.method == Method::GET || parts.method == Method::HEAD {
        Bytes::new()
    } else {
        Limited::new(body, BODY_LIMIT)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default()
    };
    let form = (parts.method == Method::POST).then(|| String::from_utf8_lossy(&body).into_owned());
    shared.state().requests.push(RecordedRequest {
        method: parts.method.clone(),
        path: path.clone(),
        query: query.clone(),
        headers: parts.headers.clone(),
        body,
    });
    shared.changed.notify_waiters();

    let (delay, mut response) = respond(
        &shared,
        &Inbound {
            method: &parts.method,
            path: &path,
            query: query.as_deref().unwrap_or_default(),
            headers: &parts.headers,
            form: form.as_deref(),
        },
    );
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if path.starts_with("/v2") {
        response.headers_mut().insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
    }
    response
}

/// The parts of a request that decide the answer.
struct Inbound<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a str,
    headers: &'a HeaderMap,
    form: Option<&'a str>,
}

/// Decides the answer under the lock; the body streams it returns run later, outside it.
fn respond(shared: &Arc<Shared>, request: &Inbound<'_>) -> (Option<Duration>, Response<Body>) {
    let mut state = shared.state();
    if state.down {
        return (
            None,
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the registry is down",
            ),
        );
    }
    let route = if state.blob_cdn {
        Route::CdnBlob
    } else {
        Route::parse(request.path)
    };
    if !matches!(route, Route::Token | Route::CdnBlob | Route::Unknown)
        && let Some(challenge) = authorize(&mut state, &shared.base_url, &route, request.headers)
    {
        return (None, challenge);
    }

    // Replacement responses are decided before routing, so a faulted token request issues
    // no token; body faults after, so they are spent only on a body they can shape.
    let mut chosen =
        state.choose_faults(request.method, request.path, &[Kind::Delay, Kind::Response]);
    if let Some(replacement) = chosen.response.take() {
        let response = match replacement {
            Replacement::Status {
                status,
                retry_after,
            } => status_fault(&state, &shared.base_url, &route, status, retry_after),
            Replacement::Redirect { base_url } => redirect(&format!("{base_url}{}", request.path)),
        };
        return (chosen.delay, response);
    }
    let response = match route_content(&mut state, &route, request) {
        Routed::Done(response) => response,
        Routed::Payload(payload) => {
            if payload.body.is_some() {
                let body_faults = state.choose_faults(
                    request.method,
                    request.path,
                    &[Kind::Corrupt, Kind::Reset, Kind::Throttle, Kind::Framing],
                );
                chosen.without_length = body_faults.without_length;
                chosen.corrupt = body_faults.corrupt;
                chosen.reset_after = body_faults.reset_after;
                chosen.throttle = body_faults.throttle;
            }
            payload.into_response(&chosen, Arc::clone(shared), request.path.to_owned())
        }
    };
    (chosen.delay, response)
}

/// The outcome of routing: content that body faults may still shape, or a finished answer.
enum Routed {
    Payload(Payload),
    Done(Response<Body>),
}

/// What the registry would send for a request, before body faults shape it.
struct Payload {
    status: StatusCode,
    headers: HeaderMap,
    /// `None` for HEAD and for answers that body faults must leave alone.
    body: Option<Bytes>,
}

impl Payload {
    fn into_response(self, chosen: &Chosen, shared: Arc<Shared>, path: String) -> Response<Body> {
        let mut response = Response::new(match self.body {
            None => empty(),
            Some(bytes) => faulty_body(bytes, chosen, shared, path),
        });
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        if chosen.without_length {
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        response
    }
}

/// The body as faults shape it: inverted bytes, paced chunks, an abort after N bytes. Bytes are
/// counted as they are handed to hyper so tests can watch a download progress.
fn faulty_body(bytes: Bytes, chosen: &Chosen, shared: Arc<Shared>, path: String) -> Body {
    let bytes = if chosen.corrupt {
        Bytes::from(bytes.iter().map(|b| !b).collect::<Vec<u8>>())
    } else {
        bytes
    };
    let len = bytes.len() as u64;
    let reset_at = chosen.reset_after.filter(|&n| n < len);
    let limit = reset_at.unwrap_or(len);
    let (chunk, every) = match chosen.throttle {
        Some((chunk, every)) => (chunk as u64, Some(every)),
        None => (len.max(1), None),
    };
    struct Progress {
        bytes: Bytes,
        offset: u64,
        done: bool,
        shared: Arc<Shared>,
        path: String,
    }
    let progress = Progress {
        bytes,
        offset: 0,
        done: false,
        shared,
        path,
    };
    let body = stream::unfold(progress, move |mut p| async move {
        if p.done {
            return None;
        }
        if p.offset >= limit {
            p.done = true;
            reset_at?;
            tokio::time::sleep(FLUSH_BEFORE_RESET).await;
            let reset: BoxError = "reset by fault injection".into();
            return Some((Err(reset), p));
        }
        if let Some(every) = every
            && p.offset > 0
        {
            tokio::time::sleep(every).await;
        }
        let end = (p.offset + chunk).min(limit);
        let piece = p.bytes.slice(p.offset as usize..end as usize);
        let sent = end - p.offset;
        p.offset = end;
        *p.shared
            .state()
            .body_bytes_sent
            .entry(p.path.clone())
            .or_default() += sent;
        p.shared.changed.notify_waiters();
        Some((Ok(Frame::data(piece)), p))
    });
    UnsyncBoxBody::new(StreamBody::new(body))
}

fn empty() -> Body {
    UnsyncBoxBody::new(Full::new(Bytes::new()).map_err(|never| match never {}))
}

fn full(bytes: impl Into<Bytes>) -> Body {
    UnsyncBoxBody::new(Full::new(bytes.into()).map_err(|never| match never {}))
}

fn json_response(
    status: StatusCode,
    content_type: &str,
    value: &serde_json::Value,
) -> Response<Body> {
    let bytes = to_json_bytes(value);
    let mut response = Response::new(full(bytes.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header_value(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    response
}

/// The spec's error body: `{"errors":[{"code","message","detail"}]}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        "application/json",
        &serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] }),
    )
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("the fake only builds header values from printable text")
}

fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    response
        .headers_mut()
        .insert(header::LOCATION, header_value(location));
    response
}

// ---------------------------------------------------------------------------------------------
// Routes and content
// ---------------------------------------------------------------------------------------------

enum Route {
    Ping,
    Manifest {
        name: String,
        reference: String,
    },
    Blob {
        name: String,
        digest: String,
    },
    Tags {
        name: String,
    },
    Referrers {
        name: String,
        digest: String,
    },
    Token,
    /// In blob CDN mode every path is a blob lookup by its last segment.
    CdnBlob,
    Unknown,
}

impl Route {
    fn parse(path: &str) -> Route {
        if path == "/token" {
            return Route::Token;
        }
        if path == "/v2" || path == "/v2/" {
            return Route::Ping;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Unknown;
        };
        if let Some(name) = rest.strip_suffix("/tags/list")
            && !name.is_empty()
        {
            return Route::Tags {
                name: name.to_owned(),
            };
        }
        // The right-most marker wins: a name may itself contain `blobs` or `manifests`.
        let found = ["/manifests/", "/blobs/", "/referrers/"]
            .into_iter()
            .filter_map(|marker| rest.rfind(marker).map(|at| (at, marker)))
            .max_by_key(|(at, _)| *at);
        let Some((at, marker)) = found else {
            return Route::Unknown;
        };
        let name = rest[..at].to_owned();
        let last = rest[at + marker.len()..].to_owned();
        if name.is_empty() || last.is_empty() || last.contains('/') {
            return Route::Unknown;
        }
        match marker {
            "/manifests/" => Route::Manifest {
                name,
                reference: last,
            },
            "/blobs/" => Route::Blob { name, digest: last },
            _ => Route::Referrers { name, digest: last },
        }
    }

    fn name(&self) -> Option<&str> {
        match self {
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. } => Some(name),
            Route::Ping | Route::Token | Route::CdnBlob | Route::Unknown => None,
        }
    }
}

fn route_content(state: &mut State, route: &Route, request: &Inbound<'_>) -> Routed {
    let method = request.method;
    if route_is_api(route) && method != Method::GET && method != Method::HEAD {
        return Routed::Done(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry is read-only",
        ));
    }
    match route {
        Route::Ping => Routed::Payload(Payload {
            status: StatusCode::OK,
            headers: json_headers("application/json", 2),
            body: (method == Method::GET).then(|| Bytes::from_static(b"{}")),
        }),
        Route::Manifest { name, reference } => {
            let found = state.repos.get(name).and_then(|repo| {
                let digest = if reference.contains(':') {
                    reference.clone()
                } else {
                    repo.tags.get(reference)?.clone()
                };
                let (media_type, bytes) = repo.manifests.get(&digest)?;
                Some((digest, media_type.clone(), bytes.clone()))
            });
            let Some((digest, media_type, bytes)) = found else {
                return Routed::Done(error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown",
                ));
            };
            let mut headers = json_headers(&media_type, bytes.len());
            headers.insert("docker-content-digest", header_value(&digest));
            Routed::Payload(Payload {
                status: StatusCode::OK,
                headers,
                body: (method == Method::GET).then_some(bytes),
            })
        }
        Route::Blob { name, digest } => {
            let bytes = state
                .repos
                .get(name)
                .and_then(|repo| repo.blobs.get(digest))
                .cloned();
            blob_payload(bytes, digest, request)
        }
        Route::CdnBlob => {
            let digest = request.path.rsplit('/').next().unwrap_or_default();
            let bytes = state
                .repos
                .values()
                .find_map(|repo| repo.blobs.get(digest))
                .cloned();
            blob_payload(bytes, digest, request)
        }
        Route::Tags { name } => {
            let Some(repo) = state.repos.get(name) else {
                return Routed::Done(error(
                    StatusCode::NOT_FOUND,
                    "NAME_UNKNOWN",
                    "repository name not known to registry",
                ));
            };
            Routed::Payload(tags_page(name, repo, request.query))
        }
        Route::Referrers { .. } => {
            let index =
                serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] });
            let bytes = to_json_bytes(&index);
            Routed::Payload(Payload {
                status: StatusCode::OK,
                headers: json_headers(OCI_INDEX, bytes.len()),
                body: (method == Method::GET).then_some(bytes),
            })
        }
        Route::Token => Routed::Done(token(state, request)),
        Route::Unknown => Routed::Done(error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "no such route on this registry",
        )),
    }
}

fn route_is_api(route: &Route) -> bool {
    !matches!(route, Route::Token | Route::Unknown)
}

fn json_headers(content_type: &str, len: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, header_value(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers
}

fn blob_payload(bytes: Option<Bytes>, digest: &str, request: &Inbound<'_>) -> Routed {
    let Some(bytes) = bytes else {
        return Routed::Done(error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        ));
    };
    let len = bytes.len() as u64;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("docker-content-digest", header_value(digest));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let range = request
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| request.method == Method::GET)
        .map(|v| parse_range(v, len));
    let (status, body) = match range {
        None | Some(RangeRequest::Ignored) => (StatusCode::OK, bytes),
        Some(RangeRequest::Unsatisfiable) => {
            let mut response = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                "range not satisfiable",
            );
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{len}")),
            );
            return Routed::Done(response);
        }
        Some(RangeRequest::Bytes { first, last }) => {
            headers.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {first}-{last}/{len}")),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                bytes.slice(first as usize..=last as usize),
            )
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Routed::Payload(Payload {
        status,
        headers,
        body: (request.method == Method::GET).then_some(body),
    })
}

enum RangeRequest {
    /// Malformed or several ranges: served as a whole, as RFC 9110 allows.
    Ignored,
    Unsatisfiable,
    Bytes {
        first: u64,
        last: u64,
    },
}

/// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range against a body of `len` bytes.
fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignored;
    };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignored;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let (first, last) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => match parse(last) {
            Some(0) => return RangeRequest::Unsatisfiable,
            Some(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            None => return RangeRequest::Ignored,
        },
        (false, true) => match parse(first) {
            Some(a) => (a, len.saturating_sub(1)),
            None => return RangeRequest::Ignored,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a <= b => (a, b.min(len.saturating_sub(1))),
            _ => return RangeRequest::Ignored,
        },
        (true, true) => return RangeRequest::Ignored,
    };
    if len == 0 || first >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Bytes { first, last }
}

/// `GET /v2/<name>/tags/list`, with the spec's `n` and `last` pagination and `Link` header.
fn tags_page(name: &str, repo: &Repo, query: &str) -> Payload {
    let params = parse_form(query);
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let limit = param("n").and_then(|n| n.parse::<usize>().ok());
    let after = param("last");
    let remaining: Vec<&String> = repo
        .tags
        .keys()
        .filter(|tag| after.is_none_or(|last| tag.as_str() > last))
        .collect();
    let page: Vec<&String> = remaining
        .iter()
        .copied()
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let bytes = to_json_bytes(&serde_json::json!({ "name": name, "tags": page }));
    let mut headers = json_headers("application/json", bytes.len());
    if let (Some(n), Some(last)) = (limit, page.last())
        && remaining.len() > page.len()
    {
        headers.insert(
            header::LINK,
            header_value(&format!(
                "</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\""
            )),
        );
    }
    Payload {
        status: StatusCode::OK,
        headers,
        body: Some(bytes),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

/// `None` when the request carries what the configured challenge asks for; otherwise the 401.
fn authorize(
    state: &mut State,
    base_url: &str,
    route: &Route,
    headers: &HeaderMap,
) -> Option<Response<Body>> {
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(scheme, value)| (scheme.to_ascii_lowercase(), value.trim().to_owned()));
    match state.auth.clone() {
        Auth::None => None,
        Auth::Basic { user, pass } => {
            let ok = credentials
                .filter(|(scheme, _)| scheme == "basic")
                .and_then(|(_, value)| decode_basic(&value))
                .is_some_and(|(u, p)| u == user && p == pass);
            (!ok).then(|| unauthorized(&basic_challenge()))
        }
        Auth::Bearer { .. } => {
            let now = Instant::now();
            state.tokens.retain(|_, token| token.expires > now);
            let token = credentials
                .filter(|(scheme, _)| scheme == "bearer")
                .and_then(|(_, value)| state.tokens.get(&value));
            match (token, route.name()) {
                (Some(_), None) => None,
                (Some(token), Some(name)) if token.repositories.iter().any(|r| r == name) => None,
                (Some(_), Some(_)) => Some(unauthorized(&format!(
                    "{},error=\"insufficient_scope\"",
                    bearer_challenge(base_url, route)
                ))),
                (None, _) => Some(unauthorized(&bearer_challenge(base_url, route))),
            }
        }
    }
}

fn basic_challenge() -> String {
    "Basic realm=\"fake\"".to_owned()
}

fn bearer_challenge(base_url: &str, route: &Route) -> String {
    let mut challenge = format!("Bearer realm=\"{base_url}/token\",service=\"{TOKEN_SERVICE}\"");
    if let Some(name) = route.name() {
        challenge.push_str(&format!(",scope=\"repository:{name}:pull\""));
    }
    challenge
}

fn unauthorized(challenge: &str) -> Response<Body> {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, header_value(challenge));
    response
}

fn decode_basic(value: &str) -> Option<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// The token endpoint: `GET /token` with Basic credentials (Docker, containers/image) or
/// `POST /token` with a password grant form (containerd tries this first).
fn token(state: &mut State, request: &Inbound<'_>) -> Response<Body> {
    state.token_requests += 1;
    let Auth::Bearer { user, pass } = state.auth.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "this registry issues no tokens",
        );
    };
    let (params, credentials) = if *request.method == Method::GET {
        let credentials = request
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, value)| decode_basic(value.trim()));
        (parse_form(request.query), credentials)
    } else if *request.method == Method::POST {
        let params = parse_form(request.form.unwrap_or_default());
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        if get("grant_type").as_deref() == Some("refresh_token") {
            let token = get("refresh_token").unwrap_or_default();
            (params, Some(Some((user.clone(), token))))
        } else if get("grant_type").as_deref() != Some("password") {
            return json_response(
                StatusCode::BAD_REQUEST,
                "application/json",
                &serde_json::json!({ "error": "unsupported_grant_type" }),
            );
        } else {
            let credentials = match (get("username"), get("password")) {
                (None, None) => None,
                (u, p) => Some(Some((u.unwrap_or_default(), p.unwrap_or_default()))),
            };
            (params, credentials)
        }
    } else {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "GET or POST only",
        );
    };
    let allowed = match credentials {
        None => state.anonymous_tokens,
        Some(Some((u, p))) => u == user && p == pass,
        // Unreadable credentials are wrong credentials.
        Some(None) => false,
    };
    if !allowed {
        if let Some(action) = state.on_refusal.pop_front()
            && let Some(pass) = action()
        {
            state.auth = Auth::Bearer { user, pass };
            state.tokens.clear();
        }
        return error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "invalid credentials",
        );
    }
    let repositories: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, scopes)| scopes.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|scope| pull_scope_repository(&scope))
        .collect();
    state.tokens_issued += 1;
    let token = format!(
        "fake-{}-{}",
        state.tokens_issued,
        &hex::encode(Sha256::digest(pseudo_random_bytes(16)))[..24]
    );
    let lifetime = state.token_lifetime;
    state.tokens.insert(
        token.clone(),
        Token {
            repositories,
            expires: Instant::now() + lifetime,
        },
    );
    json_response(
        StatusCode::OK,
        "application/json",
        &serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": lifetime.as_secs(),
        }),
    )
}

/// The repository of a `repository:<name>:<actions>` scope that grants pull.
fn pull_scope_repository(scope: &str) -> Option<String> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    actions
        .split(',')
        .any(|a| a == "pull" || a == "*")
        .then(|| name.to_owned())
}

/// The response a status fault stands for, with the spec's code for that status and, for a 401,
/// the configured challenge so a client can react as it would to a real rejection.
fn status_fault(
    state: &State,
    base_url: &str,
    route: &Route,
    status: StatusCode,
    retry_after: Option<u64>,
) -> Response<Body> {
    let code = match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => match route {
            Route::Manifest { .. } => "MANIFEST_UNKNOWN",
            Route::Blob { .. } | Route::CdnBlob => "BLOB_UNKNOWN",
            _ => "NAME_UNKNOWN",
        },
        429 => "TOOMANYREQUESTS",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let mut response = error(status, code, "injected fault");
    if status == StatusCode::UNAUTHORIZED {
        let challenge = match state.auth {
            Auth::Bearer { .. } => bearer_challenge(base_url, route),
            Auth::None | Auth::Basic { .. } => basic_challenge(),
        };
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header_value(&challenge));
    }
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// `application/x-www-form-urlencoded` pairs (also the query string's syntax), decoded.
fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?));
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|v| v as u8)
}

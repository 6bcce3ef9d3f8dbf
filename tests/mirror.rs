//! The mirror as its users meet it: a registry client pulling through an in-process regcache
//! from in-process fake upstreams that count every request and misbehave on cue.
//!
//! Each test states one thing a user would notice (an image pulls byte for byte, a cold layer is
//! downloaded once however many nodes ask, a corrupt download is never handed out as complete,
//! another repository's layers stay private, a tag keeps resolving while the upstream is down,
//! the cache survives a restart, ...). Everything listens on 127.0.0.1 only, and every wait is
//! bounded, so a hung mirror fails a test instead of stalling the suite.

mod support;

#[path = "mirror/access.rs"]
mod access;
#[path = "mirror/api.rs"]
mod api;
#[path = "mirror/auth.rs"]
mod auth;
#[path = "mirror/bundle.rs"]
mod bundle;
#[path = "mirror/coalesce.rs"]
mod coalesce;
#[path = "mirror/credentials.rs"]
mod credentials;
#[path = "mirror/cross_repo.rs"]
mod cross_repo;
#[path = "mirror/disk_full.rs"]
mod disk_full;
#[path = "mirror/eviction.rs"]
mod eviction;
#[path = "mirror/kubernetes.rs"]
mod kubernetes;
#[path = "mirror/lifecycle.rs"]
mod lifecycle;
#[path = "mirror/never_exposed.rs"]
mod never_exposed;
#[path = "mirror/offline.rs"]
mod offline;
#[path = "mirror/passthrough.rs"]
mod passthrough;
#[path = "mirror/pull.rs"]
mod pull;
#[path = "mirror/restart.rs"]
mod restart;
#[path = "mirror/routing.rs"]
mod routing;
#[path = "mirror/seed.rs"]
mod seed;
#[path = "mirror/tags.rs"]
mod tags;
#[path = "mirror/tls.rs"]
mod tls;
#[path = "mirror/upstream_errors.rs"]
mod upstream_errors;
#[path = "mirror/verify.rs"]
mod verify;
#[path = "mirror/wire.rs"]
mod wire;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;

use support::fake_upstream::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, FakeUpstream, OCI_INDEX, OCI_MANIFEST,
};
use support::mirror::{Mirror, MirrorBuilder};

/// Longest any single wait in a test may take (a whole concurrent pull, a fill to finish).
const WAIT: Duration = Duration::from_secs(20);

/// What containerd sends when it resolves a tag: every manifest kind it can pull.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Runs `future` or fails the test naming `what` once [`WAIT`] has passed.
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

fn cache_dir() -> TempDir {
    tempfile::tempdir().expect("creating a cache directory")
}

/// A mirror whose only (and default) upstream is `up`, caching under `dir`.
fn mirror_for(up: &FakeUpstream, dir: &TempDir) -> MirrorBuilder {
    MirrorBuilder::new(dir.path()).upstream(&up.host(), &up.url())
}

/// The first value of a header as text, if present.
fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("header values are text").to_owned())
}

/// The whole body of a response that must arrive complete.
async fn body(response: Response) -> Bytes {
    within("reading a response body", response.bytes())
        .await
        .expect("the body arrives whole")
}

/// The spec's error code from an OCI error body, checking the body is the spec's JSON.
async fn error_code(response: Response) -> String {
    let content_type = header(&response, "content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "an error body is JSON, got Content-Type {content_type:?}"
    );
    let bytes = body(response).await;
    let json: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "error body is JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    json["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("an OCI error body: {json}"))
        .to_owned()
}

/// Asserts a status and an OCI error code.
async fn assert_error(response: Response, status: StatusCode, code: &str, what: &str) {
    assert_eq!(response.status(), status, "{what}: status");
    assert_eq!(error_code(response).await, code, "{what}: error code");
}

/// What a client received of a body: the bytes, and the error that ended it, if any.
struct Received {
    bytes: Vec<u8>,
    error: Option<String>,
}

/// Reads a body to its end or its first error, as a pulling client would.
async fn read_until_end_or_error(mut response: Response) -> Received {
    let mut bytes = Vec::new();
    let read = async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(e) => return Some(e.to_string()),
            }
        }
    };
    let error = within("reading a body to its end or error", read).await;
    Received { bytes, error }
}

/// One response of a pull, with the headers a client checks.
#[derive(Debug, PartialEq)]
struct Fetched {
    path: String,
    status: u16,
    content_type: Option<String>,
    digest: Option<String>,
    length: Option<String>,
    body: Bytes,
}

async fn fetch(client: &reqwest::Client, base: &str, path: &str) -> Fetched {
    let response = client
        .get(format!("{base}{path}"))
        .header("accept", ACCEPT_MANIFESTS)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {base}{path}: {e:?}"));
    Fetched {
        path: path.to_owned(),
        status: response.status().as_u16(),
        content_type: header(&response, "content-type"),
        digest: header(&response, "docker-content-digest"),
        length: header(&response, "content-length"),
        body: body(response).await,
    }
}

/// Pulls `name:reference` from the registry at `base` as containerd does: the manifest (an
/// index resolves to its linux/amd64 image), then the config and every layer. Returns every
/// response in order.
async fn pull_image(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    reference: &str,
) -> Vec<Fetched> {
    let mut pulled = Vec::new();
    let top = fetch(client, base, &format!("/v2/{name}/manifests/{reference}")).await;
    assert_eq!(top.status, 200, "GET {base}{}", top.path);
    let doc: Value = serde_json::from_slice(&top.body).expect("a manifest is JSON");
    let is_index = matches!(
        top.content_type.as_deref(),
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST)
    );
    pulled.push(top);
    let doc = if is_index {
        let digest = doc["manifests"]
            .as_array()
            .expect("an index lists manifests")
            .iter()
            .find(|m| m["platform"]["architecture"] == "amd64")
            .and_then(|m| m["digest"].as_str())
            .expect("the index has a linux/amd64 image")
            .to_owned();
        let image = fetch(client, base, &format!("/v2/{name}/manifests/{digest}")).await;
        assert_eq!(image.status, 200, "GET {base}{}", image.path);
        assert!(
            matches!(
                image.content_type.as_deref(),
                Some(OCI_MANIFEST | DOCKER_MANIFEST)
            ),
            "an image manifest: {:?}",
            image.content_type
        );
        let doc = serde_json::from_slice(&image.body).expect("a manifest is JSON");
        pulled.push(image);
        doc
    } else {
        doc
    };
    let blobs = std::iter::once(&doc["config"]).chain(
        doc["layers"]
            .as_array()
            .expect("an image manifest lists layers"),
    );
    for descriptor in blobs {
        let digest = descriptor["digest"].as_str().expect("a descriptor digest");
        let blob = fetch(client, base, &format!("/v2/{name}/blobs/{digest}")).await;
        assert_eq!(blob.status, 200, "GET {base}{}", blob.path);
        assert_eq!(
            support::fake_upstream::sha256_digest(&blob.body),
            digest,
            "blob {} arrives intact",
            blob.path
        );
        pulled.push(blob);
    }
    pulled
}

/// GET a blob through the mirror and return its bytes, asserting a complete 200.
async fn get_blob(mirror: &Mirror, name: &str, digest: &str) -> Bytes {
    let response = mirror.get(&format!("/v2/{name}/blobs/{digest}")).await;
    let status = response.status();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body(response).await).into_owned();
        panic!("GET /v2/{name}/blobs/{digest} answered {status}: {text}");
    }
    body(response).await
}

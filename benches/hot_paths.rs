//! Micro-benchmarks for the work regcache does on every request: parsing the path into a route,
//! parsing names and digests, hashing blob bytes, and looking a digest up in the store. A
//! regression here shows up before it reaches the end-to-end numbers of `benches/run.sh`.
//!
//! `cargo bench --bench hot_paths` (criterion; `-- --quick` for a short run).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use regcache::http::route;
use regcache::oci::{Algorithm, Digest, DigestHasher, ImageName, Reference, RepoName};
use regcache::store::Store;

const DIGEST: &str = "sha256:4bcff63911fcb4448bd4fdacec207030997caf25e9bea4045fa6c8c44de311d1";

fn route_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route::parse");
    let blob = format!("/v2/library/alpine/blobs/{DIGEST}");
    let prefixed_blob = format!("/v2/ghcr.io/org/team/app/blobs/{DIGEST}");
    let manifest_digest = format!("/v2/library/alpine/manifests/{DIGEST}");
    let paths = [
        ("blob", blob.as_str()),
        ("blob behind a host prefix", prefixed_blob.as_str()),
        ("manifest by tag", "/v2/library/alpine/manifests/3.20"),
        ("manifest by digest", manifest_digest.as_str()),
        ("tags", "/v2/library/alpine/tags/list"),
        ("base", "/v2/"),
        ("not an API path", "/favicon.ico"),
    ];
    for (label, path) in paths {
        group.bench_with_input(BenchmarkId::from_parameter(label), path, |b, path| {
            b.iter(|| route::parse(black_box(path)))
        });
    }
    group.finish();
}

fn name_and_digest_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.bench_function("Digest sha256", |b| {
        b.iter(|| black_box(DIGEST).parse::<Digest>())
    });
    let bad = DIGEST.to_uppercase();
    group.bench_function("Digest rejected (uppercase)", |b| {
        b.iter(|| black_box(bad.as_str()).parse::<Digest>())
    });
    group.bench_function("RepoName library/alpine", |b| {
        b.iter(|| black_box("library/alpine").parse::<RepoName>())
    });
    let deep = "org/team-a/sub.group/project_1/app";
    group.bench_function("RepoName five components", |b| {
        b.iter(|| black_box(deep).parse::<RepoName>())
    });
    group.bench_function("ImageName with host prefix", |b| {
        b.iter(|| black_box("ghcr.io/org/app").parse::<ImageName>())
    });
    group.bench_function("Reference tag", |b| {
        b.iter(|| black_box("v1.2.3-alpine").parse::<Reference>())
    });
    group.bench_function("Reference digest", |b| {
        b.iter(|| black_box(DIGEST).parse::<Reference>())
    });
    group.finish();
}

fn digest_hashing(c: &mut Criterion) {
    const MIB: usize = 1 << 20;
    // Non-repeating bytes, so nothing about the input is special.
    let buffer: Vec<u8> = (0..MIB as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    let mut group = c.benchmark_group("DigestHasher 1 MiB");
    group.throughput(Throughput::Bytes(MIB as u64));
    for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
        group.bench_function(algorithm.as_str(), |b| {
            b.iter(|| {
                let mut hasher = DigestHasher::new(algorithm);
                hasher.update(black_box(&buffer));
                hasher.finish()
            })
        });
    }
    // The fill hashes what arrives in network-sized chunks; the per-call cost shows here.
    group.bench_function("sha256 in 16 KiB updates", |b| {
        b.iter(|| {
            let mut hasher = DigestHasher::new(Algorithm::Sha256);
            for chunk in buffer.chunks(16 * 1024) {
                hasher.update(black_box(chunk));
            }
            hasher.finish()
        })
    });
    group.finish();
}

fn store_lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(dir.path()).expect("opening a store in an empty directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let body = Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    );
    let stored = Digest::of(Algorithm::Sha256, &body);
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    runtime
        .block_on(store.put_manifest(&stored, media_type, body.clone()))
        .expect("storing a manifest");
    let absent: Digest = DIGEST.parse().expect("a valid digest");

    let mut group = c.benchmark_group("Store");
    group.bench_function("open_blob hit", |b| {
        b.iter(|| runtime.block_on(store.open_blob(black_box(&stored))))
    });
    group.bench_function("open_blob miss", |b| {
        b.iter(|| runtime.block_on(store.open_blob(black_box(&absent))))
    });
    group.bench_function("get_manifest hit", |b| {
        b.iter(|| runtime.block_on(store.get_manifest(black_box(&stored))))
    });
    group.finish();
}

criterion_group!(
    benches,
    route_parsing,
    name_and_digest_parsing,
    digest_hashing,
    store_lookup
);
criterion_main!(benches);

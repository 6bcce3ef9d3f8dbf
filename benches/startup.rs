//! Start-up with a large cache: how long `Store::open` takes to be ready to serve with 100,000
//! stored objects (it reads the access index, never the blob files), and how long the
//! background reconciliation scan that follows takes. Also the scan alone, as on a cache
//! written before the index existed.
//!
//! `cargo bench --bench startup` (prints timings; `-- 20000` for a smaller cache).

use std::time::Instant;

use regcache::oci::{Algorithm, Digest};
use regcache::store::Store;

fn main() {
    let objects: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("a temporary cache directory");
    let started = Instant::now();
    for n in 0..objects {
        let body = format!("object {n}");
        let digest = Digest::of(Algorithm::Sha256, body.as_bytes());
        let hex = digest.hex();
        let shard = dir.path().join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&shard).expect("shard dir");
        std::fs::write(shard.join(hex), body).expect("blob file");
    }
    println!(
        "wrote {objects} blob files in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let store = Store::open(dir.path()).expect("open");
    let started = Instant::now();
    let (added, _) = store.reconcile().expect("scan");
    println!(
        "scan of a cache without an index: {added} objects in {:.3}s",
        started.elapsed().as_secs_f64()
    );
    drop(store);

    for round in 1..=3 {
        let started = Instant::now();
        let store = Store::open(dir.path()).expect("reopen");
        let ready = started.elapsed();
        assert_eq!(store.usage().1, objects as u64);
        let started = Instant::now();
        store.reconcile().expect("scan");
        println!(
            "round {round}: ready to serve {} objects in {:.3}s; background scan {:.3}s",
            objects,
            ready.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
}

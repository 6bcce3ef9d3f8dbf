//! regcache: a pull-through caching mirror for OCI and Docker registries.
//!
//! Layout (dependencies point down this list):
//! - `http`: the hyper edge; parses every request into a `Route` and maps every error.
//! - `cache`: what to serve: hits, coalesced misses, tag freshness, the cross-repository rule.
//! - `store` / `upstream`: the disk, and the only code that dials out.
//! - `oci`: the spec's types, no IO.

pub mod config;
pub mod oci;
pub mod store;
pub mod metrics;
pub mod upstream;

//! The only code that dials out. `select` maps a request to one of the configured upstreams (never
//! to a host a client typed); `client` speaks the registry API to it with timeouts, retries,
//! redirects and the `WWW-Authenticate` flow from `challenge`.

pub mod challenge;
mod client;
mod select;

pub use client::{Error, ManifestResponse, RawResponse, Upstream};
pub use select::{SelectError, Upstreams};

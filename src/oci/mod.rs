//! The OCI Distribution vocabulary as pure types: digests, repository names, tags, references,
//! registry hosts, media types and the spec's error codes. Nothing here does IO; every other
//! module receives these types already validated, so a raw client string never reaches a path,
//! a URL or a log field unparsed.

pub mod digest;
pub mod error;
pub mod media_type;
pub mod reference;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use error::ErrorCode;
pub use reference::{ImageName, ImageRef, Reference, RegistryHost, RepoName, Tag};

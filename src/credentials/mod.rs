//! Upstream credentials from `kubernetes.io/dockerconfigjson` secrets: the file format
//! (`dockerconfig`), which registry key applies to which request (`key`, the kubelet's rules),
//! and the `Secret` type every credential value is held in, which prints `****`.
//!
//! This module decides which credential a request to an upstream should carry; `upstream`
//! decides how to present it (Basic, token endpoint, bearer).

pub mod dockerconfig;
pub mod key;

pub use crate::config::Secret;
pub use dockerconfig::{Credential, Entry, Format, ParseError};
pub use key::{KeyError, RegistryKey};

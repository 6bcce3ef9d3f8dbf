//! Shared support for the integration tests. Each test binary declares `mod support;` and uses
//! only part of it, hence the blanket `dead_code` allowance.
#![allow(dead_code)]

pub mod fake_kube;
pub mod fake_upstream;
pub mod mirror;
pub mod secret;

//! Registry keys of a dockerconfigjson `auths` map, and which request each one applies to,
//! following the kubelet's rules (`pkg/credentialprovider/keyring.go`): a scheme is ignored, a
//! leading `/v1/` or `/v2/` path is the registry itself, the port must match exactly (no port
//! matches only no port), a host label may be a glob (`*.dkr.ecr.us-east-1.amazonaws.com`, one
//! glob per label, as `filepath.Match`; `?` would start a URL query), a path restricts the key to that repository prefix, and
//! Docker Hub's aliases are one registry. Where several keys match, the most specific wins: the
//! longest path, then a literal host over a glob.
//!
//! One deliberate difference: a path prefix matches whole path segments, so `ghcr.io/org`
//! applies to `ghcr.io/org/app` but not to `ghcr.io/organisation/app` (the kubelet compares
//! strings, which would hand `org`'s credentials to a different owner on the same registry).

use std::fmt;
use std::str::FromStr;

/// Docker Hub's names; a key under any of them is a key for `docker.io`.
const DOCKER_HUB_ALIASES: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// The one name Docker Hub is known by here.
pub fn canonical_host(host: &str) -> &str {
    if DOCKER_HUB_ALIASES.contains(&host) {
        "docker.io"
    } else {
        host
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is empty")]
    Empty,
    #[error("has a scheme other than http or https")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("has user information before the host")]
    UserInfo,
    #[error("has a query or fragment")]
    Query,
    #[error("has a port that is not a number from 1 to 65535")]
    Port,
    #[error("has an invalid host name")]
    Host,
}

/// A parsed registry key, e.g. `registry.example.com:5000/team`, `*.azurecr.io`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryKey {
    /// Lowercase labels, possibly glob patterns; Docker Hub's aliases folded to `docker.io`.
    labels: Vec<String>,
    port: Option<u16>,
    /// Repository path segments the key is restricted to (empty: the whole registry).
    path: Vec<String>,
}

/// How well a key fits a request; a greater value is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    path_segments: usize,
    literal_host: bool,
}

impl FromStr for RegistryKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        let rest = match s.split_once("://") {
            Some((scheme, rest))
                if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") =>
            {
                rest
            }
            Some(_) => return Err(KeyError::Scheme),
            None => s,
        };
        if rest.contains(['?', '#']) {
            return Err(KeyError::Query);
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(KeyError::UserInfo);
        }
        if authority.is_empty() {
            return Err(KeyError::NoHost);
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let valid = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
                let port = valid
                    .then(|| port.parse::<u16>().ok())
                    .flatten()
                    .filter(|p| *p != 0)
                    .ok_or(KeyError::Port)?;
                (host, Some(port))
            }
            None => (authority, None),
        };
        let host = host.to_ascii_lowercase();
        let host = if port.is_none() {
            canonical_host(&host).to_owned()
        } else {
            host
        };
        let labels: Vec<String> = host.split('.').map(str::to_owned).collect();
        let label_ok = |l: &String| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'*'))
        };
        if !labels.iter().all(label_ok) {
            return Err(KeyError::Host);
        }
        let mut segments: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        // `/v1/` and `/v2/` name the registry's API, not a repository (docker's ResolveAuthConfig).
        if matches!(segments.first(), Some(&"v1") | Some(&"v2")) {
            segments.remove(0);
        }
        Ok(RegistryKey {
            labels,
            port,
            path: segments.into_iter().map(str::to_owned).collect(),
        })
    }
}

impl fmt::Display for RegistryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.labels.join("."))?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for segment in &self.path {
            write!(f, "/{segment}")?;
        }
        Ok(())
    }
}

impl RegistryKey {
    fn is_literal(&self) -> bool {
        !self.labels.iter().any(|l| l.contains('*'))
    }

    /// Whether the key applies to some repository on `host`.
    pub fn matches_host(&self, host: &str) -> bool {
        let path = self.path.join("/");
        self.matches(host, &path).is_some()
    }

    /// Whether the key applies to `repo` on `host` (`name[:port]`, as in a registry host), and
    /// how specifically.
    pub fn matches(&self, host: &str, repo: &str) -> Option<Specificity> {
        let host = host.to_ascii_lowercase();
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port.parse::<u16>().ok()?)),
            None => (canonical_host(&host), None),
        };
        if port != self.port {
            return None;
        }
        let target: Vec<&str> = name.split('.').collect();
        if target.len() != self.labels.len()
            || !self
                .labels
                .iter()
                .zip(&target)
                .all(|(pattern, label)| glob(pattern.as_bytes(), label.as_bytes()))
        {
            return None;
        }
        let mut repo_segments = repo.split('/').filter(|s| !s.is_empty());
        if !self
            .path
            .iter()
            .all(|want| repo_segments.next() == Some(want.as_str()))
        {
            return None;
        }
        Some(Specificity {
            path_segments: self.path.len(),
            literal_host: self.is_literal(),
        })
    }
}

/// `*` (any run of characters) within a single host label (`?` cannot appear: a key is a URL,
/// where it starts the query), and `?` as any one character for completeness; the
/// usual two-pointer walk, linear in practice and never exponential.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if *c == b'?' || *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> RegistryKey {
        s.parse()
            .unwrap_or_else(|e| panic!("`{s}` is a valid key: {e}"))
    }

    fn fits(k: &str, host: &str, repo: &str) -> bool {
        key(k).matches(host, repo).is_some()
    }

    #[test]
    fn docker_hub_in_every_spelling_is_one_registry() {
        for k in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "https://docker.io",
            "registry-1.docker.io",
            "https://registry-1.docker.io/v2/",
            "registry.hub.docker.com",
        ] {
            assert_eq!(key(k).to_string(), "docker.io", "{k}");
            for host in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
                assert!(fits(k, host, "library/alpine"), "{k} for {host}");
            }
        }
        assert!(!fits("docker.io", "ghcr.io", "library/alpine"));
    }

    #[test]
    fn schemes_and_api_prefixes_are_ignored() {
        for k in [
            "ghcr.io",
            "https://ghcr.io",
            "http://ghcr.io",
            "HTTPS://GHCR.IO/",
            "ghcr.io/v2/",
            "https://ghcr.io/v1/",
        ] {
            assert_eq!(key(k).to_string(), "ghcr.io", "{k}");
            assert!(fits(k, "ghcr.io", "org/app"), "{k}");
        }
    }

    #[test]
    fn port_must_match_exactly() {
        assert!(fits(
            "registry.example.com:5000",
            "registry.example.com:5000",
            "a/b"
        ));
        assert!(!fits(
            "registry.example.com:5000",
            "registry.example.com",
            "a"
        ));
        assert!(!fits(
            "registry.example.com",
            "registry.example.com:5000",
            "a"
        ));
        assert!(!fits(
            "registry.example.com:5000",
            "registry.example.com:5001",
            "a"
        ));
        assert!(fits(
            "https://registry.example.com:5000/v2/",
            "registry.example.com:5000",
            "a"
        ));
        // With a port the host is not folded: index.docker.io:443 is its own key.
        assert!(!fits("index.docker.io:443", "docker.io", "library/alpine"));
    }

    #[test]
    fn a_path_restricts_to_whole_segments() {
        assert!(fits("ghcr.io/org", "ghcr.io", "org/app"));
        assert!(fits("ghcr.io/org", "ghcr.io", "org/team/app"));
        assert!(fits("https://ghcr.io/v2/org/", "ghcr.io", "org/app"));
        assert!(!fits("ghcr.io/org", "ghcr.io", "organisation/app"));
        assert!(!fits("ghcr.io/org", "ghcr.io", "other/app"));
        assert!(!fits("ghcr.io/org/team", "ghcr.io", "org"));
        assert!(fits("docker.io/library", "docker.io", "library/alpine"));
    }

    #[test]
    fn host_globs_match_one_label_each() {
        let ecr = "*.dkr.ecr.us-east-1.amazonaws.com";
        assert!(fits(
            ecr,
            "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            "app"
        ));
        assert!(!fits(ecr, "dkr.ecr.us-east-1.amazonaws.com", "app"));
        assert!(!fits(ecr, "a.b.dkr.ecr.us-east-1.amazonaws.com", "app"));
        assert!(!fits(
            ecr,
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "app"
        ));
        assert!(fits("*.azurecr.io", "myreg.azurecr.io", "x"));
        assert!(fits("reg-*.example.com", "reg-10.example.com", "x"));
        assert!(!fits("reg-*.example.com", "other.example.com", "x"));
        // `?` starts a URL query, for the kubelet as here, so it is no glob.
        assert_eq!(
            "reg-?.example.com".parse::<RegistryKey>(),
            Err(KeyError::Query)
        );
        assert!(fits("*.example.com:5000", "a.example.com:5000", "x"));
        assert!(!fits("*.example.com:5000", "a.example.com", "x"));
    }

    #[test]
    fn the_most_specific_key_ranks_highest() {
        let s = |k: &str| key(k).matches("ghcr.io", "org/team/app").expect(k);
        assert!(s("ghcr.io/org/team") > s("ghcr.io/org"));
        assert!(s("ghcr.io/org") > s("ghcr.io"));
        assert!(s("ghcr.io") > s("*.io"));
        assert!(s("*.io/org") > s("ghcr.io"));
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert_eq!("".parse::<RegistryKey>(), Err(KeyError::Empty));
        assert_eq!("  ".parse::<RegistryKey>(), Err(KeyError::Empty));
        assert_eq!(
            "ftp://ghcr.io".parse::<RegistryKey>(),
            Err(KeyError::Scheme)
        );
        assert_eq!("https:///org".parse::<RegistryKey>(), Err(KeyError::NoHost));
        assert_eq!(
            "user:pw@ghcr.io".parse::<RegistryKey>(),
            Err(KeyError::UserInfo)
        );
        assert_eq!("ghcr.io?x=1".parse::<RegistryKey>(), Err(KeyError::Query));
        for port in ["ghcr.io:", "ghcr.io:0", "ghcr.io:65536", "ghcr.io:http"] {
            assert_eq!(port.parse::<RegistryKey>(), Err(KeyError::Port), "{port}");
        }
        for host in ["gh cr.io", "ghcr..io", "ghcr.io.", "ghçr.io"] {
            assert_eq!(host.parse::<RegistryKey>(), Err(KeyError::Host), "{host}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(k in "\\PC*", host in "\\PC*", repo in "\\PC*") {
            if let Ok(parsed) = k.parse::<RegistryKey>() {
                let _ = parsed.matches(&host, &repo);
                // The canonical form is a key too.
                prop_assert!(parsed.to_string().parse::<RegistryKey>().is_ok());
            }
        }
    }
}

//! Repository names, tags, references (tag or digest) and registry hosts, each validated
//! against the distribution spec's grammar when parsed. A `RepoName` is safe to join into a
//! path or a URL because the grammar admits only `[a-z0-9]`, single separators and `/`.

use std::fmt;
use std::str::FromStr;

use super::digest::{self, Digest};

/// Longest repository name accepted, as in CNCF Distribution.
pub const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "repository name must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*"
    )]
    NameGrammar,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    NameLength,
    #[error("tag must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag,
    #[error("invalid digest: {0}")]
    Digest(#[from] digest::Error),
    #[error("registry host must be a host name or IP address with an optional :port")]
    Host,
}

/// A repository name such as `library/alpine` (without any registry host).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path components, each non-empty and free of `.`/`..` by construction.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// `library/<name>` for Docker Hub's one-component official images.
    pub fn with_library_prefix(&self) -> RepoName {
        if self.0.contains('/') {
            self.clone()
        } else {
            RepoName(format!("library/{}", self.0).into())
        }
    }
}

impl FromStr for RepoName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() > MAX_NAME_LEN {
            return Err(Error::NameLength);
        }
        if s.is_empty() || !s.split('/').all(is_name_component) {
            return Err(Error::NameGrammar);
        }
        Ok(RepoName(s.into()))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_name_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let mut i = 0;
    loop {
        // a run of alphanumerics, at least one
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // one separator: ".", "_", "__" or "-+"
        let sep_start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        match &c[sep_start..i] {
            "." | "_" | "__" => {}
            sep if sep.bytes().all(|b| b == b'-') => {}
            _ => return false,
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tag such as `latest` or `1.27-alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bytes = s.as_bytes();
        let first_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let rest_ok = |b: u8| first_ok(b) || b == b'.' || b == b'-';
        match bytes.split_first() {
            Some((&first, rest))
                if first_ok(first)
                    && bytes.len() <= MAX_TAG_LEN
                    && rest.iter().all(|&b| rest_ok(b)) =>
            {
                Ok(Tag(s.into()))
            }
            _ => Err(Error::Tag),
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest request names: a tag, resolved through the tag cache, or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = Error;

    /// A reference with a `:` can only be a digest (tags exclude `:`).
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// A registry host as clients name it: `docker.io`, `ghcr.io`, `registry.example.com:5000`,
/// `10.0.0.1:5000`, `localhost:5000`. Stored lowercase; hosts are case-insensitive.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(Box<str>);

impl RegistryHost {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker's rule for telling a registry host from a first name component: it has a `.` or
    /// a `:`, or it is `localhost`.
    pub fn looks_like_host(component: &str) -> bool {
        component.contains('.') || component.contains(':') || component == "localhost"
    }
}

impl FromStr for RegistryHost {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if let Some(p) = port {
            let valid =
                p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n != 0);
            if !valid {
                return Err(Error::Host);
            }
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(Error::Host);
        }
        Ok(RegistryHost(s.to_ascii_lowercase().into()))
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A name as it appears in a request path: a repository, possibly behind a registry host
/// (`ghcr.io/org/app`) for clients that can only prefix a path. Which reading applies depends
/// on whether the request also carried `ns`, so both are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName {
    /// The host-named first component, if the first component looks like a host.
    pub host: Option<RegistryHost>,
    /// The rest after a host prefix, or the whole name.
    pub repo: RepoName,
    /// The whole name read as a repository name, when that is valid (`my.org/app` is both).
    pub whole: Option<RepoName>,
}

impl FromStr for ImageName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let whole = s.parse::<RepoName>();
        match s.split_once('/') {
            Some((first, rest)) if RegistryHost::looks_like_host(first) => Ok(ImageName {
                host: Some(first.parse()?),
                repo: rest.parse()?,
                whole: whole.ok(),
            }),
            _ => {
                let repo = whole?;
                Ok(ImageName {
                    host: None,
                    whole: Some(repo.clone()),
                    repo,
                })
            }
        }
    }
}

/// An image as an operator names it: `[host/]repository[:tag][@digest]`, such as
/// `docker.io/library/nginx:1.27` or `ghcr.io/org/app@sha256:...`. With neither a tag nor a
/// digest the tag is `latest`, as for `docker pull`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub name: ImageName,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl FromStr for ImageRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest.parse::<Digest>()?)),
            None => (s, None),
        };
        // A `:` after the last `/` starts the tag; one before it is a registry port.
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag.parse::<Tag>()?)),
            _ => (rest, None),
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".parse()?),
            (tag, _) => tag,
        };
        Ok(ImageRef {
            name: name.parse()?,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn image_references_split_into_name_tag_and_digest() {
        let r: ImageRef = "docker.io/library/nginx:1.27".parse().expect("valid");
        assert_eq!(r.name.host.as_ref().map(|h| h.as_str()), Some("docker.io"));
        assert_eq!(r.name.repo.as_str(), "library/nginx");
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("1.27"));
        let digest = format!("sha256:{}", "a".repeat(64));
        let r: ImageRef = format!("localhost:5000/team/app@{digest}")
            .parse()
            .expect("valid");
        assert_eq!(
            r.name.host.as_ref().map(|h| h.as_str()),
            Some("localhost:5000")
        );
        assert_eq!(r.tag, None);
        assert_eq!(
            r.digest.as_ref().map(|d| d.to_string()),
            Some(digest.clone())
        );
        let r: ImageRef = "alpine".parse().expect("valid");
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("latest"));
        let r: ImageRef = format!("ghcr.io/org/app:v1@{digest}")
            .parse()
            .expect("valid");
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("v1"));
        assert!(r.digest.is_some());
        for bad in ["", "Nginx", "nginx:", "nginx@sha256:abc", "nginx:a/b:c"] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/app_1",
            "a__b",
            "a.b-c--d/e",
            "0",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok} should parse");
        }
        for bad in [
            "",
            "Alpine",
            "a//b",
            "/a",
            "a/",
            "a/../b",
            "..",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "a_",
            "a:b",
            "a b",
            "a%2fb",
            "ghcr.io/../x",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad} should be refused");
        }
        assert_eq!("a".repeat(256).parse::<RepoName>(), Err(Error::NameLength));
    }

    #[test]
    fn library_prefix_only_for_single_components() {
        let alpine: RepoName = "alpine".parse().expect("valid");
        assert_eq!(alpine.with_library_prefix().as_str(), "library/alpine");
        let nested: RepoName = "org/app".parse().expect("valid");
        assert_eq!(nested.with_library_prefix().as_str(), "org/app");
    }

    #[test]
    fn tags_and_references() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_v1.2-rc".parse::<Tag>().is_ok());
        assert!(".hidden".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        assert!(matches!("3.19".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!(matches!(
            "sha256:zz".parse::<Reference>(),
            Err(Error::Digest(_))
        ));
        assert!(matches!("bad/tag".parse::<Reference>(), Err(Error::Tag)));
    }

    #[test]
    fn registry_hosts() {
        for ok in [
            "docker.io",
            "registry.example.com:5000",
            "localhost:5000",
            "10.0.0.1:5000",
            "GHCR.io",
        ] {
            assert!(ok.parse::<RegistryHost>().is_ok(), "{ok} should parse");
        }
        assert_eq!(
            "GHCR.io".parse::<RegistryHost>().map(|h| h.to_string()),
            Ok("ghcr.io".into())
        );
        for bad in [
            "",
            "a..b",
            "-a.io",
            "a.io:0",
            "a.io:99999",
            "a.io:",
            "a/b",
            "user@a.io",
            "a.io:5000:1",
        ] {
            assert!(
                bad.parse::<RegistryHost>().is_err(),
                "{bad} should be refused"
            );
        }
        assert!(RegistryHost::looks_like_host("ghcr.io"));
        assert!(RegistryHost::looks_like_host("localhost"));
        assert!(!RegistryHost::looks_like_host("library"));
    }

    #[test]
    fn image_names_with_and_without_a_host() {
        let n: ImageName = "ghcr.io/org/app".parse().expect("valid");
        assert_eq!(n.host.map(|h| h.to_string()), Some("ghcr.io".into()));
        assert_eq!(n.repo.as_str(), "org/app");
        assert_eq!(
            n.whole.map(|w| w.to_string()),
            Some("ghcr.io/org/app".into())
        );
        let n: ImageName = "localhost:5000/app".parse().expect("valid");
        assert!(n.whole.is_none());
        let n: ImageName = "library/alpine".parse().expect("valid");
        assert!(n.host.is_none());
        assert!(
            "ghcr.io".parse::<ImageName>().is_ok(),
            "a lone component is a repository"
        );
        assert!("bad_host_:1/app".parse::<ImageName>().is_err());
        assert!("ghcr.io/".parse::<ImageName>().is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = s.parse::<RepoName>();
            let _ = s.parse::<Reference>();
            let _ = s.parse::<RegistryHost>();
            let _ = s.parse::<ImageName>();
        }

        #[test]
        fn grammar_names_are_accepted(s in "[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}(/[a-z0-9]{1,5}){0,3}") {
            let name: RepoName = s.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(name.to_string(), s);
        }
    }
}

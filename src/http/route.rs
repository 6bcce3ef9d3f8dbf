//! Turns a request path into a `Route` carrying validated types, once, before anything touches
//! the store or an upstream. Names contain slashes, so the action (`manifests`, `blobs`,
//! `tags/list`, `referrers`) is found from the right.

use crate::oci::reference::Error as RefError;
use crate::oci::{Digest, ImageName, Reference};

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    Manifest {
        name: ImageName,
        reference: Reference,
    },
    Blob {
        name: ImageName,
        digest: Digest,
    },
    Tags {
        name: ImageName,
    },
    Referrers {
        name: ImageName,
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/...`: the push API this mirror does not offer.
    Upload,
    Metrics,
    Healthz,
    Readyz,
    /// `/admin/credentials`, when `credentials.admin_endpoint` is on.
    AdminCredentials,
    /// `/token`: the registry token endpoint (when access control is on).
    Token,
}

impl Route {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Upload => "upload",
            Route::Metrics => "metrics",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::AdminCredentials => "admin",
            Route::Token => "token",
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no such API path")]
    NotFound,
    #[error("invalid repository name: {0}")]
    Name(RefError),
    #[error("invalid tag: {0}")]
    Tag(RefError),
    #[error("invalid digest: {0}")]
    Digest(crate::oci::digest::Error),
}

pub fn parse(path: &str) -> Result<Route, Error> {
    match path {
        "/metrics" => return Ok(Route::Metrics),
        "/healthz" => return Ok(Route::Healthz),
        "/readyz" => return Ok(Route::Readyz),
        "/admin/credentials" => return Ok(Route::AdminCredentials),
        "/token" => return Ok(Route::Token),
        "/v2" | "/v2/" => return Ok(Route::Base),
        _ => {}
    }
    let rest = path.strip_prefix("/v2/").ok_or(Error::NotFound)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    if n < 3 {
        return Err(Error::NotFound);
    }
    let name = |end: usize| {
        segments[..end]
            .join("/")
            .parse::<ImageName>()
            .map_err(Error::Name)
    };
    if let Some(i) = segments.iter().rposition(|s| *s == "blobs")
        && segments.get(i + 1) == Some(&"uploads")
    {
        return Ok(Route::Upload);
    }
    let digest = |s: &str| s.parse::<Digest>().map_err(Error::Digest);
    match (segments[n - 2], segments[n - 1]) {
        ("tags", "list") => Ok(Route::Tags { name: name(n - 2)? }),
        ("manifests", reference) => {
            let name = name(n - 2)?;
            let reference = reference.parse::<Reference>().map_err(|e| match e {
                RefError::Digest(d) => Error::Digest(d),
                other => Error::Tag(other),
            })?;
            Ok(Route::Manifest { name, reference })
        }
        ("blobs", d) => {
            let name = name(n - 2)?;
            Ok(Route::Blob {
                name,
                digest: digest(d)?,
            })
        }
        ("referrers", d) => {
            let name = name(n - 2)?;
            Ok(Route::Referrers {
                name,
                digest: digest(d)?,
            })
        }
        _ => Err(Error::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_what_clients_send() {
        assert_eq!(parse("/v2/"), Ok(Route::Base));
        let r = parse("/v2/library/alpine/manifests/latest").expect("valid");
        assert!(matches!(
            r,
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            }
        ));
        let r = parse(&format!("/v2/ghcr.io/org/app/blobs/{D}")).expect("valid");
        match r {
            Route::Blob { name, .. } => {
                assert_eq!(
                    name.host.map(|h| h.to_string()),
                    Some("ghcr.io".to_string())
                );
                assert_eq!(name.repo.as_str(), "org/app");
            }
            other => panic!("unexpected route {other:?}"),
        }
        assert!(matches!(
            parse("/v2/a/blobs/tags/list"),
            Ok(Route::Tags { .. })
        ));
        assert!(matches!(
            parse(&format!("/v2/a/referrers/{D}")),
            Ok(Route::Referrers { .. })
        ));
        assert!(matches!(parse("/v2/a/blobs/uploads/"), Ok(Route::Upload)));
        assert!(matches!(
            parse("/v2/a/blobs/uploads/uuid-1"),
            Ok(Route::Upload)
        ));
    }

    #[test]
    fn refuses_bad_input_with_the_right_error() {
        assert!(matches!(
            parse("/v2/UPPER/manifests/latest"),
            Err(Error::Name(_))
        ));
        assert!(matches!(
            parse("/v2/a/../b/manifests/latest"),
            Err(Error::Name(_))
        ));
        assert!(matches!(
            parse("/v2/a/manifests/bad!tag"),
            Err(Error::Tag(_))
        ));
        assert!(matches!(
            parse("/v2/a/manifests/sha256:abc"),
            Err(Error::Digest(_))
        ));
        assert!(matches!(parse("/v2/a/blobs/latest"), Err(Error::Digest(_))));
        assert!(matches!(parse("/v2/a/b"), Err(Error::NotFound)));
        assert!(matches!(parse("/other"), Err(Error::NotFound)));
    }

    proptest! {
        #[test]
        fn never_panics(s in "/v2/\\PC*") {
            let _ = parse(&s);
        }
    }
}

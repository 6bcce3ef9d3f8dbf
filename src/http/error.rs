//! Every failure becomes one `ApiError`: a status, a spec error code, a message safe to show
//! (no credentials, local paths or upstream bodies), and the side at fault, which picks the log
//! level. All the mapping is here, in exhaustive matches.

use http::{HeaderValue, StatusCode};

use super::route;
use crate::cache;
use crate::oci::ErrorCode;
use crate::upstream::{self, SelectError};

/// Who caused an error: decides the log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Ours,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub fault: Fault,
    pub retry_after: Option<HeaderValue>,
    /// The `WWW-Authenticate` challenge of a 401.
    pub challenge: Option<Box<HeaderValue>>,
    /// The full chain, for the log line only.
    pub source: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: ErrorCode,
        message: impl Into<String>,
        fault: Fault,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            fault,
            retry_after: None,
            challenge: None,
            source: None,
        }
    }

    fn with_source(mut self, e: &dyn std::error::Error) -> ApiError {
        let mut chain = e.to_string();
        let mut next = e.source();
        while let Some(s) = next {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            next = s.source();
        }
        self.source = Some(chain);
        self
    }

    pub fn unsupported() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "this mirror serves pulls only; push to the upstream registry",
            Fault::Client,
        )
    }
}

impl From<route::Error> for ApiError {
    fn from(e: route::Error) -> ApiError {
        ApiError::from(&e)
    }
}

impl From<&route::Error> for ApiError {
    fn from(e: &route::Error) -> ApiError {
        let (status, code) = match e {
            route::Error::NotFound => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            route::Error::Name(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            route::Error::Tag(_) => (StatusCode::BAD_REQUEST, ErrorCode::TagInvalid),
            route::Error::Digest(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
        };
        ApiError::new(status, code, e.to_string(), Fault::Client)
    }
}

impl From<SelectError> for ApiError {
    fn from(e: SelectError) -> ApiError {
        let (status, code) = match &e {
            SelectError::NotConfigured(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            SelectError::BadNamespace | SelectError::NameInvalid => {
                (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
            }
        };
        ApiError::new(status, code, e.to_string(), Fault::Client)
    }
}

impl From<&upstream::Error> for ApiError {
    fn from(e: &upstream::Error) -> ApiError {
        let api = match e {
            upstream::Error::Config(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unavailable,
                "the mirror's upstream configuration is broken",
                Fault::Ours,
            ),
            // Only reached for requests the cache cannot answer itself, such as a tag list of
            // a repository never seeded: for an offline upstream that is simply unknown.
            upstream::Error::Offline { upstream } => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                format!("upstream {upstream} is offline and this is not cached"),
                Fault::Client,
            ),
            upstream::Error::Unreachable { upstream, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                format!("upstream {upstream} could not be reached"),
                Fault::Upstream,
            ),
            upstream::Error::Status {
                upstream,
                status,
                retry_after,
            } => match *status {
                StatusCode::TOO_MANY_REQUESTS => ApiError {
                    retry_after: retry_after.clone(),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::TooManyRequests,
                        format!("upstream {upstream} is rate limiting this mirror"),
                        Fault::Upstream,
                    )
                },
                StatusCode::NOT_FOUND => ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NameUnknown,
                    format!("upstream {upstream} does not know this repository"),
                    Fault::Client,
                ),
                // The mirror's own credentials were refused: an operator's problem, not the
                // client's, so it must not look like a client authentication error.
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    format!("upstream {upstream} refused the mirror's credentials ({status})"),
                    Fault::Upstream,
                ),
                _ => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    format!("upstream {upstream} failed ({status})"),
                    Fault::Upstream,
                ),
            },
            upstream::Error::Token { upstream, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                format!("upstream {upstream} did not issue a token to the mirror"),
                Fault::Upstream,
            ),
            upstream::Error::TooLarge { upstream, limit } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::ManifestInvalid,
                format!("upstream {upstream} sent a document over the {limit}-byte limit"),
                Fault::Upstream,
            ),
            upstream::Error::Invalid { upstream, .. } | upstream::Error::Body { upstream, .. } => {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    format!("upstream {upstream} sent a broken response"),
                    Fault::Upstream,
                )
            }
        };
        api.with_source(e)
    }
}

impl From<&cache::Error> for ApiError {
    fn from(e: &cache::Error) -> ApiError {
        match e {
            cache::Error::ManifestUnknown => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::ManifestUnknown,
                "manifest unknown",
                Fault::Client,
            ),
            cache::Error::BlobUnknown => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BlobUnknown,
                "blob unknown",
                Fault::Client,
            ),
            cache::Error::ManifestDigestMismatch => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                "the upstream sent a manifest that does not match its digest",
                Fault::Upstream,
            ),
            cache::Error::Upstream(u) => ApiError::from(u),
            cache::Error::Store(s) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unavailable,
                "the mirror's cache failed",
                Fault::Ours,
            )
            .with_source(s),
            cache::Error::Fill(inner) => ApiError::from(&**inner),
            cache::Error::FillAbandoned => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                "the download from the upstream was abandoned",
                Fault::Upstream,
            ),
        }
    }
}

impl From<cache::Error> for ApiError {
    fn from(e: cache::Error) -> ApiError {
        ApiError::from(&e)
    }
}

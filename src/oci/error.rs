//! The distribution spec's error codes and the `{"errors":[...]}` body every API error carries.

use serde::Serialize;

/// Error codes from the distribution spec (plus `TOOMANYREQUESTS`, which Docker Hub and
/// Distribution use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Not a spec code; used for the mirror's own and its upstreams' failures (5xx).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

/// The JSON body for one error.
pub fn body(code: ErrorCode, message: &str, detail: Option<&str>) -> Vec<u8> {
    let body = Body {
        errors: [Entry {
            code: code.as_str(),
            message,
            detail,
        }],
    };
    serde_json::to_vec(&body).expect("a struct of strings always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_spec_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&body(ErrorCode::NameInvalid, "bad \"name\"", None))
                .expect("json");
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad \"name\"");
        assert!(v["errors"][0].get("detail").is_none());
    }
}

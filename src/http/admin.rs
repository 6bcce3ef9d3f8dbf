//! Admin endpoints, off unless configured. `GET /admin/credentials`: per upstream, the
//! credentials that apply (source, user name, kind, load time), values always masked; there is
//! no way to reveal them over HTTP. Who may call an admin endpoint is decided in `allowed` only.

use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};

use super::body::{self, Body};
use super::error::{ApiError, Fault};
use crate::config::Config;
use crate::credentials::{self, Credentials};
use crate::oci::ErrorCode;

/// What `GET /admin/credentials` reads.
pub struct CredentialsAdmin {
    pub config: Config,
    pub set: Arc<Credentials>,
}

/// Whether `req` may use the admin endpoints beyond what the access gate (`http::auth::gate`)
/// already decided: with access control on, only members of `access.groups.admins` reach this
/// point; with it off, anyone who can reach the listener (loopback only, as configuration
/// validation requires) once `credentials.admin_endpoint` is on.
pub fn allowed<B>(_req: &Request<B>) -> bool {
    true
}

pub fn credentials<B>(
    admin: Option<&CredentialsAdmin>,
    req: &Request<B>,
) -> Result<Response<Body>, ApiError> {
    let Some(admin) = admin else {
        // Off: indistinguishable from a path that does not exist.
        return Err(ApiError::from(super::route::Error::NotFound));
    };
    if !allowed(req) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Denied,
            "not allowed",
            Fault::Client,
        ));
    }
    let rows: Vec<serde_json::Value> = credentials::list(&admin.config, &admin.set)
        .iter()
        .map(|row| row.to_json(false))
        .collect();
    let errors: Vec<serde_json::Value> = admin
        .set
        .errors()
        .into_iter()
        .map(|(path, error)| serde_json::json!({"source": path, "error": error}))
        .collect();
    let json = serde_json::json!({ "credentials": rows, "errors": errors });
    let mut resp = Response::new(body::full(json.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

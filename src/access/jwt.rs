//! The registry tokens `/token` issues: compact JWS, HMAC-SHA256 over a key only this mirror
//! holds, carrying the identity (`sub`) and the repositories granted (`access`, as the
//! distribution token spec spells it). Clients treat them as opaque; only regcache verifies
//! them, so a symmetric key is enough. Verification accepts exactly `HS256`, checks the
//! signature in constant time, then issuer, audience and time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const ISSUER: &str = "regcache";
pub const SERVICE: &str = "regcache";
/// Allowed clock difference for `nbf`/`iat` (one process signs and verifies, but be kind).
const LEEWAY: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a token this mirror issued")]
    Malformed,
    #[error("token signature does not verify")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token is for another issuer or audience")]
    Audience,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

impl Claims {
    /// Whether the token grants pull on the repository named `name` in the request path.
    pub fn grants_pull(&self, name: &str) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository" && a.name == name && a.actions.iter().any(|x| x == "pull")
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
}

/// The signing key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(****)")
    }
}

impl Key {
    /// At least 32 bytes of secret material.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, String> {
        if bytes.len() < 32 {
            return Err(
                "the signing key must be at least 32 bytes (e.g. `openssl rand -base64 48`)".into(),
            );
        }
        Ok(Key(bytes.to_vec()))
    }

    pub fn generate() -> Key {
        let mut k = Vec::with_capacity(32);
        k.extend_from_slice(&rand::random::<u128>().to_le_bytes());
        k.extend_from_slice(&rand::random::<u128>().to_le_bytes());
        Key(k)
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// Signs a token for `sub` granting `access`, valid for `ttl` from `now`.
    pub fn issue(
        &self,
        sub: &str,
        access: Vec<Access>,
        now: SystemTime,
        ttl: Duration,
    ) -> (String, Claims) {
        let iat = secs(now);
        let claims = Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: SERVICE.into(),
            exp: iat + ttl.as_secs(),
            nbf: iat,
            iat,
            jti: format!("{:032x}", rand::random::<u128>()),
            access,
        };
        let header = Header {
            alg: "HS256".into(),
            typ: "JWT".into(),
        };
        let enc = |v: &[u8]| B64.encode(v);
        let signing_input = format!(
            "{}.{}",
            enc(&serde_json::to_vec(&header).expect("a header serializes")),
            enc(&serde_json::to_vec(&claims).expect("claims serialize"))
        );
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = mac.finalize().into_bytes();
        (format!("{signing_input}.{}", enc(&sig)), claims)
    }

    /// Checks signature, issuer, audience and time; returns the claims.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, Error> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(Error::Malformed)?;
        if header.alg != "HS256" {
            return Err(Error::Malformed);
        }
        let sig = B64.decode(s).map_err(|_| Error::Malformed)?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(c.as_bytes());
        mac.verify_slice(&sig).map_err(|_| Error::Signature)?;
        let claims: Claims = B64
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(Error::Malformed)?;
        if claims.iss != ISSUER || claims.aud != SERVICE {
            return Err(Error::Audience);
        }
        let now = secs(now);
        if claims.exp <= now {
            return Err(Error::Expired);
        }
        if claims.nbf > now + LEEWAY {
            return Err(Error::Expired);
        }
        Ok(claims)
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(name: &str) -> Access {
        Access {
            kind: "repository".into(),
            name: name.into(),
            actions: vec!["pull".into()],
        }
    }

    #[test]
    fn issued_tokens_verify_and_grant_only_their_scope() {
        let key = Key::generate();
        let now = SystemTime::now();
        let (token, _) = key.issue(
            "user:alice",
            vec![pull("library/alpine")],
            now,
            Duration::from_secs(300),
        );
        let claims = key.verify(&token, now).expect("valid");
        assert_eq!(claims.sub, "user:alice");
        assert!(claims.grants_pull("library/alpine"));
        assert!(!claims.grants_pull("library/busybox"), "wrong scope");
    }

    #[test]
    fn tampered_expired_and_foreign_tokens_are_refused() {
        let key = Key::generate();
        let now = SystemTime::now();
        let (token, _) = key.issue("user:alice", vec![pull("a")], now, Duration::from_secs(300));
        // Tampered claims: grant another repository, keep the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: Claims =
            serde_json::from_slice(&B64.decode(parts[1]).expect("b64")).expect("json");
        claims.access = vec![pull("b")];
        claims.sub = "user:root".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&claims).expect("json")),
            parts[2]
        );
        assert_eq!(key.verify(&forged, now), Err(Error::Signature));
        // Tampered signature.
        let mut bad_sig = token.clone();
        let last = bad_sig.pop().expect("non-empty");
        bad_sig.push(if last == 'A' { 'B' } else { 'A' });
        assert!(key.verify(&bad_sig, now).is_err());
        // Expired.
        assert_eq!(
            key.verify(&token, now + Duration::from_secs(301)),
            Err(Error::Expired)
        );
        // Another key.
        assert_eq!(Key::generate().verify(&token, now), Err(Error::Signature));
        // alg=none.
        let none_header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert_eq!(key.verify(&unsigned, now), Err(Error::Malformed));
        // Garbage.
        assert_eq!(key.verify("rcp_notajwt", now), Err(Error::Malformed));
        assert_eq!(key.verify("a.b.c.d", now), Err(Error::Malformed));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Key::from_bytes(b"short").is_err());
        assert!(Key::from_bytes(&[7u8; 32]).is_ok());
    }
}

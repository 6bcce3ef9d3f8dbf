//! `WWW-Authenticate` challenges from upstreams (RFC 7235 auth-params), and the bearer tokens
//! their token endpoints hand out, cached per scope until shortly before they expire.

use std::collections::HashMap;

use tokio::time::{Duration, Instant};

/// What an upstream asked for on a 401.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses the first challenge we can answer; `None` for schemes we do not speak.
pub fn parse(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = auth_params(rest);
    let realm = params.get("realm")?.clone();
    if realm.is_empty() {
        return None;
    }
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
    })
}

/// `key=value` or `key="quoted, \"escaped\""` pairs separated by commas; keys lowercased.
fn auth_params(s: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            return params;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars
                .by_ref()
                .take_while(|c| *c != ',')
                .collect::<String>()
                .trim()
                .to_owned();
        }
        params.insert(key, value);
    }
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    pub value: crate::config::Secret,
    pub expires_at: Instant,
}

/// The token endpoint's answer (Docker's token spec: `token`, or the OAuth2 `access_token`).
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Tokens shorter-lived than this are not worth caching; the spec's default lifetime is 60 s.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// Stop using a token this long before it expires, so it never expires in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

impl TokenResponse {
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.filter(|t| !t.is_empty()).or(self.access_token)?;
        if value.is_empty() {
            return None;
        }
        let lifetime = self
            .expires_in
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        Some(Token {
            value: crate::config::Secret::new(value),
            expires_at: now + lifetime.saturating_sub(EXPIRY_MARGIN),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn docker_hub_challenge() {
        let c = parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
    }

    #[test]
    fn basic_unquoted_and_escaped() {
        assert_eq!(
            parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse("basic"), Some(Challenge::Basic));
        let c = parse(r#"Bearer service=reg, realm="https://x/t\"q""#);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://x/t\"q".into(),
                service: Some("reg".into())
            })
        );
        assert_eq!(parse("Bearer service=x"), None);
        assert_eq!(parse("Negotiate abc"), None);
    }

    #[test]
    fn token_lifetime_and_fallback_fields() {
        let now = Instant::now();
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).expect("json");
        let token = t.into_token(now).expect("token");
        assert_eq!(token.value.expose(), "a");
        assert_eq!(token.expires_at, now + Duration::from_secs(290));
        let empty: TokenResponse = serde_json::from_str(r#"{"token":""}"#).expect("json");
        assert!(empty.into_token(now).is_none());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse(&s);
        }
    }
}

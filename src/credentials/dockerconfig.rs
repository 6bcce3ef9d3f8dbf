//! The `kubernetes.io/dockerconfigjson` format (`{"auths": {KEY: ENTRY}}`, Docker's
//! `config.json`) and the legacy `kubernetes.io/dockercfg` one (`{KEY: ENTRY}`), parsed into
//! registry keys and credentials.
//!
//! An entry may carry `auth` (base64 of `user:password`, which wins over separate fields, as in
//! the kubelet), `username`/`password`, `identitytoken` (an OAuth2 refresh token for the
//! registry's token endpoint) or `registrytoken` (a bearer token sent as is). The JSON is first
//! read as an untyped value and then walked by hand, so no error message can quote a value:
//! errors name the registry key and the field, never what was in it.

use base64::Engine as _;
use serde_json::{Map, Value};

use super::key::{KeyError, RegistryKey};
use crate::config::Secret;

/// Which of the two layouts a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.dockerconfigjson`, Docker's `config.json`: credentials under `auths`.
    ConfigJson,
    /// `.dockercfg`: the `auths` map itself at the top level.
    Dockercfg,
}

/// One credential, in the form the registry will be shown it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// HTTP Basic, also presented to a token endpoint for a bearer token.
    Basic { username: String, password: Secret },
    /// An OAuth2 refresh token, exchanged at the token endpoint (`grant_type=refresh_token`).
    IdentityToken { username: String, token: Secret },
    /// A bearer token sent to the registry as it is.
    RegistryToken { token: Secret },
}

impl Credential {
    /// The kind, as `credentials list` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Basic { .. } => "basic",
            Credential::IdentityToken { .. } => "identitytoken",
            Credential::RegistryToken { .. } => "registrytoken",
        }
    }

    pub fn username(&self) -> Option<&str> {
        match self {
            Credential::Basic { username, .. } | Credential::IdentityToken { username, .. } => {
                Some(username)
            }
            Credential::RegistryToken { .. } => None,
        }
    }

    /// The secret part (password or token); shown only on explicit request.
    pub fn secret(&self) -> &Secret {
        match self {
            Credential::Basic { password, .. } => password,
            Credential::IdentityToken { token, .. } | Credential::RegistryToken { token } => token,
        }
    }
}

/// A registry key with its credential, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: RegistryKey,
    pub credential: Credential,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not valid JSON (line {line}, column {column})")]
    Json { line: usize, column: usize },
    #[error("the document is not a JSON object")]
    NotAnObject,
    #[error("no `auths` object")]
    NoAuths,
    #[error("registry key `{key}` {reason}")]
    Key { key: String, reason: KeyError },
    #[error("the entry for `{key}` is not a JSON object")]
    EntryNotAnObject { key: String },
    #[error("`{field}` of `{key}` is not a string")]
    FieldType { key: String, field: &'static str },
    #[error("`auth` of `{key}` is not valid base64")]
    Base64 { key: String },
    #[error("`auth` of `{key}` does not decode to UTF-8 `user:password`")]
    AuthForm { key: String },
    #[error(
        "the entry for `{key}` has no credential (auth, username/password, identitytoken or registrytoken)"
    )]
    NoCredential { key: String },
}

/// Parses a whole file. Refuses the whole file on any bad entry: a half-read secret is not
/// what the operator wrote, and the last good one is kept instead.
pub fn parse(bytes: &[u8], format: Format) -> Result<Vec<Entry>, ParseError> {
    let document: Value = serde_json::from_slice(bytes).map_err(|e| ParseError::Json {
        line: e.line(),
        column: e.column(),
    })?;
    let Value::Object(document) = document else {
        return Err(ParseError::NotAnObject);
    };
    let auths = match format {
        Format::ConfigJson => match document.get("auths") {
            Some(Value::Object(auths)) => auths.clone(),
            _ => return Err(ParseError::NoAuths),
        },
        Format::Dockercfg => document,
    };
    let mut entries = Vec::with_capacity(auths.len());
    for (key, entry) in &auths {
        let parsed_key: RegistryKey = key.parse().map_err(|reason| ParseError::Key {
            key: key.clone(),
            reason,
        })?;
        let Value::Object(entry) = entry else {
            return Err(ParseError::EntryNotAnObject { key: key.clone() });
        };
        entries.push(Entry {
            key: parsed_key,
            credential: credential(key, entry)?,
        });
    }
    Ok(entries)
}

fn credential(key: &str, entry: &Map<String, Value>) -> Result<Credential, ParseError> {
    let field = |name: &'static str| -> Result<Option<&str>, ParseError> {
        match entry.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ParseError::FieldType {
                key: key.to_owned(),
                field: name,
            }),
        }
    };
    if let Some(token) = field("registrytoken")? {
        return Ok(Credential::RegistryToken {
            token: Secret::new(token),
        });
    }
    let (mut username, mut password) = (
        field("username")?.map(str::to_owned),
        field("password")?.map(str::to_owned),
    );
    if let Some(auth) = field("auth")? {
        let (user, pass) = decode_auth(key, auth)?;
        username = Some(user);
        password = Some(pass);
    }
    if let Some(token) = field("identitytoken")? {
        return Ok(Credential::IdentityToken {
            username: username.unwrap_or_default(),
            token: Secret::new(token),
        });
    }
    match (username, password) {
        (Some(username), Some(password)) => Ok(Credential::Basic {
            username,
            password: Secret::new(password),
        }),
        _ => Err(ParseError::NoCredential {
            key: key.to_owned(),
        }),
    }
}

/// `base64(user:password)`; padding optional, surrounding whitespace ignored.
fn decode_auth(key: &str, auth: &str) -> Result<(String, String), ParseError> {
    let auth = auth.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth))
        .map_err(|_| ParseError::Base64 {
            key: key.to_owned(),
        })?;
    let text = String::from_utf8(bytes).map_err(|_| ParseError::AuthForm {
        key: key.to_owned(),
    })?;
    let (user, pass) = text.split_once(':').ok_or_else(|| ParseError::AuthForm {
        key: key.to_owned(),
    })?;
    Ok((user.to_owned(), pass.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn one(json: &str) -> Credential {
        let entries = parse(json.as_bytes(), Format::ConfigJson).expect("valid");
        assert_eq!(entries.len(), 1);
        entries[0].credential.clone()
    }

    fn basic(user: &str, pass: &str) -> Credential {
        Credential::Basic {
            username: user.into(),
            password: Secret::new(pass),
        }
    }

    #[test]
    fn what_kubectl_create_secret_writes() {
        // kubectl create secret docker-registry writes username, password, email and auth.
        let json = format!(
            r#"{{"auths":{{"registry.example.com:5000":{{"username":"bot","password":"s3cr:et","email":"a@b","auth":"{}"}}}}}}"#,
            b64("bot:s3cr:et")
        );
        let entries = parse(json.as_bytes(), Format::ConfigJson).expect("valid");
        assert_eq!(entries[0].key.to_string(), "registry.example.com:5000");
        assert_eq!(entries[0].credential, basic("bot", "s3cr:et"));
    }

    #[test]
    fn auth_wins_over_separate_fields_and_padding_is_optional() {
        let json = format!(
            r#"{{"auths":{{"ghcr.io":{{"username":"old","password":"old","auth":"{}"}}}}}}"#,
            b64("new:pw").trim_end_matches('=')
        );
        assert_eq!(one(&json), basic("new", "pw"));
        assert_eq!(
            one(r#"{"auths":{"ghcr.io":{"username":"u","password":"p"}}}"#),
            basic("u", "p")
        );
    }

    #[test]
    fn tokens() {
        let json = format!(
            r#"{{"auths":{{"myreg.azurecr.io":{{"auth":"{}","identitytoken":"refresh"}}}}}}"#,
            b64("00000000-0000-0000-0000-000000000000:")
        );
        assert_eq!(
            one(&json),
            Credential::IdentityToken {
                username: "00000000-0000-0000-0000-000000000000".into(),
                token: Secret::new("refresh")
            }
        );
        assert_eq!(
            one(r#"{"auths":{"ghcr.io":{"registrytoken":"bearer-xyz"}}}"#),
            Credential::RegistryToken {
                token: Secret::new("bearer-xyz")
            }
        );
    }

    #[test]
    fn legacy_dockercfg_has_no_auths_wrapper() {
        let json = format!(
            r#"{{"https://index.docker.io/v1/":{{"auth":"{}","email":"x@y"}}}}"#,
            b64("hub:pw")
        );
        let entries = parse(json.as_bytes(), Format::Dockercfg).expect("valid");
        assert_eq!(entries[0].key.to_string(), "docker.io");
        assert_eq!(entries[0].credential, basic("hub", "pw"));
        // The same document read as a dockerconfigjson has no `auths`.
        assert_eq!(
            parse(json.as_bytes(), Format::ConfigJson),
            Err(ParseError::NoAuths)
        );
    }

    #[test]
    fn other_config_json_keys_are_ignored_and_empty_auths_is_valid() {
        let json = r#"{"auths":{},"credHelpers":{"gcr.io":"gcloud"},"HttpHeaders":{}}"#;
        assert_eq!(parse(json.as_bytes(), Format::ConfigJson), Ok(vec![]));
    }

    #[test]
    fn bad_input_is_refused_without_quoting_values() {
        let cases: &[(&str, ParseError)] = &[
            ("{", ParseError::Json { line: 1, column: 1 }),
            ("[]", ParseError::NotAnObject),
            (r#"{"auths":[]}"#, ParseError::NoAuths),
            (r#"{"other":{}}"#, ParseError::NoAuths),
            (
                r#"{"auths":{"ghcr.io":"hunter2"}}"#,
                ParseError::EntryNotAnObject {
                    key: "ghcr.io".into(),
                },
            ),
            (
                r#"{"auths":{"ghcr.io":{"auth":"%%hunter2%%"}}}"#,
                ParseError::Base64 {
                    key: "ghcr.io".into(),
                },
            ),
            (
                r#"{"auths":{"ghcr.io":{"auth":"aHVudGVyMg=="}}}"#,
                ParseError::AuthForm {
                    key: "ghcr.io".into(),
                },
            ),
            (
                r#"{"auths":{"ghcr.io":{"password":42}}}"#,
                ParseError::FieldType {
                    key: "ghcr.io".into(),
                    field: "password",
                },
            ),
            (
                r#"{"auths":{"ghcr.io":{"username":"u"}}}"#,
                ParseError::NoCredential {
                    key: "ghcr.io".into(),
                },
            ),
            (
                r#"{"auths":{"ftp://ghcr.io":{"username":"u","password":"hunter2"}}}"#,
                ParseError::Key {
                    key: "ftp://ghcr.io".into(),
                    reason: KeyError::Scheme,
                },
            ),
        ];
        for (json, want) in cases {
            let got = parse(json.as_bytes(), Format::ConfigJson);
            match &got {
                Err(e) => {
                    assert_eq!(e, want, "{json}");
                    let message = e.to_string();
                    assert!(!message.contains("hunter2"), "{message}");
                }
                Ok(_) => panic!("`{json}` should be refused"),
            }
        }
    }

    #[test]
    fn debug_output_masks_every_secret() {
        let json = format!(
            r#"{{"auths":{{"a.io":{{"auth":"{}"}},"b.io":{{"identitytoken":"idtok-hunter2"}},"c.io":{{"registrytoken":"regtok-hunter2"}}}}}}"#,
            b64("user:pw-hunter2")
        );
        let entries = parse(json.as_bytes(), Format::ConfigJson).expect("valid");
        let printed = format!("{entries:?} {entries:#?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("****"));
        assert_eq!(entries[0].credential.secret().expose(), "pw-hunter2");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse(s.as_bytes(), Format::ConfigJson);
            let _ = parse(s.as_bytes(), Format::Dockercfg);
        }

        #[test]
        fn any_user_and_password_round_trip_through_auth(
            user in "[^:\\x00]{0,20}",
            pass in "\\PC{0,40}",
        ) {
            let json = serde_json::json!({"auths": {"ghcr.io": {"auth": b64(&format!("{user}:{pass}"))}}});
            let entries = parse(json.to_string().as_bytes(), Format::ConfigJson).expect("valid");
            prop_assert_eq!(&entries[0].credential, &basic(&user, &pass));
        }
    }
}

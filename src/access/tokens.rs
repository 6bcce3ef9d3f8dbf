//! Static pull tokens: long random strings for machines (containerd's `hosts.toml` can only
//! send a fixed `Authorization` header). The tokens file stores each token's SHA-256, never the
//! token, one per line: `NAME SHA256-HEX EXPIRY SCOPES`, where EXPIRY is an RFC 3339 time or
//! `never` and SCOPES a comma-separated list of `upstream/repository` globs that cap what the
//! token may pull (the policy still has to allow `token:NAME`). `regcache token create` makes
//! a token and prints the line.

use std::time::SystemTime;

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::policy::Glob;

/// Every token starts with this, so leaked tokens are recognisable (secret scanners).
pub const PREFIX: &str = "rcp_";

#[derive(Clone, Debug)]
pub struct PullToken {
    pub name: String,
    hash: [u8; 32],
    pub expires: Option<SystemTime>,
    pub scope: Vec<Glob>,
}

/// A token that matched a presented string.
pub enum Lookup<'a> {
    Valid(&'a PullToken),
    Expired(&'a PullToken),
    Unknown,
}

#[derive(Clone, Debug, Default)]
pub struct Tokens {
    tokens: Vec<PullToken>,
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Parses the tokens file; a bad line fails the whole file, naming the line.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut tokens: Vec<PullToken> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, hex_hash, expiry, scopes] = fields[..] else {
                return Err(format!(
                    "line {n}: expected `NAME SHA256-HEX EXPIRY SCOPES` (as printed by `regcache token create`)"
                ));
            };
            valid_name(name).map_err(|r| format!("line {n}: {r}"))?;
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex_hash, &mut hash)
                .map_err(|_| format!("line {n} (token {name}): the hash must be 64 hex digits"))?;
            let expires = if expiry == "never" {
                None
            } else {
                Some(humantime::parse_rfc3339_weak(expiry).map_err(|_| {
                    format!("line {n} (token {name}): expiry `{expiry}` is not an RFC 3339 time or `never`")
                })?)
            };
            let scope = scopes
                .split(',')
                .map(Glob::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|r| format!("line {n} (token {name}): {r}"))?;
            if tokens.iter().any(|t| t.name == name) {
                return Err(format!("line {n}: token name {name} appears twice"));
            }
            tokens.push(PullToken {
                name: name.to_owned(),
                hash,
                expires,
                scope,
            });
        }
        Ok(Tokens { tokens })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn by_name(&self, name: &str) -> Option<&PullToken> {
        self.tokens.iter().find(|t| t.name == name)
    }

    /// Finds the token `presented` is, comparing every stored hash in constant time.
    pub fn lookup(&self, presented: &str, now: SystemTime) -> Lookup<'_> {
        let h = hash(presented);
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(&h)) {
                found = Some(t);
            }
        }
        match found {
            Some(t) if t.is_expired(now) => Lookup::Expired(t),
            Some(t) => Lookup::Valid(t),
            None => Lookup::Unknown,
        }
    }
}

impl PullToken {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// Whether the token's own scope covers `target` (`upstream/repository`).
    pub fn covers(&self, target: &str) -> bool {
        self.scope.iter().any(|g| g.matches(target))
    }
}

fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "token name `{name}` must be 1-64 letters, digits, `-`, `_` or `.`"
        ));
    }
    Ok(())
}

/// A new token: the secret to hand out once, and the line for the tokens file.
pub struct Created {
    pub token: String,
    pub line: String,
}

/// Makes a token named `name`, valid until `expires` (or forever), capped to `scopes`.
pub fn create(
    name: &str,
    expires: Option<SystemTime>,
    scopes: &[String],
) -> Result<Created, String> {
    valid_name(name)?;
    if scopes.is_empty() {
        return Err("give at least one --scope, e.g. `docker.io/library/*` or `**`".into());
    }
    for s in scopes {
        Glob::parse(s)?;
        if s.contains(',') || s.contains(char::is_whitespace) {
            return Err(format!("scope `{s}` must not contain commas or spaces"));
        }
    }
    let mut secret = [0u8; 32];
    for chunk in secret.chunks_mut(16) {
        chunk.copy_from_slice(&rand::random::<u128>().to_le_bytes());
    }
    let token = format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let expiry = match expires {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        None => "never".into(),
    };
    let line = format!(
        "{name} {} {expiry} {}",
        hex::encode(hash(&token)),
        scopes.join(",")
    );
    Ok(Created { token, line })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn created_tokens_are_found_by_their_secret_only() {
        let later = SystemTime::now() + Duration::from_secs(3600);
        let c = create("ci", Some(later), &["docker.io/library/*".into()]).expect("created");
        assert!(c.token.starts_with(PREFIX));
        assert!(c.token.len() > 40);
        assert!(!c.line.contains(&c.token), "the file never holds the token");
        let tokens = Tokens::parse(&format!("# pull tokens\n{}\n", c.line)).expect("valid");
        let now = SystemTime::now();
        match tokens.lookup(&c.token, now) {
            Lookup::Valid(t) => {
                assert_eq!(t.name, "ci");
                assert!(t.covers("docker.io/library/alpine"));
                assert!(!t.covers("ghcr.io/acme/app"));
            }
            _ => panic!("token should be valid"),
        }
        assert!(matches!(tokens.lookup("rcp_wrong", now), Lookup::Unknown));
        let mut tampered = c.token.clone();
        tampered.pop();
        assert!(matches!(tokens.lookup(&tampered, now), Lookup::Unknown));
        assert!(matches!(
            tokens.lookup(&c.token, later + Duration::from_secs(1)),
            Lookup::Expired(_)
        ));
    }

    #[test]
    fn never_expiring_tokens() {
        let c = create("node", None, &["**".into()]).expect("created");
        assert!(c.line.contains(" never "));
        let tokens = Tokens::parse(&c.line).expect("valid");
        assert!(matches!(
            tokens.lookup(&c.token, SystemTime::now() + Duration::from_secs(1 << 30)),
            Lookup::Valid(_)
        ));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let h = "a".repeat(64);
        assert!(Tokens::parse("ci").unwrap_err().contains("line 1"));
        assert!(Tokens::parse(&format!("ci {h} never")).is_err());
        assert!(
            Tokens::parse("ci abc never **")
                .unwrap_err()
                .contains("hex")
        );
        assert!(
            Tokens::parse(&format!("ci {h} tomorrow **"))
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(Tokens::parse(&format!("ci {h} never alpine")).is_err());
        assert!(Tokens::parse(&format!("c/i {h} never **")).is_err());
        let dup = format!("ci {h} never **\nci {h} never **");
        assert!(Tokens::parse(&dup).unwrap_err().contains("twice"));
        assert!(create("ci", None, &[]).is_err());
        assert!(create("bad name", None, &["**".into()]).is_err());
    }
}

//! The htpasswd file: `user:bcrypt-hash` lines as `htpasswd -B` writes them. Only bcrypt is
//! accepted (`$2a$`, `$2b$`, `$2y$`); MD5, SHA1, crypt and plain-text lines are refused by name,
//! so an operator learns which line to regenerate. Verifying a password is slow on purpose
//! (bcrypt), so callers run it off the async threads.

use std::collections::HashMap;

/// Parsed htpasswd content.
#[derive(Clone, Debug, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

/// A hash every unknown user is checked against, so an unknown name costs as much as a wrong
/// password and response times do not tell which names exist.
static DUMMY_HASH: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
    bcrypt::hash(
        format!("{:032x}", rand::random::<u128>()),
        bcrypt::DEFAULT_COST,
    )
    .ok()
});

impl Htpasswd {
    /// Parses the file's text; a bad line fails the whole file (naming the line) so a half
    /// edited file never silently locks users out or lets them in.
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {n}: expected user:hash"))?;
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
                return Err(format!(
                    "line {n} (user {user}): only bcrypt hashes are accepted; create it with `htpasswd -B`"
                ));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!("line {n} (user {user}): malformed bcrypt hash"));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("line {n}: user {user} appears twice"));
            }
        }
        Ok(Htpasswd { users })
    }

    /// The stored hash (not a secret worth hiding from this process; used as a cache key part).
    pub fn hash_of(&self, user: &str) -> Option<String> {
        self.users.get(user).cloned()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. Slow (bcrypt): call from a blocking thread.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                if let Some(dummy) = DUMMY_HASH.as_deref() {
                    let _ = bcrypt::verify(password, dummy);
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_bcrypt_lines() {
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let h = Htpasswd::parse(&format!("# users\nalice:{hash}\n\n")).expect("valid");
        assert!(h.verify("alice", "s3cret"));
        assert!(!h.verify("alice", "wrong"));
        assert!(!h.verify("bob", "s3cret"));
        assert_eq!(h.len(), 1);
        // `htpasswd -B` writes $2y$.
        let y = hash.replacen("$2b$", "$2y$", 1);
        let h = Htpasswd::parse(&format!("alice:{y}")).expect("valid");
        assert!(h.verify("alice", "s3cret"));
    }

    #[test]
    fn bad_lines_are_refused_by_line() {
        let err = Htpasswd::parse("alice").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        let err = Htpasswd::parse("alice:$apr1$abc$def").unwrap_err();
        assert!(err.contains("bcrypt"), "{err}");
        let err = Htpasswd::parse("alice:{SHA}abcdef").unwrap_err();
        assert!(err.contains("bcrypt"), "{err}");
        let err = Htpasswd::parse("bob:plain").unwrap_err();
        assert!(err.contains("bob"), "{err}");
        let err = Htpasswd::parse(":$2y$05$abc").unwrap_err();
        assert!(err.contains("empty user"), "{err}");
        let err = Htpasswd::parse("a:$2y$05$short").unwrap_err();
        assert!(err.contains("malformed"), "{err}");
        let hash = bcrypt::hash("x", 4).expect("hash");
        let err = Htpasswd::parse(&format!("a:{hash}\na:{hash}")).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }
}

//! Content digests (`algorithm:hex`) as the spec defines them, and the incremental hasher that
//! produces them. Only the registered algorithms the cache can verify are accepted: a digest the
//! mirror could not check is refused at parse time rather than stored unverified.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A digest algorithm the mirror can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest: a known algorithm and lowercase hex of exactly its length.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: Box<str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("digest must have the form algorithm:hex")]
    Shape,
    #[error("unsupported digest algorithm (supported: sha256, sha512)")]
    Algorithm,
    #[error("digest hex must be {expected} lowercase hexadecimal characters")]
    Encoded { expected: usize },
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part, safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of a byte slice held in memory (manifests, small bodies).
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (alg, encoded) = s.split_once(':').ok_or(Error::Shape)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ if is_algorithm_grammar(alg) => return Err(Error::Algorithm),
            _ => return Err(Error::Shape),
        };
        let expected = algorithm.hex_len();
        let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if encoded.len() != expected || !encoded.bytes().all(lower_hex) {
            return Err(Error::Encoded { expected });
        }
        Ok(Digest {
            algorithm,
            hex: encoded.into(),
        })
    }
}

/// The spec's `algorithm ::= algorithm-component (algorithm-separator algorithm-component)*`.
fn is_algorithm_grammar(s: &str) -> bool {
    !s.is_empty()
        && s.split(['+', '.', '_', '-']).all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental hashing for streamed bodies.
pub enum DigestHasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => DigestHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            DigestHasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            DigestHasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest {
            algorithm,
            hex: hex.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_sha256() {
        let d: Digest = EMPTY.parse().expect("valid digest");
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::of(Algorithm::Sha256, b""), d);
    }

    #[test]
    fn rejects_what_the_spec_or_the_store_cannot_take() {
        let upper = EMPTY.to_uppercase().replace("SHA256", "sha256");
        assert_eq!(
            upper.parse::<Digest>(),
            Err(Error::Encoded { expected: 64 })
        );
        assert_eq!(
            "sha256:abc".parse::<Digest>(),
            Err(Error::Encoded { expected: 64 })
        );
        assert_eq!("md5:abc".parse::<Digest>(), Err(Error::Algorithm));
        assert_eq!("nocolon".parse::<Digest>(), Err(Error::Shape));
        assert_eq!("../x:abc".parse::<Digest>(), Err(Error::Shape));
        let traversal = format!("sha256:../../{}", &EMPTY[13..]);
        assert!(traversal.parse::<Digest>().is_err());
    }

    #[test]
    fn sha512_round_trips() {
        let d = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(d.hex().len(), 128);
        assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn accepted_digests_round_trip(s in "(sha256|sha512|[a-z]{1,6}):[0-9a-fA-F]{0,130}") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s);
            }
        }
    }
}

//! OCI content digests: strict parsing, file names, and incremental verification.

use crate::quote::shown;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256, Sha512};

/// Longest digest string we look at; anything longer is rejected before any other work.
/// The longest digest we accept (`sha512:` + 128 hex) is 135 bytes.
const MAX_LEN: usize = 256;

/// How much of a rejected value an error message repeats, so logs stay readable.
const SHOWN_LEN: usize = 80;

/// The hash functions we can verify. Digests naming any other algorithm are refused rather
/// than passed through, because we would have to trust content we cannot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Length of the lowercase hex encoding, the only encoding the OCI spec allows for these.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// The name used in digest strings and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a digest we accept. Every message quotes the offending value (escaped
/// and shortened) because these end up in registry error bodies and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {value:?}: {reason}")]
    Invalid { value: String, reason: &'static str },
    #[error("unsupported digest algorithm {0:?}: only sha256 and sha512 can be verified")]
    UnsupportedAlgorithm(String),
    #[error("invalid digest file name {value:?}: {reason}")]
    InvalidFileName { value: String, reason: &'static str },
}

/// A validated `sha256:<hex>` or `sha512:<hex>` digest. Holding one means the hex is
/// lowercase and of the right length, so it is safe to put in paths, URLs and file names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded part: lowercase hex of exactly `algorithm().hex_len()` characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `<algorithm>-<hex>`, e.g. `sha256-e3b0…`. Used for cache files and as the file name
    /// inside torrents, so every peer derives the same name. It consists only of `[a-z0-9-]`:
    /// it never contains `/`, `\`, `..` or `:`, so it cannot escape a directory.
    pub fn file_name(&self) -> String {
        format!("{}-{}", self.algorithm, self.hex)
    }

    /// Inverse of [`Digest::file_name`], for finding what a cached file holds.
    pub fn from_file_name(name: &str) -> Result<Digest, DigestError> {
        let invalid = |reason| DigestError::InvalidFileName {
            value: shown(name, SHOWN_LEN),
            reason,
        };
        if name.len() > MAX_LEN {
            return Err(invalid("longer than 256 bytes"));
        }
        let (algorithm, hex) = [Algorithm::Sha256, Algorithm::Sha512]
            .into_iter()
            .find_map(|a| {
                name.strip_prefix(a.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .map(|hex| (a, hex))
            })
            .ok_or_else(|| invalid("must be sha256-<hex> or sha512-<hex>"))?;
        if !is_lower_hex(hex, algorithm.hex_len()) {
            return Err(invalid(hex_reason(algorithm)));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The digest docker computes for a blob or manifest of these bytes.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(bytes);
        v.finish()
    }

    /// A hasher for this digest's algorithm; compare its [`Verifier::finish`] with `self`.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(self.algorithm)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Follows the OCI image-spec grammar (`algorithm ":" encoded`), then requires a
    /// registered algorithm we implement with its lowercase hex encoding.
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let invalid = |reason| DigestError::Invalid {
            value: shown(s, SHOWN_LEN),
            reason,
        };
        if s.len() > MAX_LEN {
            return Err(invalid("longer than 256 bytes"));
        }
        let (algorithm, encoded) = s
            .split_once(':')
            .ok_or_else(|| invalid("missing ':' between algorithm and encoded part"))?;
        if !is_algorithm_grammar(algorithm) {
            return Err(invalid(
                "algorithm must be lowercase letters and digits separated by '+', '.', '_' or '-'",
            ));
        }
        if encoded.is_empty()
            || !encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
        {
            return Err(invalid(
                "encoded part must be letters, digits, '=', '_' or '-'",
            ));
        }
        let algorithm = Algorithm::from_name(algorithm)
            .ok_or_else(|| DigestError::UnsupportedAlgorithm(algorithm.to_owned()))?;
        if !is_lower_hex(encoded, algorithm.hex_len()) {
            return Err(invalid(hex_reason(algorithm)));
        }
        Ok(Digest {
            algorithm,
            hex: encoded.to_owned(),
        })
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes content as it streams past, so a blob can be checked without buffering it whole.
#[derive(Clone)]
pub struct Verifier {
    state: State,
    bytes_hashed: u64,
}

#[derive(Clone)]
enum State {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Verifier {
    pub fn new(algorithm: Algorithm) -> Verifier {
        let state = match algorithm {
            Algorithm::Sha256 => State::Sha256(Sha256::new()),
            Algorithm::Sha512 => State::Sha512(Sha512::new()),
        };
        Verifier {
            state,
            bytes_hashed: 0,
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.state {
            State::Sha256(_) => Algorithm::Sha256,
            State::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Sha256(h) => h.update(bytes),
            State::Sha512(h) => h.update(bytes),
        }
        self.bytes_hashed += bytes.len() as u64;
    }

    /// How much has been fed in, to compare against an expected size before trusting a hash.
    pub fn bytes_hashed(&self) -> u64 {
        self.bytes_hashed
    }

    /// The digest of everything passed to [`Verifier::update`].
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self.state {
            State::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            State::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm())
            .field("bytes_hashed", &self.bytes_hashed)
            .finish()
    }
}

/// `[a-z0-9]+ ([+._-] [a-z0-9]+)*`
fn is_algorithm_grammar(s: &str) -> bool {
    let component = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    s.split(['+', '.', '_', '-']).all(component)
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_reason(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Sha256 => "encoded part must be 64 lowercase hex characters",
        Algorithm::Sha512 => "encoded part must be 128 lowercase hex characters",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_SHA512: &str = "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
                                47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

    fn parse(s: &str) -> Result<Digest, DigestError> {
        s.parse()
    }

    #[test]
    fn known_vectors() {
        let d = Digest::sha256_of(b"");
        assert_eq!(d.to_string(), format!("sha256:{EMPTY_SHA256}"));
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex(), EMPTY_SHA256);

        let d = Verifier::new(Algorithm::Sha512).finish();
        assert_eq!(d.to_string(), format!("sha512:{EMPTY_SHA512}"));
        assert_eq!(parse(&format!("sha512:{EMPTY_SHA512}")).unwrap(), d);

        assert_eq!(
            Digest::sha256_of(b"abc").hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parses_and_displays() {
        let s = format!("sha256:{EMPTY_SHA256}");
        let d = parse(&s).unwrap();
        assert_eq!(d, Digest::sha256_of(b""));
        assert_eq!(d.to_string(), s);
        assert_eq!(Algorithm::Sha256.to_string(), "sha256");
        assert_eq!(Algorithm::Sha512.hex_len(), 128);
    }

    #[test]
    fn rejects_uppercase_hex() {
        let err = parse(&format!("sha256:{}", EMPTY_SHA256.to_uppercase())).unwrap_err();
        assert!(matches!(err, DigestError::Invalid { .. }), "{err}");
        assert!(parse(&format!("SHA256:{EMPTY_SHA256}")).is_err());
    }

    #[test]
    fn rejects_wrong_length() {
        let err = parse("sha256:xyz").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid digest "sha256:xyz": encoded part must be 64 lowercase hex characters"#
        );
        assert!(parse(&format!("sha256:{}", &EMPTY_SHA256[1..])).is_err());
        assert!(parse(&format!("sha256:{EMPTY_SHA256}0")).is_err());
        // A valid sha256 hex is the wrong length for sha512.
        assert!(parse(&format!("sha512:{EMPTY_SHA256}")).is_err());
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            ":",
            "sha256",
            "sha256:",
            ":abc",
            EMPTY_SHA256,
            "sha256:../../etc",
            "sha256:../../etc/passwd",
            "sha256:e3b0\0",
            "sha256::e3b0",
            "sha256-e3b0",
            "sha+256:abc", // fits the grammar, but unsupported
            "+sha256:abc",
            "sha256+:abc",
            "sha__256:abc",
            " sha256:abc",
        ] {
            assert!(parse(s).is_err(), "{s:?} accepted");
        }
        let nul = format!("sha256:{}\0", &EMPTY_SHA256[1..]);
        assert!(parse(&nul).unwrap_err().to_string().contains("\\0"));
        let long = format!("sha256:{}", "a".repeat(10_000));
        let msg = parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn unknown_algorithm_is_unsupported() {
        assert_eq!(
            parse("blake3:abc").unwrap_err(),
            DigestError::UnsupportedAlgorithm("blake3".into())
        );
        assert_eq!(
            parse("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8").unwrap_err(),
            DigestError::UnsupportedAlgorithm("multihash+base58".into())
        );
        assert!(matches!(
            parse("sha384:abc").unwrap_err(),
            DigestError::UnsupportedAlgorithm(_)
        ));
    }

    #[test]
    fn file_name_round_trip() {
        let d = Digest::sha256_of(b"hello");
        let name = d.file_name();
        assert_eq!(name, format!("sha256-{}", d.hex()));
        assert_eq!(Digest::from_file_name(&name).unwrap(), d);
        for bad in [
            "",
            "sha256",
            "sha256-",
            "sha256:abc",
            "sha1-abc",
            "sha256-../x",
            &format!("sha256-{}", EMPTY_SHA256.to_uppercase()),
            &format!("sha256-{EMPTY_SHA256}.tmp"),
        ] {
            assert!(Digest::from_file_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn verifier_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let expected = Digest::sha256_of(&data);
        let mut v = expected.verifier();
        for chunk in data.chunks(333) {
            v.update(chunk);
        }
        assert_eq!(v.bytes_hashed(), data.len() as u64);
        assert_eq!(v.finish(), expected);

        let mut v = Verifier::new(Algorithm::Sha512);
        v.update(b"ab");
        v.update(b"c");
        let mut one = Verifier::new(Algorithm::Sha512);
        one.update(b"abc");
        assert_eq!(v.finish(), one.finish());
    }

    #[test]
    fn serde_as_string() {
        let d = Digest::sha256_of(b"");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"sha256:{EMPTY_SHA256}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:abc\"").is_err());
    }

    fn valid_digest() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
            "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
        ]
    }

    proptest! {
        #[test]
        fn valid_digests_round_trip(s in valid_digest()) {
            let d: Digest = s.parse().unwrap();
            prop_assert_eq!(d.to_string(), s);
            let name = d.file_name();
            prop_assert!(!name.contains('/') && !name.contains(".."));
            prop_assert_eq!(Digest::from_file_name(&name).unwrap(), d);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = s.parse::<Digest>();
            let _ = Digest::from_file_name(&s);
        }

        #[test]
        fn near_miss_strings_never_panic(s in "[a-zA-Z0-9:+._=/-]{0,140}") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s);
            }
        }
    }
}

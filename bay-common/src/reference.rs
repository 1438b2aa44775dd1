//! Repository names and upstream registry addresses, validated before they reach paths or URLs.

use crate::quote::shown;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest repository name the distribution spec lets clients rely on.
const MAX_NAME_LEN: usize = 255;

/// Longest registry string we look at; a DNS name is at most 253 bytes.
const MAX_REGISTRY_LEN: usize = 300;

/// Longest DNS name and label (RFC 1035).
const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// How much of a rejected value an error message repeats.
const SHOWN_LEN: usize = 80;

/// Why a string is not a repository name. Messages quote the value (escaped, shortened)
/// because they are returned to docker clients as `NAME_INVALID` details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid repository name {value:?}: {reason}")]
    Invalid { value: String, reason: &'static str },
}

/// A repository name such as `library/alpine`, checked against the distribution spec's
/// grammar. Only `[a-z0-9._/-]` survives, with no empty, `.` or `..` components, so the name
/// can be used as a path under a cache directory and spliced into upstream URLs unescaped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(String);

impl RepositoryName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RepositoryName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepositoryName {
    type Err = NameError;

    /// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255
    /// bytes. Percent-encoded input is not decoded: `%2e` is simply invalid.
    fn from_str(s: &str) -> Result<RepositoryName, NameError> {
        let invalid = |reason| NameError::Invalid {
            value: shown(s, SHOWN_LEN),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(invalid("longer than 255 characters"));
        }
        for component in s.split('/') {
            if component.is_empty() {
                return Err(invalid(
                    "empty path component (leading, trailing or doubled '/')",
                ));
            }
            if !is_name_component(component.as_bytes()) {
                return Err(invalid(
                    "each component must be lowercase letters and digits separated by '.', '_', '__' or '-'",
                ));
            }
        }
        Ok(RepositoryName(s.to_owned()))
    }
}

impl Serialize for RepositoryName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RepositoryName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RepositoryName, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: runs of lowercase alphanumerics joined by exactly
/// one separator, which is `.`, `_`, `__` or any number of `-`.
fn is_name_component(c: &[u8]) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let run = i;
        while i < c.len() && alnum(c[i]) {
            i += 1;
        }
        if i == run {
            return false;
        }
        if i == c.len() {
            return true;
        }
        let sep = i;
        while i < c.len() && !alnum(c[i]) {
            i += 1;
        }
        let ok = match &c[sep..i] {
            b"." | b"_" | b"__" => true,
            dashes => dashes.iter().all(|&b| b == b'-'),
        };
        if !ok {
            return false;
        }
    }
}

/// How we talk to an upstream registry. Plain http exists for local test registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a registry address. Messages quote the value as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid registry {value:?}: {reason}")]
    Invalid { value: String, reason: &'static str },
}

/// An upstream registry, which is also an allowlist entry: nothing but a scheme, a host and
/// maybe a port, so it can't smuggle a path or credentials into the URLs built from it.
///
/// The host is lowercased; an IPv6 host is kept in brackets (`[::1]`) in its canonical
/// textual form. Ports are kept as given: `host` and `host:443` are different entries, as
/// they are different registries in docker image references.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry {
    scheme: Scheme,
    host: String,
    port: Option<u16>,
}

impl Registry {
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Lowercase DNS name, IPv4 literal, or bracketed IPv6 literal.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// `host` or `host:port`, without scheme: what follows `p2p-` in a Host header and names
    /// the registry in tracker API paths.
    pub fn authority(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }

    /// `https://host[:port]` or `http://host[:port]`, no trailing slash; append `/v2/…`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority())
    }
}

impl fmt::Display for Registry {
    /// `host[:port]` for https (as docker writes registries), `http://host[:port]` for http,
    /// so the text parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Https => f.write_str(&self.authority()),
            Scheme::Http => write!(f, "http://{}", self.authority()),
        }
    }
}

impl FromStr for Registry {
    type Err = RegistryError;

    /// Accepts `host[:port]` and `https://host[:port]` (https), `http://host[:port]` (plain
    /// http), each with at most a lone trailing `/`.
    fn from_str(s: &str) -> Result<Registry, RegistryError> {
        let invalid = |reason| RegistryError::Invalid {
            value: shown(s, SHOWN_LEN),
            reason,
        };
        if s.len() > MAX_REGISTRY_LEN {
            return Err(invalid("longer than 300 bytes"));
        }
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
            Some(_) => return Err(invalid("scheme must be http:// or https://")),
            None => (Scheme::Https, s),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(invalid("must not contain userinfo"));
        }
        if rest.contains('/') {
            return Err(invalid("must not contain a path"));
        }
        if rest.contains('?') {
            return Err(invalid("must not contain a query"));
        }
        if rest.contains('#') {
            return Err(invalid("must not contain a fragment"));
        }
        let (host, port) = authority_parts(rest).map_err(invalid)?;
        Ok(Registry { scheme, host, port })
    }
}

impl Serialize for Registry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Registry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Registry, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits and normalises `host[:port]` the same way [`Registry`] does, so an authority from a
/// Host header or URL path can be compared with [`Registry::host`] and [`Registry::port`].
pub fn parse_authority(s: &str) -> Result<(String, Option<u16>), RegistryError> {
    if s.len() > MAX_REGISTRY_LEN {
        return Err(RegistryError::Invalid {
            value: shown(s, SHOWN_LEN),
            reason: "longer than 300 bytes",
        });
    }
    authority_parts(s).map_err(|reason| RegistryError::Invalid {
        value: shown(s, SHOWN_LEN),
        reason,
    })
}

fn authority_parts(s: &str) -> Result<(String, Option<u16>), &'static str> {
    let (host, port) = if let Some(bracketed) = s.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or("IPv6 address is missing its closing ']'")?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| "invalid IPv6 address")?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or("unexpected text after ']'")?),
        };
        (format!("[{ip}]"), port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err("IPv6 addresses must be written in brackets, e.g. [::1]:5000");
        }
        (dns_or_ipv4(host)?, port)
    };
    let port = port.map(parse_port).transpose()?;
    Ok((host, port))
}

/// A DNS name (labels of `[A-Za-z0-9-]`, not starting or ending with `-`) or an IPv4
/// literal, lowercased. A name whose last label is numeric must be a valid IPv4 address, so
/// `999.1.1.1` or `1.2.3` are not mistaken for host names.
fn dns_or_ipv4(host: &str) -> Result<String, &'static str> {
    if host.is_empty() {
        return Err("host is empty");
    }
    if host.len() > MAX_HOST_LEN {
        return Err("host is longer than 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err("host labels must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("host may contain only letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("host labels must not start or end with '-'");
        }
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    if last.bytes().all(|b| b.is_ascii_digit()) && host.parse::<Ipv4Addr>().is_err() {
        return Err("invalid IPv4 address");
    }
    Ok(host.to_ascii_lowercase())
}

fn parse_port(p: &str) -> Result<u16, &'static str> {
    const REASON: &str = "port must be a number from 1 to 65535";
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(REASON);
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(REASON),
        Ok(port) => Ok(port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> Result<RepositoryName, NameError> {
        s.parse()
    }

    fn registry(s: &str) -> Result<Registry, RegistryError> {
        s.parse()
    }

    #[test]
    fn accepts_valid_names() {
        for s in [
            "alpine",
            "library/alpine",
            "a/b/c/d",
            "my-org/my--app",
            "my_org/my__app",
            "foo.bar/baz",
            "a1/2b/0",
            "x---y",
            "a.b_c__d-e",
        ] {
            let n = name(s).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(n.as_str(), s);
            assert_eq!(n.to_string(), s);
        }
        assert!(name(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_invalid_names() {
        for s in [
            "",
            "/",
            "/alpine",
            "alpine/",
            "library//alpine",
            "..",
            "../etc",
            "library/../etc",
            "a/./b",
            "%2e%2e/etc",
            "library%2falpine",
            "Foo",
            "library/Alpine",
            "a\0b",
            "a b",
            "a:latest",
            "a@sha256",
            "a..b",
            "a___b",
            "a._b",
            "-a",
            "a-",
            "_a",
            "a.",
            "a\\b",
            "ä",
        ] {
            assert!(name(s).is_err(), "{s:?} accepted");
        }
        assert!(name(&"a".repeat(256)).is_err());
        assert_eq!(
            name("Foo/../x").unwrap_err().to_string(),
            "invalid repository name \"Foo/../x\": each component must be lowercase letters \
             and digits separated by '.', '_', '__' or '-'"
        );
    }

    #[test]
    fn name_serde_as_string() {
        let n = name("library/alpine").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"library/alpine\"");
        assert_eq!(
            serde_json::from_str::<RepositoryName>("\"library/alpine\"").unwrap(),
            n
        );
        assert!(serde_json::from_str::<RepositoryName>("\"../x\"").is_err());
    }

    #[test]
    fn parses_registries() {
        let r = registry("Registry-1.Docker.IO").unwrap();
        assert_eq!(r.scheme(), Scheme::Https);
        assert_eq!(r.host(), "registry-1.docker.io");
        assert_eq!(r.port(), None);
        assert_eq!(r.authority(), "registry-1.docker.io");
        assert_eq!(r.base_url(), "https://registry-1.docker.io");
        assert_eq!(r.to_string(), "registry-1.docker.io");

        assert_eq!(registry("ghcr.io/").unwrap(), registry("ghcr.io").unwrap());
        let r = registry("https://ghcr.io/").unwrap();
        assert_eq!(
            (r.scheme(), r.host(), r.port()),
            (Scheme::Https, "ghcr.io", None)
        );

        let r = registry("http://127.0.0.1:5000").unwrap();
        assert_eq!(r.scheme(), Scheme::Http);
        assert_eq!(r.authority(), "127.0.0.1:5000");
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        assert_eq!(r.to_string(), "http://127.0.0.1:5000");

        let r = registry("localhost:5000").unwrap();
        assert_eq!(r.base_url(), "https://localhost:5000");
        assert_eq!(r.to_string(), "localhost:5000");

        let r = registry("HTTP://[0:0::1]:5000/").unwrap();
        assert_eq!(r.host(), "[::1]");
        assert_eq!(r.authority(), "[::1]:5000");
        assert_eq!(r.to_string(), "http://[::1]:5000");

        assert_ne!(
            registry("ghcr.io").unwrap(),
            registry("ghcr.io:443").unwrap()
        );
        assert_ne!(
            registry("ghcr.io").unwrap(),
            registry("http://ghcr.io").unwrap()
        );
        assert_eq!(
            registry("GHCR.io").unwrap(),
            registry("https://ghcr.io").unwrap()
        );
    }

    #[test]
    fn rejects_invalid_registries() {
        for s in [
            "",
            "/",
            "http://",
            "ftp://host",
            "file:///etc/passwd",
            "host/v2",
            "https://host/path",
            "https://host//",
            "host?x=1",
            "host#frag",
            "user@host",
            "https://user:pw@host",
            "host:0",
            "host:65536",
            "host:",
            "host:+80",
            "host:-1",
            "host:80:80",
            "::1",
            "[::1",
            "[::1]x",
            "[nope]",
            "[::1]:0",
            "ho_st",
            "-host",
            "host-",
            "a..b",
            ".host",
            "host.",
            "999.1.1.1",
            "1.2.3",
            "host name",
            "host\0",
            "hóst",
        ] {
            assert!(registry(s).is_err(), "{s:?} accepted");
        }
        assert!(registry(&format!("{}.com", "a".repeat(64))).is_err());
        assert_eq!(
            registry("http://host:0").unwrap_err().to_string(),
            "invalid registry \"http://host:0\": port must be a number from 1 to 65535"
        );
        assert_eq!(
            registry("https://host/v2/").unwrap_err().to_string(),
            "invalid registry \"https://host/v2/\": must not contain a path"
        );
    }

    #[test]
    fn parse_authority_matches_registry() {
        assert_eq!(
            parse_authority("Registry:5000").unwrap(),
            ("registry".to_owned(), Some(5000))
        );
        assert_eq!(
            parse_authority("ghcr.io").unwrap(),
            ("ghcr.io".to_owned(), None)
        );
        assert_eq!(
            parse_authority("[::1]").unwrap(),
            ("[::1]".to_owned(), None)
        );
        assert!(parse_authority("http://ghcr.io").is_err());
        assert!(parse_authority("ghcr.io/x").is_err());
        let r = registry("http://Registry:5000").unwrap();
        let (host, port) = parse_authority(&r.authority()).unwrap();
        assert_eq!((host.as_str(), port), (r.host(), r.port()));
    }

    #[test]
    fn registry_serde_as_string() {
        let r = registry("http://localhost:5000").unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"http://localhost:5000\"");
        assert_eq!(serde_json::from_str::<Registry>(&json).unwrap(), r);
    }

    fn component() -> impl Strategy<Value = String> {
        (
            "[a-z0-9]{1,8}",
            prop::collection::vec(("(\\.|_|__|-{1,3})", "[a-z0-9]{1,8}"), 0..3),
        )
            .prop_map(|(first, rest)| {
                rest.into_iter()
                    .fold(first, |acc, (sep, run)| acc + &sep + &run)
            })
    }

    fn valid_name() -> impl Strategy<Value = String> {
        prop::collection::vec(component(), 1..6).prop_map(|c| c.join("/"))
    }

    proptest! {
        #[test]
        fn valid_names_round_trip(s in valid_name()) {
            let n: RepositoryName = s.parse().unwrap();
            prop_assert_eq!(n.to_string(), s);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = s.parse::<RepositoryName>();
            let _ = s.parse::<Registry>();
            let _ = parse_authority(&s);
        }

        #[test]
        fn near_miss_names_only_accept_safe_paths(s in "[a-zA-Z0-9._/%-]{0,40}") {
            if let Ok(n) = s.parse::<RepositoryName>() {
                prop_assert!(!n.as_str().split('/').any(|c| c.is_empty() || c == "." || c == ".."));
                prop_assert!(!n.as_str().bytes().any(|b| b.is_ascii_uppercase() || b == b'%'));
            }
        }

        #[test]
        fn corrupted_names_are_rejected(s in valid_name(), at in any::<prop::sample::Index>(),
                                        bad in prop_oneof![Just(".."), Just("//"), Just("A"), Just("%2e")]) {
            let i = at.index(s.len() + 1);
            let corrupted = format!("{}{}{}", &s[..i], bad, &s[i..]);
            // ".." is never a separator, "//" always makes an empty component, and uppercase
            // and '%' are never allowed, so every such insertion must be rejected.
            prop_assert!(corrupted.parse::<RepositoryName>().is_err(), "{:?} accepted", corrupted);
        }

        #[test]
        fn registries_round_trip(
            http in any::<bool>(),
            host in prop_oneof![
                "[a-z]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z]{1,6}){0,3}",
                any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
            ],
            port in prop::option::of(1u16..),
        ) {
            let authority = match port {
                Some(p) => format!("{host}:{p}"),
                None => host.clone(),
            };
            let text = if http { format!("http://{authority}") } else { authority.clone() };
            let r: Registry = text.parse().unwrap();
            prop_assert_eq!(r.to_string(), text);
            prop_assert_eq!(r.authority(), authority);
            prop_assert_eq!(r.to_string().parse::<Registry>().unwrap(), r);
        }
    }
}

//! Registry auth: what a client presents, `WWW-Authenticate` challenges, and cached tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use sha2::{Digest as _, Sha256};

/// How bay authenticates an upstream request.
#[derive(Clone)]
pub enum Credentials {
    /// No credentials; a Bearer challenge is still answered with an anonymous token, as Docker
    /// Hub requires even for public images.
    Anonymous,
    /// Username and password, sent as Basic or traded for a Bearer token, whichever the registry
    /// asks for.
    Basic { username: String, password: String },
    /// The client's own `Authorization` header, sent verbatim and never traded: the client does
    /// its own token dance when we relay the registry's 401.
    Forward(HeaderValue),
}

impl Credentials {
    /// `Forward` for a client that sent an Authorization header, else `Anonymous`.
    pub fn from_client(authorization: Option<&HeaderValue>) -> Self {
        match authorization {
            Some(h) => Credentials::Forward(h.clone()),
            None => Credentials::Anonymous,
        }
    }

    /// A stable, non-reversible key for caches; never log the credentials themselves.
    pub fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        match self {
            Credentials::Anonymous => h.update(b"anonymous"),
            Credentials::Basic { username, password } => {
                h.update(b"basic\0");
                h.update(username.as_bytes());
                h.update(b"\0");
                h.update(password.as_bytes());
            }
            Credentials::Forward(v) => {
                h.update(b"forward\0");
                h.update(v.as_bytes());
            }
        }
        hex::encode(&h.finalize()[..16])
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs and panics.
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Forward(_) => f.write_str("Forward(***)"),
        }
    }
}

/// A parsed `WWW-Authenticate` challenge (RFC 9110 §11.6.1, one challenge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme: `bearer` or `basic`.
    pub scheme: String,
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() {
            return None;
        }
        let mut params = HashMap::new();
        let mut s = rest.trim_start();
        while !s.is_empty() {
            let eq = s.find('=')?;
            let key = s[..eq].trim().to_ascii_lowercase();
            s = s[eq + 1..].trim_start();
            let value;
            if let Some(quoted) = s.strip_prefix('"') {
                let mut out = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => out.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        c => out.push(c),
                    }
                }
                value = out;
                s = &quoted[end? + 1..];
            } else {
                let end = s.find(',').unwrap_or(s.len());
                value = s[..end].trim().to_string();
                s = &s[end..];
            }
            params.insert(key, value);
            s = s.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        })
    }

    pub fn realm(&self) -> Option<&str> {
        self.params.get("realm").map(String::as_str)
    }
}

/// Bearer tokens by (realm, service, scope, credentials), kept until shortly before expiry so
/// a burst of blob requests costs one token request, not one each (a complaint about Kraken).
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Held while a token is fetched, so concurrent misses for a key wait for that one fetch.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenCache {
    pub(crate) fn key(challenge: &Challenge, creds: &Credentials) -> String {
        let p = |k: &str| challenge.params.get(k).cloned().unwrap_or_default();
        format!(
            "{}\0{}\0{}\0{}",
            p("realm"),
            p("service"),
            p("scope"),
            creds.cache_key()
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let mut map = self.tokens.lock().expect("token cache poisoned");
        match map.get(key) {
            Some((token, exp)) if *exp > Instant::now() => Some(token.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// The lock a token fetch for `key` holds.
    pub(crate) fn fetch_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.fetching.lock().expect("token cache poisoned");
        if map.len() > 1_000 {
            map.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        map.entry(key.to_string()).or_default().clone()
    }

    pub(crate) fn put(&self, key: String, token: String, lifetime: Duration) {
        // Renew a little early so a token never expires between our check and the request.
        let lifetime = lifetime.saturating_sub(Duration::from_secs(5).min(lifetime / 4));
        let mut map = self.tokens.lock().expect("token cache poisoned");
        if map.len() > 10_000 {
            let now = Instant::now();
            map.retain(|_, (_, exp)| *exp > now);
        }
        map.insert(key, (token, Instant::now() + lifetime));
    }
}

/// The token endpoint's answer (distribution `docs/spec/auth/token.md`).
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    /// Seconds; the spec's default is 60.
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm(), Some("https://auth.docker.io/token"));
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:samalba/my-app:pull,push");
    }

    #[test]
    fn parses_basic_and_unquoted_and_escapes() {
        let c = Challenge::parse(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.realm(), Some("basic-realm"));
        let c = Challenge::parse(r#"Bearer realm=x, error="a\"b""#).unwrap();
        assert_eq!(c.realm(), Some("x"));
        assert_eq!(c.params["error"], "a\"b");
        assert!(Challenge::parse("").is_none());
        assert!(Challenge::parse(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let f = Credentials::Forward(HeaderValue::from_static("Bearer sekrit"));
        assert!(!format!("{f:?}").contains("sekrit"));
        assert_ne!(c.cache_key(), f.cache_key());
    }

    #[test]
    fn token_cache_expires() {
        let cache = TokenCache::default();
        cache.put("k".into(), "t".into(), Duration::from_secs(60));
        assert_eq!(cache.get("k").as_deref(), Some("t"));
        cache.put("k".into(), "t".into(), Duration::ZERO);
        assert_eq!(cache.get("k"), None);
    }

    proptest::proptest! {
        #[test]
        fn challenge_parse_never_panics(s in "\\PC{0,200}") {
            let _ = Challenge::parse(&s);
        }

        #[test]
        fn challenge_round_trips(
            realm in "[ -~]{0,40}",
            service in "[a-z0-9.:-]{1,20}",
            scope in "[a-z0-9/:,_-]{1,40}",
        ) {
            let quote = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
            let h = format!(
                r#"Bearer realm="{}",service="{}",scope="{}""#,
                quote(&realm), quote(&service), quote(&scope)
            );
            let c = Challenge::parse(&h).unwrap();
            proptest::prop_assert_eq!(c.scheme.as_str(), "bearer");
            proptest::prop_assert_eq!(c.realm(), Some(realm.as_str()));
            proptest::prop_assert_eq!(&c.params["service"], &service);
            proptest::prop_assert_eq!(&c.params["scope"], &scope);
        }
    }
}

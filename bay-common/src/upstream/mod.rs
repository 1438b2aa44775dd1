//! The client for upstream registries: blob HEADs and GETs, manifest GETs, with registry auth.
//!
//! Only `<registry>/v2/<name>/blobs/<digest>` and `<registry>/v2/<name>/manifests/<reference>`
//! URLs are ever built here, from validated parts, so a caller can never make bay fetch a URL
//! of its choosing. Redirects (307 to blob storage) are followed for GETs with reqwest's
//! policy, which drops `Authorization` when the host changes; HEADs never follow them, since a
//! redirect already proves the caller may read the blob.

mod auth;

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

pub use auth::{Challenge, Credentials};
use auth::{TokenCache, TokenResponse};

use crate::api::{ErrorBody, ErrorCode};
use crate::digest::Digest;
use crate::manifest::ManifestRef;
use crate::reference::{Registry, RepositoryName};

#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub connect_timeout: Duration,
    /// Whole-request limit for HEADs and token requests.
    pub request_timeout: Duration,
    /// Longest silence while reading a blob body; blobs may take long, but never stall forever.
    pub read_timeout: Duration,
    pub user_agent: String,
}

/// The services' `--upstream-timeout` default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self::with_timeout(DEFAULT_TIMEOUT)
    }
}

impl UpstreamOptions {
    /// Every wait on upstream bounded by `t`: connecting, a whole HEAD or token request, and
    /// every read of an answer (its first byte included), so a registry that accepts and then
    /// says nothing costs at most `t`, however long a healthy blob download takes.
    pub fn with_timeout(t: Duration) -> Self {
        Self {
            connect_timeout: t,
            request_timeout: t,
            read_timeout: t,
            user_agent: concat!("bay/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// An upstream answer that the caller must see as is: 401 (with its challenge, so the client
/// can authenticate), 403, 404, 429.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    /// The headers worth relaying: WWW-Authenticate, Content-Type, Retry-After, Docker-*.
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Refusal {
    /// What to send the caller: upstream's status, relayed headers and body. A refusal to a
    /// HEAD has no body, so it gets a registry-style error body instead.
    pub fn to_parts(&self) -> (StatusCode, HeaderMap, Bytes) {
        let mut headers = self.headers.clone();
        if !self.body.is_empty() {
            return (self.status, headers, self.body.clone());
        }
        let code = match self.status.as_u16() {
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Denied,
            429 => ErrorCode::Toomanyrequests,
            _ => ErrorCode::BlobUnknown,
        };
        let body = ErrorBody::new(
            code,
            format!("upstream answered {}", self.status),
            serde_json::Value::Null,
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        (self.status, headers, Bytes::from(body.to_json()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream refused with {}", .0.status)]
    Refused(Box<Refusal>),
    #[error("upstream answered {status} for {url}")]
    Status { status: StatusCode, url: String },
    #[error("upstream request to {url} failed: {}", transport_cause(source))]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("token endpoint {realm} failed: {why}")]
    Token { realm: String, why: String },
}

/// What went wrong on the wire, in words a client can act on: reqwest reports a read that timed
/// out in a body as "error decoding response body".
fn transport_cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer within the upstream timeout (--upstream-timeout)".to_owned()
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

impl UpstreamError {
    fn transport(url: &str, source: reqwest::Error) -> Self {
        UpstreamError::Transport {
            url: url.to_string(),
            source,
        }
    }
}

/// What a blob HEAD told us.
#[derive(Debug, Clone)]
pub struct BlobHead {
    /// `None` when upstream redirected (the size lives at the storage URL).
    pub size: Option<u64>,
    pub redirected: bool,
}

/// Idle keep-alive connections kept per host and for how long: a burst of pulls must not
/// leave hundreds of sockets open for a minute and a half (reqwest's defaults).
pub const IDLE_PER_HOST: usize = 4;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct UpstreamClient {
    follow: reqwest::Client,
    no_follow: reqwest::Client,
    tokens: TokenCache,
    opts: UpstreamOptions,
}

const RELAYED_HEADERS: &[&str] = &[
    "www-authenticate",
    "content-type",
    "retry-after",
    "docker-distribution-api-version",
    "docker-error",
];

impl UpstreamClient {
    pub fn new(opts: UpstreamOptions) -> Result<Self, reqwest::Error> {
        let build = |policy| {
            reqwest::Client::builder()
                .user_agent(opts.user_agent.clone())
                .pool_max_idle_per_host(IDLE_PER_HOST)
                .pool_idle_timeout(IDLE_TIMEOUT)
                .connect_timeout(opts.connect_timeout)
                .read_timeout(opts.read_timeout)
                .redirect(policy)
                .build()
        };
        Ok(Self {
            follow: build(reqwest::redirect::Policy::limited(5))?,
            no_follow: build(reqwest::redirect::Policy::none())?,
            tokens: TokenCache::default(),
            opts,
        })
    }

    pub fn blob_url(registry: &Registry, name: &RepositoryName, digest: &Digest) -> String {
        format!("{}/v2/{}/blobs/{}", registry.base_url(), name, digest)
    }

    /// HEAD the blob with the caller's credentials, not following redirects. Ok means upstream
    /// would serve this blob to this caller.
    pub async fn head_blob(
        &self,
        registry: &Registry,
        name: &RepositoryName,
        digest: &Digest,
        creds: &Credentials,
    ) -> Result<BlobHead, UpstreamError> {
        let url = Self::blob_url(registry, name, digest);
        let resp = self.send(Method::HEAD, &url, creds, false, None).await?;
        let status = resp.status();
        if status.is_redirection() {
            return Ok(BlobHead {
                size: None,
                redirected: true,
            });
        }
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(BlobHead {
            size,
            redirected: false,
        })
    }

    /// GET the blob, following redirects; the body is the caller's to stream and verify.
    pub async fn get_blob(
        &self,
        registry: &Registry,
        name: &RepositoryName,
        digest: &Digest,
        creds: &Credentials,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = Self::blob_url(registry, name, digest);
        self.send(Method::GET, &url, creds, true, None).await
    }

    /// GET the blob from byte `offset` on (a `Range` request). Upstream may ignore the range
    /// and answer 200 with the whole blob; the caller checks the status.
    pub async fn get_blob_from(
        &self,
        registry: &Registry,
        name: &RepositoryName,
        digest: &Digest,
        creds: &Credentials,
        offset: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = Self::blob_url(registry, name, digest);
        self.send(Method::GET, &url, creds, true, Some((offset, None)))
            .await
    }

    /// GET bytes `start..=end` of the blob (a `Range` request); as for [`Self::get_blob_from`],
    /// the caller checks that upstream answered 206 with that range.
    pub async fn get_blob_range(
        &self,
        registry: &Registry,
        name: &RepositoryName,
        digest: &Digest,
        creds: &Credentials,
        start: u64,
        end: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = Self::blob_url(registry, name, digest);
        self.send(Method::GET, &url, creds, true, Some((start, Some(end))))
            .await
    }

    /// `reference` is a validated tag or a digest, so it cannot leave the manifests path.
    pub fn manifest_url(
        registry: &Registry,
        name: &RepositoryName,
        reference: &ManifestRef,
    ) -> String {
        format!(
            "{}/v2/{}/manifests/{}",
            registry.base_url(),
            name,
            reference
        )
    }

    /// GET a manifest, accepting the index and manifest types preheating follows
    /// ([`crate::manifest::ACCEPT`]); the body is the caller's to cap, verify and parse.
    pub async fn get_manifest(
        &self,
        registry: &Registry,
        name: &RepositoryName,
        reference: &ManifestRef,
        creds: &Credentials,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = Self::manifest_url(registry, name, reference);
        self.send_accepting(
            Method::GET,
            &url,
            creds,
            true,
            None,
            Some(crate::manifest::ACCEPT),
        )
        .await
    }

    /// Sends a request, answering one auth challenge if our credentials allow it. Returns only
    /// 2xx (and 3xx when not following); anything else becomes an error.
    async fn send(
        &self,
        method: Method,
        url: &str,
        creds: &Credentials,
        follow: bool,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_accepting(method, url, creds, follow, range, None)
            .await
    }

    /// [`Self::send`] with an `Accept` header.
    async fn send_accepting(
        &self,
        method: Method,
        url: &str,
        creds: &Credentials,
        follow: bool,
        range: Option<(u64, Option<u64>)>,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let client = if follow {
            &self.follow
        } else {
            &self.no_follow
        };
        let attempt = |auth: Option<HeaderValue>| {
            let mut req = client.request(method.clone(), url);
            if method == Method::HEAD {
                req = req.timeout(self.opts.request_timeout);
            }
            if let Some(auth) = auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            match range {
                Some((from, Some(to))) => {
                    req = req.header(header::RANGE, format!("bytes={from}-{to}"))
                }
                Some((from, None)) => req = req.header(header::RANGE, format!("bytes={from}-")),
                None => {}
            }
            if let Some(accept) = accept {
                req = req.header(header::ACCEPT, accept);
            }
            req.send()
        };
        let first_auth = match creds {
            Credentials::Forward(h) => Some(h.clone()),
            _ => None,
        };
        let resp = attempt(first_auth)
            .await
            .map_err(|e| UpstreamError::transport(url, e))?;
        let resp = if resp.status() == StatusCode::UNAUTHORIZED
            && !matches!(creds, Credentials::Forward(_))
        {
            match self.answer_challenge(&resp, creds).await? {
                Some(auth) => {
                    let retry = attempt(Some(auth))
                        .await
                        .map_err(|e| UpstreamError::transport(url, e))?;
                    // Still refused: relay the first challenge, as a client asking upstream
                    // directly would see it (the retry's names our token's scope error).
                    if retry.status() == StatusCode::UNAUTHORIZED {
                        resp
                    } else {
                        retry
                    }
                }
                None => resp,
            }
        } else {
            resp
        };
        let status = resp.status();
        if status.is_success() || (!follow && status.is_redirection()) {
            return Ok(resp);
        }
        if matches!(status.as_u16(), 401 | 403 | 404 | 429) {
            let mut headers = HeaderMap::new();
            for name in RELAYED_HEADERS {
                for v in resp.headers().get_all(*name) {
                    headers.append(*name, v.clone());
                }
            }
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                // Error bodies are small; cap what we keep anyway.
                let b = resp.bytes().await.unwrap_or_default();
                b.slice(..b.len().min(64 * 1024))
            };
            return Err(UpstreamError::Refused(Box::new(Refusal {
                status,
                headers,
                body,
            })));
        }
        Err(UpstreamError::Status {
            status,
            url: url.to_string(),
        })
    }

    /// Works out the Authorization header that answers a 401, if our credentials can.
    async fn answer_challenge(
        &self,
        resp: &reqwest::Response,
        creds: &Credentials,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(challenge) = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse)
        else {
            return Ok(None);
        };
        match (challenge.scheme.as_str(), creds) {
            ("basic", Credentials::Basic { username, password }) => {
                Ok(Some(basic_header(username, password)))
            }
            ("bearer", Credentials::Anonymous | Credentials::Basic { .. }) => {
                let token = self.token(&challenge, creds).await?;
                Ok(HeaderValue::from_str(&format!("Bearer {token}")).ok())
            }
            _ => Ok(None),
        }
    }

    async fn token(
        &self,
        challenge: &Challenge,
        creds: &Credentials,
    ) -> Result<String, UpstreamError> {
        let key = TokenCache::key(challenge, creds);
        if let Some(t) = self.tokens.get(&key) {
            return Ok(t);
        }
        // A burst of misses costs one token request: the others wait for it. If it fails,
        // they each try on their own rather than queue behind one another.
        let gate = self.tokens.fetch_lock(&key);
        let _fetching = match gate.try_lock() {
            Ok(guard) => Some(guard),
            Err(_) => {
                drop(gate.lock().await);
                if let Some(t) = self.tokens.get(&key) {
                    return Ok(t);
                }
                None
            }
        };
        let realm = challenge.realm().unwrap_or_default().to_string();
        let fail = |why: String| UpstreamError::Token {
            realm: realm.clone(),
            why,
        };
        let mut url = url::Url::parse(&realm).map_err(|e| fail(format!("bad realm: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail("realm is not an http(s) URL".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            for k in ["service", "scope"] {
                if let Some(v) = challenge.params.get(k) {
                    q.append_pair(k, v);
                }
            }
        }
        let mut req = self
            .follow
            .get(url.as_str())
            .timeout(self.opts.request_timeout);
        if let Credentials::Basic { username, password } = creds {
            req = req.header(header::AUTHORIZATION, basic_header(username, password));
        }
        let resp = req.send().await.map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("status {}", resp.status())));
        }
        let body: TokenResponse = resp.json().await.map_err(|e| fail(e.to_string()))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("answer has no token".into()))?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        self.tokens.put(key, token.clone(), lifetime);
        Ok(token)
    }
}

fn basic_header(username: &str, password: &str) -> HeaderValue {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let mut v = HeaderValue::from_str(&format!("Basic {raw}")).expect("base64 is a valid header");
    v.set_sensitive(true);
    v
}

//! `UpstreamClient` against in-process fake registries, token servers and blob storage, each on
//! its own loopback address: the token dance and its cache, Basic auth, forwarded client
//! headers, redirects (and which of them carry `Authorization`), and how refusals come back.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bay_common::upstream::{Credentials, UpstreamClient, UpstreamError, UpstreamOptions};
use bay_common::{Digest, Registry, RepositoryName};
use bytes::Bytes;
use reqwest::header::HeaderValue;
use sha2::{Digest as _, Sha256};

/// Every test gets its own addresses (port 0), so tests may run in parallel.
const REGISTRY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const TOKEN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const STORAGE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

const SCOPE: &str = "repository:a/b:pull";
/// Where a registry redirecting to itself sends blob GETs.
const SAME_HOST_PATH: &str = "/internal/blob";
const USER: &str = "alice";
const PASSWORD: &str = "s3cret";

/// One request as a fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
}

impl Seen {
    fn authorization(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap())
    }

    fn query_param(&self, key: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl Recorder {
    fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap) {
        self.0.lock().unwrap().push(Seen {
            method: method.clone(),
            path: uri.path().to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            headers: headers.clone(),
        });
    }

    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

async fn serve(ip: Ipv4Addr, app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Bound before spawning, so connections queue up from here on: no readiness wait needed.
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// What the fake registry answers to an authorized blob request.
enum BlobAnswer {
    Bytes(Bytes),
    /// 307 with this `Location`, for GET and HEAD alike (as Distribution does).
    Redirect(String),
    Refuse {
        status: StatusCode,
        headers: Vec<(&'static str, &'static str)>,
        body: &'static str,
    },
}

struct FakeRegistry {
    /// `Authorization` values let through; empty means no auth at all.
    accept: Vec<String>,
    /// `WWW-Authenticate` sent with a 401.
    challenge: String,
    blob: BlobAnswer,
    /// Served at [`SAME_HOST_PATH`] to authorized requests.
    same_host_bytes: Bytes,
    seen: Recorder,
}

const UNAUTHORIZED_BODY: &str =
    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;

async fn registry_handler(
    State(r): State<Arc<FakeRegistry>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    r.seen.record(&method, &uri, &headers);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !r.accept.is_empty() && !auth.is_some_and(|a| r.accept.iter().any(|x| x == a)) {
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, r.challenge.as_str()),
                (header::CONTENT_TYPE, "application/json"),
                (
                    header::HeaderName::from_static("docker-distribution-api-version"),
                    "registry/2.0",
                ),
            ],
            UNAUTHORIZED_BODY,
        )
            .into_response();
    }
    if uri.path() == SAME_HOST_PATH {
        return r.same_host_bytes.clone().into_response();
    }
    if !uri.path().starts_with("/v2/a/b/blobs/") {
        return StatusCode::NOT_FOUND.into_response();
    }
    match &r.blob {
        BlobAnswer::Bytes(b) => b.clone().into_response(),
        BlobAnswer::Redirect(location) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location.as_str())],
        )
            .into_response(),
        BlobAnswer::Refuse {
            status,
            headers,
            body,
        } => {
            let mut resp = (*status, *body).into_response();
            for (k, v) in headers {
                resp.headers_mut().insert(*k, HeaderValue::from_static(v));
            }
            resp
        }
    }
}

impl FakeRegistry {
    fn open(blob: BlobAnswer) -> FakeRegistry {
        FakeRegistry {
            accept: Vec::new(),
            challenge: String::new(),
            blob,
            same_host_bytes: Bytes::new(),
            seen: Recorder::default(),
        }
    }

    /// Demands `Bearer t`, challenging with the token server at `token`.
    fn bearer(token: SocketAddr, blob: BlobAnswer) -> FakeRegistry {
        FakeRegistry {
            accept: vec!["Bearer t".into()],
            challenge: format!(
                r#"Bearer realm="http://{token}/token",service="svc",scope="{SCOPE}""#
            ),
            ..FakeRegistry::open(blob)
        }
    }

    /// Demands Basic `USER:PASSWORD`.
    fn basic(blob: BlobAnswer) -> FakeRegistry {
        FakeRegistry {
            accept: vec![basic_value(USER, PASSWORD)],
            challenge: r#"Basic realm="r""#.into(),
            ..FakeRegistry::open(blob)
        }
    }

    async fn start(self, ip: Ipv4Addr) -> (Arc<FakeRegistry>, Registry) {
        let state = Arc::new(self);
        let app = Router::new()
            .fallback(registry_handler)
            .with_state(state.clone());
        let addr = serve(ip, app).await;
        let registry = format!("http://{addr}").parse().unwrap();
        (state, registry)
    }
}

struct FakeTokenServer {
    /// The `Authorization` a token request must carry; `None` gives anyone a token.
    require: Option<String>,
    expires_in: u64,
    /// How long each answer takes.
    delay: Duration,
    seen: Recorder,
}

async fn token_handler(
    State(t): State<Arc<FakeTokenServer>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    t.seen.record(&method, &uri, &headers);
    tokio::time::sleep(t.delay).await;
    if let Some(required) = &t.require
        && headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(required.as_bytes())
    {
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    axum::Json(serde_json::json!({"token": "t", "expires_in": t.expires_in})).into_response()
}

impl FakeTokenServer {
    async fn start(require: Option<String>, expires_in: u64) -> (Arc<FakeTokenServer>, SocketAddr) {
        Self::start_slow(require, expires_in, Duration::ZERO).await
    }

    async fn start_slow(
        require: Option<String>,
        expires_in: u64,
        delay: Duration,
    ) -> (Arc<FakeTokenServer>, SocketAddr) {
        let state = Arc::new(FakeTokenServer {
            require,
            expires_in,
            delay,
            seen: Recorder::default(),
        });
        let app = Router::new()
            .route("/token", axum::routing::get(token_handler))
            .with_state(state.clone());
        (state, serve(TOKEN_IP, app).await)
    }
}

/// Blob storage: records what it was sent and serves the same bytes at any path.
struct FakeStorage {
    bytes: Bytes,
    seen: Recorder,
}

async fn storage_handler(
    State(s): State<Arc<FakeStorage>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    s.seen.record(&method, &uri, &headers);
    s.bytes.clone().into_response()
}

impl FakeStorage {
    async fn start(ip: Ipv4Addr, bytes: Bytes) -> (Arc<FakeStorage>, SocketAddr) {
        let state = Arc::new(FakeStorage {
            bytes,
            seen: Recorder::default(),
        });
        let app = Router::new()
            .fallback(storage_handler)
            .with_state(state.clone());
        (state, serve(ip, app).await)
    }
}

fn basic_value(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn blob() -> (Bytes, Digest) {
    let bytes = Bytes::from_static(b"the layer bytes, as the registry stores them");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
        .parse()
        .unwrap();
    (bytes, digest)
}

fn name() -> RepositoryName {
    "a/b".parse().unwrap()
}

fn client() -> UpstreamClient {
    UpstreamClient::new(UpstreamOptions {
        request_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        ..UpstreamOptions::default()
    })
    .unwrap()
}

fn basic_creds(password: &str) -> Credentials {
    Credentials::Basic {
        username: USER.into(),
        password: password.into(),
    }
}

fn forward(value: &'static str) -> Credentials {
    Credentials::Forward(HeaderValue::from_static(value))
}

async fn body_of(resp: reqwest::Response) -> Bytes {
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    resp.bytes().await.unwrap()
}

fn refusal(e: UpstreamError) -> bay_common::upstream::Refusal {
    match e {
        UpstreamError::Refused(r) => *r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_bearer_dance_and_token_cache() {
    let (bytes, digest) = blob();
    let (tokens, token_addr) = FakeTokenServer::start(None, 300).await;
    let (reg, registry) = FakeRegistry::bearer(token_addr, BlobAnswer::Bytes(bytes.clone()))
        .start(REGISTRY_IP)
        .await;
    let client = client();
    let anon = Credentials::Anonymous;

    // Sequential calls: one token request, then the cache.
    for i in 0..5 {
        if i % 2 == 0 {
            let head = client
                .head_blob(&registry, &name(), &digest, &anon)
                .await
                .unwrap();
            assert!(!head.redirected);
            assert_eq!(head.size, Some(bytes.len() as u64));
        } else {
            let resp = client
                .get_blob(&registry, &name(), &digest, &anon)
                .await
                .unwrap();
            assert_eq!(body_of(resp).await, bytes);
        }
    }
    assert_eq!(tokens.seen.count(), 1, "sequential calls share one token");
    let t = &tokens.seen.all()[0];
    assert_eq!(t.method, Method::GET);
    assert_eq!(t.query_param("service").as_deref(), Some("svc"));
    assert_eq!(t.query_param("scope").as_deref(), Some(SCOPE));
    assert_eq!(
        t.authorization(),
        None,
        "anonymous token requests carry no credentials"
    );
    // Each call costs the registry an unauthenticated probe (401) plus the authorized retry:
    // the client does not send a cached token up front.
    let seen = reg.seen.all();
    assert_eq!(seen.len(), 10);
    assert!(
        seen.iter()
            .skip(1)
            .step_by(2)
            .all(|s| s.authorization() == Some("Bearer t"))
    );

    // A burst from a cold cache.
    let client = self::client();
    let calls = (0..20).map(|i| {
        let (client, registry, digest, bytes) = (&client, &registry, &digest, &bytes);
        async move {
            if i % 2 == 0 {
                client
                    .head_blob(registry, &name(), digest, &Credentials::Anonymous)
                    .await
                    .map(|_| ())
            } else {
                let resp = client
                    .get_blob(registry, &name(), digest, &Credentials::Anonymous)
                    .await?;
                assert_eq!(body_of(resp).await.len(), bytes.len());
                Ok(())
            }
        }
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    let burst_tokens = tokens.seen.count() - 1;
    assert_eq!(
        burst_tokens, 1,
        "a burst of 20 cold calls fetched {burst_tokens} tokens"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_fetched_again() {
    let (_, digest) = blob();
    // 3 s lifetime; the cache renews a quarter early, so the token is good for 2.25 s (long
    // enough that a stalled machine does not expire it between the first two calls).
    let (tokens, token_addr) = FakeTokenServer::start(None, 3).await;
    let (_reg, registry) = FakeRegistry::bearer(token_addr, BlobAnswer::Bytes(blob().0))
        .start(REGISTRY_IP)
        .await;
    let client = client();
    let anon = Credentials::Anonymous;
    client
        .head_blob(&registry, &name(), &digest, &anon)
        .await
        .unwrap();
    client
        .head_blob(&registry, &name(), &digest, &anon)
        .await
        .unwrap();
    assert_eq!(tokens.seen.count(), 1);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    client
        .head_blob(&registry, &name(), &digest, &anon)
        .await
        .unwrap();
    assert_eq!(tokens.seen.count(), 2, "an expired token is not reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_credentials_are_traded_for_a_token() {
    let (bytes, digest) = blob();
    let (tokens, token_addr) = FakeTokenServer::start(Some(basic_value(USER, PASSWORD)), 300).await;
    let (_reg, registry) = FakeRegistry::bearer(token_addr, BlobAnswer::Bytes(bytes.clone()))
        .start(REGISTRY_IP)
        .await;
    let client = client();

    let resp = client
        .get_blob(&registry, &name(), &digest, &basic_creds(PASSWORD))
        .await
        .unwrap();
    assert_eq!(body_of(resp).await, bytes);
    let seen = tokens.seen.all();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization(),
        Some(basic_value(USER, PASSWORD).as_str())
    );
    assert_eq!(seen[0].query_param("service").as_deref(), Some("svc"));
    assert_eq!(seen[0].query_param("scope").as_deref(), Some(SCOPE));

    // Wrong password: the token endpoint refuses, and so does the client.
    let err = client
        .head_blob(&registry, &name(), &digest, &basic_creds("wrong"))
        .await
        .unwrap_err();
    match &err {
        UpstreamError::Token { realm, why } => {
            assert_eq!(realm, &format!("http://{token_addr}/token"));
            assert!(why.contains("401"), "{why}");
        }
        other => panic!("expected a token error, got {other:?}"),
    }
    assert!(!err.to_string().contains("wrong"), "{err}");
    assert_eq!(
        tokens.seen.count(),
        2,
        "the right password's token is not reused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_token_failures_does_not_queue() {
    let (_, digest) = blob();
    let delay = Duration::from_millis(300);
    let (tokens, token_addr) =
        FakeTokenServer::start_slow(Some(basic_value(USER, PASSWORD)), 300, delay).await;
    let (_reg, registry) = FakeRegistry::bearer(token_addr, BlobAnswer::Bytes(blob().0))
        .start(REGISTRY_IP)
        .await;
    let client = client();
    let started = std::time::Instant::now();
    let calls = (0..10).map(|_| {
        let (client, registry, digest) = (&client, &registry, &digest);
        async move {
            client
                .head_blob(registry, &name(), digest, &basic_creds("wrong"))
                .await
        }
    });
    for r in futures::future::join_all(calls).await {
        assert!(matches!(r, Err(UpstreamError::Token { .. })), "{r:?}");
    }
    // One failed fetch, then the waiters' own fetches side by side: two rounds, not ten
    // (the bound leaves a loaded machine room and still fails at ten rounds).
    let elapsed = started.elapsed();
    assert!(elapsed < delay * 7, "{elapsed:?}");
    assert!(tokens.seen.count() <= 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_registry() {
    let (bytes, digest) = blob();
    let (reg, registry) = FakeRegistry::basic(BlobAnswer::Bytes(bytes.clone()))
        .start(REGISTRY_IP)
        .await;
    let client = client();

    let resp = client
        .get_blob(&registry, &name(), &digest, &basic_creds(PASSWORD))
        .await
        .unwrap();
    assert_eq!(body_of(resp).await, bytes);
    let head = client
        .head_blob(&registry, &name(), &digest, &basic_creds(PASSWORD))
        .await
        .unwrap();
    assert_eq!(head.size, Some(bytes.len() as u64));
    let auths: Vec<_> = reg
        .seen
        .all()
        .iter()
        .map(|s| s.authorization().map(str::to_string))
        .collect();
    let basic = Some(basic_value(USER, PASSWORD));
    assert_eq!(auths, [None, basic.clone(), None, basic]);

    for creds in [Credentials::Anonymous, basic_creds("wrong")] {
        let r = refusal(
            client
                .get_blob(&registry, &name(), &digest, &creds)
                .await
                .unwrap_err(),
        );
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{creds:?}");
        assert_eq!(r.headers["www-authenticate"], r#"Basic realm="r""#);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["docker-distribution-api-version"], "registry/2.0");
        assert_eq!(r.body, UNAUTHORIZED_BODY);
    }
    // A HEAD refusal has no body; to_parts makes a registry error of it.
    let r = refusal(
        client
            .head_blob(&registry, &name(), &digest, &Credentials::Anonymous)
            .await
            .unwrap_err(),
    );
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], r#"Basic realm="r""#);
    assert!(r.body.is_empty());
    let (status, headers, body) = r.to_parts();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], r#"Basic realm="r""#);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_sends_the_client_header_and_never_trades_it() {
    let (bytes, digest) = blob();
    let (tokens, token_addr) = FakeTokenServer::start(None, 300).await;
    let (reg, registry) = FakeRegistry::bearer(token_addr, BlobAnswer::Bytes(bytes.clone()))
        .start(REGISTRY_IP)
        .await;
    let client = client();

    // A good header: one request, sent with it.
    let resp = client
        .get_blob(&registry, &name(), &digest, &forward("Bearer t"))
        .await
        .unwrap();
    assert_eq!(body_of(resp).await, bytes);
    let seen = reg.seen.all();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization(), Some("Bearer t"));

    // A stale one: the 401 and its challenge come back for the client's own token dance.
    for creds in [forward("Bearer stale-token"), forward("Basic Zm9vOmJhcg==")] {
        for head in [true, false] {
            let err = if head {
                client
                    .head_blob(&registry, &name(), &digest, &creds)
                    .await
                    .map(|_| ())
            } else {
                client
                    .get_blob(&registry, &name(), &digest, &creds)
                    .await
                    .map(|_| ())
            }
            .unwrap_err();
            let r = refusal(err);
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            assert_eq!(
                r.headers["www-authenticate"],
                format!(
                    r#"Bearer realm="http://{token_addr}/token",service="svc",scope="{SCOPE}""#
                )
            );
            assert_eq!(r.body.is_empty(), head);
        }
    }
    let sent: Vec<_> = reg.seen.all()[1..]
        .iter()
        .map(|s| s.authorization().unwrap().to_string())
        .collect();
    assert_eq!(
        sent,
        [
            "Bearer stale-token",
            "Bearer stale-token",
            "Basic Zm9vOmJhcg==",
            "Basic Zm9vOmJhcg=="
        ],
        "exactly one request each, with the header verbatim"
    );
    assert_eq!(tokens.seen.count(), 0, "Forward never asks for a token");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_another_host_drops_authorization() {
    let (bytes, digest) = blob();
    let (storage, storage_addr) = FakeStorage::start(STORAGE_IP, bytes.clone()).await;
    let (tokens, token_addr) = FakeTokenServer::start(Some(basic_value(USER, PASSWORD)), 300).await;
    let location = format!("http://{storage_addr}/storage/blob?X-Signature=abc");
    let (reg, registry) = FakeRegistry::bearer(token_addr, BlobAnswer::Redirect(location))
        .start(REGISTRY_IP)
        .await;
    let client = client();

    // HEAD: the redirect alone answers it; storage is never asked.
    for creds in [forward("Bearer t"), basic_creds(PASSWORD)] {
        let head = client
            .head_blob(&registry, &name(), &digest, &creds)
            .await
            .unwrap();
        assert!(head.redirected);
        assert_eq!(head.size, None);
    }
    assert_eq!(storage.seen.count(), 0, "HEAD never follows");

    for creds in [forward("Bearer t"), basic_creds(PASSWORD)] {
        let resp = client
            .get_blob(&registry, &name(), &digest, &creds)
            .await
            .unwrap();
        assert_eq!(body_of(resp).await, bytes);
    }
    // Ranges survive the redirect; credentials don't.
    let resp = client
        .get_blob_from(&registry, &name(), &digest, &forward("Bearer t"), 5)
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK); // the fake ignores ranges
    let seen = storage.seen.all();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.method, Method::GET);
        assert_eq!(s.path, "/storage/blob");
        assert_eq!(s.query, "X-Signature=abc");
        assert_eq!(s.authorization(), None, "storage got {:?}", s.headers);
    }
    assert_eq!(seen[2].headers["range"], "bytes=5-");
    // The registry itself did get the credentials (through the token dance for Basic).
    assert_eq!(tokens.seen.count(), 1);
    assert!(
        reg.seen
            .all()
            .iter()
            .any(|s| s.method == Method::GET && s.authorization() == Some("Bearer t"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_from_a_basic_registry_drops_the_password() {
    let (bytes, digest) = blob();
    // Same IP as the registry, another port: still another origin to reqwest.
    for storage_ip in [STORAGE_IP, REGISTRY_IP] {
        let (storage, storage_addr) = FakeStorage::start(storage_ip, bytes.clone()).await;
        let location = format!("http://{storage_addr}/docker/registry/v2/blobs/data");
        let (_reg, registry) = FakeRegistry::basic(BlobAnswer::Redirect(location))
            .start(REGISTRY_IP)
            .await;
        let resp = client()
            .get_blob(&registry, &name(), &digest, &basic_creds(PASSWORD))
            .await
            .unwrap();
        assert_eq!(body_of(resp).await, bytes);
        let seen = storage.seen.all();
        assert_eq!(seen.len(), 1, "{storage_ip}");
        assert_eq!(seen[0].authorization(), None, "{storage_ip}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_the_same_host_keeps_authorization() {
    let (bytes, digest) = blob();
    let (tokens, token_addr) = FakeTokenServer::start(None, 300).await;
    for location in [
        SAME_HOST_PATH.to_string(),
        // Absolute, filled in below once the port is known.
        String::new(),
    ] {
        let mut fake = FakeRegistry::bearer(token_addr, BlobAnswer::Bytes(Bytes::new()));
        fake.same_host_bytes = bytes.clone();
        // The registry only learns its port when it starts; a relative Location avoids that,
        // and for the absolute case the address is reserved first.
        let listener = tokio::net::TcpListener::bind((REGISTRY_IP, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        fake.blob = BlobAnswer::Redirect(if location.is_empty() {
            format!("http://{addr}{SAME_HOST_PATH}")
        } else {
            location
        });
        let state = Arc::new(fake);
        let app = Router::new()
            .fallback(registry_handler)
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let registry: Registry = format!("http://{addr}").parse().unwrap();

        for creds in [forward("Bearer t"), Credentials::Anonymous] {
            let resp = client()
                .get_blob(&registry, &name(), &digest, &creds)
                .await
                .unwrap();
            assert_eq!(body_of(resp).await, bytes);
        }
        let to_target: Vec<_> = state
            .seen
            .all()
            .into_iter()
            .filter(|s| s.path == SAME_HOST_PATH)
            .collect();
        assert_eq!(to_target.len(), 2);
        for s in to_target {
            assert_eq!(s.authorization(), Some("Bearer t"));
        }
    }
    assert_eq!(tokens.seen.count(), 2, "one anonymous token per client");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_keep_status_body_and_headers() {
    let (_, digest) = blob();
    let cases = [
        (
            StatusCode::NOT_FOUND,
            vec![("content-type", "application/json")],
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:x"}]}"#,
        ),
        (
            StatusCode::FORBIDDEN,
            vec![("content-type", "application/json")],
            r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
        ),
        (
            StatusCode::TOO_MANY_REQUESTS,
            vec![
                ("content-type", "application/json"),
                ("retry-after", "17"),
                ("docker-error", "ratelimited"),
            ],
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
        ),
    ];
    let client = client();
    for (status, headers, body) in cases {
        let (_reg, registry) = FakeRegistry::open(BlobAnswer::Refuse {
            status,
            headers: headers.clone(),
            body,
        })
        .start(REGISTRY_IP)
        .await;
        let r = refusal(
            client
                .get_blob(&registry, &name(), &digest, &Credentials::Anonymous)
                .await
                .unwrap_err(),
        );
        assert_eq!(r.status, status);
        assert_eq!(r.body, body);
        for (k, v) in &headers {
            assert_eq!(r.headers[*k], *v, "{status} {k}");
        }
        let (s, h, b) = r.to_parts();
        assert_eq!(
            (s, b),
            (status, Bytes::from(body)),
            "a GET's body is relayed as is"
        );
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(h["retry-after"], "17");
        }

        let r = refusal(
            client
                .head_blob(&registry, &name(), &digest, &Credentials::Anonymous)
                .await
                .unwrap_err(),
        );
        assert_eq!(r.status, status);
        assert!(r.body.is_empty());
    }

    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::BAD_REQUEST,
    ] {
        let (_reg, registry) = FakeRegistry::open(BlobAnswer::Refuse {
            status,
            headers: vec![],
            body: "oops",
        })
        .start(REGISTRY_IP)
        .await;
        for head in [true, false] {
            let err = if head {
                client
                    .head_blob(&registry, &name(), &digest, &Credentials::Anonymous)
                    .await
                    .map(|_| ())
            } else {
                client
                    .get_blob(&registry, &name(), &digest, &Credentials::Anonymous)
                    .await
                    .map(|_| ())
            }
            .unwrap_err();
            match err {
                UpstreamError::Status { status: s, url } => {
                    assert_eq!(s, status);
                    assert_eq!(url, UpstreamClient::blob_url(&registry, &name(), &digest));
                }
                other => panic!("expected a status error for {status}, got {other:?}"),
            }
        }
    }
}

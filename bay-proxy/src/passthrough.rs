//! Everything but blob GETs: relayed to the upstream registry as they are, both bodies streamed.
//!
//! The client must not be able to tell the proxy from the registry, so method, path, query,
//! end-to-end headers and bodies pass unchanged in both directions. The only edits are the
//! ones HTTP asks of a proxy (hop-by-hop headers, `Host`) and `Location`s that point at the
//! upstream itself, which are turned back towards the proxy so upload sessions stay on it.

use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{OriginalUri, Request};
use axum::http::Method;
use axum::http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bay_common::upstream::UpstreamError;
use bay_common::{NameError, Registry, Scheme};
use url::Url;

use crate::error::ProxyError;

/// How long the TCP (and TLS) handshake with the upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a bodyless request waits for the upstream's answer to start, and then for each
/// piece of its body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1), plus the
/// never-standard `Proxy-Connection`. Headers named in `Connection` are dropped too.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwards a request to an upstream registry and streams the answer back.
///
/// Redirects are never followed: a 307 to blob storage goes back to the client as it came,
/// and the client decides, as it would talking to the registry directly.
#[derive(Debug, Clone)]
pub struct Passthrough {
    /// Requests without a body: an upstream that goes silent for the read timeout (before
    /// or during its answer) is given up on.
    client: reqwest::Client,
    /// Requests with a body (blob uploads, manifest pushes). reqwest's read timeout runs from
    /// the moment the request starts, so a GiB layer push would trip it while still sending,
    /// and a registry may take minutes to commit a big blob after the last byte. Docker's own
    /// client sets no response deadline either, so here the client's patience decides; a
    /// client that gives up drops its connection, and with it this request.
    uploads: reqwest::Client,
}

impl Passthrough {
    pub fn new() -> Result<Self, reqwest::Error> {
        Self::with_timeouts(CONNECT_TIMEOUT, READ_TIMEOUT)
    }

    /// Like [`Passthrough::new`], with other timeouts (tests, slow links).
    pub fn with_timeouts(connect: Duration, read: Duration) -> Result<Self, reqwest::Error> {
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(bay_common::upstream::IDLE_PER_HOST)
                .pool_idle_timeout(bay_common::upstream::IDLE_TIMEOUT)
                .connect_timeout(connect)
                // Bodies are relayed as bytes: manifests are digested as sent, and
                // Content-Length must keep describing what is relayed. These are no-ops
                // unless another crate turns the decompression features on.
                .no_gzip()
                .no_brotli()
                .no_deflate()
                .no_zstd()
        };
        Ok(Self {
            client: builder().read_timeout(read).build()?,
            uploads: builder().build()?,
        })
    }

    /// Sends `req` to `upstream` and relays the answer.
    ///
    /// `proxy_host` is the Host header the client used (`p2p-registry.example.com:5000`);
    /// upstream `Location`s pointing at the upstream itself are rewritten to
    /// `http://<proxy_host><path>` so the client comes back here. Failing to reach the
    /// upstream is answered with a registry-style 502 `UNAVAILABLE`.
    pub async fn forward(&self, upstream: &Registry, proxy_host: &str, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        // Behind a nested router the request URI has lost its prefix; the original has not.
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(&parts.uri, |original| &original.0);
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let Some(url) = upstream_url(upstream, target) else {
            return ProxyError::BadName(NameError::Invalid {
                value: shortened(target),
                reason: "the path would not reach the upstream unchanged \
                         (dot segments or characters a URL parser escapes)",
            })
            .into_response();
        };
        let method = parts.method;
        let path = url.path().to_owned();

        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // reqwest writes the upstream's Host. Our own server already answered any
        // `Expect: 100-continue` once the body started flowing upstream. (reqwest also
        // adds `Accept: */*` when the client sent no Accept at all; it has no way to
        // leave it out, and to a registry it means the same as no Accept.)
        headers.remove(header::HOST);
        headers.remove(header::EXPECT);

        let mut request = reqwest::Request::new(method.clone(), url);
        *request.headers_mut() = headers;
        let client = if body.is_end_stream() {
            &self.client
        } else {
            // A client's Content-Length stays in the headers and hyper sends the body with
            // it (registries need it for monolithic PUTs); without one it goes chunked.
            *request.body_mut() = Some(reqwest::Body::wrap_stream(body.into_data_stream()));
            &self.uploads
        };

        match client.execute(request).await {
            Ok(answer) => {
                tracing::debug!(
                    upstream = %upstream, %method, path, status = answer.status().as_u16(),
                    "passthrough"
                );
                relay(answer, &method, upstream, proxy_host)
            }
            Err(e) => {
                // The whole chain: reqwest's own message is only "error sending request".
                tracing::warn!(
                    upstream = %upstream, %method, path, error = %crate::error::chain(&e),
                    "upstream unreachable"
                );
                ProxyError::Upstream(UpstreamError::Transport {
                    url: format!("{}{path}", upstream.base_url()),
                    source: e.without_url(),
                })
                .into_response()
            }
        }
    }
}

/// The upstream URL for a request target, or `None` when the URL parser would change the
/// path or query (resolving `..`, escaping `{`): forwarding a path other than the one the
/// client asked for would not be transparent, and no registry path needs either.
fn upstream_url(upstream: &Registry, target: &str) -> Option<Url> {
    if !target.starts_with('/') {
        return None;
    }
    let url = Url::parse(&format!("{}{target}", upstream.base_url())).ok()?;
    (&url[url::Position::BeforePath..] == target).then_some(url)
}

/// The client's answer: upstream status, headers and body, minus hop-by-hop headers.
fn relay(
    answer: reqwest::Response,
    method: &Method,
    upstream: &Registry,
    proxy_host: &str,
) -> Response {
    let (parts, body) = axum::http::Response::<reqwest::Body>::from(answer).into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    rewrite_locations(&mut headers, upstream, proxy_host);

    let body = if method == Method::HEAD {
        // Empty, but of unknown length: axum gives a body of known length 0 a
        // `Content-Length: 0`, which would be a lie on a HEAD whose upstream sent no
        // length, and the upstream's own Content-Length (the GET's size) must stand.
        Body::from_stream(futures::stream::empty::<
            Result<Bytes, std::convert::Infallible>,
        >())
    } else {
        // Streamed as it arrives; the exact size hint from the upstream's Content-Length
        // is kept, so the client gets the same framing.
        Body::new(body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = parts.status;
    *response.headers_mut() = headers;
    response
}

/// Removes the headers that belong to one hop, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn rewrite_locations(headers: &mut HeaderMap, upstream: &Registry, proxy_host: &str) {
    if let Entry::Occupied(mut locations) = headers.entry(header::LOCATION) {
        for value in locations.iter_mut() {
            let rewritten = value
                .to_str()
                .ok()
                .and_then(|location| proxied_location(location, upstream, proxy_host))
                .and_then(|location| HeaderValue::from_str(&location).ok());
            if let Some(rewritten) = rewritten {
                *value = rewritten;
            }
        }
    }
}

/// `http://<proxy_host><path?query>` when `location` is an absolute (or scheme-relative) URL
/// on the upstream itself: same scheme, host and port. `None` for relative locations, which
/// already resolve against the proxy, and for other hosts such as blob storage.
fn proxied_location(location: &str, upstream: &Registry, proxy_host: &str) -> Option<String> {
    let absolute = if location.starts_with("//") {
        format!("{}:{location}", upstream.scheme())
    } else {
        location.to_owned()
    };
    let url = Url::parse(&absolute).ok()?;
    let default_port = match upstream.scheme() {
        Scheme::Http => 80,
        Scheme::Https => 443,
    };
    let same_origin = url.scheme() == upstream.scheme().as_str()
        && url.username().is_empty()
        && url.password().is_none()
        && url.host_str() == Some(upstream.host())
        && url.port_or_known_default() == Some(upstream.port().unwrap_or(default_port));
    if !same_origin {
        return None;
    }
    // Path and query exactly as the upstream wrote them: everything after the authority,
    // which ends at the first `/`, `?` or `#` after `//`.
    let after_scheme = &absolute[absolute.find("//")? + 2..];
    let rest = &after_scheme[after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len())..];
    let slash = if rest.starts_with('/') { "" } else { "/" };
    Some(format!("http://{proxy_host}{slash}{rest}"))
}

/// At most 80 bytes of a request target, for error messages.
fn shortened(target: &str) -> String {
    let mut end = target.len().min(80);
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    target[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::http::StatusCode;
    use bay_common::api::{ErrorBody, ErrorCode};
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::timeout;

    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const WAIT: Duration = Duration::from_secs(10);

    /// What the fake upstream received.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        target: String,
        headers: HeaderMap,
        body: Bytes,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    async fn serve(listener: TcpListener, router: Router) -> SocketAddr {
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr
    }

    async fn loopback() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    /// A fake upstream that records every request (body read whole) and answers with
    /// `answer(own address, request)`.
    async fn recording_upstream<F>(answer: F) -> (SocketAddr, Log)
    where
        F: Fn(SocketAddr, &Seen) -> Response + Clone + Send + Sync + 'static,
    {
        let listener = loopback().await;
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let seen = log.clone();
        let router = Router::new().fallback(move |req: Request| {
            let (answer, seen) = (answer.clone(), seen.clone());
            async move {
                let (parts, body) = req.into_parts();
                let request = Seen {
                    method: parts.method,
                    target: parts.uri.path_and_query().unwrap().as_str().to_owned(),
                    headers: parts.headers,
                    body: axum::body::to_bytes(body, usize::MAX).await.unwrap(),
                };
                let response = answer(addr, &request);
                seen.lock().unwrap().push(request);
                response
            }
        });
        (serve(listener, router).await, log)
    }

    fn registry(addr: SocketAddr) -> Registry {
        format!("http://{addr}").parse().unwrap()
    }

    /// A proxy whose every request goes through `passthrough` to `upstream`.
    async fn proxy_with(passthrough: Passthrough, upstream: Registry) -> SocketAddr {
        let router = Router::new().fallback(move |req: Request| {
            let (passthrough, upstream) = (passthrough.clone(), upstream.clone());
            async move {
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                passthrough.forward(&upstream, &host, req).await
            }
        });
        serve(loopback().await, router).await
    }

    async fn proxy_to(upstream: SocketAddr) -> SocketAddr {
        proxy_with(Passthrough::new().unwrap(), registry(upstream)).await
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: impl Into<Body>) -> Response {
        let mut response = Response::new(body.into());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        response
    }

    /// Sends `request` (which must say `Connection: close`) over a plain socket and returns
    /// the response head's lines and the body bytes, as they were on the wire.
    async fn raw_exchange(addr: SocketAddr, request: &str) -> (Vec<String>, Vec<u8>) {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut bytes = Vec::new();
        timeout(WAIT, socket.read_to_end(&mut bytes))
            .await
            .unwrap()
            .unwrap();
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
        (
            head.split("\r\n").map(str::to_owned).collect(),
            bytes[end + 4..].to_vec(),
        )
    }

    /// Values of `name` in a raw response head, in order.
    fn raw_header(head: &[String], name: &str) -> Vec<String> {
        head.iter()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn passthrough_forwards_target_headers_and_manifest_bytes_verbatim() {
        // Odd spacing on purpose: any re-serialisation would change the digest.
        const MANIFEST: &str = "{\"schemaVersion\": 2,\n   \"mediaType\" :\"x\"}\n";
        let (up, log) = recording_upstream(|_, _| {
            answer(
                200,
                &[
                    ("content-type", "application/vnd.oci.image.index.v1+json"),
                    ("docker-content-digest", DIGEST),
                    ("docker-distribution-api-version", "registry/2.0"),
                    ("warning", "299 - \"deprecated\""),
                ],
                MANIFEST,
            )
        })
        .await;
        let proxy = proxy_to(up).await;
        let target = "/v2/a/b/manifests/latest?ns=x&y=%2F&z=a%20b";

        let mut accept = HeaderMap::new();
        for value in [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            "*/*",
        ] {
            accept.append(header::ACCEPT, HeaderValue::from_static(value));
        }
        let response = client()
            .get(format!("http://{proxy}{target}"))
            .headers(accept)
            .header(header::AUTHORIZATION, "Bearer s3cr3t")
            .header(header::USER_AGENT, "docker/27.0 go/go1.22")
            .header(header::RANGE, "bytes=0-")
            .header(header::IF_NONE_MATCH, "\"sha256:abc\"")
            .header("docker-foo", "bar")
            .send()
            .await
            .unwrap();

        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(
            values(&headers, "content-type"),
            ["application/vnd.oci.image.index.v1+json"]
        );
        assert_eq!(values(&headers, "docker-content-digest"), [DIGEST]);
        assert_eq!(
            values(&headers, "docker-distribution-api-version"),
            ["registry/2.0"]
        );
        assert_eq!(values(&headers, "warning"), ["299 - \"deprecated\""]);
        assert_eq!(
            values(&headers, "content-length"),
            [MANIFEST.len().to_string()]
        );
        assert_eq!(response.bytes().await.unwrap(), MANIFEST.as_bytes());

        let seen = log.lock().unwrap()[0].clone();
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.target, target);
        assert_eq!(
            values(&seen.headers, "accept"),
            [
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
                "*/*",
            ]
        );
        assert_eq!(values(&seen.headers, "authorization"), ["Bearer s3cr3t"]);
        assert_eq!(
            values(&seen.headers, "user-agent"),
            ["docker/27.0 go/go1.22"]
        );
        assert_eq!(values(&seen.headers, "range"), ["bytes=0-"]);
        assert_eq!(values(&seen.headers, "if-none-match"), ["\"sha256:abc\""]);
        assert_eq!(values(&seen.headers, "docker-foo"), ["bar"]);
        assert_eq!(values(&seen.headers, "host"), [up.to_string()]);
        assert!(seen.body.is_empty());
    }

    #[tokio::test]
    async fn passthrough_keeps_every_method() {
        let (up, log) = recording_upstream(|_, _| answer(202, &[], "")).await;
        let proxy = proxy_to(up).await;
        let methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
        for method in methods {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let response = client()
                .request(method, format!("http://{proxy}/v2/a/blobs/uploads/"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
        }
        let seen: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.method.to_string())
            .collect();
        assert_eq!(seen, methods);
    }

    #[tokio::test]
    async fn passthrough_strips_hop_by_hop_headers_both_ways() {
        let (up, log) = recording_upstream(|_, _| {
            answer(
                200,
                &[
                    ("connection", "x-resp-hop"),
                    ("x-resp-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-authenticate", "Basic realm=\"proxy\""),
                    ("upgrade", "h2c"),
                    ("x-end-to-end", "kept"),
                ],
                "body",
            )
        })
        .await;
        let proxy = proxy_to(up).await;

        // Raw, so nothing between the test and the proxy adds or drops headers.
        let (head, body) = raw_exchange(
            proxy,
            "GET /v2/ HTTP/1.1\r\n\
             Host: p2p-registry.example.com\r\n\
             Connection: close, x-hop\r\n\
             X-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\n\
             TE: trailers\r\n\
             Trailer: x-checksum\r\n\
             Proxy-Authorization: Basic cHJveHk6cHJveHk=\r\n\
             Proxy-Connection: keep-alive\r\n\
             Upgrade: h2c\r\n\
             X-End-To-End: kept\r\n\
             \r\n",
        )
        .await;

        let seen = log.lock().unwrap()[0].clone();
        for name in [
            "x-hop",
            "keep-alive",
            "te",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(!seen.headers.contains_key(name), "{name} went upstream");
        }
        // Whatever reqwest says about its own connection, never the client's tokens.
        assert!(
            values(&seen.headers, "connection")
                .iter()
                .all(|v| !v.contains("x-hop"))
        );
        assert_eq!(values(&seen.headers, "x-end-to-end"), ["kept"]);

        assert!(head[0].starts_with("HTTP/1.1 200"), "{head:?}");
        for name in ["x-resp-hop", "keep-alive", "proxy-authenticate", "upgrade"] {
            assert!(raw_header(&head, name).is_empty(), "{name} came back");
        }
        assert!(
            raw_header(&head, "connection")
                .iter()
                .all(|v| !v.contains("x-resp-hop"))
        );
        assert_eq!(raw_header(&head, "x-end-to-end"), ["kept"]);
        assert_eq!(body, b"body");
    }

    #[tokio::test]
    async fn passthrough_head_keeps_upstream_length_and_digest_on_the_wire() {
        let (up, _) = recording_upstream(|_, seen| {
            if seen.target.ends_with("/latest") {
                answer(
                    200,
                    &[
                        ("content-length", "1234"),
                        ("content-type", "application/vnd.oci.image.manifest.v1+json"),
                        ("docker-content-digest", DIGEST),
                    ],
                    Body::empty(),
                )
            } else {
                // An older registry that sends no length: the proxy must not make one up.
                // (An empty body of unknown length, so that axum doesn't either.)
                answer(
                    200,
                    &[("docker-content-digest", DIGEST)],
                    Body::from_stream(futures::stream::empty::<Result<Bytes, std::io::Error>>()),
                )
            }
        })
        .await;
        let proxy = proxy_to(up).await;

        let (head, body) = raw_exchange(
            proxy,
            "HEAD /v2/a/manifests/latest HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(head[0].starts_with("HTTP/1.1 200"), "{head:?}");
        assert_eq!(raw_header(&head, "content-length"), ["1234"]);
        assert_eq!(raw_header(&head, "docker-content-digest"), [DIGEST]);
        assert_eq!(
            raw_header(&head, "content-type"),
            ["application/vnd.oci.image.manifest.v1+json"]
        );
        assert!(raw_header(&head, "transfer-encoding").is_empty());
        assert!(body.is_empty());

        let (head, body) = raw_exchange(
            proxy,
            "HEAD /v2/a/manifests/old HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(head[0].starts_with("HTTP/1.1 200"), "{head:?}");
        assert_eq!(raw_header(&head, "docker-content-digest"), [DIGEST]);
        assert!(raw_header(&head, "content-length").is_empty(), "{head:?}");
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn passthrough_relays_auth_challenges_verbatim() {
        const BEARER: &str = "Bearer realm=\"https://auth.example.com/token\",\
                              service=\"registry.example.com\",scope=\"repository:a/b:pull\"";
        const BODY: &str = "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\",\"detail\":null}]}\n";
        let (up, log) = recording_upstream(|_, _| {
            answer(
                401,
                &[
                    ("www-authenticate", BEARER),
                    ("www-authenticate", "Basic realm=\"basic-realm\""),
                    ("content-type", "application/json"),
                ],
                BODY,
            )
        })
        .await;
        let proxy = proxy_to(up).await;

        let response = client()
            .get(format!("http://{proxy}/v2/a/b/manifests/1"))
            .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            values(response.headers(), "www-authenticate"),
            [BEARER, "Basic realm=\"basic-realm\""]
        );
        assert_eq!(response.text().await.unwrap(), BODY);
        assert_eq!(
            values(&log.lock().unwrap()[0].headers, "authorization"),
            ["Basic dXNlcjpwYXNz"]
        );
    }

    #[tokio::test]
    async fn passthrough_points_upstream_locations_back_at_the_proxy() {
        let (up, _) = recording_upstream(|own, seen| {
            let location = match seen.target.as_str() {
                "/v2/a/blobs/uploads/" => {
                    format!("http://{own}/v2/a/blobs/uploads/0b1e?_state=q%2Bx%3D&a=b")
                }
                "/scheme-relative" => format!("//{own}/v2/a/blobs/uploads/2"),
                "/relative" => "/v2/a/blobs/uploads/1?_state=x".to_owned(),
                "/other-port" => format!("http://{}:1/v2/x", own.ip()),
                "/https" => format!("https://{own}/v2/x"),
                _ => {
                    "https://storage.example.com/docker/blobs/data?X-Amz-Signature=ab%2F".to_owned()
                }
            };
            let status = if seen.method == Method::POST {
                202
            } else {
                307
            };
            answer(status, &[("location", &location)], "")
        })
        .await;
        let proxy = proxy_to(up).await;

        let location = |method: Method, path: &'static str| {
            let request = client()
                .request(method, format!("http://{proxy}{path}"))
                .header(header::HOST, "p2p-registry.example.com:5000");
            async move {
                let response = request.send().await.unwrap();
                values(response.headers(), "location")
            }
        };
        assert_eq!(
            location(Method::POST, "/v2/a/blobs/uploads/").await,
            ["http://p2p-registry.example.com:5000/v2/a/blobs/uploads/0b1e?_state=q%2Bx%3D&a=b"]
        );
        assert_eq!(
            location(Method::GET, "/scheme-relative").await,
            ["http://p2p-registry.example.com:5000/v2/a/blobs/uploads/2"]
        );
        assert_eq!(
            location(Method::GET, "/relative").await,
            ["/v2/a/blobs/uploads/1?_state=x"]
        );
        assert_eq!(
            location(Method::GET, "/other-port").await,
            [format!("http://{}:1/v2/x", up.ip())]
        );
        assert_eq!(
            location(Method::GET, "/https").await,
            [format!("https://{up}/v2/x")]
        );
        assert_eq!(
            location(Method::GET, "/v2/a/blobs/sha256:0").await,
            ["https://storage.example.com/docker/blobs/data?X-Amz-Signature=ab%2F"]
        );
    }

    #[test]
    fn proxied_location_matches_scheme_host_and_port() {
        let rewrite = |location: &str, upstream: &str| {
            proxied_location(location, &upstream.parse().unwrap(), "p2p-r.example:5000")
        };
        let to_proxy = |path: &str| Some(format!("http://p2p-r.example:5000{path}"));
        assert_eq!(
            rewrite("https://R.example/v2/x", "r.example"),
            to_proxy("/v2/x")
        );
        assert_eq!(
            rewrite("https://r.example:443/v2/x", "r.example"),
            to_proxy("/v2/x")
        );
        assert_eq!(
            rewrite("https://r.example/v2/x", "r.example:443"),
            to_proxy("/v2/x")
        );
        assert_eq!(rewrite("https://r.example", "r.example"), to_proxy("/"));
        assert_eq!(
            rewrite("https://r.example?a=%2f", "r.example"),
            to_proxy("/?a=%2f")
        );
        assert_eq!(
            rewrite("http://[::1]:5000/v2/", "http://[::1]:5000"),
            to_proxy("/v2/")
        );
        assert_eq!(rewrite("//r.example/v2/x", "r.example"), to_proxy("/v2/x"));
        assert_eq!(rewrite("http://r.example/v2/x", "r.example"), None);
        assert_eq!(rewrite("https://r.example:8443/v2/x", "r.example"), None);
        assert_eq!(rewrite("https://user@r.example/v2/x", "r.example"), None);
        assert_eq!(
            rewrite("https://s3.example/r.example/v2/x", "r.example"),
            None
        );
        assert_eq!(rewrite("/v2/x", "r.example"), None);
        assert_eq!(rewrite("v2/x", "r.example"), None);
    }

    #[tokio::test]
    async fn passthrough_streams_a_big_put_with_its_content_length() {
        const SIZE: usize = 8 << 20;
        let (up, log) = recording_upstream(|_, _| answer(201, &[], "")).await;
        let proxy = proxy_to(up).await;
        let blob: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let chunks: Vec<Result<Bytes, std::io::Error>> = blob
            .chunks(64 << 10)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();

        let response = client()
            .put(format!(
                "http://{proxy}/v2/a/blobs/uploads/1?_state=s&digest={DIGEST}"
            ))
            .header(header::CONTENT_LENGTH, SIZE)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);

        let seen = log.lock().unwrap()[0].clone();
        assert_eq!(seen.method, Method::PUT);
        assert_eq!(values(&seen.headers, "content-length"), [SIZE.to_string()]);
        assert!(!seen.headers.contains_key("transfer-encoding"));
        assert_eq!(
            values(&seen.headers, "content-type"),
            ["application/octet-stream"]
        );
        assert!(seen.body == blob, "body changed on the way");
    }

    #[tokio::test]
    async fn passthrough_streams_uploads_before_they_end() {
        let (first_arrived, arrived) = oneshot::channel::<Bytes>();
        let first_arrived = Arc::new(Mutex::new(Some(first_arrived)));
        let router = Router::new().fallback(move |req: Request| {
            let first_arrived = first_arrived.lock().unwrap().take().unwrap();
            async move {
                let mut body = req.into_body().into_data_stream();
                let first = body.next().await.unwrap().unwrap();
                first_arrived.send(first.clone()).unwrap();
                let mut total = first.len();
                while let Some(chunk) = body.next().await {
                    total += chunk.unwrap().len();
                }
                answer(202, &[], total.to_string())
            }
        });
        let up = serve(loopback().await, router).await;
        let proxy = proxy_to(up).await;

        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let request = client()
            .patch(format!("http://{proxy}/v2/a/blobs/uploads/1"))
            .body(reqwest::Body::wrap_stream(receiver_stream(rx)))
            .send();
        let request = tokio::spawn(request);
        tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
        // The upstream has the first chunk while the client still holds the rest.
        let first = timeout(WAIT, arrived).await.unwrap().unwrap();
        assert_eq!(first, "first");
        tx.send(Ok(Bytes::from_static(b"-second"))).await.unwrap();
        drop(tx);
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 202);
        assert_eq!(response.text().await.unwrap(), "12");
    }

    /// An mpsc receiver as a stream, without pulling in tokio-stream.
    fn receiver_stream<T: Send + 'static>(
        rx: mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send + 'static {
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
    }

    #[tokio::test]
    async fn passthrough_streams_answers_before_they_end() {
        let (release, released) = oneshot::channel::<()>();
        let released = Arc::new(Mutex::new(Some(released)));
        let router = Router::new().fallback(move || {
            let released = released.lock().unwrap().take().unwrap();
            let rest = async move {
                released.await.unwrap();
                Ok::<_, std::io::Error>(Bytes::from(vec![b'b'; 1 << 20]))
            };
            let body = futures::stream::once(async { Ok(Bytes::from_static(b"first chunk")) })
                .chain(futures::stream::once(rest));
            async move { answer(200, &[], Body::from_stream(body)) }
        });
        let up = serve(loopback().await, router).await;
        let proxy = proxy_to(up).await;

        let mut response = timeout(WAIT, client().get(format!("http://{proxy}/v2/big")).send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        // The upstream is still holding the rest back.
        let first = timeout(WAIT, response.chunk()).await.unwrap().unwrap();
        assert_eq!(first.unwrap(), "first chunk");
        release.send(()).unwrap();
        let mut rest = 0;
        while let Some(chunk) = timeout(WAIT, response.chunk()).await.unwrap().unwrap() {
            rest += chunk.len();
        }
        assert_eq!(rest, 1 << 20);
    }

    #[tokio::test]
    async fn passthrough_answers_502_unavailable_when_upstream_is_down() {
        // Bound but not listening: connections are refused, and no test running beside this
        // one can take the port (a listener dropped at once left it to the next test's fake
        // upstream, which then answered here).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let closed = socket.local_addr().unwrap();
        let proxy = proxy_to(closed).await;

        let response = client()
            .get(format!("http://{proxy}/v2/a/manifests/1?x=y"))
            .header(header::AUTHORIZATION, "Bearer s3cr3t")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502);
        assert_eq!(
            values(response.headers(), "content-type"),
            ["application/json"]
        );
        let text = response.text().await.unwrap();
        let body: ErrorBody = serde_json::from_str(&text).unwrap();
        assert_eq!(body.errors[0].code, ErrorCode::Unavailable);
        assert!(
            body.errors[0].message.contains(&closed.to_string()),
            "{text}"
        );
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[tokio::test]
    async fn passthrough_gives_up_on_silent_upstreams_but_not_on_long_uploads() {
        const READ: Duration = Duration::from_millis(300);
        let router = Router::new().fallback(|req: Request| async move {
            if req.method() == Method::GET {
                std::future::pending::<()>().await;
            }
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .unwrap();
            // Committing takes longer than the read timeout, after a long upload.
            tokio::time::sleep(2 * READ).await;
            answer(201, &[], body.len().to_string())
        });
        let up = serve(loopback().await, router).await;
        let passthrough = Passthrough::with_timeouts(CONNECT_TIMEOUT, READ).unwrap();
        let proxy = proxy_with(passthrough, registry(up)).await;

        let response = timeout(WAIT, client().get(format!("http://{proxy}/v2/")).send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 502);

        let slow = futures::stream::iter(0..4).then(|_| async {
            tokio::time::sleep(READ).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))
        });
        let response = timeout(
            WAIT,
            client()
                .put(format!(
                    "http://{proxy}/v2/a/blobs/uploads/1?digest={DIGEST}"
                ))
                .header(header::CONTENT_LENGTH, 40)
                .body(reqwest::Body::wrap_stream(slow))
                .send(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.text().await.unwrap(), "40");
    }

    #[tokio::test]
    async fn passthrough_refuses_paths_the_url_parser_would_change() {
        let (up, log) = recording_upstream(|_, _| answer(200, &[], "")).await;
        let proxy = proxy_to(up).await;
        for path in ["/v2/a/../b/manifests/1", "/v2/a/%2e%2e/b/manifests/1"] {
            let (head, body) = raw_exchange(
                proxy,
                &format!("GET {path} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(head[0].starts_with("HTTP/1.1 400"), "{head:?}");
            let body: ErrorBody = serde_json::from_slice(&body).unwrap();
            assert_eq!(body.errors[0].code, ErrorCode::NameInvalid);
        }
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn upstream_url_keeps_the_target_raw() {
        let upstream: Registry = "https://r.example:443".parse().unwrap();
        let url = upstream_url(&upstream, "/v2/a/b/tags/list?n=10&last=a%2Fb").unwrap();
        assert_eq!(
            url.as_str(),
            "https://r.example/v2/a/b/tags/list?n=10&last=a%2Fb"
        );
        assert!(upstream_url(&upstream, "/v2/./a").is_none());
        assert!(upstream_url(&upstream, "*").is_none());
        assert!(upstream_url(&upstream, "@evil.example/").is_none());
    }

    #[test]
    fn hop_by_hop_headers_include_those_named_by_connection() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Foo"),
            ("connection", "x-bar"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("te", "trailers"),
            ("authorization", "Bearer t"),
            ("accept", "a"),
            ("accept", "b"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            left,
            [
                ("authorization", "Bearer t"),
                ("accept", "a"),
                ("accept", "b")
            ]
        );
    }
}

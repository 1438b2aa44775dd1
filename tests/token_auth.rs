//! Registry token auth end to end: a private repository on a docker-registry with `auth: token`
//! (tokens from an in-process issuer), read through bay-proxy and bay-tracker.
//!
//! alice may pull and push `private/app`; bob may pull and push `other/thing` only; anonymous
//! callers get tokens that grant nothing. alice pulls through the proxy with skopeo; everyone
//! else is refused for manifests and blobs alike, also once the proxy holds the blobs and the
//! tracker seeds them, and no password or token shows up in any log.

use std::time::Duration;

use base64::Engine as _;
use bay_tests::{
    Image, Proxy, Registry, TokenIssuer, TokenPolicy, Tracker, User, http_client, sha256_file,
    skopeo_pull,
};
use reqwest::StatusCode;

const ALICE: (&str, &str) = ("alice", "alice-pw-5d1e0c7b");
const BOB: (&str, &str) = ("bob", "bob-pw-93a4f2e6");
const PRIVATE: &str = "private/app";
const OTHER: &str = "other/thing";
const SETTLE: Duration = Duration::from_secs(60);
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

struct Cluster {
    issuer: TokenIssuer,
    registry: Registry,
    /// `private/app:1`, pushed by alice.
    image: Image,
    /// `other/thing:1`, pushed by bob.
    other: Image,
    tracker: Tracker,
    proxy: Proxy,
}

fn policy() -> TokenPolicy {
    TokenPolicy {
        users: vec![
            User::new(ALICE.0, ALICE.1).may(PRIVATE, &["pull", "push"]),
            User::new(BOB.0, BOB.1).may(OTHER, &["pull", "push"]),
        ],
        ..TokenPolicy::default()
    }
}

/// A token for alice's pull of `private/app` with the right issuer and audience, signed by a
/// key the registry does not trust.
async fn forged_token() -> String {
    let forger = TokenIssuer::start(policy()).await.unwrap();
    forger
        .token(Some(ALICE), &format!("repository:{PRIVATE}:pull"))
        .await
        .unwrap()
}

async fn cluster() -> Cluster {
    let issuer = TokenIssuer::start(policy()).await.unwrap();
    let registry = Registry::start_with_token_auth(&issuer.registry_auth())
        .await
        .unwrap();

    // skopeo does the token dance with the realm itself.
    let image = Image::generate(&[3 << 20, 400_000], 81).unwrap();
    image
        .push_to(&registry.authority(), &format!("{PRIVATE}:1"), Some(ALICE))
        .await
        .unwrap();
    let other = Image::generate(&[300_000], 82).unwrap();
    other
        .push_to(&registry.authority(), &format!("{OTHER}:1"), Some(BOB))
        .await
        .unwrap();
    let alice = issuer
        .token(Some(ALICE), &format!("repository:{PRIVATE}:pull"))
        .await
        .unwrap();
    let r = send(
        reqwest::Method::HEAD,
        &format!("{}/v2/{PRIVATE}/manifests/1", registry.url()),
        Some(&alice),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "the push landed");
    assert_eq!(
        r.headers()["docker-content-digest"],
        image.manifest.digest.as_str()
    );

    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let proxy = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();
    Cluster {
        issuer,
        registry,
        image,
        other,
        tracker,
        proxy,
    }
}

/// A request with `Authorization: Bearer <token>` if given.
async fn send(method: reqwest::Method, url: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = http_client()
        .request(method, url)
        .header("accept", MANIFEST_ACCEPT);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Who asks, as the tests see them.
#[derive(Clone, Copy)]
enum Caller<'a> {
    /// No Authorization at all.
    Anonymous,
    /// A token that does not let its holder read `private/app`, and who holds it.
    Unauthorized(&'a str, &'static str),
}

impl Caller<'_> {
    fn bearer(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Unauthorized(token, _) => Some(token),
        }
    }
}

// Names the caller, never the token: assertion messages end up in CI logs too.
impl std::fmt::Debug for Caller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anonymous => f.write_str("anonymous"),
            Caller::Unauthorized(_, who) => write!(f, "{who}"),
        }
    }
}

/// `method url` as `caller` is refused the way upstream refuses: an anonymous caller gets 401
/// with a Bearer challenge naming the issuer, so a client can go and get a token; a caller
/// with the wrong token gets 401 or 403. Either way the body is a small error, not the content.
async fn assert_refused(method: reqwest::Method, url: &str, caller: Caller<'_>, realm: &str) {
    let r = send(method.clone(), url, caller.bearer()).await;
    let status = r.status();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.bytes().await.unwrap();
    let what = format!("{method} {url} as {caller:?}: {status} {challenge:?}");
    match caller {
        Caller::Anonymous => {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
            let challenge = challenge.unwrap_or_else(|| panic!("no challenge: {what}"));
            assert!(
                challenge.starts_with("Bearer ")
                    && challenge.contains(&format!("realm=\"{realm}\"")),
                "{what}"
            );
        }
        Caller::Unauthorized(..) => assert!(
            matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
            "{what}"
        ),
    }
    assert!(body.len() < 4096, "{what}: {} bytes of body", body.len());
}

/// Every blob skopeo stored in a `dir:` copy matches its digest and the image's.
fn check_dir_copy(dir: &std::path::Path, image: &Image) {
    for blob in image.layers.iter().chain([&image.config]) {
        let path = dir.join(blob.digest.trim_start_matches("sha256:"));
        assert!(path.exists(), "{} missing from the copy", blob.digest);
        assert_eq!(sha256_file(&path).unwrap(), blob.digest);
    }
}

/// Neither a password (plain or in a Basic header) nor any token the issuer handed out, nor a
/// token's signature alone, appears in any log.
fn assert_no_secrets_logged(c: &Cluster, more_tokens: &[&str]) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut secrets = Vec::new();
    for (user, password) in [ALICE, BOB] {
        secrets.push(password.to_owned());
        secrets.push(b64.encode(format!("{user}:{password}")));
    }
    let mut tokens = c.issuer.issued_tokens();
    assert!(!tokens.is_empty());
    tokens.extend(more_tokens.iter().map(|t| t.to_string()));
    for token in &tokens {
        secrets.push(token.clone());
        secrets.push(token.rsplit('.').next().unwrap().to_owned());
    }
    for (name, log) in [
        ("bay-proxy", c.proxy.log_text()),
        ("bay-tracker", c.tracker.log_text()),
        ("docker-registry", c.registry.log_text()),
    ] {
        assert!(!log.is_empty(), "{name} logged nothing");
        for secret in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "{name}'s log holds a secret ({} chars)",
                secret.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn private_repository_through_the_proxy() {
    let c = cluster().await;
    let realm = c.issuer.realm();
    let scope = format!("repository:{PRIVATE}:pull");
    let alice = c.issuer.token(Some(ALICE), &scope).await.unwrap();
    let bob = c.issuer.token(Some(BOB), &scope).await.unwrap();
    let forged = forged_token().await;
    let callers = [
        Caller::Anonymous,
        Caller::Unauthorized(&bob, "bob's token"),
        Caller::Unauthorized(&forged, "a token signed by an untrusted key"),
    ];
    let proxy = c.proxy.url();
    let manifest = format!("{proxy}/v2/{PRIVATE}/manifests/1");
    let blob_urls: Vec<String> = c
        .image
        .layers
        .iter()
        .chain([&c.image.config])
        .map(|b| format!("{proxy}/v2/{PRIVATE}/blobs/{}", b.digest))
        .collect();
    let refused_everywhere = || async {
        for caller in callers {
            for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                assert_refused(method.clone(), &manifest, caller, &realm).await;
                for url in &blob_urls {
                    assert_refused(method.clone(), url, caller, &realm).await;
                }
            }
        }
    };

    // Nothing held yet: refused.
    refused_everywhere().await;
    for creds in [None, Some(BOB)] {
        let out = tempfile::tempdir().unwrap();
        let pulled = skopeo_pull(
            &c.proxy.authority(),
            &format!("{PRIVATE}:1"),
            out.path(),
            creds,
        )
        .await;
        assert!(pulled.is_err(), "skopeo pulled as {creds:?}");
    }

    // alice pulls through the proxy: manifests passed through, blobs from the swarm.
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(
        &c.proxy.authority(),
        &format!("{PRIVATE}:1"),
        out.path(),
        Some(ALICE),
    )
    .await
    .unwrap();
    check_dir_copy(out.path(), &c.image);
    let held = c.image.layers.len() as u64 + 1;
    let before = c.proxy.wait_held(held, SETTLE).await.unwrap();
    // A blob the manifest's prefetch finished first is a cache hit; both came via the swarm.
    let n = |k: &str| before[k].as_u64().unwrap_or(0);
    assert_eq!(n("swarm_downloads") + n("cache_hits"), held, "{before}");
    assert_eq!(n("bytes_from_upstream"), 0, "{before}");
    assert_eq!(before["fallbacks"], 0, "{before}");
    for b in c.image.layers.iter().chain([&c.image.config]) {
        assert_eq!(
            c.registry.blob_gets(&b.digest),
            1,
            "fetched once, by the tracker"
        );
    }

    // Held by the proxy and seeded: still refused, and nothing was served from the cache.
    refused_everywhere().await;
    let layer = &c.image.layers[0];
    for caller in callers {
        let r = http_client()
            .get(&blob_urls[0])
            .header("range", "bytes=0-99");
        let r = match caller.bearer() {
            Some(t) => r.bearer_auth(t),
            None => r,
        };
        let status = r.send().await.unwrap().status();
        assert!(
            matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
            "range GET as {caller:?}: {status}"
        );
    }
    // bob asking for alice's layer under his own repository: upstream does not know it there.
    let bob_other = c
        .issuer
        .token(Some(BOB), &format!("repository:{OTHER}:pull"))
        .await
        .unwrap();
    let r = send(
        reqwest::Method::GET,
        &format!("{proxy}/v2/{OTHER}/blobs/{}", layer.digest),
        Some(&bob_other),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    for creds in [None, Some(BOB)] {
        let out = tempfile::tempdir().unwrap();
        let pulled = skopeo_pull(
            &c.proxy.authority(),
            &format!("{PRIVATE}:1"),
            out.path(),
            creds,
        )
        .await;
        assert!(
            pulled.is_err(),
            "skopeo pulled as {creds:?} from a warm proxy"
        );
    }
    let after = c.proxy.stats().await.unwrap();
    for counter in ["blobs_served", "cache_hits", "swarm_downloads", "fallbacks"] {
        assert_eq!(after[counter], before[counter], "{counter}: {after}");
    }

    // bob's credentials are good, just not for this repository.
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(
        &c.proxy.authority(),
        &format!("{OTHER}:1"),
        out.path(),
        Some(BOB),
    )
    .await
    .unwrap();
    check_dir_copy(out.path(), &c.other);
    // (bob's blobs may have been prefetched when his manifest passed: hits counted from here.)
    let before = c.proxy.stats().await.unwrap();

    // alice's token reads the cached blob.
    let r = send(reqwest::Method::GET, &blob_urls[0], Some(&alice)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.bytes().await.unwrap(),
        c.image.blob_bytes(&layer.digest).unwrap()
    );
    let s = c.proxy.stats().await.unwrap();
    assert_eq!(
        s["cache_hits"].as_u64(),
        Some(before["cache_hits"].as_u64().unwrap() + 1),
        "{s}"
    );

    // The tracker, holding and seeding the blob, hands its torrent to alice only.
    let torrent = format!(
        "{}/v1/torrents/{}/{PRIVATE}/blobs/{}",
        c.tracker.url(),
        c.registry.authority(),
        layer.digest
    );
    for caller in callers {
        assert_refused(reqwest::Method::GET, &torrent, caller, &realm).await;
    }
    let r = send(reqwest::Method::GET, &torrent, Some(&alice)).await;
    assert_eq!(r.status(), StatusCode::OK);

    // skopeo fetched its tokens as alice and bob, never with a wrong password. bay asked for
    // anonymous tokens on behalf of anonymous callers, and never presented anyone's
    // credentials to the issuer itself.
    let requests = c.issuer.requests();
    assert!(requests.iter().all(|r| r.status == 200), "{requests:?}");
    assert!(
        requests
            .iter()
            .any(|r| r.user.as_deref() == Some(ALICE.0) && r.scopes == [scope.clone()]),
        "{requests:?}"
    );
    let by_bay: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("bay/"))
        })
        .collect();
    assert!(!by_bay.is_empty(), "{requests:?}");
    assert!(by_bay.iter().all(|r| r.user.is_none()), "{by_bay:?}");
    assert_no_secrets_logged(&c, &[&forged]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tracker_hands_private_torrents_only_to_readers() {
    let c = cluster().await;
    let realm = c.issuer.realm();
    let scope = format!("repository:{PRIVATE}:pull");
    let alice = c.issuer.token(Some(ALICE), &scope).await.unwrap();
    let bob = c.issuer.token(Some(BOB), &scope).await.unwrap();
    let forged = forged_token().await;
    let layer = &c.image.layers[1];
    let torrent = format!(
        "{}/v1/torrents/{}/{PRIVATE}/blobs/{}",
        c.tracker.url(),
        c.registry.authority(),
        layer.digest
    );
    let callers = [
        Caller::Anonymous,
        Caller::Unauthorized(&bob, "bob's token"),
        Caller::Unauthorized(&forged, "a token signed by an untrusted key"),
    ];

    for caller in callers {
        assert_refused(reqwest::Method::GET, &torrent, caller, &realm).await;
    }
    assert_eq!(c.registry.blob_gets(&layer.digest), 0);
    // The bytes of a blob being fetched, and slices of it, are the blob too.
    let early = torrent.replace("/v1/torrents/", "/v1/early/");
    let early_slot = format!("{early}/slot?port=6881");
    for caller in callers {
        assert_refused(reqwest::Method::GET, &early, caller, &realm).await;
        assert_refused(reqwest::Method::GET, &early_slot, caller, &realm).await;
    }
    // A reader asking while no fetch runs is told so, and nothing is fetched for it.
    for url in [&early, &early_slot] {
        let r = send(reqwest::Method::GET, url, Some(&alice)).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(c.registry.blob_gets(&layer.digest), 0);

    let r = send(reqwest::Method::GET, &torrent, Some(&alice)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.bytes().await.unwrap();
    assert!(body.starts_with(b"d"), "a bencoded torrent");
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);

    // Held and seeded now: still refused.
    for caller in callers {
        assert_refused(reqwest::Method::GET, &torrent, caller, &realm).await;
    }
    // Under bob's repository the blob does not exist upstream.
    let bob_other = c
        .issuer
        .token(Some(BOB), &format!("repository:{OTHER}:pull"))
        .await
        .unwrap();
    let r = send(
        reqwest::Method::GET,
        &format!(
            "{}/v1/torrents/{}/{OTHER}/blobs/{}",
            c.tracker.url(),
            c.registry.authority(),
            layer.digest
        ),
        Some(&bob_other),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);
    assert_no_secrets_logged(&c, &[&forged]);
}

//! bay-proxy end to end: real docker-registry upstream, real tracker and proxies on their own
//! loopback addresses, skopeo as the client.

use std::time::Duration;

use bay_tests::{
    ExchangeNode, Image, Proxy, Registry, RegistryOptions, Tracker, http_client, sha256_file,
    skopeo_pull,
};
use reqwest::StatusCode;

/// Every blob skopeo stored in a `dir:` copy matches its digest and the image's.
fn check_dir_copy(dir: &std::path::Path, image: &Image) {
    for blob in image.layers.iter().chain([&image.config]) {
        let hex = blob.digest.trim_start_matches("sha256:");
        let path = dir.join(hex);
        assert!(path.exists(), "{} missing from the copy", blob.digest);
        assert_eq!(sha256_file(&path).unwrap(), blob.digest);
    }
}

struct Cluster {
    registry: Registry,
    image: Image,
    tracker: Tracker,
}

async fn cluster(layers: &[u64], tracker_args: &[&str]) -> Cluster {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(layers, 11).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], tracker_args)
        .await
        .unwrap();
    Cluster {
        registry,
        image,
        tracker,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn second_proxy_gets_blobs_from_the_first_and_upstream_sends_each_once() {
    let c = cluster(&[8 << 20, 3 << 20, 200_000], &[]).await;
    let trackers = [c.tracker.url()];
    let a = Proxy::start(&trackers, &c.registry.url(), &[])
        .await
        .unwrap();
    let b = Proxy::start(&trackers, &c.registry.url(), &[])
        .await
        .unwrap();

    let out_a = tempfile::tempdir().unwrap();
    skopeo_pull(&a.authority(), "test/img:1", out_a.path(), None)
        .await
        .unwrap();
    check_dir_copy(out_a.path(), &c.image);
    a.wait_held(4, Duration::from_secs(30)).await.unwrap();
    let out_b = tempfile::tempdir().unwrap();
    skopeo_pull(&b.authority(), "test/img:1", out_b.path(), None)
        .await
        .unwrap();
    check_dir_copy(out_b.path(), &c.image);

    for blob in c.image.layers.iter().chain([&c.image.config]) {
        assert_eq!(
            c.registry.blob_gets(&blob.digest),
            1,
            "{} must leave upstream exactly once (by the tracker)",
            blob.digest
        );
    }
    let settle = Duration::from_secs(30);
    let sa = a.wait_held(4, settle).await.unwrap();
    let sb = b.wait_held(4, settle).await.unwrap();
    assert_eq!(sa["fallbacks"], 0, "{sa}");
    assert_eq!(sb["fallbacks"], 0, "{sb}");
    // Blobs the manifest's prefetch had finished before skopeo asked count as cache hits;
    // either way every byte came through the swarm.
    let count = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    assert_eq!(
        count(&sa, "swarm_downloads") + count(&sa, "cache_hits"),
        4,
        "{sa}"
    );
    assert_eq!(count(&sa, "bytes_from_upstream"), 0, "{sa}");
    assert_eq!(
        count(&sa, "bytes_held"),
        count(&sa, "bytes_from_trackers"),
        "{sa}"
    );
    assert!(
        sb["bytes_from_peers"].as_u64().unwrap() > 0,
        "proxy B got nothing from proxy A: {sb}"
    );

    // A second pull through A is served from its cache.
    let again = tempfile::tempdir().unwrap();
    skopeo_pull(&a.authority(), "test/img:1", again.path(), None)
        .await
        .unwrap();
    check_dir_copy(again.path(), &c.image);
    let hits = count(&sa, "cache_hits");
    let sa = a.stats().await.unwrap();
    assert_eq!(count(&sa, "cache_hits"), hits + 4, "{sa}");
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_pass_through_byte_for_byte_and_pushes_land_upstream() {
    let c = cluster(&[100_000], &[]).await;
    let p = Proxy::start(&[c.tracker.url()], &c.registry.url(), &[])
        .await
        .unwrap();
    let client = http_client();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let get = |base: String| {
            client
                .request(method.clone(), format!("{base}/v2/test/img/manifests/1"))
                .header("accept", accept)
                .send()
        };
        let direct = get(c.registry.url()).await.unwrap();
        let proxied = get(p.url()).await.unwrap();
        assert_eq!(proxied.status(), direct.status());
        for h in ["docker-content-digest", "content-type", "content-length"] {
            assert_eq!(
                proxied.headers().get(h),
                direct.headers().get(h),
                "{method} {h}"
            );
        }
        assert_eq!(
            proxied.bytes().await.unwrap(),
            direct.bytes().await.unwrap(),
            "{method}"
        );
    }

    // Blob HEAD passes through with upstream's headers.
    let layer = &c.image.layers[0];
    let head = client
        .head(format!("{}/v2/test/img/blobs/{}", p.url(), layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        layer.size.to_string().as_str()
    );

    // A push through the proxy lands upstream.
    let pushed = Image::generate(&[50_000, 70_000], 99).unwrap();
    pushed
        .push_to(&p.authority(), "test/pushed:7", None)
        .await
        .unwrap();
    let r = client
        .get(format!("{}/v2/test/pushed/manifests/7", c.registry.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-content-digest"],
        pushed.manifest.digest.as_str()
    );

    // Registry errors for what the proxy refuses.
    let r = client
        .get(format!("{}/v2/test/img/blobs/sha256:zz", p.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DIGEST_INVALID");
    let r = client
        .get(format!("{}/v2/", p.url()))
        .header("host", "p2p-evil.example:5000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["detail"]["registry"], "evil.example:5000");
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_and_unknown_blobs() {
    let c = cluster(&[1 << 20], &[]).await;
    let p = Proxy::start(&[c.tracker.url()], &c.registry.url(), &[])
        .await
        .unwrap();
    let layer = &c.image.layers[0];
    let bytes = c.image.blob_bytes(&layer.digest).unwrap();
    let url = format!("{}/v2/test/img/blobs/{}", p.url(), layer.digest);
    let client = http_client();
    let r = client
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1000-1999/{}", bytes.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), &bytes[1000..2000]);
    let r = client
        .get(&url)
        .header("range", format!("bytes={}-", bytes.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let missing = format!("sha256:{}", "1".repeat(64));
    let r = client
        .get(format!("{}/v2/test/img/blobs/{missing}", p.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_succeeds_through_fallback_when_the_tracker_is_dead() {
    let mut c = cluster(&[2 << 20, 100_000], &[]).await;
    let p = Proxy::start(
        &[c.tracker.url()],
        &c.registry.url(),
        &["--stall-timeout", "2"],
    )
    .await
    .unwrap();
    c.tracker.kill();
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(&p.authority(), "test/img:1", out.path(), None)
        .await
        .unwrap();
    check_dir_copy(out.path(), &c.image);
    let s = p.stats().await.unwrap();
    assert!(s["fallbacks"].as_u64().unwrap() >= 3, "{s}");
    assert!(
        p.log_text().contains("streaming from upstream"),
        "the fallback is logged"
    );
    // What came from upstream was verified and cached: a second pull needs no upstream.
    let gets_before: usize = c
        .image
        .layers
        .iter()
        .map(|l| c.registry.blob_gets(&l.digest))
        .sum();
    let again = tempfile::tempdir().unwrap();
    skopeo_pull(&p.authority(), "test/img:1", again.path(), None)
        .await
        .unwrap();
    let gets_after: usize = c
        .image
        .layers
        .iter()
        .map(|l| c.registry.blob_gets(&l.digest))
        .sum();
    assert_eq!(gets_before, gets_after);
}

/// Four proxies pull one 64 MiB blob at the same moment, every uploader limited to 16 MiB/s:
/// each proxy takes only its own slice from the tracker and the rest from the others, so the
/// tracker sends each piece about once (its BitTorrent seed, asked for pieces in librqbit's
/// order, sent up to twice the blob).
#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_pulls_swarm() {
    let limit = ["--upload-limit", "16M"];
    let c = cluster(&[64 << 20], &limit).await;
    let layer = c.image.layers[0].clone();
    let trackers = [c.tracker.url()];
    let mut proxies = Vec::new();
    for _ in 0..4 {
        proxies.push(
            Proxy::start(
                &trackers,
                &c.registry.url(),
                &["--upload-limit", "16M", "--stall-timeout", "30"],
            )
            .await
            .unwrap(),
        );
    }
    // Let the tracker hold the blob first, so the four start their swarm downloads together.
    let r = http_client()
        .get(format!(
            "{}/v1/torrents/{}/test/img/blobs/{}",
            c.tracker.url(),
            c.registry.authority(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let pulls = proxies.iter().map(|p| {
        let url = format!("{}/v2/test/img/blobs/{}", p.url(), layer.digest);
        async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .no_proxy()
                .build()
                .unwrap();
            let bytes = client.get(url).send().await.unwrap().bytes().await.unwrap();
            (
                bay_common::Digest::sha256_of(&bytes).to_string(),
                started.elapsed(),
            )
        }
    });
    let results = futures::future::join_all(pulls).await;
    for (digest, _) in &results {
        assert_eq!(digest, &layer.digest);
    }
    let tracker_stats: serde_json::Value = c.tracker.stats().await.unwrap();
    let seed_up = tracker_stats["seed_uploaded_bytes"].as_u64().unwrap();
    let mut from_peers = 0;
    for p in &proxies {
        let s = p.wait_held(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(s["fallbacks"], 0, "{s}");
        from_peers += s["bytes_from_peers"].as_u64().unwrap();
    }
    let ratio = seed_up as f64 / layer.size as f64;
    eprintln!(
        "4 proxies, 64 MiB at 16 MiB/s per uploader: seed uploaded {ratio:.2}x the blob, proxies got {} MiB from each other, times {:?}",
        from_peers >> 20,
        results.iter().map(|r| r.1).collect::<Vec<_>>()
    );
    assert!(from_peers > 0, "proxies exchanged nothing");
    assert!(ratio <= 1.25, "seed uploaded {ratio:.2}x the blob");
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);
}

/// A seed that is alive but slow (many nodes starting at once on a thin link) must be waited
/// for: every node that gave up on it would cost the registry another copy of the blob.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_seed_is_waited_for_not_abandoned() {
    // 1 MiB in 256 KiB pieces at 64 KiB/s: a piece every 4 s, twice the stall timeout.
    let c = cluster(&[1 << 20], &["--upload-limit", "64K"]).await;
    let p = Proxy::start(
        &[c.tracker.url()],
        &c.registry.url(),
        &["--stall-timeout", "2"],
    )
    .await
    .unwrap();
    let layer = &c.image.layers[0];
    let body = http_client()
        .get(format!("{}/v2/test/img/blobs/{}", p.url(), layer.digest))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len() as u64, layer.size);
    let s = p.wait_held(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(s["fallbacks"], 0, "{s}");
    assert_eq!(s["bytes_from_upstream"], 0, "{s}");
    assert_eq!(
        c.registry.blob_gets(&layer.digest),
        1,
        "only the tracker's GET"
    );
}

/// Clients that ask one proxy for the same blob at the same moment share one swarm download:
/// each one's bytes come from it, none waits on a download librqbit never fed (two starts of
/// one torrent once left the second with storage librqbit did not use) and none goes upstream.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_gets_of_one_blob_share_one_download() {
    // The tracker sends the 8 MiB in about 2 s, so the GETs overlap the download however
    // slowly the machine starts them.
    let c = cluster(&[8 << 20], &["--upload-limit", "4M"]).await;
    let layer = c.image.layers[0].clone();
    let p = Proxy::start(&[c.tracker.url()], &c.registry.url(), &[])
        .await
        .unwrap();
    let url = format!("{}/v2/test/img/blobs/{}", p.url(), layer.digest);
    let gets = (0..8).map(|_| {
        let url = url.clone();
        async move {
            let r = http_client()
                .get(url)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            bay_common::Digest::sha256_of(&r.bytes().await.unwrap()).to_string()
        }
    });
    for digest in futures::future::join_all(gets).await {
        assert_eq!(digest, layer.digest);
    }
    let s = p.wait_held(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(s["fallbacks"], 0, "{s}");
    assert_eq!(s["bytes_from_upstream"], 0, "{s}");
    // A GET that reaches the proxy only after the download finished is a cache hit.
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(n("swarm_downloads") + n("cache_hits"), 8, "{s}");
    assert!(
        n("swarm_downloads") >= 2,
        "no two GETs shared the download: {s}"
    );
    assert_eq!(
        c.registry.blob_gets(&layer.digest),
        1,
        "only the tracker's fetch"
    );
}

/// A finished download is hashed once: a client stream that hashed the blob as it sent it is
/// waited for (here a slow client, still reading long after the download finished), and only
/// a download no stream read to the end (the client hangs up early) is hashed from the file
/// before it is cached.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_a_client_stream_verified_is_not_hashed_again() {
    let c = cluster(&[24 << 20, 6 << 20], &[]).await;
    let p = Proxy::start(&[c.tracker.url()], &c.registry.url(), &[])
        .await
        .unwrap();
    let url = |digest: &str| format!("{}/v2/test/img/blobs/{digest}", p.url());

    let whole = &c.image.layers[0];
    let mut r = http_client().get(url(&whole.digest)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
        // About 10 MiB/s: the swarm download ends long before.
        tokio::time::sleep(Duration::from_micros(chunk.len() as u64 / 10)).await;
    }
    eprintln!(
        "the slow client read {} bytes in {:?}",
        body.len(),
        started.elapsed()
    );
    assert_eq!(
        bay_common::Digest::sha256_of(&body).to_string(),
        whole.digest
    );
    p.wait_held(1, Duration::from_secs(30)).await.unwrap();

    let cut = &c.image.layers[1];
    let mut r = http_client().get(url(&cut.digest)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    p.wait_held(2, Duration::from_secs(30)).await.unwrap();

    let log = p.log_text();
    let verified: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("blob verified"))
        .collect();
    let line = |digest: &str| {
        verified
            .iter()
            .find(|l| l.contains(digest))
            .unwrap_or_else(|| panic!("no 'blob verified' line for {digest}: {verified:?}"))
            .to_string()
    };
    assert!(
        line(&whole.digest).contains("by_stream=true"),
        "{verified:?}"
    );
    assert!(
        line(&cut.digest).contains("by_stream=false"),
        "{verified:?}"
    );
}

/// Proxies that wait 30 s for a stalled swarm rather than 5 (the tests that hold upstream to
/// 1 MiB/s must not fall back while it fetches).
async fn patient_proxies(c: &Cluster, n: usize) -> Vec<Proxy> {
    let mut proxies = Vec::new();
    for _ in 0..n {
        proxies.push(
            Proxy::start(
                &[c.tracker.url()],
                &c.registry.url(),
                &["--stall-timeout", "30"],
            )
            .await
            .unwrap(),
        );
    }
    proxies
}

/// Every proxy GETs the blob at once; the digests of what each client got.
async fn pull_blob_everywhere(proxies: &[Proxy], digest: &str) -> Vec<String> {
    futures::future::join_all(proxies.iter().map(|p| {
        let url = format!("{}/v2/test/img/blobs/{digest}", p.url());
        async move {
            let r = http_client()
                .get(url)
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            bay_common::Digest::sha256_of(&r.bytes().await.unwrap()).to_string()
        }
    }))
    .await
}

/// Cold, the proxies read pieces while the tracker still fetches the blob from upstream
/// (`bay-proxy/src/early.rs`), each piece going to one of them, and pass them on between them
/// (`bay-proxy/src/exchange.rs`): what they read early is not read from the tracker again, each
/// byte leaves the tracker about once, and most of the blob crosses between the nodes before
/// the torrent exists. Upstream is held to 1 MiB/s, so the fetch takes 8 s and the reads have
/// time to run.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_blob_is_read_early_and_passed_on_between_nodes() {
    let c = cluster(&[8 << 20], &["--upstream-rate", "1M"]).await;
    let layer = c.image.layers[0].clone();
    let proxies = patient_proxies(&c, 4).await;
    for digest in pull_blob_everywhere(&proxies, &layer.digest).await {
        assert_eq!(digest, layer.digest);
    }
    let (mut from_tracker, mut passed_in, mut passed_out) = (0, 0, 0);
    for p in &proxies {
        let s = p.wait_held(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(s["fallbacks"], 0, "{s}");
        assert_eq!(s["bytes_from_upstream"], 0, "{s}");
        from_tracker += s["bytes_from_trackers"].as_u64().unwrap();
        passed_in += s["exchange_bytes_received"].as_u64().unwrap();
        passed_out += s["exchange_bytes_sent"].as_u64().unwrap();
    }
    let t: serde_json::Value = c.tracker.stats().await.unwrap();
    let early = t["early_bytes_served"].as_u64().unwrap();
    let served = t["piece_bytes_served"].as_u64().unwrap();
    let size = layer.size as f64;
    eprintln!(
        "tracker served {:.2} S over HTTP, {:.2} S of it while fetching; proxies took {:.2} S \
         from it and passed {:.2} S on between them while it fetched",
        served as f64 / size,
        early as f64 / size,
        from_tracker as f64 / size,
        passed_in as f64 / size,
    );
    // Each of the 4 nodes needs the 3/4 of the blob the others got early; the fetch takes 8 s,
    // time enough to pass most of it on before the torrent exists.
    assert!(
        passed_in as f64 >= 2.0 * size,
        "the proxies passed only {passed_in} bytes on between them while the tracker fetched"
    );
    assert!(
        passed_in <= passed_out,
        "{passed_in} bytes received from other nodes, {passed_out} sent to them"
    );
    // The exchange port answers what it does not hold, or cannot parse, with registry errors.
    let p = &proxies[0];
    let port = p.exchange_port().expect("the proxy logs its exchange port");
    let unknown = bay_common::Digest::sha256_of(b"no such blob").to_string();
    for (path, status, code) in [
        (
            "/v1/exchange/sha256:zz/0",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            &*format!("/v1/exchange/{unknown}/0"),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            &*format!("/v1/exchange/{unknown}/x"),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
    ] {
        let r = http_client()
            .get(format!("http://{}:{port}{path}", p.ip()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], code, "{path}: {body}");
    }
    // Without early reads nothing leaves the tracker before the fetch ends.
    assert!(
        early as f64 >= 0.5 * size,
        "only {early} bytes were read while the tracker fetched: {t}"
    );
    assert!(
        served as f64 <= 1.25 * size,
        "the tracker sent {served} bytes of a {size}-byte blob: slices read early were read again: {t}"
    );
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);
}

/// A node that passes wrong bytes on while the tracker fetches a cold blob: it takes pieces
/// from the tracker like a proxy and answers every exchange request with bytes of the right
/// length that are all wrong. The proxies that read them find them wrong against the torrent
/// (librqbit checks each piece) and get those pieces again: every client gets the right blob,
/// the caches hold the right blob, and upstream still sends it once.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_passing_on_wrong_bytes_early_costs_time_not_correctness() {
    let c = cluster(&[8 << 20], &["--upstream-rate", "1M"]).await;
    let layer = c.image.layers[0].clone();
    let proxies = patient_proxies(&c, 3).await;
    // A node passing on wrong bytes for every piece asked of it.
    let blob = c.image.blob_bytes(&layer.digest).unwrap();
    let liar = ExchangeNode::start(blob, &[0..=u64::MAX], true).await;
    let early = format!(
        "{}/v1/early/{}/test/img/blobs/{}",
        c.tracker.url(),
        c.registry.authority(),
        layer.digest
    );
    let lying = take_pieces(&liar, early, layer.size);
    let pulls = pull_blob_everywhere(&proxies, &layer.digest);
    let (taken, digests) = tokio::join!(lying, pulls);
    for d in digests {
        assert_eq!(d, layer.digest, "a client got a wrong blob");
    }
    let lies = liar.served();
    eprintln!("the liar took {taken} pieces from the tracker and served {lies} wrong bytes");
    assert!(
        taken > 0 && lies > 0,
        "no proxy read from the liar ({taken} pieces taken, {lies} bytes served): the test proved nothing"
    );
    for p in &proxies {
        p.wait_held(1, Duration::from_secs(30)).await.unwrap();
        // What is cached is the right blob: a cache hit streams it from disk.
        let r = http_client()
            .get(format!("{}/v2/test/img/blobs/{}", p.url(), layer.digest))
            .send()
            .await
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert_eq!(
            bay_common::Digest::sha256_of(&body).to_string(),
            layer.digest
        );
        let s = p.stats().await.unwrap();
        assert_eq!(s["cache_hits"], 1, "{s}");
    }
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);
}

/// Reads pieces early from the tracker (URL `early`, without query) the way a proxy at
/// `node`'s address that passes them on would, until none is left; how many it got.
async fn take_pieces(node: &ExchangeNode, early: String, size: u64) -> u64 {
    let client = node.client();
    let url = format!("{early}?exchange={}", node.port);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut taken = 0;
    while std::time::Instant::now() < deadline {
        let r = client
            .get(&url)
            .header("range", format!("bytes=0-{}", size - 1))
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::PARTIAL_CONTENT => {
                r.bytes().await.unwrap();
                taken += 1;
            }
            StatusCode::RANGE_NOT_SATISFIABLE => break,
            StatusCode::NOT_FOUND if taken > 0 => break, // the fetch is over
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    taken
}

//! What an operator does to running services: SIGTERM in the middle of a pull (the client
//! gets a whole verified blob or a cut connection, the disk keeps no partial blob, trackers
//! hear the proxy left), and limits on what the tracker takes from upstream.

use std::path::Path;
use std::time::{Duration, Instant};

use bay_tests::{
    Image, Proxy, Registry, RegistryOptions, Scrape, Tracker, http_client, sha256_file,
};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};

struct Pull {
    bytes: u64,
    sha256: String,
    /// The body ended with an error (the connection was cut) rather than cleanly.
    cut: bool,
}

/// GETs a blob through `proxy`, reporting progress so the test can act mid-transfer.
fn start_pull(
    proxy: &Proxy,
    digest: &str,
    progress: tokio::sync::watch::Sender<u64>,
) -> tokio::task::JoinHandle<Pull> {
    let url = format!("{}/v2/test/img/blobs/{digest}", proxy.url());
    tokio::spawn(async move {
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(url)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut hash = Sha256::new();
        let mut bytes = 0u64;
        let mut cut = false;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => {
                    hash.update(&c);
                    bytes += c.len() as u64;
                    progress.send_replace(bytes);
                }
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        Pull {
            bytes,
            sha256: format!("sha256:{}", hex::encode(hash.finalize())),
            cut,
        }
    })
}

/// Every file in `blobs/` is complete (hashes to its name) and `tmp/` is empty.
fn check_cache(data_dir: &Path) -> Vec<String> {
    let tmp: Vec<_> = std::fs::read_dir(data_dir.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "partial files left in tmp/: {tmp:?}");
    let mut held = Vec::new();
    for entry in std::fs::read_dir(data_dir.join("blobs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let digest = name.replacen('-', ":", 1);
        assert_eq!(
            sha256_file(&path).unwrap(),
            digest,
            "{name} in blobs/ is not complete"
        );
        held.push(digest);
    }
    held
}

async fn setup(layer: u64, tracker_args: &[&str]) -> (Registry, Image, Tracker) {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[layer], 31).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], tracker_args)
        .await
        .unwrap();
    (registry, image, tracker)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_pull_cuts_the_client_and_leaves_no_partial_blob() {
    // 48 MiB from a seed sending 8 MiB/s: about 6 s, far longer than the 1 s drain.
    let (registry, image, tracker) = setup(48 << 20, &["--upload-limit", "8M"]).await;
    let layer = &image.layers[0];
    let mut proxy = Proxy::start(&[tracker.url()], &registry.url(), &["--drain-timeout", "1"])
        .await
        .unwrap();
    let (tx, mut progress) = tokio::sync::watch::channel(0);
    let pull = start_pull(&proxy, &layer.digest, tx);
    progress.wait_for(|b| *b >= 4 << 20).await.unwrap();
    let peers_before = Scrape::of(&tracker.url())
        .await
        .unwrap()
        .get("bay_peers")
        .unwrap();
    assert!(peers_before >= 1.0, "the proxy never announced");

    let t0 = Instant::now();
    let status = proxy.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "proxy exited with {status}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let pull = pull.await.unwrap();
    assert!(
        pull.cut && pull.bytes < layer.size,
        "a 6 s transfer cannot finish in a 1 s drain: got {} of {} bytes, cut: {}",
        pull.bytes,
        layer.size,
        pull.cut
    );
    assert!(check_cache(proxy.data_dir()).is_empty());

    // The tracker heard the proxy leave instead of waiting for its entry to expire.
    let t = Scrape::of(&tracker.url()).await.unwrap();
    assert!(
        t.get(r#"bay_announce_requests_total{event="stopped"}"#)
            .unwrap()
            >= 1.0
    );
    assert_eq!(t.get("bay_peers").unwrap(), 0.0, "{}", t.text);

    // Started again, the proxy serves the blob whole.
    proxy.restart().await.unwrap();
    let (tx, _progress) = tokio::sync::watch::channel(0);
    let again = start_pull(&proxy, &layer.digest, tx).await.unwrap();
    assert!(!again.cut);
    assert_eq!(again.sha256, layer.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_pull_finish_within_the_drain_deadline_and_caches_it() {
    // 24 MiB at 8 MiB/s: about 3 s, well inside a 30 s drain.
    let (registry, image, tracker) = setup(24 << 20, &["--upload-limit", "8M"]).await;
    let layer = &image.layers[0];
    let mut proxy = Proxy::start(
        &[tracker.url()],
        &registry.url(),
        &["--drain-timeout", "30"],
    )
    .await
    .unwrap();
    let (tx, mut progress) = tokio::sync::watch::channel(0);
    let pull = start_pull(&proxy, &layer.digest, tx);
    progress.wait_for(|b| *b >= 2 << 20).await.unwrap();
    let status = proxy.terminate(Duration::from_secs(45)).await.unwrap();
    assert!(status.success(), "proxy exited with {status}");
    let pull = pull.await.unwrap();
    assert!(!pull.cut, "the response was cut after {} bytes", pull.bytes);
    assert_eq!(pull.bytes, layer.size);
    assert_eq!(pull.sha256, layer.digest);
    assert_eq!(check_cache(proxy.data_dir()), vec![layer.digest.clone()]);

    proxy.restart().await.unwrap();
    // The cache is verified and seeded again before the proxy calls itself ready.
    bay_tests::wait_http_ok(&format!("{}/readyz", proxy.url()), Duration::from_secs(30))
        .await
        .unwrap();
    let (tx, _progress) = tokio::sync::watch::channel(0);
    let again = start_pull(&proxy, &layer.digest, tx).await.unwrap();
    assert_eq!(again.sha256, layer.digest);
    let m = Scrape::of(&proxy.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_blob_requests_total{outcome="cache_hit"}"#)
            .unwrap(),
        1.0
    );
    assert_eq!(registry.blob_gets(&layer.digest), 1);
}

fn torrent_url(tracker: &Tracker, registry: &Registry, digest: &str) -> String {
    format!(
        "{}/v1/torrents/{}/test/img/blobs/{digest}",
        tracker.url(),
        registry.authority()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn tracker_sigterm_mid_fetch_leaves_nothing_partial() {
    // 32 MiB at 4 MiB/s from upstream: about 8 s.
    let (registry, image, mut tracker) =
        setup(32 << 20, &["--upstream-rate", "4M", "--drain-timeout", "1"]).await;
    let url = torrent_url(&tracker, &registry, &image.layers[0].digest);
    let request = tokio::spawn(async move { http_client().get(url).send().await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Scrape::of(&tracker.url())
        .await
        .unwrap()
        .value("bay_upstream_bytes_total")
        < (4 << 20) as f64
    {
        assert!(Instant::now() < deadline, "the fetch never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = tracker.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "tracker exited with {status}");
    let answer = request.await.unwrap();
    assert!(
        answer.as_ref().map_or(true, |r| !r.status().is_success()),
        "a torrent for a blob that was never fetched: {answer:?}"
    );
    assert!(check_cache(tracker.data_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn tracker_limits_upstream_rate_and_concurrent_fetches() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[8 << 20, 8 << 20], 32).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(
        &[registry.url()],
        &["--upstream-rate", "4M", "--upstream-concurrency", "1"],
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let requests: Vec<_> = image
        .layers
        .iter()
        .map(|l| {
            let url = torrent_url(&tracker, &registry, &l.digest);
            tokio::spawn(async move { http_client().get(url).send().await.unwrap().status() })
        })
        .collect();
    // While the first fetch runs, the second waits for the one slot.
    let mut saw_queued = false;
    while requests.iter().any(|r| !r.is_finished()) {
        let m = Scrape::of(&tracker.url()).await.unwrap();
        saw_queued |= m.value("bay_upstream_queued_fetches") == 1.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    let took = t0.elapsed();
    assert!(saw_queued, "the second fetch never waited for a slot");
    // 16 MiB at 4 MiB/s is 4 s, less the 100 ms of burst the limiter allows.
    assert!(
        took >= Duration::from_millis(3800),
        "16 MiB arrived in {took:?}, faster than 4 MiB/s"
    );
    let m = Scrape::of(&tracker.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_upstream_fetches_total{outcome="ok"}"#)
            .unwrap(),
        2.0
    );
    for l in &image.layers {
        assert_eq!(registry.blob_gets(&l.digest), 1);
    }
}

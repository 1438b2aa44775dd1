//! What an operator watches: `/metrics`, `/readyz` and the savings in the stats endpoints move
//! as a pull goes through the swarm, then the cache, then (tracker gone) upstream.

use std::time::Duration;

use bay_tests::{
    Image, Proxy, Registry, RegistryOptions, Scrape, Tracker, http_client, skopeo_pull,
};

async fn json(url: String) -> serde_json::Value {
    http_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn status(url: String) -> u16 {
    http_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_swarm_cache_and_fallback_pulls() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[3 << 20, 1 << 20], 21).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let blobs: Vec<_> = image.layers.iter().chain([&image.config]).collect();
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let n = blobs.len() as f64;
    let mut tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let trackers = [tracker.url()];
    // Without prefetch, so each pull's outcomes are exact (tests/prefetch.rs covers it).
    let a = Proxy::start(&trackers, &registry.url(), &["--prefetch", "false"])
        .await
        .unwrap();
    let b = Proxy::start(&trackers, &registry.url(), &["--prefetch", "false"])
        .await
        .unwrap();
    for url in [tracker.url(), a.url(), b.url()] {
        // Ready once start-up verification (nothing to verify here) is done.
        bay_tests::wait_http_ok(&format!("{url}/readyz"), Duration::from_secs(30))
            .await
            .unwrap();
    }
    assert_eq!(status(format!("{}/_bay/readyz", a.url())).await, 200);
    let image_key = format!("{}/test/img", registry.authority());

    // 1. Through the swarm: proxy A alone, so every byte comes from the tracker's seed.
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(&a.authority(), "test/img:1", out.path(), None)
        .await
        .unwrap();
    a.wait_held(blobs.len() as u64, Duration::from_secs(30))
        .await
        .unwrap();
    let m = Scrape::of(&a.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_blob_requests_total{outcome="swarm"}"#)
            .unwrap(),
        n
    );
    assert_eq!(
        m.value(r#"bay_blob_requests_total{outcome="cache_hit"}"#),
        0.0
    );
    assert_eq!(
        m.get(r#"bay_blob_bytes_served_total{source="swarm"}"#)
            .unwrap(),
        total as f64
    );
    assert_eq!(
        m.get(r#"bay_blob_bytes_received_total{source="tracker_seed"}"#)
            .unwrap(),
        total as f64,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(r#"bay_blob_bytes_received_total{source="upstream"}"#),
        0.0
    );
    assert!(!m.text.contains("bay_fallbacks_total{"), "{}", m.text);
    assert_eq!(
        m.get(r#"bay_swarm_downloads_total{outcome="cached"}"#)
            .unwrap(),
        n
    );
    assert_eq!(m.get("bay_cache_blobs").unwrap(), n);
    assert_eq!(m.get("bay_cache_bytes").unwrap(), total as f64);

    let t = Scrape::of(&tracker.url()).await.unwrap();
    assert_eq!(
        t.get(r#"bay_upstream_fetches_total{outcome="ok"}"#)
            .unwrap(),
        n
    );
    assert_eq!(t.get("bay_upstream_bytes_total").unwrap(), total as f64);
    assert!(
        t.get(r#"bay_torrent_requests_total{outcome="ok"}"#)
            .unwrap()
            >= n
    );
    assert!(
        t.get(r#"bay_announce_requests_total{event="started"}"#)
            .unwrap()
            >= n
    );
    // Each finished download is announced as `completed` right away (librqbit only says
    // left=0 at its next announce), so trackers hand the proxy to newcomers as a seed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = Scrape::of(&tracker.url()).await.unwrap();
        let completed = t.value(r#"bay_announce_requests_total{event="completed"}"#);
        if completed >= n {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{completed} completed announces for {n} downloads"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.get("bay_cache_blobs").unwrap(), n);
    // The proxy read its pieces over HTTP, not from the BitTorrent seed.
    assert!(t.get("bay_piece_bytes_served_total").unwrap() >= total as f64);
    assert_eq!(t.get("bay_seed_uploaded_bytes_total").unwrap(), 0.0);
    assert_eq!(t.get("bay_cache_evictions_total").unwrap(), 0.0);

    // 2. Again through A: all from its cache.
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(&a.authority(), "test/img:1", out.path(), None)
        .await
        .unwrap();
    let m = Scrape::of(&a.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_blob_requests_total{outcome="cache_hit"}"#)
            .unwrap(),
        n
    );
    assert_eq!(
        m.get(r#"bay_blob_bytes_served_total{source="cache"}"#)
            .unwrap(),
        total as f64
    );
    let s = a.stats().await.unwrap();
    let img = &s["savings"]["images"][&image_key];
    assert_eq!(img["bytes_served"], 2 * total, "{s}");
    assert_eq!(img["bytes_from_upstream"], 0, "{s}");
    assert_eq!(img["bytes_saved"], 2 * total, "{s}");
    assert_eq!(s["savings"]["total"]["bytes_saved"], 2 * total, "{s}");

    // The tracker handed out each blob once and fetched each once: nothing saved yet.
    let ts = json(format!("{}/v1/stats", tracker.url())).await;
    let timg = &ts["savings"]["images"][&image_key];
    assert_eq!(timg["bytes_from_upstream"], total, "{ts}");
    assert!(timg["bytes_served"].as_u64().unwrap() >= total, "{ts}");

    // A refused blob GET counts as refused.
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = http_client()
        .get(format!("{}/v2/test/img/blobs/{missing}", a.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let m = Scrape::of(&a.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_blob_requests_total{outcome="refused"}"#)
            .unwrap(),
        1.0
    );

    // 3. The tracker is gone: proxy B falls back to upstream for every blob.
    tracker.kill();
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(&b.authority(), "test/img:1", out.path(), None)
        .await
        .unwrap();
    let m = Scrape::of(&b.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_blob_requests_total{outcome="upstream"}"#)
            .unwrap(),
        n
    );
    assert_eq!(
        m.get(r#"bay_fallbacks_total{reason="no_torrent"}"#)
            .unwrap(),
        n
    );
    assert_eq!(m.get("bay_upstream_fetches_total").unwrap(), n);
    assert_eq!(
        m.get(r#"bay_blob_bytes_received_total{source="upstream"}"#)
            .unwrap(),
        total as f64
    );
    assert_eq!(
        m.get(r#"bay_blob_bytes_served_total{source="upstream"}"#)
            .unwrap(),
        total as f64
    );
    let s = b.stats().await.unwrap();
    assert_eq!(s["fallbacks"], blobs.len(), "{s}");
    let img = &s["savings"]["images"][&image_key];
    assert_eq!(img["bytes_served"], total, "{s}");
    assert_eq!(img["bytes_from_upstream"], total, "{s}");
    assert_eq!(img["bytes_saved"], 0, "{s}");
}

/// `--metrics-listen` gives Prometheus an address of its own (the registry API stays on
/// loopback): it serves the metrics and the probes, and nothing that reaches a registry.
#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_address_serves_metrics_and_probes_only() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let ip = bay_tests::loopback_ip();
    let addr = format!("{ip}:{}", bay_tests::free_port(ip));
    let p = Proxy::start(&[], &registry.url(), &["--metrics-listen", &addr])
        .await
        .unwrap();
    let base = format!("http://{addr}");
    bay_tests::wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status(format!("{base}/healthz")).await, 200);
    let m = Scrape::of(&base).await.unwrap();
    m.get("bay_cache_blobs").unwrap();
    // The registry API and the stats answer on the proxy's own address only.
    assert_eq!(status(format!("{}/_bay/stats", p.url())).await, 200);
    for path in ["/v2/", "/_bay/stats", "/_bay/metrics"] {
        assert_eq!(status(format!("{base}{path}")).await, 404, "{path}");
    }
}

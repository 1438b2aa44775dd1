//! The proxy's cache keeps its promises (SECURITY.md): a cached file that changed on disk is
//! never served as it is, whole or in part, and not seeded after a restart; a verified blob
//! that cannot be cached is still served, and the failure is logged and counted.

use std::path::PathBuf;
use std::time::Duration;

use bay_common::Digest;
use bay_tests::{Image, Proxy, Registry, RegistryOptions, Scrape, Tracker, flip_byte, http_client};
use reqwest::StatusCode;

const REPO: &str = "test/cache";

struct Setup {
    registry: Registry,
    image: Image,
    tracker: Tracker,
}

async fn setup(seed: u64) -> Setup {
    setup_sized(2 << 20, seed).await
}

async fn setup_sized(size: u64, seed: u64) -> Setup {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[size], seed).unwrap();
    image
        .push(&registry, &format!("{REPO}:1"), None)
        .await
        .unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    Setup {
        registry,
        image,
        tracker,
    }
}

fn blob_url(proxy: &Proxy, digest: &str) -> String {
    format!("{}/v2/{REPO}/blobs/{digest}", proxy.url())
}

fn cached_path(proxy: &Proxy, digest: &str) -> PathBuf {
    let d: Digest = digest.parse().unwrap();
    proxy.data_dir().join("blobs").join(d.file_name())
}

async fn get(url: &str, range: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut req = http_client().get(url).timeout(Duration::from_secs(60));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.bytes().await.unwrap().to_vec())
}

/// A cached blob is served from its file in blocks of 1 MiB: whole, and in ranges that start,
/// end or cross a block's edge, every byte is the blob's and the upstream is not asked again.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_blob_is_served_whole_and_in_ranges_across_its_read_blocks() {
    let s = setup_sized((5 << 20) / 2, 40).await;
    let layer = s.image.layers[0].clone();
    let good = s.image.blob_bytes(&layer.digest).unwrap();
    assert!(good.len() > (2 << 20), "{}", good.len());
    let p = Proxy::start(&[s.tracker.url()], &s.registry.url(), &[])
        .await
        .unwrap();
    let url = blob_url(&p, &layer.digest);
    assert_eq!(get(&url, None).await.0, StatusCode::OK);
    p.wait_held(1, Duration::from_secs(30)).await.unwrap();
    let served = r#"bay_blob_bytes_served_total{source="cache"}"#;
    let before = Scrape::of(&p.url()).await.unwrap().value(served);

    let (status, body) = get(&url, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == good, "the whole blob from the cache differs");
    let mib = 1usize << 20;
    let last = good.len() - 1;
    for (from, to) in [
        (0, 0),
        (mib - 10, mib + 10),
        (mib, 2 * mib - 1),
        (mib - 1, 2 * mib),
        (2 * mib - 1, last),
        (last, last),
    ] {
        let (status, body) = get(&url, Some(&format!("bytes={from}-{to}"))).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "bytes={from}-{to}");
        assert!(body == good[from..=to], "bytes={from}-{to} differ");
    }
    let after = Scrape::of(&p.url()).await.unwrap().value(served);
    let ranges = 1 + 21 + mib + (mib + 2) + (last - 2 * mib + 2) + 1;
    assert_eq!(after - before, (good.len() + ranges) as f64);
    assert_eq!(s.registry.blob_gets(&layer.digest), 1);
}

/// A Range GET of a cached blob whose file was changed after it was verified gets the right
/// bytes: the file is checked again before any part of it goes out, found wrong, dropped, and
/// the blob fetched again.
#[tokio::test(flavor = "multi_thread")]
async fn a_range_of_a_changed_cached_blob_is_not_served_from_it() {
    let s = setup(41).await;
    let layer = s.image.layers[0].clone();
    let good = s.image.blob_bytes(&layer.digest).unwrap();
    let p = Proxy::start(&[s.tracker.url()], &s.registry.url(), &[])
        .await
        .unwrap();
    let url = blob_url(&p, &layer.digest);
    assert_eq!(get(&url, None).await.0, StatusCode::OK);
    p.wait_held(1, Duration::from_secs(30)).await.unwrap();

    // Let the modification time move on a coarse clock, then damage the cached copy.
    tokio::time::sleep(Duration::from_millis(20)).await;
    flip_byte(cached_path(&p, &layer.digest), 1000).unwrap();

    let (status, body) = get(&url, Some("bytes=900-1099")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert!(body == good[900..1100], "the damaged bytes were served");
    assert!(
        p.log_text()
            .contains("cached blob changed on disk and no longer matches"),
        "the proxy did not notice"
    );
    // The copy it holds now is the blob again.
    p.wait_held(1, Duration::from_secs(30)).await.unwrap();
    assert!(std::fs::read(cached_path(&p, &layer.digest)).unwrap() == good);
}

/// A proxy restarted over a cache whose file was damaged while it was down hashes it again,
/// drops it (nothing damaged is seeded or served), and serves the blob whole and right.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_drops_a_cached_blob_damaged_meanwhile() {
    let s = setup(42).await;
    let layer = s.image.layers[0].clone();
    let good = s.image.blob_bytes(&layer.digest).unwrap();
    let mut p = Proxy::start(&[s.tracker.url()], &s.registry.url(), &[])
        .await
        .unwrap();
    assert_eq!(
        get(&blob_url(&p, &layer.digest), None).await.0,
        StatusCode::OK
    );
    p.wait_held(1, Duration::from_secs(30)).await.unwrap();
    p.terminate(Duration::from_secs(10)).await.unwrap();

    flip_byte(cached_path(&p, &layer.digest), 5).unwrap();
    p.restart().await.unwrap();
    let log = p.log_text();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !p.log_text().contains("discarding cached blob") {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted proxy kept the damaged blob:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !p.log_text().contains("re-seeding cached blob"),
        "the damaged blob was seeded"
    );
    let (status, body) = get(&blob_url(&p, &layer.digest), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body == good,
        "the proxy served the damaged blob after its restart"
    );
}

/// A blob fetched from upstream that cannot be moved into the cache (here a directory stands
/// where its file should go) still reaches the client verified; the failure is logged with its
/// cause and the blob's digest, and counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_that_cannot_be_cached_is_served_and_the_failure_counted() {
    let s = setup(43).await;
    // No tracker: the blob comes from upstream, through the proxy's cache-filling path.
    let p = Proxy::start(&[], &s.registry.url(), &[]).await.unwrap();
    uncacheable_blob_is_served_and_counted(
        &s,
        &p,
        "verified blob from upstream not cached: moving it to",
    )
    .await;
}

/// The same for a swarm download: its finished file cannot be linked into the cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_swarm_download_that_cannot_be_cached_is_served_and_the_failure_counted() {
    let s = setup(44).await;
    let p = Proxy::start(&[s.tracker.url()], &s.registry.url(), &[])
        .await
        .unwrap();
    uncacheable_blob_is_served_and_counted(&s, &p, "caching blob failed, serving without caching")
        .await;
    assert_eq!(p.stats().await.unwrap()["fallbacks"], 0);
}

async fn uncacheable_blob_is_served_and_counted(s: &Setup, p: &Proxy, logged: &str) {
    let layer = s.image.layers[0].clone();
    let good = s.image.blob_bytes(&layer.digest).unwrap();
    // After the start-up scan of the cache, which would remove the stray directory.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_client()
            .get(format!("{}/_bay/readyz", p.url()))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let blocker = cached_path(p, &layer.digest);
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();

    let (status, body) = get(&blob_url(p, &layer.digest), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == good);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = Scrape::of(&format!("{}/_bay", p.url())).await.unwrap();
        if m.value("bay_cache_commit_failures_total") >= 1.0 || std::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(m.value("bay_cache_commit_failures_total"), 1.0);
    let log = p.log_text();
    assert!(
        log.contains(logged) && log.contains(&layer.digest),
        "the failure was not logged with its cause and digest:\n{log}"
    );
    assert_eq!(p.stats().await.unwrap()["blobs_held"], 0);
}

//! High availability: three trackers, three proxies; the tracker that owns a layer (ranks first
//! for its digest) is killed in the middle of a pull, and every pull still finishes verified
//! while upstream sends that layer at most twice and every other blob once.

use std::time::{Duration, Instant};

use bay_proxy::trackers::rendezvous;
use bay_tests::{Image, Proxy, Registry, RegistryOptions, Tracker, sha256_file, skopeo_pull};

const LINK: &str = "8M";

fn owner(tracker_urls: &[String], digest: &str) -> usize {
    // The proxy ranks trackers by their parsed URL, which ends in '/'.
    let normalized: Vec<String> = tracker_urls
        .iter()
        .map(|u| url::Url::parse(u).unwrap().to_string())
        .collect();
    rendezvous(&normalized, digest)[0]
}

async fn pull_all(proxies: &[Proxy], image: &Image, reference: &str) -> Vec<Duration> {
    let started = Instant::now();
    let outs: Vec<tempfile::TempDir> = proxies
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let pulls = proxies.iter().zip(&outs).map(|(p, out)| async move {
        skopeo_pull(&p.authority(), reference, out.path(), None)
            .await
            .unwrap();
        started.elapsed()
    });
    let times = futures::future::join_all(pulls).await;
    for out in &outs {
        for blob in image.layers.iter().chain([&image.config]) {
            let path = out.path().join(blob.digest.trim_start_matches("sha256:"));
            assert_eq!(sha256_file(&path).unwrap(), blob.digest);
        }
    }
    times
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_losing_the_owning_tracker() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let calm = Image::generate(&[16 << 20, 16 << 20, 16 << 20], 1).unwrap();
    calm.push(&registry, "ha/calm:1", None).await.unwrap();
    let stormy = Image::generate(&[24 << 20, 24 << 20, 24 << 20], 2).unwrap();
    stormy.push(&registry, "ha/stormy:1", None).await.unwrap();

    let mut trackers = Vec::new();
    for _ in 0..3 {
        trackers.push(
            Tracker::start(&[registry.url()], &["--upload-limit", LINK])
                .await
                .unwrap(),
        );
    }
    let urls: Vec<String> = trackers.iter().map(|t| t.url()).collect();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let args = ["--upload-limit", LINK, "--stall-timeout", "4"];
        proxies.push(Proxy::start(&urls, &registry.url(), &args).await.unwrap());
    }

    // All trackers up.
    let calm_times = pull_all(&proxies, &calm, "ha/calm:1").await;
    for blob in calm.layers.iter().chain([&calm.config]) {
        assert_eq!(registry.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }

    // The owner of the first layer dies while the three proxies pull.
    let victim_layer = stormy.layers[0].digest.clone();
    let victim = owner(&urls, &victim_layer);
    let pulls = {
        let proxies = &proxies;
        let stormy = &stormy;
        async move { pull_all(proxies, stormy, "ha/stormy:1").await }
    };
    let t0 = Instant::now();
    let killer = async {
        registry
            .wait_blob_gets(&victim_layer, 1, Duration::from_secs(60))
            .await
            .unwrap();
        // Let the swarm get going on it, then pull the plug.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        trackers[victim].kill();
        eprintln!("killed tracker {victim} ({})", urls[victim]);
        t0.elapsed()
    };
    let (stormy_times, killed_at) = tokio::join!(pulls, killer);
    // Otherwise this tested nothing: the tracker died while every pull was still running.
    for t in &stormy_times {
        assert!(
            *t > killed_at,
            "a pull ended ({t:?}) before the tracker was killed ({killed_at:?})"
        );
    }

    for blob in stormy.layers.iter().chain([&stormy.config]) {
        let gets = registry.blob_gets(&blob.digest);
        if owner(&urls, &blob.digest) == victim {
            assert!((1..=2).contains(&gets), "{}: {gets} GETs", blob.digest);
        } else {
            assert_eq!(
                gets, 1,
                "{} is not the dead tracker's: {gets} GETs",
                blob.digest
            );
        }
    }
    let mut fallbacks = 0;
    for p in &proxies {
        fallbacks += p.stats().await.unwrap()["fallbacks"].as_u64().unwrap();
    }
    eprintln!(
        "3 trackers, 3 proxies, uploads {LINK}B/s: 48 MiB with all trackers up: {calm_times:?}; \
         72 MiB with the owner of a layer killed mid-pull (at {killed_at:?}): {stormy_times:?}; \
         upstream GETs of that layer: {}; fallbacks to upstream: {fallbacks}",
        registry.blob_gets(&victim_layer)
    );
    // The proxies wait for the next tracker to seed the layer rather than each going upstream:
    // at most one of them may have (the second upstream GET allowed above).
    assert!(fallbacks <= 1, "{fallbacks} fallbacks to upstream");
}

//! An image manifest passing through the proxy starts the swarm downloads of its blobs, so a
//! client that asks for layers one after another finds them cached or on their way.

use std::time::Duration;

use bay_tests::{
    Image, Proxy, Registry, RegistryOptions, Scrape, Tracker, http_client, skopeo_pull,
};

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

async fn get_manifest(base: &str, reference: &str) -> (u16, Option<String>, Vec<u8>) {
    let r = http_client()
        .get(format!("{base}/v2/test/img/manifests/{reference}"))
        .header("accept", MANIFEST_TYPES)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, digest, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_get_prefetches_its_blobs_and_relays_the_bytes_unchanged() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[3 << 20, 1 << 20], 31).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let blobs: Vec<_> = image.layers.iter().chain([&image.config]).collect();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let proxy = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();

    // The client gets upstream's bytes and digest header, whatever the proxy does with them.
    let direct = get_manifest(&registry.url(), "1").await;
    let (status, digest, bytes) = get_manifest(&proxy.url(), "1").await;
    assert_eq!(status, 200);
    assert_eq!(digest, direct.1);
    assert_eq!(bytes, direct.2);
    assert_eq!(digest.as_deref(), Some(image.manifest.digest.as_str()));

    // No client asked for a blob, yet every blob arrives, verified, through the swarm.
    proxy
        .wait_held(blobs.len() as u64, Duration::from_secs(60))
        .await
        .unwrap();
    let m = Scrape::of(&proxy.url()).await.unwrap();
    assert_eq!(m.get("bay_prefetches_total").unwrap(), blobs.len() as f64);
    assert_eq!(
        m.get(r#"bay_swarm_downloads_total{outcome="cached"}"#)
            .unwrap(),
        blobs.len() as f64
    );
    for outcome in ["cache_hit", "swarm", "upstream"] {
        assert_eq!(
            m.value(&format!(
                r#"bay_blob_requests_total{{outcome="{outcome}"}}"#
            )),
            0.0
        );
    }
    for b in &blobs {
        // Once, by the tracker.
        assert_eq!(registry.blob_gets(&b.digest), 1, "{}", b.digest);
    }
    // One after another in the manifest's order (config, 3 MiB, 1 MiB), so the swarm can start
    // on one layer while the tracker fetches the next; fetched all at once, the 1 MiB layer
    // would finish before the 3 MiB one.
    let fetched: Vec<String> = registry
        .access_log()
        .into_iter()
        .filter(|e| e.method == "GET" && e.status == 200 && e.uri.contains("/blobs/sha256:"))
        .map(|e| e.uri.rsplit('/').next().unwrap().to_owned())
        .collect();
    let order = [&image.config, &image.layers[0], &image.layers[1]].map(|b| b.digest.clone());
    assert_eq!(fetched, order);

    // The manifest again, now by digest: nothing new starts for blobs already held.
    let (status, _, again) = get_manifest(&proxy.url(), &image.manifest.digest).await;
    assert_eq!((status, again), (200, direct.2));

    // The pull finds everything cached; skopeo checks every digest.
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(&proxy.authority(), "test/img:1", out.path(), None)
        .await
        .unwrap();
    let m = Scrape::of(&proxy.url()).await.unwrap();
    assert_eq!(m.get("bay_prefetches_total").unwrap(), blobs.len() as f64);
    assert_eq!(
        m.get(r#"bay_blob_requests_total{outcome="cache_hit"}"#)
            .unwrap(),
        blobs.len() as f64
    );
    for b in &blobs {
        assert_eq!(registry.blob_gets(&b.digest), 1, "{}", b.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_prefetch_when_disabled_or_when_the_answer_is_not_an_image_manifest() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[1 << 20], 32).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let off = Proxy::start(&[tracker.url()], &registry.url(), &["--prefetch", "false"])
        .await
        .unwrap();
    let on = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();

    assert_eq!(get_manifest(&off.url(), "1").await.0, 200);
    // A missing tag and a HEAD pass through and start nothing either.
    assert_eq!(get_manifest(&on.url(), "nope").await.0, 404);
    let head = http_client()
        .head(format!("{}/v2/test/img/manifests/1", on.url()))
        .header("accept", MANIFEST_TYPES)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);

    // Enough time for a prefetch of 1 MiB to show (the first test sees 4 MiB in well under it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in [&off, &on] {
        let s = p.stats().await.unwrap();
        assert_eq!(s["blobs_held"].as_u64(), Some(0), "{s}");
        let m = Scrape::of(&p.url()).await.unwrap();
        assert_eq!(m.value("bay_prefetches_total"), 0.0);
    }
    for b in image.layers.iter().chain([&image.config]) {
        assert_eq!(registry.blob_gets(&b.digest), 0, "{}", b.digest);
    }

    // The same GET on the proxy that prefetches does start it: the check above could fail.
    assert_eq!(get_manifest(&on.url(), "1").await.0, 200);
    on.wait_held(2, Duration::from_secs(60)).await.unwrap();
}

/// Many clients getting one image manifest at once start one prefetch of its blobs, not one
/// each: the tracker is asked for each blob's torrent twice (the paced first pass, then the
/// download), however many clients there were.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_manifest_gets_start_one_prefetch() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[2 << 20, 1 << 20, 1 << 20], 33).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let blobs = image.layers.len() + 1;
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let proxy = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();
    let url = proxy.url();
    let gets = (0..8).map(|_| get_manifest(&url, "1"));
    for (status, digest, _) in futures::future::join_all(gets).await {
        assert_eq!(status, 200);
        assert_eq!(digest.as_deref(), Some(image.manifest.digest.as_str()));
    }
    proxy
        .wait_held(blobs as u64, Duration::from_secs(60))
        .await
        .unwrap();
    let stats: serde_json::Value = tracker.stats().await.unwrap();
    let asked = stats["torrents_served"].as_u64().unwrap();
    assert!(
        asked <= 2 * blobs as u64,
        "the tracker was asked for {asked} torrents for {blobs} blobs"
    );
    let m = Scrape::of(&proxy.url()).await.unwrap();
    assert_eq!(m.get("bay_prefetches_total").unwrap(), blobs as f64);
}

//! containerd's mirror mode end to end: a private `containerd` pulls `<registry>/test/img:1`
//! with a `hosts.toml` whose `server` is the real registry and whose only `[host]` is a
//! bay-proxy (`capabilities = ["pull", "resolve"]`). containerd then sends every request to the
//! proxy's plain address with `?ns=<registry>`, and the proxy must take the upstream from that
//! parameter: its `--default-upstream` here is an address nobody listens on, so a request
//! routed any other way fails (and containerd would fall back to the registry itself, which the
//! registry's log would show).
//!
//! A second containerd pulls the same image through a second proxy, which gets the blobs from
//! the swarm (the first proxy and the tracker's seed); upstream sends each blob once in all.
//!
//! Needs Debian's `containerd` (daemon and `ctr`); where it is not installed, the test prints
//! `SKIPPED: containerd mirror test: <reason>` and returns (under `CI=true` it fails instead).

use std::time::{Duration, Instant};

use bay_tests::{
    Containerd, Image, Proxy, Registry, RegistryOptions, Tracker, free_port, loopback_ip, skip,
};
use sha2::{Digest as _, Sha256};

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The chain ID of a stack of layers with these diff IDs (OCI image spec): the first diff ID,
/// then `sha256(<chain id so far> + " " + <next diff id>)`.
fn chain_id(diff_ids: &[&str]) -> String {
    let mut ids = diff_ids.iter();
    let first = ids.next().expect("at least one layer").to_string();
    ids.fold(first, |chain, diff| {
        sha256(format!("{chain} {diff}").as_bytes())
    })
}

/// Pulls `reference` with `containerd` through its configured mirror and checks what landed in
/// its content store and snapshotter.
async fn pull_and_check(containerd: &Containerd, reference: &str, image: &Image) {
    let started = Instant::now();
    let chain = containerd.pull(reference).await.unwrap();
    eprintln!(
        "ctr images pull {reference} (containerd pid {:?}) took {:?}",
        containerd.pid(),
        started.elapsed()
    );

    // Unpacking into the snapshotter checked every layer against the config's diff_ids; the
    // chain ID says all of them, in order, made it.
    let layer_digests: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(
        chain,
        chain_id(&layer_digests),
        "chain ID of the unpacked image"
    );
    assert_eq!(
        containerd.image_digest(reference).await.unwrap(),
        image.manifest.digest
    );
    for blob in image.layers.iter().chain([&image.config, &image.manifest]) {
        let bytes = containerd.content(&blob.digest).await.unwrap();
        assert_eq!(bytes.len() as u64, blob.size, "size of {}", blob.digest);
        assert_eq!(sha256(&bytes), blob.digest, "content of {}", blob.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_the_proxy_as_a_registry_mirror() {
    if let Some(why) = Containerd::missing() {
        skip("containerd mirror test", &why);
        return;
    }
    let started = Instant::now();
    // Two daemons, each with its own root: two machines' containerds.
    let (first, second) = tokio::join!(Containerd::start(), Containerd::start());
    let (first, second) = (first.unwrap(), second.unwrap());
    eprintln!(
        "containerd {} x2 up after {:?} ({}, {})",
        first.server_version(),
        started.elapsed(),
        first.dir().display(),
        second.dir().display()
    );

    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[8 << 20, 3 << 20, 300_000], 53).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let trackers = [tracker.url()];

    // The proxies' default upstream is allowlisted but dead: only `ns` reaches the registry.
    let dead_ip = loopback_ip();
    let dead = format!("http://{dead_ip}:{}", free_port(dead_ip));
    let registry_url = registry.url();
    let real = ["--upstream", registry_url.as_str()];
    let a = Proxy::start(&trackers, &dead, &real).await.unwrap();
    let b = Proxy::start(&trackers, &dead, &real).await.unwrap();

    let reference = format!("{}/test/img:1", registry.authority());
    let hosts_a = first
        .add_mirror(&registry.authority(), &registry.url(), &a.url())
        .unwrap();
    second
        .add_mirror(&registry.authority(), &registry.url(), &b.url())
        .unwrap();
    eprintln!(
        "{}:\n{}",
        hosts_a.display(),
        std::fs::read_to_string(&hosts_a).unwrap()
    );

    let pushed = registry.access_log().len();
    pull_and_check(&first, &reference, &image).await;
    let blobs = image.layers.len() as u64 + 1;
    let sa = a.wait_held(blobs, Duration::from_secs(30)).await.unwrap();
    eprintln!("proxy A stats: {sa}");
    assert_eq!(sa["blobs_served"], blobs, "{sa}");
    // A blob the manifest's prefetch finished first is a cache hit; both came via the swarm.
    let n = |k: &str| sa[k].as_u64().unwrap_or(0);
    assert_eq!(n("swarm_downloads") + n("cache_hits"), blobs, "{sa}");
    assert_eq!(sa["fallbacks"], 0, "{sa}");
    assert_eq!(sa["bytes_from_upstream"], 0, "{sa}");

    pull_and_check(&second, &reference, &image).await;
    let sb = b.wait_held(blobs, Duration::from_secs(30)).await.unwrap();
    eprintln!("proxy B stats: {sb}");
    let total: u64 = image
        .layers
        .iter()
        .chain([&image.config])
        .map(|b| b.size)
        .sum();
    assert_eq!(sb["blobs_served"], blobs, "{sb}");
    assert_eq!(sb["fallbacks"], 0, "{sb}");
    assert_eq!(sb["bytes_from_upstream"], 0, "{sb}");
    let from_swarm = sb["bytes_from_peers"].as_u64().unwrap_or(0)
        + sb["bytes_from_trackers"].as_u64().unwrap_or(0);
    assert!(from_swarm >= total, "{from_swarm} < {total} bytes: {sb}");
    assert!(
        sb["bytes_from_peers"].as_u64().unwrap_or(0) > 0,
        "proxy B got nothing from proxy A: {sb}"
    );

    // Upstream: each blob left once (to the tracker). containerd adds `ns` only for mirrors,
    // so every manifest request carrying it came through a proxy, and none came without it.
    for blob in image.layers.iter().chain([&image.config]) {
        assert_eq!(
            registry.blob_gets(&blob.digest),
            1,
            "{} must leave upstream exactly once (by the tracker)",
            blob.digest
        );
    }
    let ns = format!("ns={}", registry.authority().replace(':', "%3A"));
    let manifests: Vec<_> = registry
        .access_log()
        .into_iter()
        .skip(pushed)
        .filter(|e| e.uri.contains("/manifests/"))
        .collect();
    assert!(!manifests.is_empty());
    for e in &manifests {
        eprintln!("registry saw {} {} -> {}", e.method, e.uri, e.status);
        assert!(
            e.uri.contains(&ns),
            "{} {} reached the registry without {ns}: not through a proxy",
            e.method,
            e.uri
        );
    }
    eprintln!("test took {:?}", started.elapsed());
}

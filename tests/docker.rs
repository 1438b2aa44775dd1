//! The real Docker client end to end: `docker pull p2p-<registry>:<port>/repo:tag` through a
//! private `dockerd`, resolved by temporary /etc/hosts lines to bay-proxy, whose blobs come
//! from the swarm; `docker save` then shows the layers arrived intact.
//!
//! Needs root (for /etc/hosts and dockerd) and Debian's `docker.io`. Where Docker is not
//! installed the test prints `SKIPPED: docker pull test: <reason>` and returns (under `CI=true`
//! it fails instead); where it is installed but dockerd cannot start, the test fails.

use std::path::Path;
use std::time::{Duration, Instant};

use bay_tests::{
    Dockerd, HostsEntry, Image, Proxy, Registry, RegistryOptions, Tracker, loopback_ip,
    run_with_timeout, sha256_file, skip,
};

/// Layer digests, in order, of the image a `docker save` archive holds (both the classic
/// `<id>/layer.tar` format and the OCI layout of Docker 25+ list them in `manifest.json`).
async fn saved_layer_digests(archive: &Path, out: &Path) -> Vec<String> {
    let mut tar = tokio::process::Command::new("tar");
    tar.arg("-xf").arg(archive).arg("-C").arg(out);
    let result = run_with_timeout(&mut tar, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(result.status.success(), "tar -xf: {result:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let layers = manifest[0]["Layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no Layers in the saved manifest.json: {manifest}"));
    layers
        .iter()
        .map(|l| sha256_file(out.join(l.as_str().unwrap())).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_pull_through_the_proxy_gets_intact_layers_from_the_swarm() {
    if let Some(why) = Dockerd::missing() {
        skip("docker pull test", &why);
        return;
    }
    let started = Instant::now();
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    // Docker calls the registry `bay-reg-<pid>:<port>` and the proxy `p2p-bay-reg-<pid>:<port>`:
    // same port number, so the proxy listens on that port on an address of its own. Both names
    // exist before dockerd starts, so no resolver cache inside it can miss them.
    let name = format!("bay-reg-{}", std::process::id());
    let upstream_authority = format!("{name}:{}", registry.port());
    let upstream = format!("http://{upstream_authority}");
    let proxy_ip = loopback_ip();
    let _registry_host = HostsEntry::add(registry.ip(), &name).unwrap();
    let _proxy_host = HostsEntry::add(proxy_ip, &format!("p2p-{name}")).unwrap();

    let dockerd = Dockerd::start()
        .await
        .expect("Docker is installed: dockerd must start");
    eprintln!(
        "dockerd {} up after {:?} (client {})",
        dockerd.server_version(),
        started.elapsed(),
        dockerd.client().display()
    );

    let image = Image::generate(&[3 << 20, 1 << 20, 300_000], 31).unwrap();
    image
        .push_to(&upstream_authority, "test/img:1", None)
        .await
        .unwrap();
    let tracker = Tracker::start(std::slice::from_ref(&upstream), &[])
        .await
        .unwrap();
    let proxy = Proxy::start_on(proxy_ip, registry.port(), &[tracker.url()], &upstream, &[])
        .await
        .unwrap();

    let reference = format!("p2p-{upstream_authority}/test/img:1");
    let pull_started = Instant::now();
    dockerd.docker(&["pull", &reference]).await.unwrap();
    eprintln!("docker pull {reference} took {:?}", pull_started.elapsed());

    // What dockerd recorded: the layers as diff_ids, the config as image id, the manifest.
    let inspect = dockerd
        .docker(&["image", "inspect", &reference])
        .await
        .unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let inspect = &inspect[0];
    let digests: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(inspect["RootFS"]["Layers"], serde_json::json!(digests));
    assert_eq!(inspect["Id"], image.config.digest.as_str());
    let repo_digest = format!(
        "p2p-{name}:{}/test/img@{}",
        registry.port(),
        image.manifest.digest
    );
    assert!(
        inspect["RepoDigests"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d == repo_digest.as_str())),
        "{repo_digest} not among {}",
        inspect["RepoDigests"]
    );

    // `docker save` rebuilds each layer tar from what is on disk: byte-identical or not.
    let saved = tempfile::tempdir().unwrap();
    let archive = saved.path().join("image.tar");
    dockerd
        .docker(&["save", "-o", archive.to_str().unwrap(), &reference])
        .await
        .unwrap();
    let extracted = saved.path().join("x");
    std::fs::create_dir(&extracted).unwrap();
    assert_eq!(saved_layer_digests(&archive, &extracted).await, digests);

    // Every blob left upstream once, by the tracker; the proxy took them all from the swarm.
    for blob in image.layers.iter().chain([&image.config]) {
        assert_eq!(
            registry.blob_gets(&blob.digest),
            1,
            "{} must leave upstream exactly once (by the tracker)",
            blob.digest
        );
    }
    let stats = proxy
        .wait_held(image.layers.len() as u64 + 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(stats["fallbacks"], 0, "{stats}");
    assert!(
        // Prefetched blobs finished before the client asked are cache hits.
        stats["swarm_downloads"].as_u64().unwrap_or(0) + stats["cache_hits"].as_u64().unwrap_or(0)
            >= image.layers.len() as u64,
        "{stats}"
    );
    eprintln!("proxy stats: {stats}; test took {:?}", started.elapsed());
}

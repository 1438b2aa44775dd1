//! Load: 32 concurrent pulls of one multi-layer image through 4 proxies. Every pull verifies,
//! upstream sends each blob once, and the proxies' open files and memory come back down.

use std::time::Duration;

use bay_tests::{Image, Proxy, Registry, RegistryOptions, Tracker, sha256_file, skopeo_pull};

const PULLS_PER_PROXY: usize = 8;

/// Resident memory of a process, in KiB.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A process's open descriptors, sorted by what they hold. Idle pooled connections come and go
/// with how requests happened to overlap, so each kind gets its own bound: a leak shows in
/// its kind, whatever the pools do beside it.
#[derive(Debug, Default)]
struct Fds {
    /// Blob files (`…/sha256-<hex>`): librqbit keeps one open per torrent it seeds.
    blobs: usize,
    /// TCP connections to the registry, to the tracker, and to anything else (other proxies'
    /// peer and exchange ports, their connections to ours).
    registry: usize,
    tracker: usize,
    peers: usize,
    /// Everything else: logs, pipes, eventfds, epolls, listeners, non-TCP sockets.
    other: usize,
    /// Every descriptor as `fd target`, for a failure message.
    listing: Vec<String>,
}

fn fds(pid: u32, registry: std::net::Ipv4Addr, tracker: std::net::Ipv4Addr) -> Fds {
    // fd -> (state, remote address) of the process's TCP sockets.
    let ss = std::process::Command::new("ss")
        .args(["-tanpH"])
        .output()
        .unwrap();
    let tag = format!("pid={pid},fd=");
    let mut tcp = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&ss.stdout).lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 6 {
            continue;
        }
        for user in line.split(&tag).skip(1) {
            let fd: String = user.chars().take_while(char::is_ascii_digit).collect();
            tcp.insert(fd, (cols[0].to_string(), cols[4].to_string()));
        }
    }
    let mut out = Fds::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(entry) = entry else { continue };
        let fd = entry.file_name().to_string_lossy().into_owned();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed while listed
        };
        let target = target.display().to_string();
        match tcp.get(&fd) {
            Some((state, remote)) if state != "LISTEN" => {
                let ip = remote.rsplit_once(':').map_or("", |(ip, _)| ip);
                if ip == registry.to_string() {
                    out.registry += 1;
                } else if ip == tracker.to_string() {
                    out.tracker += 1;
                } else {
                    out.peers += 1;
                }
                out.listing.push(format!("{fd} {state} {remote}"));
            }
            _ => {
                if target.contains("/sha256-") {
                    out.blobs += 1;
                } else {
                    out.other += 1;
                }
                out.listing.push(format!("{fd} {target}"));
            }
        }
    }
    out.listing.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_pulls_through_four_proxies() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    // A first image warms the proxies up (connection pools, swarm sessions); the baseline is
    // taken after it, so what the load adds on top is what must go away again.
    let warm = Image::generate(&[1 << 20, 1 << 20], 31).unwrap();
    warm.push(&registry, "load/warm:1", None).await.unwrap();
    let image = Image::generate(&[6 << 20, 3 << 20, 1 << 20], 32).unwrap();
    image.push(&registry, "load/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let mut proxies = Vec::new();
    for _ in 0..4 {
        proxies.push(
            Proxy::start(&[tracker.url()], &registry.url(), &[])
                .await
                .unwrap(),
        );
    }
    for p in &proxies {
        let out = tempfile::tempdir().unwrap();
        skopeo_pull(&p.authority(), "load/warm:1", out.path(), None)
            .await
            .unwrap();
        p.wait_held(3, Duration::from_secs(30)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (reg_ip, tracker_ip) = (registry.ip(), tracker.ip());
    let before: Vec<(Fds, u64)> = proxies
        .iter()
        .map(|p| {
            let pid = p.pid().unwrap();
            (fds(pid, reg_ip, tracker_ip), rss(pid))
        })
        .collect();

    let outs: Vec<(usize, tempfile::TempDir)> = (0..proxies.len() * PULLS_PER_PROXY)
        .map(|i| (i % proxies.len(), tempfile::tempdir().unwrap()))
        .collect();
    let pulls = outs.iter().map(|(p, out)| {
        let proxy = &proxies[*p];
        async move { skopeo_pull(&proxy.authority(), "load/img:1", out.path(), None).await }
    });
    let peak: Vec<(usize, u64)> = {
        let all = futures::future::join_all(pulls);
        tokio::pin!(all);
        let mut peak: Vec<(usize, u64)> =
            before.iter().map(|(f, r)| (f.listing.len(), *r)).collect();
        loop {
            tokio::select! {
                results = &mut all => {
                    for r in results {
                        r.unwrap();
                    }
                    break peak;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    for (i, p) in proxies.iter().enumerate() {
                        let pid = p.pid().unwrap();
                        let (f, r) = (fd_count(pid), rss(pid));
                        peak[i] = (peak[i].0.max(f), peak[i].1.max(r));
                    }
                }
            }
        }
    };
    for (_, out) in &outs {
        for blob in image.layers.iter().chain([&image.config]) {
            let path = out.path().join(blob.digest.trim_start_matches("sha256:"));
            assert_eq!(sha256_file(&path).unwrap(), blob.digest);
        }
    }
    for blob in image.layers.iter().chain([&image.config]) {
        assert_eq!(registry.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }

    // Let connections close and downloads settle, then compare with the baseline.
    for p in &proxies {
        p.wait_held(3 + 4, Duration::from_secs(30)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = 3 + 4;
    let idle = bay_common::upstream::IDLE_PER_HOST;
    for (i, p) in proxies.iter().enumerate() {
        let pid = p.pid().unwrap();
        let after = (fds(pid, reg_ip, tracker_ip), rss(pid));
        let (b, a) = (&before[i].0, &after.0);
        eprintln!(
            "proxy {i}: fds {} -> peak {} -> {}, RSS {} -> peak {} -> {} KiB; \
             blobs {} -> {}, registry {} -> {}, tracker {} -> {}, peers {} -> {}, other {} -> {}",
            b.listing.len(),
            peak[i].0,
            a.listing.len(),
            before[i].1,
            peak[i].1,
            after.1,
            b.blobs,
            a.blobs,
            b.registry,
            a.registry,
            b.tracker,
            a.tracker,
            b.peers,
            a.peers,
            b.other,
            a.other
        );
        let why = format!("proxy {i}: before {:#?}, after {:#?}", b.listing, a.listing);
        // One file per blob librqbit seeds: the image's 4 new ones, and nothing the 32 pulls
        // read from the cache stays open.
        assert_eq!(a.blobs, b.blobs + 4, "blob files: {why}");
        // Logs, pipes, runtimes, listeners; one more for a socket being opened as we count.
        assert!(a.other <= b.other + 1, "other descriptors: {why}");
        // Idle pooled connections, at most `IDLE_PER_HOST` per HTTP client and host: to the
        // registry the pass-through's two clients and the upstream client; to the tracker the
        // three clients of `trackers.rs` and librqbit's announces (one per torrent at a time);
        // to each other proxy the exchange client's 2 and librqbit's connections, one per
        // torrent. A connection left open per request would pass these after 32 blob GETs.
        assert!(a.registry <= 3 * idle, "registry connections: {why}");
        assert!(a.tracker <= 3 * idle + held, "tracker connections: {why}");
        let others = proxies.len() - 1;
        assert!(a.peers <= others * (2 + held), "peer connections: {why}");
        assert!(
            after.1 <= before[i].1 + 64 * 1024,
            "proxy {i} RSS grew from {} to {} KiB",
            before[i].1,
            after.1
        );
    }
}

//! Load: 32 concurrent pulls of one multi-layer image through 4 proxies. Every pull verifies,
//! upstream sends each blob once, and the proxies' open files and memory come back down.

use std::time::Duration;

use bay_tests::{Image, Proxy, Registry, RegistryOptions, Tracker, sha256_file, skopeo_pull};

const PULLS_PER_PROXY: usize = 8;

/// (open file descriptors, resident memory in KiB) of a process.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

/// What each open descriptor points at, for a failure message.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| !t.starts_with("socket:"))
        .collect();
    v.sort();
    let ss = std::process::Command::new("ss")
        .args(["-tanpH"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let tag = format!("pid={pid},");
    v.extend(
        ss.lines()
            .filter(|l| l.contains(&tag))
            .map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" ")),
    );
    v
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
    let before: Vec<(usize, u64)> = proxies.iter().map(|p| usage(p.pid().unwrap())).collect();

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
        let mut peak = before.clone();
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
                        let (f, r) = usage(p.pid().unwrap());
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
    for (i, p) in proxies.iter().enumerate() {
        let after = usage(p.pid().unwrap());
        eprintln!(
            "proxy {i}: fds {} -> peak {} -> {}, RSS {} -> peak {} -> {} KiB",
            before[i].0, peak[i].0, after.0, before[i].1, peak[i].1, after.1
        );
        // 4 new blob files, and at most 4 idle connections per host and HTTP client (upstream
        // checks, pass-through, tracker requests, librqbit's announces), some of which the
        // baseline already had.
        assert!(
            after.0 <= before[i].0 + 4 + 4 * 4,
            "proxy {i} keeps {} fds open, {} before: {:?}",
            after.0,
            before[i].0,
            fd_targets(p.pid().unwrap())
        );
        assert!(
            after.1 <= before[i].1 + 64 * 1024,
            "proxy {i} RSS grew from {} to {} KiB",
            before[i].1,
            after.1
        );
    }
}

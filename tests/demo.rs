//! `bay-demo`: the whole job on one machine. Starts a real docker-registry, pushes a generated
//! image, starts a tracker and three proxies on their own loopback addresses, pulls the image
//! through all three at once with skopeo, verifies it, and prints where the bytes came from.
//! Everything it starts is stopped when it ends, also on Ctrl-C.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bay_tests::{Image, Proxy, Registry, RegistryOptions, Tracker, sha256_file, skopeo_pull};

/// Every BitTorrent uploader is limited like a modest network link, so the swarm has work to do.
const LINK: &str = "32M";
const LAYERS: [u64; 3] = [48 << 20, 24 << 20, 8 << 20];
const PROXIES: usize = 3;

#[tokio::main]
async fn main() -> Result<()> {
    tokio::select! {
        r = demo() => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: stopping everything the demo started");
            Ok(())
        }
    }
}

async fn demo() -> Result<()> {
    let step = |s: &str| println!("==> {s}");
    step("starting docker-registry (the upstream)");
    let registry = Registry::start(RegistryOptions::default()).await?;
    step("generating a 3-layer image and pushing it with skopeo");
    let image = Image::generate(&LAYERS, 2026)?;
    image.push(&registry, "demo/app:1", None).await?;
    let total: u64 = image
        .layers
        .iter()
        .chain([&image.config])
        .map(|b| b.size)
        .sum();

    step("starting bay-tracker");
    let tracker = Tracker::start(&[registry.url()], &["--upload-limit", LINK]).await?;
    step(&format!("starting {PROXIES} bay-proxies"));
    let mut proxies = Vec::new();
    for _ in 0..PROXIES {
        let args = ["--upload-limit", LINK, "--stall-timeout", "30"];
        proxies.push(Proxy::start(&[tracker.url()], &registry.url(), &args).await?);
    }
    for (i, p) in proxies.iter().enumerate() {
        println!(
            "    proxy {} at {} (BitTorrent port {})",
            i + 1,
            p.url(),
            p.peer_port()
        );
    }
    println!(
        "    registry at {}, tracker at {}, uploads limited to {LINK}B/s each",
        registry.url(),
        tracker.url()
    );

    step("pulling demo/app:1 through all proxies at once (skopeo copy)");
    let started = Instant::now();
    let outs: Vec<tempfile::TempDir> = (0..PROXIES)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let pulls = proxies.iter().zip(&outs).map(|(p, out)| async move {
        skopeo_pull(&p.authority(), "demo/app:1", out.path(), None).await?;
        Ok::<_, anyhow::Error>(started.elapsed())
    });
    let times = futures::future::try_join_all(pulls).await?;

    step("verifying every blob of every copy");
    for out in &outs {
        for blob in image.layers.iter().chain([&image.config]) {
            let path = out.path().join(blob.digest.trim_start_matches("sha256:"));
            let got = sha256_file(&path).with_context(|| format!("{}", path.display()))?;
            ensure!(got == blob.digest, "{} has digest {got}", path.display());
        }
    }
    println!("    all {PROXIES} copies verified");

    let mut rows = Vec::new();
    for p in &proxies {
        rows.push(p.wait_held(4, Duration::from_secs(30)).await?);
    }
    let upstream_bytes: u64 = image
        .layers
        .iter()
        .chain([&image.config])
        .map(|b| registry.blob_gets(&b.digest) as u64 * b.size)
        .sum();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let field = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);

    println!();
    println!(
        "image: {} blobs, {:.1} MiB; uploads limited to {LINK}B/s per node",
        image.layers.len() + 1,
        mib(total)
    );
    println!();
    println!(
        "{:<8} {:>8} {:>18} {:>18} {:>16}",
        "proxy", "time", "from tracker seed", "from peer proxies", "from upstream"
    );
    for (i, (s, t)) in rows.iter().zip(&times).enumerate() {
        println!(
            "{:<8} {:>7.1}s {:>14.1} MiB {:>14.1} MiB {:>12.1} MiB",
            i + 1,
            t.as_secs_f64(),
            mib(field(s, "bytes_from_trackers")),
            mib(field(s, "bytes_from_peers")),
            mib(field(s, "bytes_from_upstream")),
        );
    }
    println!();
    println!(
        "upstream registry served {:.1} MiB of blobs; {PROXIES} direct pulls would have cost {:.1} MiB ({:.0}% saved)",
        mib(upstream_bytes),
        mib(total * PROXIES as u64),
        100.0 * (1.0 - upstream_bytes as f64 / (total * PROXIES as u64) as f64)
    );
    // bay's own ledger, as an operator reads it from the stats endpoints.
    let tracker_stats: serde_json::Value = bay_tests::http_client()
        .get(format!("{}/v1/stats", tracker.url()))
        .send()
        .await?
        .json()
        .await?;
    let saved = |s: &serde_json::Value, k: &str| s["savings"]["total"][k].as_u64().unwrap_or(0);
    let served: u64 = rows.iter().map(|s| saved(s, "bytes_served")).sum();
    let fetched = saved(&tracker_stats, "bytes_from_upstream")
        + rows
            .iter()
            .map(|s| saved(s, "bytes_from_upstream"))
            .sum::<u64>();
    ensure!(
        served == total * PROXIES as u64 && fetched == upstream_bytes,
        "bay's stats disagree: proxies served {served} bytes, bay fetched {fetched} upstream; \
         the registry sent {upstream_bytes}"
    );
    println!(
        "bay's stats agree: proxies served {:.1} MiB to clients, bay fetched {:.1} MiB upstream",
        mib(served),
        mib(fetched)
    );
    Ok(())
}

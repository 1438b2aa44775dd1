//! What a swarm pull costs the proxy: a guard against CPU regressions on the blob path.
//!
//! A fresh proxy pulls a 256 MiB blob from the tracker (its web seed) on loopback, and its CPU
//! time per GiB received must stay under a generous bound: three times the 2 CPU-s per GiB
//! `bench/fastlink` holds it to. The bound leaves room for the debug build the tests run and
//! for a busy machine; the exact figures belong to the benchmark (`bench/RESULTS.md`).
//!
//! The proxy's writer thread is left out: it only copies verified pieces into the page cache,
//! whose cost is the machine's, not bay's (on this project's VMs, where the host takes freed
//! memory back, 2-3 CPU-s per GiB; on a plain host 0.3).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bay_tests::{Image, Proxy, Registry, RegistryOptions, Tracker, http_client};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};

const SIZE: u64 = 256 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Three times `bench/fastlink`'s target of 2 CPU-s per GiB received.
const MAX_CPU_S_PER_GIB: f64 = 6.0;

/// CPU-seconds of each thread name of process `pid` so far.
fn thread_cpu(pid: u32) -> HashMap<String, f64> {
    let ticks = clk_tck();
    let mut out = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let (Ok(stat), Ok(name)) = (
            std::fs::read_to_string(t.join("stat")),
            std::fs::read_to_string(t.join("comm")),
        ) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks_used: f64 =
            fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        *out.entry(name.trim().to_owned()).or_insert(0.0) += ticks_used / ticks;
    }
    out
}

/// Clock ticks per second as `/proc/<pid>/stat` counts them (100 on every Linux seen).
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swarm_pull_costs_the_proxy_little_cpu_per_gib() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[SIZE], 18).unwrap();
    image.push(&registry, "test/big:1", None).await.unwrap();
    let layer = image.layers[0].clone();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    // The tracker fetches the blob before the measured pull.
    let r = http_client()
        .get(format!(
            "{}/v1/torrents/{}/test/big/blobs/{}",
            tracker.url(),
            registry.authority(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let proxy = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();
    let pid = proxy.pid().unwrap();

    let before = thread_cpu(pid);
    let started = Instant::now();
    let resp = http_client()
        .get(format!(
            "{}/v2/test/big/blobs/{}",
            proxy.url(),
            layer.digest
        ))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut hash = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        got += chunk.len() as u64;
        hash.update(&chunk);
    }
    assert_eq!(got, layer.size);
    assert_eq!(
        format!("sha256:{}", hex::encode(hash.finalize())),
        layer.digest
    );
    let stats = proxy.wait_held(1, Duration::from_secs(60)).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    let after = thread_cpu(pid);

    assert_eq!(stats["fallbacks"], 0, "{stats}");
    assert_eq!(stats["bytes_from_upstream"], 0, "{stats}");
    let used = |name: Option<&str>| -> f64 {
        after
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| *n == want))
            .map(|(n, v)| v - before.get(n).copied().unwrap_or(0.0))
            .sum()
    };
    let total = used(None);
    let writer = used(Some("bay-writer"));
    let gib = layer.size as f64 / GIB;
    let per_gib = (total - writer) / gib;
    eprintln!(
        "swarm pull of {} MiB in {secs:.2} s: proxy {total:.2} CPU-s, of which its writer \
         {writer:.2}; {per_gib:.2} CPU-s per GiB without it (bound {MAX_CPU_S_PER_GIB})",
        SIZE >> 20
    );
    assert!(writer > 0.0, "the writer thread wrote nothing: {after:?}");
    assert!(
        per_gib <= MAX_CPU_S_PER_GIB,
        "the proxy spent {per_gib:.2} CPU-s per GiB on a swarm pull (bound {MAX_CPU_S_PER_GIB})"
    );
}

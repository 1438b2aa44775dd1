//! What the two hashes every swarm byte needs cost on this machine, with the very code bay-proxy
//! runs them with: SHA-256 from the sha2 crate (the client stream's digest check) and SHA-1 from
//! librqbit's wrapper (its piece check, OpenSSL). `bench/fastlink` sets them against the CPU a
//! swarm pull may spend at its throughput target.
//!
//! ```text
//! hash_floor [MiB, default 1024]
//! ```
//!
//! Prints one JSON object: per hash, CPU-seconds per GiB of this thread and MiB/s.

use anyhow::Context as _;
use librqbit_sha1_wrapper::ISha1 as _;
use sha2::Digest as _;

/// Hashed in rounds over this buffer. A swarm byte is hashed right after a copy put it in the
/// CPU's cache, so the buffer fits there too: over 64 MiB this VM's memory, not the hash, set
/// the pace (0.92 CPU-s/GiB for each, against 0.52-0.61 here).
const BUF: usize = 1 << 20;

/// Nanoseconds this thread has run (`/proc/thread-self/schedstat`, first field).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    s.split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()
        .context("schedstat")
}

/// Hashes `buf` `rounds` times: this thread's CPU-seconds per GiB, and MiB/s.
fn measure(
    buf: &[u8],
    rounds: usize,
    hash: impl Fn(&[u8]) -> u8,
) -> anyhow::Result<serde_json::Value> {
    let (t0, c0) = (std::time::Instant::now(), thread_cpu_ns()?);
    let mut sink = 0u8;
    for _ in 0..rounds {
        sink ^= hash(buf);
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu_ns()? - c0);
    let bytes = (rounds * buf.len()) as f64;
    std::hint::black_box(sink);
    Ok(serde_json::json!({
        "cpu_s_per_gib": (cpu as f64 / 1e9) / (bytes / f64::from(1u32 << 30)),
        "mib_s": bytes / f64::from(1u32 << 20) / wall,
    }))
}

fn main() -> anyhow::Result<()> {
    let mib: usize = match std::env::args().nth(1) {
        None => 1024,
        Some(a) => a
            .parse()
            .ok()
            .filter(|m| *m > 0)
            .with_context(|| format!("MiB {a:?}: a positive whole number"))?,
    };
    // Not random, but hashes do not care; every byte differs from its neighbours.
    let buf: Vec<u8> = (0..BUF as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    let rounds = (mib << 20).div_ceil(BUF);
    let sha256 = measure(&buf, rounds, |b| sha2::Sha256::digest(b)[0])?;
    let sha1 = measure(&buf, rounds, |b| {
        let mut h = librqbit_sha1_wrapper::Sha1::new();
        h.update(b);
        h.finish()[0]
    })?;
    let out = serde_json::json!({ "sha256": sha256, "sha1": sha1 });
    println!("{out}");
    Ok(())
}

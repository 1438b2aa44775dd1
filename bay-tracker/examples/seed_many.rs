//! How long bay-tracker's seed takes to start seeding N blobs of one size (as it does at start
//! for the blobs an earlier run left), with librqbit's fast resume (`--seed-fast-resume`, the
//! default) and without: the full hash costs in proportion to the bytes, fast resume's session
//! file in proportion to the blobs held.
//!
//! ```text
//! seed_many <count> <size, e.g. 4K or 16M> [dir, default /tmp]
//! ```
//!
//! Prints one line per way and the ratio. The blobs are written (random bytes) in a scratch
//! dir under `dir` before either way is timed, and removed after.

use std::time::Instant;

use anyhow::Context as _;
use bay_common::Digest;
use bay_common::flags::parse_size;
use bay_common::torrent::BlobTorrent;
use bay_tracker::seeder::Seeder;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(count), Some(size)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: seed_many <count> <size> [dir]");
    };
    let count: usize = count
        .parse()
        .with_context(|| format!("count {count:?} is not a number"))?;
    let size = parse_size(size).map_err(|e| anyhow::anyhow!("size {size:?}: {e}"))? as usize;
    anyhow::ensure!(size > 0, "size must be above 0");
    let scratch = tempfile::tempdir_in(args.get(2).map(String::as_str).unwrap_or("/tmp"))?;
    let blobs = scratch.path().join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let mut torrents = Vec::with_capacity(count);
    let mut data = vec![0u8; size];
    for _ in 0..count {
        rand::fill(&mut data[..]);
        let t = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data)?;
        std::fs::write(blobs.join(t.file_name()), &data)?;
        torrents.push(t);
    }
    let mut took = vec![];
    for fast_resume in [true, false] {
        let seeder = Seeder::start(
            "127.0.0.1:0".parse()?,
            &blobs,
            &scratch.path().join("seed-state"),
            fast_resume,
            None,
        )
        .await?;
        let started = Instant::now();
        for t in &torrents {
            seeder.add(t, &blobs).await?;
        }
        let s = started.elapsed().as_secs_f64();
        seeder.stop().await;
        println!(
            "{count} blobs of {size} bytes, fast resume {}: {s:.2} s",
            if fast_resume { "on" } else { "off" }
        );
        took.push(s);
    }
    println!("on / off: {:.2}", took[0] / took[1]);
    Ok(())
}

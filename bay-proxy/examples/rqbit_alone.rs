//! librqbit on its own, as bay-proxy runs it: downloads one torrent from the peers an HTTP
//! tracker names, and exits once every piece is verified. `bench/fastlink` runs it beside
//! aria2c on the same torrent and seed to show what librqbit itself costs per GiB, apart from
//! bay's web seed, streaming and hashing.
//!
//! ```text
//! rqbit_alone <torrent file> <announce URL> <out dir> <peer port> [fs|landing]
//! ```
//!
//! `fs` (the default) keeps librqbit's own file storage; `landing` uses bay-proxy's
//! ([`bay_proxy::landing`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bay_common::pool::Pool;
use bay_common::torrent::BlobTorrent;
use bay_proxy::landing::{self, Landing, Writer};
use bay_proxy::swarm::Swarm;
use bytes::Bytes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [torrent, announce, out, port, rest @ ..] = &args[..] else {
        bail!(
            "usage: rqbit_alone <torrent file> <announce URL> <out dir> <peer port> [fs|landing]"
        );
    };
    let landing = match rest.first().map(String::as_str) {
        None | Some("fs") => false,
        Some("landing") => true,
        Some(other) => bail!("storage {other:?}: fs or landing"),
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("peer port {port:?}"))?;
    let out = std::path::PathBuf::from(out);
    let bytes = std::fs::read(torrent).with_context(|| format!("reading {torrent}"))?;
    let torrent = Arc::new(BlobTorrent::from_metainfo(&bytes)?);
    // The given tracker only: a private torrent's librqbit announces to one tracker.
    let metainfo = Bytes::from(torrent.to_metainfo(std::slice::from_ref(announce)));
    let swarm = Swarm::start(
        port,
        &out,
        vec![announce.clone()],
        None,
        bay_proxy::swarm::Tuning::default(),
    )
    .await?;
    let started = Instant::now();
    let handle = if landing {
        let l = Arc::new(Landing::new(
            out.join(torrent.file_name()),
            torrent.clone(),
            Writer::start()?,
            Pool::new(landing::POOL_BYTES),
        ));
        let h = swarm
            .add_download(metainfo, &out, l.storage_factory())
            .await?;
        tokio::time::timeout(Duration::from_secs(600), async {
            while !h.stats().finished {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
        l.flushed().await.map_err(anyhow::Error::msg)?;
        h
    } else {
        let h = swarm.add(metainfo, &out).await?;
        tokio::time::timeout(Duration::from_secs(600), h.wait_until_completed()).await??;
        h
    };
    let secs = started.elapsed().as_secs_f64();
    let st = handle.stats();
    swarm.stop().await;
    eprintln!(
        "rqbit_alone: {} bytes in {secs:.2} s ({:.0} MiB/s), finished {}",
        st.progress_bytes,
        st.progress_bytes as f64 / secs / (1 << 20) as f64,
        st.finished
    );
    Ok(())
}

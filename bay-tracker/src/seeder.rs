//! The tracker's librqbit session: seeds every held blob on the peer port.
//!
//! It runs on a runtime of its own ([`Dedicated`]), as bay-proxy's does: on the main
//! multi-threaded runtime librqbit reads every 16 KiB upload chunk through `block_in_place`,
//! and the seed cost 1.8-2.8 CPU-s per GiB it sent (`bench/fastlink`, aria2c and librqbit
//! downloading from it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bay_common::announce::InfoHash;
use bay_common::runtime::Dedicated;
use bay_common::torrent::BlobTorrent;
use librqbit::api::TorrentIdOrHash;
use librqbit::dht::Id20;
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, Session, SessionOptions,
};

use crate::error::TrackerError;

/// Longest we wait for librqbit to re-check a blob's pieces when it starts seeding it.
const INIT_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Seeder {
    rt: Dedicated,
    session: Arc<Session>,
    /// Uploads of torrents since removed, which the session no longer reports.
    retired_uploaded: std::sync::atomic::AtomicU64,
}

impl Seeder {
    /// Starts a session listening on `listen` with DHT, local discovery, UPnP and persistence
    /// off: the tracker hands out its own seed, so the session announces to no tracker either.
    pub async fn start(
        listen: SocketAddr,
        blob_dir: &Path,
        upload_limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let opts = SessionOptions {
            dht: None,
            persistence: None,
            fastresume: false,
            disable_trackers: true,
            disable_local_service_discovery: true,
            listen: Some(ListenerOptions {
                mode: ListenerMode::TcpOnly,
                listen_addr: listen,
                enable_upnp_port_forwarding: false,
                // Set explicitly: librqbit otherwise reports 4240 for loopback listeners.
                announce_port: Some(listen.port()),
                ipv4_only: listen.is_ipv4(),
                ..Default::default()
            }),
            ipv4_only: listen.is_ipv4(),
            // Each upload chunk read takes a permit of this semaphore; the default of 8
            // starves a seed serving many peers.
            runtime_worker_threads: Some(512),
            peer_limit: Some(512),
            ratelimits: librqbit::limits::LimitsConfig {
                upload_bps: upload_limit
                    .and_then(|b| std::num::NonZeroU32::new(b.min(u32::MAX as u64) as u32)),
                download_bps: None,
            },
            ..Default::default()
        };
        let rt = Dedicated::start("bay-seed")?;
        let dir = blob_dir.to_path_buf();
        let session = rt
            .run(async move { Session::new_with_opts(dir, opts).await })
            .await??;
        Ok(Self {
            rt,
            session,
            retired_uploaded: Default::default(),
        })
    }

    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.session.listen_addr()
    }

    /// Seeds a verified blob that sits at `blob_dir/<torrent file name>`. librqbit re-hashes
    /// the pieces before it seeds (it has no way to be told the data is good).
    pub async fn add(&self, torrent: &BlobTorrent, blob_dir: &Path) -> Result<(), TrackerError> {
        let bytes = torrent.to_metainfo(&[]);
        let seed_err = |e: String| TrackerError::Seed(format!("{}: {e}", torrent.digest()));
        let session = self.session.clone();
        let opts = AddTorrentOptions {
            overwrite: true,
            output_folder: Some(blob_dir.to_string_lossy().into_owned()),
            ..Default::default()
        };
        let added = self
            .rt
            .run(async move {
                let resp = session
                    .add_torrent(AddTorrent::from_bytes(bytes), Some(opts))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let handle = resp
                    .into_handle()
                    .ok_or("librqbit listed the torrent only")?;
                tokio::time::timeout(INIT_TIMEOUT, handle.wait_until_initialized())
                    .await
                    .map_err(|_| "piece check timed out")?
                    .map_err(|e| format!("{e:#}"))?;
                Ok::<_, String>(handle)
            })
            .await
            .map_err(|e| seed_err(e.to_string()))?;
        let handle = added.map_err(seed_err)?;
        let stats = handle.stats();
        if !stats.finished {
            self.remove(torrent.info_hash()).await;
            return Err(seed_err(format!(
                "only {} of {} bytes passed the piece check",
                stats.progress_bytes, stats.total_bytes
            )));
        }
        Ok(())
    }

    /// Stops seeding; the caller removes the file.
    pub async fn remove(&self, info_hash: InfoHash) {
        let id = TorrentIdOrHash::Hash(Id20::new(info_hash.0));
        if let Some(h) = self.session.get(id) {
            self.retired_uploaded.fetch_add(
                h.stats().uploaded_bytes,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let session = self.session.clone();
        match self
            .rt
            .run(async move { session.delete(id, false).await })
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(info_hash = %info_hash.to_hex(), "removing torrent: {e:#}")
            }
            Err(e) => tracing::debug!(info_hash = %info_hash.to_hex(), "removing torrent: {e}"),
        }
    }

    /// Bytes the seed has uploaded since start, including torrents evicted since.
    pub fn uploaded_bytes(&self) -> u64 {
        let live = self.session.with_torrents(|it| {
            it.map(|(_, h)| h.stats().uploaded_bytes)
                .fold(0u64, |a, b| a.saturating_add(b))
        });
        live.saturating_add(
            self.retired_uploaded
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Stops the session, then its runtime.
    pub async fn stop(&self) {
        let session = self.session.clone();
        if let Err(e) = self.rt.run(async move { session.stop().await }).await {
            tracing::debug!("stopping the session: {e}");
        }
        self.rt.shutdown();
    }
}

//! The proxy's librqbit session: downloads blobs from the swarm, and seeds what it holds.
//!
//! Stock librqbit 9.1 does not make leechers that start together trade pieces
//! (`docs/swarming.md`). Three things restore it, all outside librqbit: the tracker's
//! hand-out policy (see bay-tracker), a slice of each blob per node that this node alone takes
//! from the tracker ([`crate::webseed`]), and waking librqbit's idle piece requesters
//! ([`crate::wake`]). A small request window keeps a connection from reserving pieces that
//! another peer will have a moment later.
//!
//! The session runs on a single-threaded runtime of its own ([`Dedicated`]), where librqbit
//! does its disk I/O inline instead of through `block_in_place`; everything here that makes
//! librqbit spawn tasks goes through it. Downloads keep their pieces in bay's own storage
//! ([`crate::landing`]); seeds of cached blobs use librqbit's file storage.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bay_common::announce::{AnnounceRequest, Event, InfoHash, PeerId};
use bay_common::runtime::Dedicated;
use bytes::Bytes;
use librqbit::api::TorrentIdOrHash;
use librqbit::dht::Id20;
use librqbit::storage::BoxStorageFactory;
use librqbit::{
    AddTorrent, AddTorrentOptions, AddTorrentResponse, ConnectionOptions, ListenerMode,
    ListenerOptions, ManagedTorrent, PeerConnectionOptions, Session, SessionOptions,
};

/// How the BitTorrent session treats its connections (`--request-window`, `--peer-limit`).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// 16 KiB chunks in flight per connection (16 is one 256 KiB piece).
    pub request_window: usize,
    pub peer_limit: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            request_window: 16,
            peer_limit: 128,
        }
    }
}

pub type Handle = Arc<ManagedTorrent>;

pub struct Swarm {
    rt: Dedicated,
    session: Arc<Session>,
    peer_id: PeerId,
    peer_port: u16,
    announce: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("swarm: {0}")]
pub struct SwarmError(String);

fn err(e: impl std::fmt::Display) -> SwarmError {
    SwarmError(e.to_string())
}

impl Swarm {
    /// Starts the session on `0.0.0.0:peer_port`: every proxy on a machine announces from the
    /// same address, so peers must be reachable on all interfaces.
    pub async fn start(
        peer_port: u16,
        default_dir: &Path,
        announce: Vec<String>,
        upload_limit: Option<u64>,
        tuning: Tuning,
    ) -> anyhow::Result<Self> {
        let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, peer_port));
        let peer_id = PeerId::generate();
        let opts = SessionOptions {
            peer_id: Some(Id20::new(peer_id.0)),
            dht: None,
            persistence: None,
            fastresume: false,
            disable_local_service_discovery: true,
            listen: Some(ListenerOptions {
                mode: ListenerMode::TcpOnly,
                listen_addr: listen,
                enable_upnp_port_forwarding: false,
                announce_port: Some(peer_port),
                ipv4_only: true,
                ..Default::default()
            }),
            connect: Some(ConnectionOptions {
                peer_opts: Some(PeerConnectionOptions {
                    max_request_window: Some(tuning.request_window),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ipv4_only: true,
            // Every upload chunk read holds a permit of this semaphore, and librqbit's default of
            // 8 starves a node serving many peers.
            runtime_worker_threads: Some(1024),
            peer_limit: Some(tuning.peer_limit),
            ratelimits: librqbit::limits::LimitsConfig {
                upload_bps: upload_limit
                    .and_then(|b| std::num::NonZeroU32::new(b.min(u32::MAX as u64) as u32)),
                download_bps: None,
            },
            ..Default::default()
        };
        let rt = Dedicated::start("bay-swarm")?;
        let dir = default_dir.to_path_buf();
        let session = rt
            .run(async move { Session::new_with_opts(dir, opts).await })
            .await??;
        Ok(Self {
            rt,
            session,
            peer_id,
            peer_port,
            announce,
        })
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// Adds a torrent whose complete file is at `dir/<file name>`, to seed it, announcing to
    /// every configured tracker so proxies find each other whichever tracker handed out the
    /// torrent.
    pub async fn add(&self, metainfo: Bytes, dir: &Path) -> Result<Handle, SwarmError> {
        self.add_with(metainfo, dir, None).await
    }

    /// Adds a torrent to download into `storage` (a [`crate::landing::Landing`]).
    pub async fn add_download(
        &self,
        metainfo: Bytes,
        dir: &Path,
        storage: BoxStorageFactory,
    ) -> Result<Handle, SwarmError> {
        self.add_with(metainfo, dir, Some(storage)).await
    }

    async fn add_with(
        &self,
        metainfo: Bytes,
        dir: &Path,
        storage: Option<BoxStorageFactory>,
    ) -> Result<Handle, SwarmError> {
        let session = self.session.clone();
        let download = storage.is_some();
        let opts = AddTorrentOptions {
            overwrite: true,
            output_folder: Some(dir.to_string_lossy().into_owned()),
            trackers: Some(self.announce.clone()),
            storage_factory: storage,
            ..Default::default()
        };
        self.rt
            .run(async move {
                let resp = session
                    .add_torrent(AddTorrent::from_bytes(metainfo), Some(opts))
                    .await
                    .map_err(|e| err(format!("{e:#}")))?;
                let handle = match resp {
                    AddTorrentResponse::Added(_, h) => h,
                    // Its storage is another one than ours: what we would read never arrives.
                    AddTorrentResponse::AlreadyManaged(..) if download => {
                        return Err(err("the torrent is in the session already"));
                    }
                    AddTorrentResponse::AlreadyManaged(_, h) => h,
                    AddTorrentResponse::ListOnly(_) => {
                        return Err(err("librqbit only listed the torrent"));
                    }
                };
                tokio::time::timeout(Duration::from_secs(600), handle.wait_until_initialized())
                    .await
                    .map_err(|_| err("initial check timed out"))?
                    .map_err(|e| err(format!("{e:#}")))?;
                Ok(handle)
            })
            .await
            .map_err(err)?
    }

    pub fn get(&self, info_hash: InfoHash) -> Option<Handle> {
        self.session
            .get(TorrentIdOrHash::Hash(Id20::new(info_hash.0)))
    }

    /// Stops the torrent; its files stay unless `delete_files`.
    pub async fn remove(&self, info_hash: InfoHash, delete_files: bool) {
        let id = TorrentIdOrHash::Hash(Id20::new(info_hash.0));
        let session = self.session.clone();
        let r = self
            .rt
            .run(async move { session.delete(id, delete_files).await })
            .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(info_hash = %info_hash, "removing torrent: {e:#}"),
            Err(e) => tracing::debug!(info_hash = %info_hash, "removing torrent: {e}"),
        }
    }

    /// Stops the session, then its runtime.
    pub async fn stop(&self) {
        let session = self.session.clone();
        if let Err(e) = self.rt.run(async move { session.stop().await }).await {
            tracing::debug!("stopping the session: {e}");
        }
        self.rt.shutdown();
    }

    /// A `stopped` announce for every torrent in the session, as of now: librqbit never sends
    /// one, and without it trackers keep handing out this node until its entry expires.
    pub fn stopped_announces(&self) -> Vec<AnnounceRequest> {
        self.session.with_torrents(|it| {
            it.map(|(_, h)| self.announce_of(h, Some(Event::Stopped)))
                .collect()
        })
    }

    /// A `completed` announce for a download that just finished: librqbit never sends one,
    /// and until its next announce trackers would not hand this node to newcomers as a seed.
    pub fn completed_announce(&self, handle: &Handle) -> AnnounceRequest {
        self.announce_of(handle, Some(Event::Completed))
    }

    /// A plain announce of where a download stands: sent when its first pieces arrive, so
    /// trackers hand this node to other leechers at once rather than after librqbit's next
    /// announce (leechers with nothing are handed to nobody, see bay-tracker's `announce`).
    pub fn progress_announce(&self, handle: &Handle) -> AnnounceRequest {
        self.announce_of(handle, None)
    }

    fn announce_of(&self, h: &Handle, event: Option<Event>) -> AnnounceRequest {
        let st = h.stats();
        AnnounceRequest {
            info_hash: InfoHash(h.info_hash().0),
            peer_id: self.peer_id,
            port: self.peer_port,
            uploaded: st.uploaded_bytes,
            downloaded: st.progress_bytes,
            left: st.total_bytes.saturating_sub(st.progress_bytes),
            event,
            compact: true,
            numwant: Some(0),
            ip: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::landing::{self, Landing, Writer};
    use bay_common::pool::Pool;
    use bay_common::torrent::BlobTorrent;

    /// A second download of a torrent already in the session is refused: librqbit would keep
    /// the first one's storage, and a reader of the second would wait for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torrent_is_downloaded_once() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let torrent =
            Arc::new(BlobTorrent::from_bytes(bay_common::Digest::sha256_of(&data), &data).unwrap());
        let meta = Bytes::from(torrent.to_metainfo(&[]));
        let swarm = Swarm::start(0, dir.path(), vec![], None, Tuning::default())
            .await
            .unwrap();
        let landing = || {
            Arc::new(Landing::new(
                dir.path().join(torrent.file_name()),
                torrent.clone(),
                Writer::start().unwrap(),
                Pool::new(landing::POOL_BYTES),
            ))
        };
        let first = landing();
        swarm
            .add_download(meta.clone(), dir.path(), first.storage_factory())
            .await
            .unwrap();
        let second = landing();
        let again = swarm
            .add_download(meta, dir.path(), second.storage_factory())
            .await;
        assert!(again.is_err(), "added twice");
        swarm.stop().await;
    }
}

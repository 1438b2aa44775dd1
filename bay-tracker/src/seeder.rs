//! The tracker's librqbit session: seeds every held blob on the peer port.
//!
//! It runs on a runtime of its own ([`Dedicated`]), as bay-proxy's does: on the main
//! multi-threaded runtime librqbit reads every 16 KiB upload chunk through `block_in_place`,
//! and the seed cost 1.8-2.8 CPU-s per GiB it sent (`bench/fastlink`, aria2c and librqbit
//! downloading from it).
//!
//! Every blob it seeds was hashed by the tracker just before (the fetch, or the re-read at
//! start, builds the torrent from the bytes it checked against the digest). librqbit would hash
//! it all again before seeding: one more SHA-1 pass over the file, on the path of every cold
//! pull, since a fetched blob is handed out only once it seeds. Its fast resume skips that: the
//! session keeps a piece bitfield per torrent in a state dir, and for a torrent whose bitfield
//! says "complete" it reads a sample of pieces (the first and a few more) instead of all. The
//! seeder writes that bitfield itself before each add. In librqbit 9.1 the sample catches only
//! pieces it cannot read (a short file), not a wrong hash, so the tracker's own check is the one
//! that counts, as it was before: a node's librqbit checks every piece it receives anyway. The
//! seeder empties the state dir at start, so librqbit never restores a session of its own.
//!
//! The price: librqbit writes files for every add and rewrites its whole session file, listing
//! every held blob, on every add and removal. Seeding 8000 blobs of 4 KiB took 25.8 s this way
//! against 2.0 s with the full hash; 500 blobs of 16 MiB took 1.8 s against 5.8 s
//! (`examples/seed_many.rs`). Layers are mostly MiBs and more, so it is on by default;
//! `--seed-fast-resume false` turns it off for a cache of tens of thousands of tiny blobs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bay_common::announce::InfoHash;
use bay_common::runtime::Dedicated;
use bay_common::torrent::BlobTorrent;
use librqbit::api::TorrentIdOrHash;
use librqbit::dht::Id20;
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, Session, SessionOptions,
    SessionPersistenceConfig,
};

use crate::error::TrackerError;

/// Longest we wait for librqbit to re-check a blob's pieces when it starts seeding it.
const INIT_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Seeder {
    rt: Dedicated,
    session: Arc<Session>,
    /// Where librqbit's fast resume reads the bitfields the seeder writes; None without it.
    state_dir: Option<PathBuf>,
    /// Uploads of torrents since removed, which the session no longer reports.
    retired_uploaded: std::sync::atomic::AtomicU64,
    /// The id the next torrent gets in the session.
    next_id: AtomicUsize,
}

impl Seeder {
    /// Starts a session listening on `listen` with DHT, local discovery and UPnP off: the
    /// tracker hands out its own seed, so the session announces to no tracker either.
    /// `state_dir` is emptied of an earlier run's state either way; with `fast_resume` the
    /// session keeps its state there, without it librqbit hashes every blob before seeding it.
    pub async fn start(
        listen: SocketAddr,
        blob_dir: &Path,
        state_dir: &Path,
        fast_resume: bool,
        upload_limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        match std::fs::remove_dir_all(state_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::anyhow!("emptying {}: {e}", state_dir.display()));
            }
            _ => {}
        }
        let state_dir = fast_resume.then_some(state_dir);
        if let Some(dir) = state_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let opts = SessionOptions {
            dht: None,
            persistence: state_dir.map(|dir| SessionPersistenceConfig::Json {
                folder: Some(dir.to_path_buf()),
            }),
            fastresume: state_dir.is_some(),
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
            state_dir: state_dir.map(Path::to_path_buf),
            retired_uploaded: Default::default(),
            next_id: AtomicUsize::new(0),
        })
    }

    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.session.listen_addr()
    }

    /// Seeds a blob that sits at `blob_dir/<torrent file name>` and whose torrent was built from
    /// the bytes checked against its digest. With fast resume librqbit reads a sample of its
    /// pieces, without it hashes them all (module doc).
    pub async fn add(&self, torrent: &BlobTorrent, blob_dir: &Path) -> Result<(), TrackerError> {
        let added = self.add_once(torrent, blob_dir).await;
        if added.is_err()
            && let Some(dir) = &self.state_dir
        {
            let _ = tokio::fs::remove_file(bitv_path(dir, torrent)).await;
        }
        added
    }

    async fn add_once(&self, torrent: &BlobTorrent, blob_dir: &Path) -> Result<(), TrackerError> {
        let bytes = torrent.to_metainfo(&[]);
        let seed_err = |e: String| TrackerError::Seed(format!("{}: {e}", torrent.digest()));
        if let Some(dir) = &self.state_dir {
            let bitv = bitv_path(dir, torrent);
            tokio::fs::write(&bitv, complete_bitfield(torrent.piece_count()))
                .await
                .map_err(|e| seed_err(format!("writing {}: {e}", bitv.display())))?;
        }
        let session = self.session.clone();
        let opts = AddTorrentOptions {
            overwrite: true,
            output_folder: Some(blob_dir.to_string_lossy().into_owned()),
            // With persistence librqbit numbers a torrent after the ones its store has written,
            // and two adds at once got the same number: the second was handed the first's
            // torrent as "already managed" and never seeded. Numbered here, they cannot collide.
            preferred_id: Some(self.next_id.fetch_add(1, Ordering::Relaxed)),
            ..Default::default()
        };
        let want = Id20::new(torrent.info_hash().0);
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
                if handle.info_hash() != want {
                    return Err(format!(
                        "librqbit answered with another torrent ({:?})",
                        handle.info_hash()
                    ));
                }
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

/// Where librqbit's fast resume reads the bitfield of `torrent`: named by its info hash, in
/// lowercase hex as librqbit writes it.
fn bitv_path(dir: &Path, torrent: &BlobTorrent) -> PathBuf {
    dir.join(format!("{}.bitv", torrent.info_hash().to_hex()))
}

/// A BitTorrent bitfield with every one of `pieces` set: bit 7 of byte 0 is piece 0, and the
/// bits past the last piece stay clear. This is the layout librqbit reads a fast-resume bitfield
/// in.
fn complete_bitfield(pieces: usize) -> Vec<u8> {
    let mut out = vec![0xff; pieces.div_ceil(8)];
    if !pieces.is_multiple_of(8)
        && let Some(last) = out.last_mut()
    {
        *last = 0xff << (8 - pieces % 8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bay_common::Digest;

    #[test]
    fn a_complete_bitfield_sets_each_piece_and_no_more() {
        assert_eq!(complete_bitfield(1), [0x80]);
        assert_eq!(complete_bitfield(8), [0xff]);
        assert_eq!(complete_bitfield(9), [0xff, 0x80]);
        assert_eq!(complete_bitfield(23), [0xff, 0xff, 0xfe]);
    }

    /// The threads of this process that run a seed's runtime, where librqbit checks pieces.
    fn seed_threads() -> impl Iterator<Item = std::path::PathBuf> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|t| t.unwrap().path())
            .filter(|dir| {
                std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "bay-seed")
            })
    }

    /// Bytes read so far by the seeds' threads.
    fn seed_thread_reads() -> u64 {
        seed_threads()
            .map(|dir| {
                let io = std::fs::read_to_string(dir.join("io")).unwrap();
                io.lines()
                    .find_map(|l| l.strip_prefix("rchar: "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap()
            })
            .sum()
    }

    /// A seed over `dir/blobs`, with its state in `dir/seed-state`.
    async fn seed_in(dir: &Path, fast_resume: bool) -> (Seeder, PathBuf) {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let seeder = Seeder::start(
            "127.0.0.1:0".parse().unwrap(),
            &blobs,
            &dir.join("seed-state"),
            fast_resume,
            None,
        )
        .await
        .unwrap();
        (seeder, blobs)
    }

    fn blob_on_disk(dir: &Path, size: usize) -> BlobTorrent {
        let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
        let torrent = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap();
        std::fs::write(dir.join(torrent.file_name()), &data).unwrap();
        torrent
    }

    /// Bytes librqbit read while it added a 64 MiB blob, with fast resume or without.
    async fn read_to_seed(fast_resume: bool) -> (u64, usize) {
        let dir = tempfile::tempdir().unwrap();
        let (seeder, blobs) = seed_in(dir.path(), fast_resume).await;
        let size = 64 << 20;
        let torrent = blob_on_disk(&blobs, size);
        assert!(torrent.piece_count() >= 64, "{}", torrent.piece_count());
        let before = seed_thread_reads();
        seeder.add(&torrent, &blobs).await.unwrap();
        let read = seed_thread_reads() - before;
        let id = TorrentIdOrHash::Hash(Id20::new(torrent.info_hash().0));
        assert!(seeder.session.get(id).unwrap().stats().finished);
        seeder.stop().await;
        seed_thread_gone().await;
        (read, size)
    }

    /// Waits for the stopped seed's thread to end, so the next seed's reads are its own.
    async fn seed_thread_gone() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seed_threads().next().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the seed's thread lives on"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The one test in this crate that starts seeds, one at a time, so their thread's reads
    // are their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_is_seeded_after_a_sample_of_its_pieces_is_checked_not_all() {
        seed_thread_gone().await;
        let (read, size) = read_to_seed(true).await;
        assert!(
            read < size as u64 / 4,
            "librqbit read {read} bytes of a {size}-byte blob before seeding it"
        );
        assert!(read > 0, "librqbit checked no piece at all");
        // Without fast resume it reads (and hashes) every byte.
        let (read, size) = read_to_seed(false).await;
        assert!(read >= size as u64, "librqbit read {read} bytes of {size}");

        // Blobs held at the same moment (fetches end together) are all seeded, each with its
        // own torrent.
        let dir = tempfile::tempdir().unwrap();
        let (seeder, blobs) = seed_in(dir.path(), true).await;
        let torrents: Vec<_> = (0..8).map(|_| blob_on_disk(&blobs, 1 << 20)).collect();
        let added = futures::future::join_all(torrents.iter().map(|t| seeder.add(t, &blobs))).await;
        for (t, a) in torrents.iter().zip(added) {
            a.unwrap();
            let id = TorrentIdOrHash::Hash(Id20::new(t.info_hash().0));
            let h = seeder
                .session
                .get(id)
                .expect("a blob added at the same time is not seeded");
            assert!(h.stats().finished);
        }
        seeder.stop().await;
    }
}

//! Making a blob held: verified on disk, torrent built, seeded. One flight per digest.
//!
//! The first request for a blob starts a flight that streams it from upstream into `tmp/`,
//! hashing sha256 and the torrent's SHA-1 pieces in the same pass; only a blob whose digest
//! matches is renamed into `blobs/` and seeded. Later requests for the same digest wait for
//! that flight, so upstream sends each blob once however many proxies ask at the same moment.
//! The flight runs as its own task: a caller that hangs up does not cancel it for the others.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use bay_common::store::VerifyError;
use bay_common::torrent::{BlobTorrent, TorrentBuilder};
use bay_common::upstream::{Credentials, UpstreamClient};
use bay_common::{Digest, Registry, RepositoryName, Verifier};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::error::TrackerError;
use crate::limit::UpstreamLimits;
use crate::metrics::Metrics;
use crate::seeder::Seeder;
use bay_common::access::AccessCache;
use bay_common::store::Store;

type FlightResult = Result<Arc<BlobTorrent>, Arc<TrackerError>>;
type Flight = Shared<BoxFuture<'static, FlightResult>>;

/// Bytes of a fetch that are on disk, flushed, for [`Fetching`]'s readers, at least this often.
const PUBLISH_EVERY: u64 = 256 * 1024;

/// How far a fetch from upstream has got, for those reading the blob before it is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes from the start are in the file.
    Written(u64),
    /// Every byte is in the file and the digest matched.
    Verified,
    /// The fetch failed: what was read may be wrong.
    Failed,
}

/// A blob being fetched from upstream (with a known length): where its bytes land and how far
/// they got. Proxies read their slices from it before the torrent exists (`crate::pieces`).
pub struct Fetching {
    pub path: PathBuf,
    pub size: u64,
    pub progress: watch::Receiver<Progress>,
    /// Pieces (of the torrent the blob will have) already sent to some proxy.
    sent: Mutex<Vec<bool>>,
}

impl Fetching {
    /// The torrent's piece length for this blob.
    pub fn piece_length(&self) -> u64 {
        bay_common::torrent::piece_length_for(self.size) as u64
    }

    /// Of pieces `first..=last`, takes the first run not sent to anyone yet (at most up to
    /// `last`) and marks it sent: each piece leaves early once, whoever asks. Proxies arrive
    /// at different moments and their slices shrink as others arrive, so a slice often
    /// covers bytes an earlier proxy read while it was still larger; those reach the late one
    /// from its peers instead.
    pub fn take_unsent(&self, first: u64, last: u64) -> Option<(u64, u64)> {
        let mut sent = self.sent.lock().expect("sent poisoned");
        let n = sent.len() as u64;
        let from = (first..=last.min(n.saturating_sub(1))).find(|p| !sent[*p as usize])?;
        let mut to = from;
        while to < last && to + 1 < n && !sent[(to + 1) as usize] {
            to += 1;
        }
        for p in from..=to {
            sent[p as usize] = true;
        }
        Some((from, to))
    }
}

/// Registers a fetch in [`Blobs::fetching`] for as long as it lives; a fetch dropped before it
/// was verified tells its readers it failed.
struct FetchingGuard<'a> {
    blobs: &'a Blobs,
    digest: Digest,
    progress: watch::Sender<Progress>,
    published: u64,
}

impl FetchingGuard<'_> {
    fn written(&mut self, bytes: u64) {
        self.published = bytes;
        self.progress.send_replace(Progress::Written(bytes));
    }
}

impl Drop for FetchingGuard<'_> {
    fn drop(&mut self) {
        self.progress.send_if_modified(|p| {
            let failed = *p != Progress::Verified;
            if failed {
                *p = Progress::Failed;
            }
            failed
        });
        self.blobs
            .fetching
            .lock()
            .expect("fetching poisoned")
            .remove(&self.digest);
    }
}

/// Where a flight may get the blob from if it is not on disk.
#[derive(Clone)]
pub struct Source {
    pub registry: Registry,
    pub name: RepositoryName,
    pub creds: Credentials,
}

pub struct Blobs {
    pub store: Arc<Store>,
    pub seeder: Arc<Seeder>,
    pub upstream: Arc<UpstreamClient>,
    pub access: AccessCache,
    pub metrics: Arc<Metrics>,
    limits: UpstreamLimits,
    flights: Mutex<HashMap<Digest, Flight>>,
    fetching: Mutex<HashMap<Digest, Arc<Fetching>>>,
}

impl Blobs {
    pub fn new(
        store: Arc<Store>,
        seeder: Arc<Seeder>,
        upstream: Arc<UpstreamClient>,
        metrics: Arc<Metrics>,
        limits: UpstreamLimits,
    ) -> Self {
        Self {
            store,
            seeder,
            upstream,
            access: AccessCache::default(),
            metrics,
            limits,
            flights: Mutex::default(),
            fetching: Mutex::default(),
        }
    }

    /// The blob's fetch from upstream, while one is running and its length is known.
    pub fn fetching(&self, digest: &Digest) -> Option<Arc<Fetching>> {
        self.fetching
            .lock()
            .expect("fetching poisoned")
            .get(digest)
            .cloned()
    }

    /// Whether upstream lets the caller read the blob (cached, as for torrents).
    pub async fn check_access(
        &self,
        source: &Source,
        digest: &Digest,
    ) -> Result<(), Arc<TrackerError>> {
        self.access
            .check(
                &self.upstream,
                &source.registry,
                &source.name,
                digest,
                &source.creds,
            )
            .await
            .map(drop)
            .map_err(|e| Arc::new(e.into()))
    }

    /// The torrent of a blob for a caller, after upstream agreed the caller may read it.
    pub async fn torrent_for(
        self: &Arc<Self>,
        source: Source,
        digest: &Digest,
    ) -> Result<Arc<BlobTorrent>, Arc<TrackerError>> {
        self.check_access(&source, digest).await?;
        if let Some(t) = self.store.get(digest) {
            return Ok(t);
        }
        self.ensure(digest, Some(source)).await
    }

    /// Like `torrent_for`, but never starts an upstream fetch: the torrent if the blob is held
    /// or on its way (a flight is running), else `NotHeld`. Proxies ask this of every tracker
    /// before they have one fetch, so a tracker that restarted empty does not fetch again what
    /// another tracker of the set holds.
    pub async fn torrent_if_held(
        self: &Arc<Self>,
        source: Source,
        digest: &Digest,
    ) -> Result<Arc<BlobTorrent>, Arc<TrackerError>> {
        self.check_access(&source, digest).await?;
        if let Some(t) = self.store.get(digest) {
            return Ok(t);
        }
        let flight = self
            .flights
            .lock()
            .expect("flights poisoned")
            .get(digest)
            .cloned();
        match flight {
            Some(f) => f.await.or_else(|e| self.store.get(digest).ok_or(e)),
            None => Err(Arc::new(TrackerError::NotHeld(digest.to_string()))),
        }
    }

    /// Joins or starts the flight for `digest`. Without a source the flight only verifies a
    /// blob left on disk by an earlier run.
    pub async fn ensure(self: &Arc<Self>, digest: &Digest, source: Option<Source>) -> FlightResult {
        loop {
            let (flight, ours) = {
                let mut flights = self.flights.lock().expect("flights poisoned");
                match flights.get(digest) {
                    Some(f) => (f.clone(), false),
                    None => {
                        let this = self.clone();
                        let d = digest.clone();
                        let src = source.clone();
                        let span = tracing::info_span!("flight", digest = %d,
                            repo = src.as_ref().map(|s| s.name.to_string()).unwrap_or_default());
                        let task = tokio::spawn(
                            async move {
                                let result = this.run_flight(&d, src).await.map_err(Arc::new);
                                this.flights.lock().expect("flights poisoned").remove(&d);
                                result
                            }
                            .instrument(span),
                        );
                        let f = async move {
                            task.await.unwrap_or_else(|e| {
                                Err(Arc::new(TrackerError::Seed(format!("flight task: {e}"))))
                            })
                        }
                        .boxed()
                        .shared();
                        flights.insert(digest.clone(), f.clone());
                        (f, true)
                    }
                }
            };
            let result = flight.await;
            // A verify-only flight we merely joined may fail for want of a source; ours may not.
            if result.is_ok() || ours || source.is_none() || self.store.get(digest).is_some() {
                return result.or_else(|e| self.store.get(digest).ok_or(e));
            }
        }
    }

    async fn run_flight(
        &self,
        digest: &Digest,
        source: Option<Source>,
    ) -> Result<Arc<BlobTorrent>, TrackerError> {
        if let Some(t) = self.store.get(digest) {
            return Ok(t);
        }
        let path = self.store.blob_path(digest);
        if tokio::fs::try_exists(&path).await? {
            match self.verify_local(digest, &path).await {
                Ok(torrent) => return self.hold(torrent).await,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "discarding blob that failed verification: {e}");
                    tokio::fs::remove_file(&path).await?;
                }
            }
        }
        let Some(source) = source else {
            return Err(TrackerError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{digest} is not on disk"),
            )));
        };
        let torrent = self.download(digest, &source).await?;
        self.hold(torrent).await
    }

    /// Re-hashes a blob found on disk at start.
    async fn verify_local(
        &self,
        digest: &Digest,
        path: &std::path::Path,
    ) -> Result<BlobTorrent, TrackerError> {
        bay_common::store::verify_file(path, digest)
            .await
            .map_err(|e| match e {
                VerifyError::Io(e) => TrackerError::Io(e),
                VerifyError::Empty { .. } => TrackerError::Empty(digest.to_string()),
                VerifyError::Mismatch { got, .. } => TrackerError::DigestMismatch {
                    digest: digest.to_string(),
                    got: got.to_string(),
                },
            })
    }

    /// Streams the blob from upstream into `tmp/`, verifying as it goes; renames it into
    /// `blobs/` only when the digest matches.
    async fn download(
        &self,
        digest: &Digest,
        source: &Source,
    ) -> Result<BlobTorrent, TrackerError> {
        let mut waited = false;
        let slot = self
            .limits
            .slot(|| {
                tracing::info!("waiting for an upstream fetch slot (--upstream-concurrency)");
                self.metrics.upstream_queued.inc();
                waited = true;
            })
            .await;
        if waited {
            self.metrics.upstream_queued.dec();
        }
        let started = std::time::Instant::now();
        let mut resp = match self
            .upstream
            .get_blob(&source.registry, &source.name, digest, &source.creds)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.metrics.upstream_fetch("failed");
                return Err(e.into());
            }
        };
        let image = format!("{}/{}", source.registry.authority(), source.name);
        let mut received = 0u64;
        let tmp = self.store.temp_path();
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let announced = resp.content_length();
            let mut early = match announced {
                Some(size) if size > 0 => {
                    let (tx, rx) = watch::channel(Progress::Written(0));
                    self.fetching.lock().expect("fetching poisoned").insert(
                        digest.clone(),
                        Arc::new(Fetching {
                            path: tmp.clone(),
                            size,
                            progress: rx,
                            sent: Mutex::new(vec![
                                false;
                                size.div_ceil(bay_common::torrent::piece_length_for(size) as u64)
                                    as usize
                            ]),
                        }),
                    );
                    Some(FetchingGuard {
                        blobs: self,
                        digest: digest.clone(),
                        progress: tx,
                        published: 0,
                    })
                }
                _ => None,
            };
            let mut verifier = Verifier::new(digest.algorithm());
            let mut builder = match announced {
                Some(0) => return Err(TrackerError::Empty(digest.to_string())),
                Some(n) => Some(
                    TorrentBuilder::new(digest.clone(), n)
                        .map_err(|e| TrackerError::Seed(e.to_string()))?,
                ),
                None => None,
            };
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| TrackerError::Upstream(transport(&source.registry, e)))?
            {
                self.metrics.upstream_bytes.inc_by(chunk.len() as u64);
                received += chunk.len() as u64;
                self.limits.take(chunk.len()).await;
                verifier.update(&chunk);
                if let Some(b) = builder.as_mut() {
                    b.update(&chunk);
                }
                file.write_all(&chunk).await?;
                if let Some(e) = early.as_mut()
                    && received - e.published >= PUBLISH_EVERY
                {
                    // Written means readable from another handle: the last write may still
                    // be on the blocking pool.
                    file.flush().await?;
                    e.written(received);
                }
            }
            let got_size = verifier.bytes_hashed();
            let got = verifier.finish();
            if &got != digest {
                return Err(TrackerError::DigestMismatch {
                    digest: digest.to_string(),
                    got: got.to_string(),
                });
            }
            if let Some(expected) = announced
                && expected != got_size
            {
                return Err(TrackerError::SizeMismatch {
                    digest: digest.to_string(),
                    expected,
                    got: got_size,
                });
            }
            file.flush().await?;
            if let Some(e) = early.as_mut() {
                e.progress.send_replace(Progress::Verified);
            }
            file.sync_all().await?;
            drop(file);
            let torrent = match builder {
                Some(b) => b.finish().map_err(|e| TrackerError::Seed(e.to_string()))?,
                // Upstream sent no length: hash the pieces from the verified file instead.
                None => self.verify_local(digest, &tmp).await?,
            };
            tokio::fs::rename(&tmp, self.store.blob_path(digest)).await?;
            Ok(torrent)
        }
        .await;
        drop(slot);
        self.metrics.ledger.fetched(&image, received);
        self.metrics
            .upstream_fetch(if result.is_ok() { "ok" } else { "failed" });
        match &result {
            Ok(t) => tracing::info!(
                size = t.size(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "fetched and verified blob from upstream"
            ),
            Err(e) => {
                tracing::warn!("upstream fetch failed: {e}");
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        result
    }

    /// Drops a held blob whose file no longer matches its torrent (bit rot, a disk error, a
    /// hand-edited file), so that the next request fetches it from upstream again instead of
    /// every proxy being handed the bad bytes.
    pub async fn discard_damaged(&self, torrent: &Arc<BlobTorrent>) {
        let digest = torrent.digest();
        // Only this copy: one fetched again since is not touched. While the store holds this
        // one no fetch of the blob starts, so the seed can go first.
        if !self
            .store
            .get(digest)
            .is_some_and(|held| Arc::ptr_eq(&held, torrent))
        {
            return;
        }
        self.seeder.remove(torrent.info_hash()).await;
        if !self.store.remove_copy(torrent) {
            return; // another read of it dropped it meanwhile
        }
        tracing::error!(digest = %digest, "held blob no longer matches its torrent: dropped, it will be fetched again");
        self.metrics.damaged_blobs.inc();
        if let Err(e) = tokio::fs::remove_file(self.store.blob_path(digest)).await {
            tracing::warn!(digest = %digest, "removing damaged blob: {e}");
        }
    }

    /// Seeds a verified blob and records it, evicting what no longer fits.
    async fn hold(&self, torrent: BlobTorrent) -> Result<Arc<BlobTorrent>, TrackerError> {
        let torrent = Arc::new(torrent);
        self.seeder.add(&torrent, self.store.blob_dir()).await?;
        for victim in self.store.insert(torrent.clone()) {
            tracing::info!(digest = %victim.digest(), size = victim.size(), "evicting blob");
            self.seeder.remove(victim.info_hash()).await;
            if let Err(e) = tokio::fs::remove_file(self.store.blob_path(victim.digest())).await {
                tracing::warn!(digest = %victim.digest(), "removing evicted blob: {e}");
            }
        }
        Ok(torrent)
    }
}

fn transport(registry: &Registry, e: reqwest::Error) -> bay_common::upstream::UpstreamError {
    bay_common::upstream::UpstreamError::Transport {
        url: registry.base_url(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_piece_goes_out_early_once() {
        let size = 10 * 256 * 1024 + 5; // 11 pieces of 256 KiB, the last of 5 bytes
        let (_tx, rx) = watch::channel(Progress::Written(0));
        let f = Fetching {
            path: PathBuf::new(),
            size,
            progress: rx,
            sent: Mutex::new(vec![false; 11]),
        };
        assert_eq!(f.piece_length(), 256 * 1024);
        assert_eq!(f.take_unsent(2, 5), Some((2, 5)));
        // An overlapping ask gets what is left after the pieces already sent, in one run.
        assert_eq!(f.take_unsent(0, 7), Some((0, 1)));
        assert_eq!(f.take_unsent(0, 7), Some((6, 7)));
        assert_eq!(f.take_unsent(0, 7), None);
        // Asking past the end is cut to the last piece.
        assert_eq!(f.take_unsent(9, 40), Some((9, 10)));
        assert_eq!(f.take_unsent(8, 10), Some((8, 8)));
        assert_eq!(f.take_unsent(0, 10), None);
    }
}

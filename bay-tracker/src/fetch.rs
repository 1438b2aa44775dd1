//! Making a blob held: verified on disk, torrent built, seeded. One flight per digest.
//!
//! The first request for a blob starts a flight that streams it from upstream into `tmp/`,
//! hashing sha256 and the torrent's SHA-1 pieces in the same pass; only a blob whose digest
//! matches is renamed into `blobs/` and seeded. Later requests for the same digest wait for
//! that flight, so upstream sends each blob once however many proxies ask at the same moment.
//! The flight runs as its own task: a caller that hangs up does not cancel it for the others.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use bay_common::api::{self, EarlyHolders, Held};
use bay_common::store::VerifyError;
use bay_common::torrent::{BlobTorrent, TorrentBuilder};
use bay_common::upstream::{Credentials, UpstreamClient};
use bay_common::{Digest, Registry, RepositoryName, Verifier};
use futures::FutureExt;
use futures::StreamExt;
use futures::future::{BoxFuture, Shared};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::Instrument;

use crate::error::TrackerError;
use crate::limit::UpstreamLimits;
use crate::metrics::Metrics;
use crate::offers::Offers;
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
    /// Where the blob is once verified: pieces nobody got while it was fetched still go out
    /// early from there, for as long as the fetch stays listed.
    pub stored: PathBuf,
    pub size: u64,
    pub progress: watch::Receiver<Progress>,
    /// Per piece (of the torrent the blob will have): whether it went to some proxy early,
    /// and that proxy's exchange address if it passes pieces on.
    sent: Mutex<Vec<Option<Option<SocketAddr>>>>,
}

impl Fetching {
    pub fn new(
        path: PathBuf,
        stored: PathBuf,
        size: u64,
        progress: watch::Receiver<Progress>,
    ) -> Fetching {
        let pieces = size.div_ceil(bay_common::torrent::piece_length_for(size) as u64);
        Fetching {
            path,
            stored,
            size,
            progress,
            sent: Mutex::new(vec![None; pieces as usize]),
        }
    }

    /// The torrent's piece length for this blob.
    pub fn piece_length(&self) -> u64 {
        bay_common::torrent::piece_length_for(self.size) as u64
    }

    /// Of pieces `first..=last`, takes the first one not sent to anyone yet and marks it sent
    /// to `holder` (an exchange address): each piece leaves early once, whoever asks, and the
    /// others get it from that node. One piece per ask, so the nodes reading at once take
    /// turns along the fetch and each has pieces to pass on while it runs.
    pub fn take_unsent(&self, first: u64, last: u64, holder: Option<SocketAddr>) -> Take {
        let mut sent = self.sent.lock().expect("sent poisoned");
        let n = sent.len() as u64;
        let Some(p) = (first..=last.min(n.saturating_sub(1))).find(|p| sent[*p as usize].is_none())
        else {
            return Take::NoneLeft;
        };
        if let Some(h) = holder
            && over_share(&sent, h)
        {
            return Take::Wait;
        }
        sent[p as usize] = Some(holder);
        Take::Piece(p)
    }

    /// Which other node holds each piece sent early, for the node at `me`, from piece `from` on.
    pub fn holders(&self, me: Option<SocketAddr>, from: u32) -> EarlyHolders {
        let sent = self.sent.lock().expect("sent poisoned");
        let mut out = EarlyHolders {
            first: from.min(sent.len() as u32),
            ..Default::default()
        };
        out.pieces = sent[out.first as usize..]
            .iter()
            .map(|s| match s {
                None => api::NOT_SENT,
                Some(Some(addr)) if Some(*addr) != me => {
                    let i = match out.nodes.iter().position(|n| n == addr) {
                        Some(i) => i,
                        None => {
                            out.nodes.push(*addr);
                            out.nodes.len() - 1
                        }
                    };
                    i as i32
                }
                Some(_) => api::NOT_PASSED_ON,
            })
            .collect();
        out
    }
}

/// What an early read gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Piece(u64),
    /// Every piece asked for went to some node.
    NoneLeft,
    /// The node holds more than its share of the pieces sent so far: others get the next ones.
    Wait,
}

/// Whether `h` holds more than its share of the pieces sent to nodes that pass them on. Each
/// node passes its pieces on to all the others, so one that took more than its share while
/// the fetch runs (the nodes ask as fast as their links bring them pieces) needs more uplink
/// than it has: in `bench/swarm.sh` one node with 22 % of the pieces kept 7 others waiting for
/// 2 s after the fetch.
fn over_share(sent: &[Option<Option<SocketAddr>>], h: SocketAddr) -> bool {
    let mut nodes: Vec<(SocketAddr, u64)> = Vec::new();
    for addr in sent.iter().flatten().flatten() {
        match nodes.iter_mut().find(|(a, _)| a == addr) {
            Some((_, n)) => *n += 1,
            None => nodes.push((*addr, 1)),
        }
    }
    let mine = nodes.iter().find(|(a, _)| *a == h).map_or(0, |(_, n)| *n);
    let holders = nodes.len() as u64 + u64::from(mine == 0);
    let total: u64 = nodes.iter().map(|(_, n)| n).sum();
    mine >= total / holders + 2
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
        let mut map = self.blobs.fetching.lock().expect("fetching poisoned");
        let Some(entry) = map.remove(&self.digest) else {
            return;
        };
        // A verified fetch stays listed a moment, so proxies learn who holds the pieces sent
        // last (no bytes are sent early any more: the file moved into the store).
        if *self.progress.borrow() == Progress::Verified
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            map.insert(self.digest.clone(), entry.clone());
            let (fetching, digest) = (self.blobs.fetching.clone(), self.digest.clone());
            rt.spawn(async move {
                tokio::time::sleep(LISTED_AFTER_FETCH).await;
                let mut map = fetching.lock().expect("fetching poisoned");
                if map.get(&digest).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                    map.remove(&digest);
                }
            });
        }
    }
}

/// A fetch's bytes as they land, in order: the file in `tmp/`, the digest, and the torrent's
/// piece hashes once the size is known.
struct Partial {
    file: tokio::fs::File,
    verifier: Verifier,
    builder: Option<TorrentBuilder>,
    /// Bytes in the file.
    len: u64,
}

impl Partial {
    async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.verifier.update(data);
        if let Some(b) = self.builder.as_mut() {
            b.update(data);
        }
        self.len += data.len() as u64;
        self.file.write_all(data).await
    }

    /// Drops what was written: upstream sends the whole blob after all.
    async fn start_over(&mut self, digest: &Digest) -> std::io::Result<()> {
        if self.len > 0 {
            self.file.set_len(0).await?;
            self.file.seek(std::io::SeekFrom::Start(0)).await?;
            self.verifier = Verifier::new(digest.algorithm());
            self.len = 0;
        }
        self.builder = None;
        Ok(())
    }
}

/// Whether upstream answered a `Range` request with exactly the range `want`
/// (`bytes <first>-<last>/<size>`).
fn partial(resp: &reqwest::Response, want: &str) -> bool {
    resp.status() == reqwest::StatusCode::PARTIAL_CONTENT
        && resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .is_some_and(|v| v.as_bytes() == want.as_bytes())
}

/// How long a verified fetch stays listed for proxies asking who holds which piece.
const LISTED_AFTER_FETCH: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Pieces nodes offer to a fetch that starts over (`crate::offers`).
    pub offers: Offers,
    flights: Mutex<HashMap<Digest, Flight>>,
    fetching: Arc<Mutex<HashMap<Digest, Arc<Fetching>>>>,
}

impl Blobs {
    pub fn new(
        store: Arc<Store>,
        seeder: Arc<Seeder>,
        upstream: Arc<UpstreamClient>,
        metrics: Arc<Metrics>,
        limits: UpstreamLimits,
        offers: Offers,
    ) -> Self {
        Self {
            offers,
            store,
            seeder,
            upstream,
            access: AccessCache::default(),
            metrics,
            limits,
            flights: Mutex::default(),
            fetching: Arc::default(),
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
        self.check_access_sized(source, digest).await.map(drop)
    }

    /// [`Self::check_access`], with the size upstream's HEAD gave (none if it redirected).
    async fn check_access_sized(
        &self,
        source: &Source,
        digest: &Digest,
    ) -> Result<Option<u64>, Arc<TrackerError>> {
        self.access
            .check(
                &self.upstream,
                &source.registry,
                &source.name,
                digest,
                &source.creds,
            )
            .await
            .map_err(|e| Arc::new(e.into()))
    }

    /// The torrent of a blob for a caller, after upstream agreed the caller may read it.
    /// `offer` is what the caller holds of it from an early read (`crate::offers`).
    pub async fn torrent_for(
        self: &Arc<Self>,
        source: Source,
        digest: &Digest,
        offer: Option<(SocketAddr, Held)>,
    ) -> Result<Arc<BlobTorrent>, Arc<TrackerError>> {
        let size = self.check_access_sized(&source, digest).await?;
        if let Some(t) = self.store.get(digest) {
            return Ok(t);
        }
        // Only an offer of the size upstream's HEAD gave: the size sets how much the fetch
        // reserves for piece hashes before upstream sends a byte.
        if let Some((node, held)) = offer.filter(|(_, h)| Some(h.size) == size) {
            // Under the flights lock, so a flight that ends now does not drop it unseen; the
            // flight this request starts or joins drops it as it ends.
            let _flights = self.flights.lock().expect("flights poisoned");
            self.offers.offer(digest, node, held);
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
                                let mut flights = this.flights.lock().expect("flights poisoned");
                                flights.remove(&d);
                                this.offers.forget(&d);
                                drop(flights);
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
    /// `blobs/` only when the digest matches. Pieces nodes offered (`crate::offers`) come first
    /// and upstream sends the rest; if the digest then fails, the fetch runs again from
    /// upstream alone.
    async fn download(
        &self,
        digest: &Digest,
        source: &Source,
    ) -> Result<BlobTorrent, TrackerError> {
        match self.fetch_once(digest, source, true).await {
            Ok(t) => Ok(t),
            Err((
                e @ (TrackerError::DigestMismatch { .. } | TrackerError::SizeMismatch { .. }),
                taken,
            )) if taken > 0 => {
                tracing::warn!(
                    taken,
                    "the blob with pieces nodes offered failed its check ({e}): fetching it \
                     from upstream alone"
                );
                self.offers.forget(digest);
                self.fetch_once(digest, source, false)
                    .await
                    .map_err(|(e, _)| e)
            }
            Err((e, _)) => Err(e),
        }
    }

    /// One pass of [`Self::download`]; the error comes with the bytes taken from nodes.
    async fn fetch_once(
        &self,
        digest: &Digest,
        source: &Source,
        from_nodes: bool,
    ) -> Result<BlobTorrent, (TrackerError, u64)> {
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
        let image = format!("{}/{}", source.registry.authority(), source.name);
        let mut received = 0u64;
        let mut taken = 0u64;
        let tmp = self.store.temp_path();
        let result = async {
            let file = tokio::fs::File::create(&tmp).await?;
            let mut out = Partial {
                file,
                verifier: Verifier::new(digest.algorithm()),
                builder: None,
                len: 0,
            };
            let offered = from_nodes.then(|| self.offers.size(digest)).flatten();
            if let Some(size) = offered {
                out.builder = Some(
                    TorrentBuilder::new(digest.clone(), size)
                        .map_err(|e| TrackerError::Seed(e.to_string()))?,
                );
                self.take_offered(digest, source, size, &mut out, &mut taken, &mut received)
                    .await?;
                // Early readers may read the nodes' pieces from the file.
                out.file.flush().await?;
            }
            // Upstream resumes where the nodes' pieces end, or sends the whole blob.
            let mut resp = None;
            // Bytes of upstream's answer the file already holds: the nodes' pieces, when
            // upstream ignores the `Range` and sends the whole blob.
            let mut skip = 0u64;
            let resumed = match offered.filter(|_| out.len > 0) {
                Some(size) => {
                    tracing::info!(
                        taken,
                        prefix = out.len,
                        "took the pieces nodes offered; asking upstream for the rest"
                    );
                    (resp, skip) = self.rest_from(digest, source, size, out.len).await?;
                    true
                }
                None => false,
            };
            if !resumed {
                out.start_over(digest).await?;
                resp = Some(
                    self.upstream
                        .get_blob(&source.registry, &source.name, digest, &source.creds)
                        .await?,
                );
            }
            let announced = match resumed {
                false => resp.as_ref().and_then(|r| r.content_length()),
                true => offered,
            };
            let mut early = match announced {
                Some(size) if size > 0 => {
                    let (tx, rx) = watch::channel(Progress::Written(out.len));
                    self.fetching.lock().expect("fetching poisoned").insert(
                        digest.clone(),
                        Arc::new(Fetching::new(
                            tmp.clone(),
                            self.store.blob_path(digest),
                            size,
                            rx,
                        )),
                    );
                    Some(FetchingGuard {
                        blobs: self,
                        digest: digest.clone(),
                        progress: tx,
                        published: out.len,
                    })
                }
                _ => None,
            };
            if out.builder.is_none() {
                out.builder = match announced {
                    Some(0) => return Err(TrackerError::Empty(digest.to_string())),
                    Some(n) => Some(
                        TorrentBuilder::new(digest.clone(), n)
                            .map_err(|e| TrackerError::Seed(e.to_string()))?,
                    ),
                    None => None,
                };
            }
            // Offers that come after upstream began to send (the request that started this
            // fetch offered nothing, the next ones did): at the first piece boundary where a
            // node offers the next piece, upstream's stream is left for the nodes' pieces and
            // taken up again after them with a `Range`.
            let late_size = announced.filter(|_| from_nodes);
            let mut late_takes = 0;
            while let Some(chunk) = match resp.as_mut() {
                Some(r) => r
                    .chunk()
                    .await
                    .map_err(|e| TrackerError::Upstream(transport(&source.registry, e)))?,
                None => None,
            } {
                self.count_upstream(chunk.len(), &mut received).await;
                let mut chunk = &chunk[..];
                if skip > 0 {
                    let n = skip.min(chunk.len() as u64);
                    skip -= n;
                    chunk = &chunk[n as usize..];
                }
                let cut = match late_size {
                    Some(size) if late_takes < crate::offers::MAX_GAPS && !chunk.is_empty() => self
                        .offers
                        .offered_boundary(digest, size, out.len, chunk.len())
                        .map(|at| (at, size)),
                    _ => None,
                };
                let keep = cut.map_or(chunk.len(), |(at, _)| (at - out.len) as usize);
                out.append(&chunk[..keep]).await?;
                if let Some((_, size)) = cut {
                    late_takes += 1;
                    // Upstream's connection closes now, not after the nodes' pieces.
                    drop(resp.take());
                    (resp, skip) = self
                        .take_late_offers(digest, source, size, &mut out, &mut taken, &mut received)
                        .await?;
                }
                if let Some(e) = early.as_mut()
                    && out.len - e.published >= PUBLISH_EVERY
                {
                    // Written means readable from another handle: the last write may still
                    // be on the blocking pool.
                    out.file.flush().await?;
                    e.written(out.len);
                }
            }
            let Partial {
                mut file,
                verifier,
                builder,
                ..
            } = out;
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
                from_nodes = taken,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "fetched and verified blob from upstream"
            ),
            Err(e) => {
                tracing::warn!("upstream fetch failed: {e}");
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        result.map_err(|e| (e, taken))
    }

    /// Counts `n` bytes received from upstream, and waits for `--upstream-rate`.
    async fn count_upstream(&self, n: usize, received: &mut u64) {
        self.metrics.upstream_bytes.inc_by(n as u64);
        *received += n as u64;
        self.limits.take(n).await;
    }

    /// Takes the pieces nodes offered from where `out` reaches (a piece boundary) after
    /// upstream's stream was left there, then asks upstream for the rest ([`Self::rest_from`]).
    async fn take_late_offers(
        &self,
        digest: &Digest,
        source: &Source,
        size: u64,
        out: &mut Partial,
        taken: &mut u64,
        received: &mut u64,
    ) -> Result<(Option<reqwest::Response>, u64), TrackerError> {
        let (at, before) = (out.len, *taken);
        self.take_offered(digest, source, size, out, taken, received)
            .await?;
        tracing::info!(
            at,
            taken = *taken - before,
            prefix = out.len,
            "took pieces nodes offered after upstream began; asking upstream for the rest"
        );
        self.rest_from(digest, source, size, out.len).await
    }

    /// Upstream's answer for the blob from byte `from` on (None if `from` is its end), and how
    /// many of the answer's first bytes the file already holds: 0 for the 206 asked for, `from`
    /// when upstream ignored the `Range` and sends the whole blob.
    async fn rest_from(
        &self,
        digest: &Digest,
        source: &Source,
        size: u64,
        from: u64,
    ) -> Result<(Option<reqwest::Response>, u64), TrackerError> {
        if from == size {
            return Ok((None, 0));
        }
        let want = format!("bytes {from}-{}/{size}", size - 1);
        let r = self
            .upstream
            .get_blob_from(&source.registry, &source.name, digest, &source.creds, from)
            .await;
        let why = match r {
            Ok(r) if partial(&r, &want) => return Ok((Some(r), 0)),
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                tracing::info!(
                    "upstream did not resume at {want} (answered 200): reading past what the \
                     file holds"
                );
                return Ok((Some(r), from));
            }
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        tracing::info!("upstream did not resume at {want} ({why}): asking for the whole blob");
        let r = self
            .upstream
            .get_blob(&source.registry, &source.name, digest, &source.creds)
            .await?;
        Ok((Some(r), from))
    }

    /// Writes the pieces nodes offered into `out` in order (`crate::offers`), from where it
    /// reaches (a piece boundary) on, each gap between them fetched from upstream alone, until
    /// no node offers more; `out.len` then says how far the file reaches. `taken` counts the
    /// nodes' bytes, `received` upstream's.
    async fn take_offered(
        &self,
        digest: &Digest,
        source: &Source,
        size: u64,
        out: &mut Partial,
        taken: &mut u64,
        received: &mut u64,
    ) -> Result<(), TrackerError> {
        let pl = bay_common::torrent::piece_length_for(size) as u64;
        let count = size.div_ceil(pl) as u32;
        let deadline = tokio::time::Instant::now() + Held::read_within(size);
        debug_assert_eq!(out.len % pl, 0, "offered pieces start at a piece boundary");
        let mut next = (out.len / pl) as u32;
        let mut waited = false;
        let mut gaps = 0;
        while next < count {
            let before = next;
            {
                let mut run = std::pin::pin!(self.offers.run_from(digest, size, next));
                while let Ok(Some(Some(data))) = tokio::time::timeout_at(deadline, run.next()).await
                {
                    out.append(&data).await?;
                    *taken += data.len() as u64;
                    self.metrics.node_bytes.inc_by(data.len() as u64);
                    next += 1;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(next, "reading the pieces nodes offered took too long");
                return Ok(());
            }
            if next > before {
                continue;
            }
            if !waited {
                // The nodes ask together as their tracker dies; the next piece may be in an
                // offer a moment away.
                waited = true;
                tokio::time::sleep(crate::offers::LATE_OFFERS).await;
                continue;
            }
            // No node offers piece `next` (it was on its way to a node when the tracker
            // died): upstream sends the gap, if nodes offer pieces after it.
            let Some(after) = self.offers.next_offered(digest, size, next) else {
                return Ok(());
            };
            if gaps == crate::offers::MAX_GAPS {
                return Ok(());
            }
            gaps += 1;
            if after <= next {
                continue; // offered again a moment ago
            }
            let (first, last) = (next as u64 * pl, after as u64 * pl - 1);
            let want = format!("bytes {first}-{last}/{size}");
            let resp = self
                .upstream
                .get_blob_range(
                    &source.registry,
                    &source.name,
                    digest,
                    &source.creds,
                    first,
                    last,
                )
                .await;
            let mut resp = match resp {
                Ok(r) if partial(&r, &want) => r,
                _ => return Ok(()),
            };
            let (expected, mut got) = (last + 1 - first, 0u64);
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| TrackerError::Upstream(transport(&source.registry, e)))?
            {
                got += chunk.len() as u64;
                if got > expected {
                    break;
                }
                self.count_upstream(chunk.len(), received).await;
                out.append(&chunk).await?;
            }
            if got != expected {
                return Err(TrackerError::SizeMismatch {
                    digest: digest.to_string(),
                    expected,
                    got,
                });
            }
            next = after;
        }
        Ok(())
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
        let f = Fetching::new(PathBuf::new(), PathBuf::new(), size, rx);
        assert_eq!(f.piece_length(), 256 * 1024);
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:6883".parse().unwrap(),
            "10.0.0.2:6883".parse().unwrap(),
        );
        assert_eq!(f.take_unsent(2, 5, Some(a)), Take::Piece(2));
        // Whoever asks next gets the next piece not sent.
        assert_eq!(f.take_unsent(0, 10, Some(b)), Take::Piece(0));
        assert_eq!(f.take_unsent(0, 10, None), Take::Piece(1));
        assert_eq!(f.take_unsent(2, 3, Some(a)), Take::Piece(3));
        // Asking past the end is cut to the last piece.
        assert_eq!(f.take_unsent(10, 40, Some(b)), Take::Piece(10));
        for p in [4, 5, 6, 7] {
            let who = if p % 2 == 0 { a } else { b };
            assert_eq!(f.take_unsent(0, 10, Some(who)), Take::Piece(p));
        }
        // a holds 4 pieces, b 4: a third node may take them all, up to its share and 2 more.
        let c: SocketAddr = "10.0.0.3:6883".parse().unwrap();
        assert_eq!(f.take_unsent(0, 10, Some(c)), Take::Piece(8));
        assert_eq!(f.take_unsent(0, 10, Some(c)), Take::Piece(9));
        assert_eq!(f.take_unsent(0, 10, Some(a)), Take::NoneLeft);
        for p in [8, 9] {
            f.sent.lock().unwrap()[p] = Some(Some(a));
        }
        // Each node learns who holds what, without itself or nodes that pass nothing on.
        let h = f.holders(Some(a), 0);
        assert_eq!(h.nodes, vec![b]);
        assert_eq!(h.pieces, vec![0, -2, -2, -2, -2, 0, -2, 0, -2, -2, 0]);
        let h = f.holders(None, 0);
        assert_eq!(h.holder(2), Some(a));
        assert_eq!(h.holder(0), Some(b));
        assert_eq!(h.holder(1), None);
        assert_eq!(h.holder(11), None);
        // From a piece on, indexed from there.
        let h = f.holders(Some(b), 9);
        assert_eq!((h.first, h.pieces.clone()), (9, vec![0, -2]));
        assert_eq!(h.nodes, vec![a]);
        assert_eq!(h.holder(9), Some(a));
        assert_eq!(h.holder(2), None, "before `first`, nothing is known");
        assert!(f.holders(None, 40).pieces.is_empty());
    }

    #[test]
    fn a_node_over_its_share_waits_for_the_others() {
        let (_tx, rx) = watch::channel(Progress::Written(0));
        let f = Fetching::new(PathBuf::new(), PathBuf::new(), 64 * 256 * 1024, rx);
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:6883".parse().unwrap(),
            "10.0.0.2:6883".parse().unwrap(),
        );
        // Alone, a node takes every piece: its share is all of them.
        for p in 0..5 {
            assert_eq!(f.take_unsent(0, 63, Some(a)), Take::Piece(p));
        }
        // A second node arrives: a holds 5 of 6, 2 more than its share of 3.
        assert_eq!(f.take_unsent(0, 63, Some(b)), Take::Piece(5));
        assert_eq!(f.take_unsent(0, 63, Some(a)), Take::Wait);
        assert_eq!(f.take_unsent(0, 63, Some(b)), Take::Piece(6));
        assert_eq!(f.take_unsent(0, 63, Some(a)), Take::Wait);
        assert_eq!(f.take_unsent(0, 63, Some(b)), Take::Piece(7));
        // 5 of 8 is within 2 of a's share of 4.
        assert_eq!(f.take_unsent(0, 63, Some(a)), Take::Piece(8));
        // A node that passes nothing on is never held back, nor counted.
        for p in 9..20 {
            assert_eq!(f.take_unsent(0, 63, None), Take::Piece(p));
        }
        assert_eq!(f.take_unsent(0, 63, Some(a)), Take::Wait);
    }

    #[test]
    fn the_first_unsent_piece_is_where_the_next_ask_starts() {
        let (_tx, rx) = watch::channel(Progress::Written(0));
        let f = Fetching::new(PathBuf::new(), PathBuf::new(), 4 * 256 * 1024, rx);
        let a: SocketAddr = "10.0.0.1:6883".parse().unwrap();
        assert_eq!(f.holders(None, 0).first_unsent(), 0);
        assert_eq!(f.take_unsent(0, 3, Some(a)), Take::Piece(0));
        assert_eq!(f.take_unsent(0, 3, None), Take::Piece(1));
        let h = f.holders(Some(a), 0);
        assert_eq!(h.pieces, vec![-2, -2, -1, -1]);
        assert_eq!(h.first_unsent(), 2);
        assert_eq!(f.holders(Some(a), 2).first_unsent(), 2);
    }
}

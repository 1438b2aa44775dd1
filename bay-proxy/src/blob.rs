//! A blob GET, top to bottom: authorize with upstream, serve from the local cache, else from
//! the swarm as pieces arrive, else straight from upstream — always verified on the way out.
//!
//! Every body from the swarm or upstream is hashed as it goes out and its last chunk is held
//! back until the digest matched, so a client never receives a complete wrong blob: on a
//! mismatch the connection is cut short of `Content-Length`. Cached files were hashed when
//! written; they are re-hashed on the way out only if they changed on disk since.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bay_common::access::AccessCache;
use bay_common::api::{Held, ProxyStats};
use bay_common::metrics::Outcome;
use bay_common::store::{Store, verify_digest, verify_file};
use bay_common::torrent::{BlobTorrent, TorrentBuilder};
use bay_common::upstream::{Credentials, UpstreamClient};
use bay_common::{Digest, Registry, RepositoryName, Verifier};
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::early::{self, Early};
use crate::error::ProxyError;
use crate::exchange::Exchange;
use crate::landing::{self, Landing, Reader, Writer};
use crate::metrics::{Metrics, outcome, reason, source};
use crate::swarm::{Handle, Swarm};
use crate::trackers::{Fetched, Trackers, TrackersError};
use crate::wake;
use crate::webseed::{Gate, PieceStream, Plan, WebSeed};
use bay_common::pool::Pool;
use bay_common::range::ByteRange;

mod stream;
use stream::{Reading, Source, Tee, VerifyingBody};

const CHUNK: usize = 256 * 1024;
/// Bytes per read of a cached file sent as it is.
const CACHE_READ: u64 = 1 << 20;
/// How often the idle requesters of a running download are woken. A peer's new piece waits
/// for the next wake-up before anyone asks for it; 50 ms beat 200 ms and 20 ms in
/// `bench/swarm.sh` (`bench/RESULTS.md`).
const WAKE_EVERY: Duration = Duration::from_millis(50);
/// Piece steals that make a download's stall final. librqbit 9.1 lets a peer whose average
/// piece time is under 1 ms (its integer average is then 0) steal at once, and a steal resets
/// the piece's clock, so two fast peers can take a piece from each other every few
/// microseconds: 25,000 steals of one piece within a second in `tests/ha.rs`. Each steal asks
/// for the piece anew and cancels the last request; the piece then did not come for 45 s, and
/// in another run the two peers sent 370 and 140 MB for a 24 MiB blob at their upload limit,
/// working through what was asked and cancelled. A normal download has a handful of steals.
const STEAL_STORM: u64 = 500;

/// Whether a download that saw `steals` and has made no progress for `quiet` will not recover
/// (rather than wait for [`Blobs::patience`] as a slow swarm is waited for).
fn storm_stalled(quiet: Duration, stall_timeout: Duration, steals: u64) -> bool {
    steals >= STEAL_STORM && quiet > stall_timeout
}

/// How long a finished download waits for a client stream to finish hashing the blob before
/// hashing the file itself.
const STREAM_VERIFY_WAIT: Duration = Duration::from_secs(10);
/// How far a prefetched download gets before the next one starts (see [`Blobs::prefetch`]).
/// A quarter: N=16, 64 MiB in 4 layers, 100 Mbit/s, warm 1.77 → 1.71 T* (medians of 3); at
/// 10 Mbit/s and 256 MiB 1.164 → 1.166 (`bench/RESULTS.md`, "Prefetch a quarter ahead").
const PREFETCH_STAGGER: f64 = 0.25;
/// How often a running download reports its progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often this node asks the tracker which slice of a blob to fetch first.
const SLOT_EVERY: Duration = Duration::from_secs(1);
/// ... and how often in its first seconds: nodes that got the torrent together ask for slices
/// within milliseconds, and the first to ask is given the whole blob until it asks again. At
/// 100 Mbit/s a second of reading that is most of a 16 MiB blob's slices, sent twice.
const SLOT_FIRST_EVERY: Duration = Duration::from_millis(200);
const SLOT_FIRST_ASKS: u32 = 10;

/// Who asked for which blob of which upstream.
#[derive(Clone)]
pub struct BlobRequest {
    pub registry: Registry,
    pub name: RepositoryName,
    pub digest: Digest,
    pub authorization: Option<HeaderValue>,
}

impl BlobRequest {
    fn creds(&self) -> Credentials {
        Credentials::from_client(self.authorization.as_ref())
    }

    /// The ledger's key: `<registry>/<repository>`.
    fn image(&self) -> String {
        format!("{}/{}", self.registry.authority(), self.name)
    }
}

/// A swarm download in progress, shared by every client asking for the blob meanwhile.
struct Download {
    torrent: Arc<BlobTorrent>,
    handle: Handle,
    /// None while running; Some(true) once verified and cached, Some(false) if it failed.
    outcome: watch::Sender<Option<bool>>,
    /// Set while another tracker is being asked to seed the blob because the swarm stalled
    /// (its seed died); clients wait for that rather than all going upstream.
    recovering: std::sync::atomic::AtomicBool,
    /// Set when a client stream read the whole blob from the swarm and its digest matched:
    /// the file needs no second read before it is cached.
    stream_verified: std::sync::atomic::AtomicBool,
    /// Client streams reading the blob from the swarm now.
    streams: std::sync::atomic::AtomicUsize,
    /// A client stream verified the blob or stopped reading it from the swarm.
    stream_ended: tokio::sync::Notify,
    /// The tracker's share: pieces over HTTP, offered to librqbit as a peer.
    webseed: WebSeed,
    /// Where librqbit puts the pieces, and clients read them.
    landing: Arc<Landing>,
    /// Bytes of the pieces offered early that came from other nodes, not the tracker.
    from_nodes: Arc<std::sync::atomic::AtomicU64>,
}

impl Download {
    /// Bytes received so far, verified or not: grows while any peer is sending.
    fn arrived(&self) -> u64 {
        let st = self.handle.stats();
        let fetched = st.live.as_ref().map_or(0, |l| l.snapshot.fetched_bytes);
        st.progress_bytes.saturating_add(fetched)
    }

    /// Whether a tracker that holds the blob is answering: then a download that gets nothing
    /// is queued behind other nodes on a busy tracker link, not abandoned by a dead tracker.
    fn seed_reachable(&self) -> bool {
        self.webseed.has_source()
    }

    /// Why the download can no longer deliver, if it cannot.
    fn unusable(&self) -> Option<String> {
        self.landing
            .failure()
            .or_else(|| self.handle.stats().error.clone())
    }
}

pub struct Blobs {
    store: Arc<Store>,
    swarm: Arc<Swarm>,
    trackers: Arc<Trackers>,
    upstream: Arc<UpstreamClient>,
    access: AccessCache,
    stall_timeout: Duration,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Downloads being started, one at a time per blob: two clients (or a client and a
    /// prefetch) starting the same one must not both add it to the session.
    starting: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Manifests whose blobs are being prefetched.
    prefetching: Prefetching,
    pub metrics: Metrics,
    /// Stops the background work of downloads at shutdown.
    stop: CancellationToken,
    /// One web seed at a time reads from the trackers (see [`Gate`]).
    webseed_gate: Arc<Gate>,
    /// Writes downloads' verified pieces to their files.
    writer: Writer,
    pool: Arc<Pool>,
    /// Slices read while trackers fetch the blobs, until their torrents come.
    early: Mutex<HashMap<Digest, Early>>,
    early_budget: Arc<early::Budget>,
    early_reads: bool,
    /// Where early pieces are passed on between nodes (`crate::exchange`).
    exchange: Option<Arc<Exchange>>,
    /// Early reads whose torrent came, still passing pieces on for a moment.
    lingering: Arc<Mutex<HashMap<Digest, early::Holding>>>,
    /// Downloads that gave up, still serving their verified pieces to a tracker that fetches
    /// the blob again (see [`Blobs::keep_offering`]).
    given_up: Arc<Mutex<HashMap<Digest, Arc<GivenUp>>>>,
}

/// A download that gave up, and how many of its pieces were read since.
struct GivenUp {
    landing: Arc<Landing>,
    served: std::sync::atomic::AtomicU64,
}

impl Blobs {
    pub fn new(
        store: Arc<Store>,
        swarm: Arc<Swarm>,
        trackers: Arc<Trackers>,
        upstream: Arc<UpstreamClient>,
        stall_timeout: Duration,
        writer: Writer,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            swarm,
            trackers,
            upstream,
            access: AccessCache::default(),
            stall_timeout,
            downloads: Mutex::default(),
            starting: Mutex::default(),
            prefetching: Arc::default(),
            metrics: Metrics::default(),
            stop,
            webseed_gate: Arc::default(),
            writer,
            pool: Pool::new(landing::POOL_BYTES),
            early: Mutex::default(),
            early_budget: Arc::default(),
            early_reads: true,
            exchange: None,
            lingering: Arc::default(),
            given_up: Arc::default(),
        }
    }

    /// Passes early pieces on between nodes through `exchange` (`--exchange-port`).
    pub fn exchange(mut self, exchange: Option<Arc<Exchange>>) -> Self {
        self.exchange = exchange;
        self
    }

    /// The pieces of a blob read early, for other nodes to read.
    pub fn early_holding(&self, digest: &Digest) -> Option<early::Holding> {
        let reading = self
            .early
            .lock()
            .expect("poisoned")
            .get(digest)
            .map(|e| e.holding());
        reading.or_else(|| {
            self.lingering
                .lock()
                .expect("poisoned")
                .get(digest)
                .cloned()
        })
    }

    /// Piece `p` of a blob this node is downloading, if librqbit verified it here: what the
    /// exchange port serves beside early reads (a tracker taking over a fetch reads it).
    pub async fn landed_piece(&self, digest: &Digest, p: u32) -> Option<Bytes> {
        let (landing, given_up) = match self.running(digest) {
            Some(d) => (d.landing.clone(), None),
            None => {
                let g = self.given_up(digest)?;
                (g.landing.clone(), Some(g))
            }
        };
        let piece = match tokio::task::spawn_blocking(move || landing.verified_piece(p)).await {
            Ok(Ok(piece)) => piece,
            Ok(Err(e)) => {
                tracing::debug!(digest = %digest, "reading piece {p} back: {e:#}");
                None
            }
            Err(_) => None,
        };
        if let (Some(g), Some(_)) = (given_up, &piece) {
            g.served.fetch_add(1, Ordering::Relaxed);
        }
        piece
    }

    fn given_up(&self, digest: &Digest) -> Option<Arc<GivenUp>> {
        self.given_up.lock().expect("poisoned").get(digest).cloned()
    }

    /// The landing of the blob's running download, or else of one that gave up lately.
    fn landing(&self, digest: &Digest) -> Option<Arc<Landing>> {
        match self.running(digest) {
            Some(d) => Some(d.landing.clone()),
            None => self.given_up(digest).map(|g| g.landing.clone()),
        }
    }

    /// Keeps serving the verified pieces of a download that gave up, for as long as a tracker's
    /// fetch reads what nodes offered ([`Held::read_within`]). Its download offered them when
    /// its swarm stalled; the fetch that took the offer reads them in order, and often after
    /// the download gave up: every node stalled on a hung tracker gives up at about the same
    /// time, and their offers went with them (`bench/RESULTS.md`, "Every fault at once"). The
    /// landing's file is already unlinked; its open descriptor keeps the bytes readable.
    fn keep_offering(&self, torrent: &BlobTorrent, landing: Arc<Landing>) {
        let port = self.exchange.as_ref().map(|e| e.port());
        if port.and_then(|port| landing.held(port)).is_none() || landing.failure().is_some() {
            return;
        }
        let (digest, size) = (torrent.digest().clone(), torrent.size());
        tracing::info!(
            serving_for_s = Held::read_within(size).as_secs(),
            "still serving the pieces this download verified, for a tracker that fetches the \
             blob again"
        );
        let given_up = Arc::new(GivenUp {
            landing,
            served: Default::default(),
        });
        self.given_up
            .lock()
            .expect("poisoned")
            .insert(digest.clone(), given_up.clone());
        let map = Arc::downgrade(&self.given_up);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Held::read_within(size)) => {}
                _ = stop.cancelled() => {}
            }
            if let Some(map) = map.upgrade() {
                let mut map = map.lock().expect("poisoned");
                if map.get(&digest).is_some_and(|g| Arc::ptr_eq(g, &given_up)) {
                    map.remove(&digest);
                }
            }
            tracing::info!(
                digest = %digest,
                pieces_read = given_up.served.load(Ordering::Relaxed),
                "no longer serving the pieces of the download that gave up"
            );
        });
    }

    /// Keeps a read whose torrent came going for [`early::LINGER`].
    fn linger(&self, digest: Digest, lingering: early::Lingering) {
        let holding = lingering.holding();
        self.lingering
            .lock()
            .expect("poisoned")
            .insert(digest.clone(), holding.clone());
        let map = Arc::downgrade(&self.lingering);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(early::LINGER) => {}
                _ = stop.cancelled() => {}
            }
            drop(lingering);
            if let Some(map) = map.upgrade() {
                let mut map = map.lock().expect("poisoned");
                if map.get(&digest).is_some_and(|h| h.same(&holding)) {
                    map.remove(&digest);
                }
            }
        });
    }

    /// Whether blobs are read while trackers fetch them (`--early-reads`).
    pub fn early_reads(mut self, on: bool) -> Self {
        self.early_reads = on;
        self
    }

    /// Answers `GET /v2/<name>/blobs/<digest>`.
    pub async fn get(
        self: &Arc<Self>,
        req: BlobRequest,
        range: Option<&str>,
    ) -> Result<Response, ProxyError> {
        // Counted once the answer is certain: a cache hit whose file then fails is `failed`.
        let mut how = outcome::FAILED;
        let answer = self.answer(req, range, &mut how).await;
        self.metrics.request(match &answer {
            Ok(_) => how,
            Err(ProxyError::Refused(_)) => outcome::REFUSED,
            Err(_) => outcome::FAILED,
        });
        answer
    }

    async fn answer(
        self: &Arc<Self>,
        req: BlobRequest,
        range: Option<&str>,
        how: &mut &'static str,
    ) -> Result<Response, ProxyError> {
        // 1. Upstream decides who may read what; a cached blob proves nothing about the caller.
        let upstream_size = self
            .access
            .check(
                &self.upstream,
                &req.registry,
                &req.name,
                &req.digest,
                &req.creds(),
            )
            .await?;

        // 2. Held locally: serve from disk. A part of a file that changed since it was
        // verified is not sent before the whole file is checked again (a whole blob is checked
        // on the way out); one that fails is dropped and fetched again below.
        if let Some(t) = self.store.get(&req.digest)
            && (range.is_none() || self.cached_file_intact(&req.digest).await)
        {
            *how = outcome::CACHE_HIT;
            tracing::debug!(size = t.size(), "serving blob from cache");
            return self.serve_file(&req, t.size(), range).await;
        }

        // 3. From the swarm, as pieces arrive.
        let download = match self.download(&req).await {
            Ok(d) => Some(d),
            Err(Start::Refused(r)) => return Err(ProxyError::Refused(r)),
            // The tracker already waited on upstream for this blob: the client hears why now
            // rather than after a second wait on the same registry.
            Err(Start::UpstreamFailed { status, why }) => {
                tracing::warn!("{why}");
                return Err(ProxyError::UpstreamViaTracker { status, why });
            }
            Err(Start::Held) => match self.store.get(&req.digest) {
                Some(t) => {
                    *how = outcome::CACHE_HIT;
                    return self.serve_file(&req, t.size(), range).await;
                }
                None => {
                    tracing::warn!("blob evicted as soon as cached, streaming from upstream");
                    None
                }
            },
            Err(Start::Failed(why)) => {
                tracing::warn!("swarm unavailable, streaming from upstream: {why}");
                None
            }
        };
        if let Some(range) = range {
            // Ranges are served only from a verified file: wait for it.
            let verified = match &download {
                Some(d) => d
                    .outcome
                    .subscribe()
                    .wait_for(|o| o.is_some())
                    .await
                    .ok()
                    .and_then(|o| *o),
                None => None,
            };
            if verified == Some(true) {
                *how = outcome::SWARM;
            } else {
                self.metrics.fallback(if download.is_some() {
                    reason::RANGE
                } else {
                    reason::NO_TORRENT
                });
                self.fetch_to_cache(&req).await?;
                *how = outcome::UPSTREAM;
            }
            let t = self.store.get(&req.digest).ok_or_else(|| {
                ProxyError::Io(std::io::Error::other("blob vanished from the cache"))
            })?;
            return self.serve_file(&req, t.size(), Some(range)).await;
        }
        // A download whose torrent already failed (a full disk, say) cannot be streamed: its
        // clients go to upstream like those without a swarm.
        let streamable = match download {
            Some(d) => match d.unusable() {
                None => {
                    let reader = d.landing.reader();
                    Ok((d, reader))
                }
                Some(e) => {
                    tracing::warn!("swarm download unusable, streaming from upstream: {e}");
                    Err(reason::SWARM_UNUSABLE)
                }
            },
            None => Err(reason::NO_TORRENT),
        };
        let body = match streamable {
            Ok((d, reader)) => {
                *how = outcome::SWARM;
                let size = d.torrent.size();
                VerifyingBody::new(
                    self.clone(),
                    req.digest.clone(),
                    Some(req.clone()),
                    size,
                    Source::Swarm {
                        reader,
                        _reading: Some(Reading::new(&d)),
                        download: d,
                        last_progress: 0,
                        waiting_since: None,
                    },
                )
            }
            // 4. Straight from upstream, verified, and cached and seeded if it verifies.
            Err(why) => {
                self.metrics.fallback(why);
                let body = self.upstream_body(&req, upstream_size).await?;
                *how = outcome::UPSTREAM;
                body
            }
        };
        Ok(blob_response(
            &req.digest,
            body.size,
            StatusCode::OK,
            None,
            body.into_body(),
        ))
    }

    /// How long a download may make no progress at all, while a seed is still connected,
    /// before it is abandoned.
    fn patience(&self) -> Duration {
        (self.stall_timeout * 6).max(Duration::from_secs(30))
    }

    /// Waits, at most `deadline`, for downloads to wind up once shutdown began, so one that
    /// finished is verified and cached before the session stops.
    pub async fn wait_downloads(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        while !self.downloads.lock().expect("poisoned").is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts swarm downloads of the blobs an image manifest names, unless cached or already
    /// running, so they are on their way before the client asks. Nothing is served by this:
    /// a client's GET still has its access checked, then joins the download.
    ///
    /// Two things are paced, both in the manifest's order (`bench/RESULTS.md` has the runs):
    /// - Torrents are asked for one after another, so a tracker that holds none of them yet
    ///   fetches the layers from upstream one at a time at the full speed of its link, and the
    ///   swarm starts on the first while the next is fetched (N=8, 40 Mbit/s: cold 2.71 →
    ///   1.99 T*).
    /// - Each swarm download starts once the one before is `PREFETCH_STAGGER` (a quarter) done:
    ///   a node with every layer in flight at once has uneven piece times, and librqbit then
    ///   takes pieces over from "slow" peers and fetches them again (N=8, 40 Mbit/s, warm:
    ///   33 % → 19 % of piece bytes fetched twice, 1.80 → 1.51 T* at half done). Half done
    ///   left the tracker's uplink idle between small layers on fast links: at 100 Mbit/s
    ///   each 16 MiB layer's first half took 2.2 s and its second 0.5 s.
    ///
    /// One prefetch per manifest runs at a time, and at most [`MAX_PREFETCHES`] in all: N
    /// clients getting one tag at once would otherwise each walk its layers.
    pub fn prefetch(
        self: &Arc<Self>,
        manifest: &Digest,
        registry: &Registry,
        name: &RepositoryName,
        digests: Vec<Digest>,
        authorization: Option<HeaderValue>,
    ) {
        let Some(running) = PrefetchGuard::enter(&self.prefetching, manifest) else {
            tracing::debug!(manifest = %manifest, "not prefetching: already running, or too many are");
            return;
        };
        let wanted: Vec<BlobRequest> = digests
            .into_iter()
            .filter(|d| !self.held_or_running(d))
            .map(|digest| BlobRequest {
                registry: registry.clone(),
                name: name.clone(),
                digest,
                authorization: authorization.clone(),
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let this = self.clone();
        let reqs = wanted.clone();
        let guard = running.clone();
        tokio::spawn(async move {
            let _running = guard;
            for req in &reqs {
                if this.stop.is_cancelled() {
                    return;
                }
                if this.held_or_running(&req.digest) {
                    continue;
                }
                let fetched = this.torrent_for(req).await;
                if let Err(e) = fetched {
                    // Refused or no tracker: the rest would fare the same.
                    tracing::debug!(digest = %req.digest, "no prefetch: {e}");
                    return;
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let _running = running;
            for req in wanted {
                if this.stop.is_cancelled() {
                    return;
                }
                if this.store.get(&req.digest).is_some() {
                    continue;
                }
                // One a client already started counts too: the next waits for it all the same.
                let d = match this.running(&req.digest) {
                    Some(d) => d,
                    None => {
                        let span =
                            tracing::info_span!("prefetch", digest = %req.digest, repo = %req.name);
                        match this.download(&req).instrument(span).await {
                            Ok(d) => {
                                this.metrics.prefetches.inc();
                                d
                            }
                            Err(e) => {
                                tracing::debug!(digest = %req.digest, "prefetch stopped: {e}");
                                return;
                            }
                        }
                    }
                };
                let enough = (d.torrent.size() as f64 * PREFETCH_STAGGER) as u64;
                while !this.stop.is_cancelled() && d.outcome.borrow().is_none() {
                    let st = d.handle.stats();
                    if st.finished || st.error.is_some() || st.progress_bytes >= enough {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }

    /// Asks the trackers for the blob's torrent as `req`'s client: they check its access.
    async fn torrent_for(&self, req: &BlobRequest) -> Result<Fetched, TrackersError> {
        // Asked as a tracker may start the fetch: what this node's early read holds, which
        // spares upstream what a tracker that died mid-fetch had fetched.
        let held = || {
            let port = self.exchange.as_ref()?.port();
            self.early_holding(&req.digest)
                .and_then(|h| h.held(port))
                // A download asking again because its swarm stalled (its tracker died or
                // hangs) offers what it got through the swarm, and so does one starting
                // after such a download gave up.
                .or_else(|| self.landing(&req.digest)?.held(port))
        };
        self.trackers
            .torrent(
                &req.registry,
                &req.name,
                &req.digest,
                req.authorization.as_ref(),
                &held,
            )
            .await
    }

    fn held_or_running(&self, digest: &Digest) -> bool {
        self.store.get(digest).is_some() || self.running(digest).is_some()
    }

    /// The blob's download in progress, if one is.
    fn running(&self, digest: &Digest) -> Option<Arc<Download>> {
        self.downloads
            .lock()
            .expect("poisoned")
            .get(digest)
            .cloned()
    }

    /// Joins the running download of the blob, or starts one.
    async fn download(self: &Arc<Self>, req: &BlobRequest) -> Result<Arc<Download>, Start> {
        if let Some(d) = self.running(&req.digest) {
            return Ok(d);
        }
        self.read_early(req);
        let fetched = self.torrent_for(req).await.inspect_err(|_| {
            self.early.lock().expect("poisoned").remove(&req.digest);
        });
        let fetched = fetched.map_err(|e| match e {
            TrackersError::Refused(r) => Start::Refused(r),
            TrackersError::UpstreamFailed { status, .. } => Start::UpstreamFailed {
                status,
                why: e.to_string(),
            },
            other => Start::Failed(other.to_string()),
        })?;
        let start = self
            .starting
            .lock()
            .expect("poisoned")
            .entry(req.digest.clone())
            .or_default()
            .clone();
        let _one_at_a_time = start.lock().await;
        // Someone may have started it while we asked the tracker, or even finished it: a
        // tracker that was slow to answer (an unreachable one tried first) can take longer
        // than a small blob's whole download, which now seeds from the cache.
        let started = match self.running(&req.digest) {
            Some(d) => Ok(d),
            None if self.store.get(&req.digest).is_some() => Err(Start::Held),
            None => self.start_download(req, fetched).await,
        };
        self.early.lock().expect("poisoned").remove(&req.digest);
        self.starting.lock().expect("poisoned").remove(&req.digest);
        started
    }

    /// Starts reading this node's slice of the blob from a tracker fetching it, unless a read
    /// of it runs already (`crate::early`).
    fn read_early(&self, req: &BlobRequest) {
        let mut early = self.early.lock().expect("poisoned");
        if !self.early_reads || early.contains_key(&req.digest) {
            return;
        }
        let ask = early::Ask {
            trackers: self.trackers.clone(),
            path: bay_common::api::early_path(&req.registry, &req.name, &req.digest),
            digest: req.digest.clone(),
            authorization: req.authorization.clone(),
            peer_port: self.swarm.peer_port(),
            exchange: self.exchange.clone(),
        };
        early.insert(
            req.digest.clone(),
            Early::start(
                ask,
                self.early_budget.clone(),
                self.pool.clone(),
                self.stop.child_token(),
            ),
        );
    }

    /// Adds a download to the session and starts its web seed and supervisor; one at a time
    /// per blob (see [`Blobs::download`]).
    async fn start_download(
        self: &Arc<Self>,
        req: &BlobRequest,
        fetched: Fetched,
    ) -> Result<Arc<Download>, Start> {
        let torrent = Arc::new(fetched.torrent);
        let landing = Arc::new(Landing::new(
            self.store.tmp_dir().join(torrent.file_name()),
            torrent.clone(),
            self.writer.clone(),
            self.pool.clone(),
        ));
        let handle = self
            .swarm
            .add_download(
                fetched.metainfo.clone(),
                self.store.tmp_dir(),
                landing.storage_factory(),
            )
            .await
            .map_err(|e| Start::Failed(e.to_string()))?;
        let (outcome, _) = watch::channel(None);
        let webseed = WebSeed::start(
            torrent.clone(),
            handle.clone(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.swarm.peer_port())),
            self.trackers.clone(),
            self.trackers.piece_sources(&req.digest, &fetched.from),
            self.webseed_gate.clone(),
            self.stop.clone(),
        );
        let from_nodes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let early = self.early.lock().expect("poisoned").remove(&req.digest);
        if let Some(early) = early {
            let sink = webseed.early_sink(from_nodes.clone());
            let (got, lingering) = early.finish(&torrent, sink);
            webseed.leave_to_peers(&got.elsewhere);
            from_nodes.fetch_add(got.from_nodes, Ordering::Relaxed);
            if !got.pieces.is_empty() {
                tracing::info!(
                    pieces = got.pieces.len(),
                    from_nodes = got.from_nodes,
                    "offering the pieces read while the tracker fetched the blob"
                );
                webseed.preload(got.pieces);
            }
            if let Some(lingering) = lingering {
                self.linger(req.digest.clone(), lingering);
            }
        }
        let download = Arc::new(Download {
            torrent,
            handle,
            outcome,
            recovering: Default::default(),
            stream_verified: Default::default(),
            streams: Default::default(),
            stream_ended: Default::default(),
            webseed,
            landing,
            from_nodes,
        });
        {
            let mut map = self.downloads.lock().expect("poisoned");
            if let Some(d) = map.get(&req.digest) {
                return Ok(d.clone());
            }
            map.insert(req.digest.clone(), download.clone());
        }
        let this = self.clone();
        let d = download.clone();
        let req = req.clone();
        let span_req = req.clone();
        tokio::spawn(async move { this.supervise(d, req).await }.instrument(
            tracing::info_span!("download", digest = %span_req.digest, repo = %span_req.name),
        ));
        Ok(download)
    }

    /// Drives a download to its end: tells the web seed this node's slice, wakes idle
    /// requesters, gives up when the swarm stalls, and on completion verifies, caches and keeps
    /// seeding.
    async fn supervise(self: Arc<Self>, d: Arc<Download>, req: BlobRequest) {
        let started = Instant::now();
        let ih = d.torrent.info_hash();
        let stop = self.stop.child_token();
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, self.swarm.peer_port()));
        let pieces = d.torrent.piece_count();
        let mut last_progress = (0u64, Instant::now());
        let mut last_recovery: Option<Instant> = None;
        let mut wake_tick = tokio::time::interval(WAKE_EVERY);
        // The node's slice, asked for beside this loop: a tracker slow to answer must not hold
        // up the wake-ups and the end of the download.
        let slots = {
            let (trackers, d) = (self.trackers.clone(), d.clone());
            let (digest, port, stop) = (req.digest.clone(), self.swarm.peer_port(), stop.clone());
            tokio::spawn(async move {
                for asked in 0u32.. {
                    if let Some(s) = trackers.slot(ih, &digest, port).await {
                        d.webseed.set_plan(Plan::from_slot(&s, pieces as u32));
                    }
                    let pause = if asked < SLOT_FIRST_ASKS {
                        SLOT_FIRST_EVERY
                    } else {
                        SLOT_EVERY
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            })
        };
        let give_up = self.patience();
        let steals = |d: &Download| {
            d.handle
                .stats()
                .live
                .map_or(0, |l| l.snapshot.peer_stats.steals as u64)
        };
        let mut progress_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let mut reported = (0u64, Instant::now());
        let mut announced = false;
        let finished = loop {
            let stats = d.handle.stats();
            if stats.finished {
                break true;
            }
            if !announced && stats.progress_bytes > 0 {
                announced = true;
                let now = self.swarm.progress_announce(&d.handle);
                let trackers = self.trackers.clone();
                tokio::spawn(async move {
                    trackers
                        .announce_events(&[now], Duration::from_secs(5))
                        .await
                });
            }
            if let Some(e) = d.landing.failure() {
                tracing::warn!(
                    progress = stats.progress_bytes,
                    "swarm download failed, giving up: {e}"
                );
                break false;
            }
            if let Some(e) = &stats.error {
                // librqbit stopped the torrent for good.
                tracing::warn!(
                    progress = stats.progress_bytes,
                    "swarm download failed, giving up: {e}"
                );
                break false;
            }
            // Good pieces read from a tracker count as progress, and waiting for the node's
            // turn at the trackers (behind its other downloads) is not a stall.
            let progress = stats.progress_bytes + d.webseed.verified();
            let steals_now = steals(&d);
            if progress > last_progress.0 || (d.webseed.queued() && d.webseed.has_source()) {
                last_progress = (progress, Instant::now());
            } else if storm_stalled(last_progress.1.elapsed(), self.stall_timeout, steals_now) {
                tracing::warn!(
                    progress = stats.progress_bytes,
                    steals = steals_now,
                    "no progress after a storm of piece steals (librqbit's peers are flooded \
                     with requests it cancelled), giving up"
                );
                break false;
            } else if last_progress.1.elapsed() > self.stall_timeout / 2
                && !d.webseed.has_source()
                && last_recovery.is_none_or(|t: Instant| t.elapsed() > self.stall_timeout * 2)
            {
                // Nobody is sending and no tracker serves the blob: the one that held it may
                // be gone. Asking the next tracker for the torrent makes it fetch the blob
                // (once, for every proxy), and the web seed reads from it from then on.
                last_recovery = Some(Instant::now());
                d.recovering.store(true, Ordering::Relaxed);
                let (this, d2, req) = (self.clone(), d.clone(), req.clone());
                tokio::spawn(async move {
                    tracing::warn!("swarm stalled, asking the trackers to seed the blob again");
                    let r = this.torrent_for(&req).await;
                    if let Err(e) = r {
                        tracing::warn!("no tracker could seed the blob again: {e}");
                    }
                    d2.recovering.store(false, Ordering::Relaxed);
                });
            }
            if last_progress.1.elapsed() > give_up {
                tracing::warn!(
                    progress = stats.progress_bytes,
                    "swarm made no progress for {give_up:?}, giving up"
                );
                break false;
            }
            tokio::select! {
                // At shutdown a download that just finished is still worth keeping.
                _ = stop.cancelled() => break d.handle.stats().finished,
                _ = wake_tick.tick() => {
                    let _ = wake::nudge(peer, ih, pieces).await;
                }
                _ = progress_tick.tick() => {
                    let st = d.handle.stats();
                    let rate = (st.progress_bytes - reported.0) as f64
                        / reported.1.elapsed().as_secs_f64().max(0.001);
                    reported = (st.progress_bytes, Instant::now());
                    tracing::info!(
                        percent = format!("{:.1}", 100.0 * st.progress_bytes as f64 / st.total_bytes.max(1) as f64),
                        mib_per_s = format!("{:.1}", rate / (1 << 20) as f64),
                        peers = st.live.as_ref().map_or(0, |l| l.snapshot.peer_stats.live),
                        "downloading"
                    );
                }
            }
        };
        slots.abort();
        d.webseed.stop();
        let (from_trackers, from_peers) = peer_bytes(&d.handle, &d.webseed);
        // Pieces other nodes passed on early reach librqbit through the web seed too.
        let moved = d.from_nodes.load(Ordering::Relaxed).min(from_trackers);
        let (from_trackers, from_peers) = (from_trackers - moved, from_peers + moved);
        // Pieces librqbit took over from a slower peer and fetched again from the start.
        let steals = d
            .handle
            .stats()
            .live
            .map_or(0, |l| l.snapshot.peer_stats.steals);
        self.metrics.received(source::TRACKER_SEED, from_trackers);
        self.metrics.received(source::PEERS, from_peers);
        let ok = finished && self.keep(&d).await;
        self.metrics
            .swarm_downloads
            .get_or_create(&Outcome {
                outcome: if ok { "cached" } else { "failed" },
            })
            .inc();
        if !ok {
            self.swarm.remove(ih, false).await;
            let _ = tokio::fs::remove_file(self.store.tmp_dir().join(d.torrent.file_name())).await;
            self.keep_offering(&d.torrent, d.landing.clone());
        }
        self.downloads
            .lock()
            .expect("poisoned")
            .remove(d.torrent.digest());
        d.outcome.send_replace(Some(ok));
        if ok {
            let done = self.swarm.completed_announce(&d.handle);
            let trackers = self.trackers.clone();
            tokio::spawn(async move {
                trackers
                    .announce_events(&[done], Duration::from_secs(5))
                    .await
            });
            tracing::info!(
                size = d.torrent.size(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                from_peers,
                from_trackers,
                from_upstream = 0,
                tracker_fetched = d.webseed.fetched(),
                steals,
                "blob downloaded from the swarm"
            );
        }
    }

    /// Verifies a complete file and makes it a cached blob: linked into `blobs/` (the swarm
    /// keeps seeding the same inode), then recorded, evicting what no longer fits.
    async fn keep(&self, d: &Download) -> bool {
        let torrent = &d.torrent;
        let digest = torrent.digest();
        let file = &self.store.tmp_dir().join(torrent.file_name());
        let dest = self.store.blob_path(digest);
        if !tokio::fs::try_exists(file).await.unwrap_or(false) {
            // The session already had this torrent seeding from the cache (a restart's
            // re-seed raced with this download): nothing to move.
            return self.store.get(digest).is_some()
                || matches!(verify_file(&dest, digest).await, Ok(t) if t.info_hash() == torrent.info_hash());
        }
        if let Err(e) = d.landing.flushed().await {
            tracing::warn!("writing the downloaded blob failed, not caching it: {e}");
            self.metrics.commit_failures.inc();
            return false;
        }
        // librqbit checked every piece against the torrent; the digest is checked here unless
        // a client stream hashed the whole file. One still sending the tail is waited for:
        // hashing the file again beside it doubled the CPU at the end of every download, and
        // with 8 nodes on 2 cores that was a 2 s tail with the network idle (bench/RESULTS.md).
        let until = tokio::time::Instant::now() + STREAM_VERIFY_WAIT;
        loop {
            let ended = d.stream_ended.notified();
            if d.stream_verified.load(Ordering::Relaxed) || d.streams.load(Ordering::Relaxed) == 0 {
                break;
            }
            if tokio::time::timeout_at(until, ended).await.is_err() {
                break;
            }
        }
        let by_stream = d.stream_verified.load(Ordering::Relaxed);
        if !by_stream && let Err(e) = verify_digest(file, digest).await {
            tracing::error!("downloaded blob failed verification, discarding: {e}");
            return false;
        }
        tracing::debug!(by_stream, "blob verified");
        let staged = self.store.temp_path();
        let linked = tokio::fs::hard_link(file, &staged).await;
        if let Err(e) = linked.and(tokio::fs::rename(&staged, &dest).await) {
            tracing::warn!("caching blob failed, serving without caching: {e}");
            self.metrics.commit_failures.inc();
            let _ = tokio::fs::remove_file(&staged).await;
            return false;
        }
        self.record(torrent.clone()).await;
        true
    }

    /// Whether a cached blob's file is as verified: unchanged since (one `stat`), or hashed
    /// again now and found right. One that fails is discarded.
    async fn cached_file_intact(&self, digest: &Digest) -> bool {
        let path = self.store.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(meta) if self.store.unchanged_since_verified(digest, &meta) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        match verify_digest(&path, digest).await {
            Ok(()) => {
                self.store.restamp(digest);
                true
            }
            Err(e) => {
                tracing::error!(digest = %digest, "cached blob changed on disk and no longer matches: {e}");
                self.discard(digest).await;
                false
            }
        }
    }

    /// Drops a cached blob whose file no longer matches its digest.
    async fn discard(&self, digest: &Digest) {
        let Some(t) = self.store.remove(digest) else {
            return;
        };
        tracing::warn!(digest = %digest, "discarding cached blob that failed verification");
        self.swarm.remove(t.info_hash(), false).await;
        for dir in [self.store.blob_dir(), self.store.tmp_dir()] {
            let _ = tokio::fs::remove_file(dir.join(t.file_name())).await;
        }
    }

    async fn record(&self, torrent: Arc<BlobTorrent>) {
        for victim in self.store.insert(torrent) {
            tracing::info!(digest = %victim.digest(), size = victim.size(), "evicting blob");
            self.swarm.remove(victim.info_hash(), false).await;
            for dir in [self.store.blob_dir(), self.store.tmp_dir()] {
                let _ = tokio::fs::remove_file(dir.join(victim.file_name())).await;
            }
        }
    }

    /// A verified body of the blob from upstream that also caches and seeds it (unless the
    /// cache cannot be written, which only costs the caching).
    async fn upstream_body(
        self: &Arc<Self>,
        req: &BlobRequest,
        size_hint: Option<u64>,
    ) -> Result<VerifyingBody, ProxyError> {
        self.metrics.upstream_fetches.inc();
        let resp = self
            .upstream
            .get_blob(&req.registry, &req.name, &req.digest, &req.creds())
            .await?;
        let size = resp
            .content_length()
            .or(size_hint)
            .ok_or_else(|| ProxyError::Io(std::io::Error::other("upstream sent no blob length")))?;
        let mut body = VerifyingBody::new(
            self.clone(),
            req.digest.clone(),
            Some(req.clone()),
            size,
            Source::Upstream { resp, skip: 0 },
        );
        body.tee = Tee::new(self, &req.digest, size).await;
        Ok(body)
    }

    /// Gets a whole blob from upstream into the cache (for Range requests the swarm could not
    /// serve).
    async fn fetch_to_cache(self: &Arc<Self>, req: &BlobRequest) -> Result<(), ProxyError> {
        let mut body = self.upstream_body(req, None).await?;
        body.to_client = false;
        if body.tee.is_none() {
            return Err(ProxyError::Io(std::io::Error::other(
                "cannot write to the cache",
            )));
        }
        while let Some(chunk) = body.next().await {
            chunk.map_err(ProxyError::Io)?;
        }
        Ok(())
    }

    /// Serves a verified blob from disk; a whole-blob GET is re-hashed on the way out.
    async fn serve_file(
        self: &Arc<Self>,
        req: &BlobRequest,
        size: u64,
        range: Option<&str>,
    ) -> Result<Response, ProxyError> {
        let digest = &req.digest;
        let path = self.store.blob_path(digest);
        let file = tokio::fs::File::open(&path).await?;
        let range = match range {
            Some(r) => Some(
                ByteRange::parse(r, size)
                    .map_err(|_| ProxyError::BadRange(r.chars().take(64).collect(), size))?,
            ),
            None => None,
        };
        let status = if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        match range {
            Some(r) if !(r.start == 0 && r.end + 1 == size) => {
                let len = r.end + 1 - r.start;
                let file = file.into_std().await;
                Ok(blob_response(
                    digest,
                    len,
                    status,
                    Some(r.content_range(size)),
                    self.plain_file_body(req, file, r.start, len),
                ))
            }
            // Verified when it was written (or re-read at start) and not changed since: sent
            // as is, at the speed of the disk. The client checks the digest as always.
            _ if self
                .store
                .unchanged_since_verified(digest, &file.metadata().await?) =>
            {
                let cr = range.map(|r| r.content_range(size));
                let body = self.plain_file_body(req, file.into_std().await, 0, size);
                Ok(blob_response(digest, size, status, cr, body))
            }
            // Changed on disk since: re-hashed on the way out, dropped if it no longer matches.
            _ => {
                let mut body = VerifyingBody::new(
                    self.clone(),
                    digest.clone(),
                    None,
                    size,
                    Source::File { file },
                );
                body.image = req.image();
                let cr = range.map(|r| r.content_range(size));
                Ok(blob_response(digest, size, status, cr, body.into_body()))
            }
        }
    }

    /// `len` bytes of a cached file from `start`, counted as served from cache. Each block is
    /// read straight into a pooled buffer by the thread that then writes it to the client
    /// ([`bay_common::runtime::in_place`]): through tokio's file, every block went to a
    /// blocking-pool thread and back and was copied once more, out of tokio's buffer.
    fn plain_file_body(
        self: &Arc<Self>,
        req: &BlobRequest,
        file: std::fs::File,
        start: u64,
        len: u64,
    ) -> Body {
        self.metrics.ledger.served(&req.image(), len);
        let this = self.clone();
        let file = Arc::new(file);
        let pool = self.pool.clone();
        let blocks = futures::stream::try_unfold(start, move |at| {
            let (file, pool) = (file.clone(), pool.clone());
            async move {
                let end = start + len;
                if at >= end {
                    return Ok(None);
                }
                let n = (end - at).min(CACHE_READ) as usize;
                let mut buf = pool.take(n);
                let block = bay_common::runtime::in_place(move || {
                    use std::os::unix::fs::FileExt;
                    file.read_exact_at(buf.as_mut(), at)
                        .map(|()| buf.into_bytes())
                })
                .await?;
                Ok::<_, std::io::Error>(Some((block, at + n as u64)))
            }
        })
        .inspect(move |c| {
            if let Ok(c) = c {
                this.metrics.served(source::CACHE, c.len() as u64);
            }
        });
        Body::from_stream(blocks)
    }

    pub fn stats(&self) -> ProxyStats {
        let m = &self.metrics;
        let (blobs_held, bytes_held) = self.store.usage();
        let cache_hits = m.requests(outcome::CACHE_HIT);
        let swarm = m.requests(outcome::SWARM);
        ProxyStats {
            blobs_served: cache_hits + swarm + m.requests(outcome::UPSTREAM),
            cache_hits,
            swarm_downloads: swarm,
            fallbacks: m.fallbacks_total(),
            bytes_from_peers: m.received_total(source::PEERS),
            bytes_from_trackers: m.received_total(source::TRACKER_SEED),
            bytes_from_upstream: m.received_total(source::UPSTREAM),
            blobs_held,
            bytes_held,
            exchange_bytes_sent: m.exchange_sent.get(),
            exchange_bytes_received: m.exchange_received.get(),
            savings: m.ledger.report(),
        }
    }

    /// The `/metrics` exposition, with the cache readings brought up to date.
    pub fn render_metrics(&self) -> Response {
        self.metrics
            .render(self.store.usage(), self.store.evictions())
    }

    /// Verifies and re-seeds blobs an earlier run left in the cache.
    pub async fn reseed_leftovers(self: Arc<Self>) {
        let leftovers = match self.store.leftovers() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("listing the cache: {e}");
                return;
            }
        };
        for digest in leftovers {
            if self.stop.is_cancelled() {
                return;
            }
            let path = self.store.blob_path(&digest);
            match verify_file(&path, &digest).await {
                Ok(t) => {
                    let t = Arc::new(t);
                    match self
                        .swarm
                        .add(Bytes::from(t.to_metainfo(&[])), self.store.blob_dir())
                        .await
                    {
                        Ok(_) => {
                            self.record(t).await;
                            tracing::info!(digest = %digest, "re-seeding cached blob");
                        }
                        Err(e) => tracing::warn!(digest = %digest, "cannot seed cached blob: {e}"),
                    }
                }
                Err(e) => {
                    tracing::warn!(digest = %digest, "discarding cached blob: {e}");
                    let _ = tokio::fs::remove_file(&path).await;
                }
            }
        }
    }
}

enum Start {
    Refused(Box<bay_common::upstream::Refusal>),
    /// A tracker tried upstream for the blob and failed (502, 504).
    UpstreamFailed {
        status: StatusCode,
        why: String,
    },
    Failed(String),
    /// Finished by another request while this one waited for the torrent.
    Held,
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::Refused(r) => write!(f, "upstream refused: {}", r.status),
            Start::UpstreamFailed { why, .. } => f.write_str(why),
            Start::Failed(why) => f.write_str(why),
            Start::Held => f.write_str("held already"),
        }
    }
}

/// Prefetches running at once, at most.
const MAX_PREFETCHES: usize = 4;

/// The manifests whose blobs are being prefetched.
type Prefetching = Arc<Mutex<std::collections::HashSet<Digest>>>;

/// A running prefetch of a manifest's blobs, until both its tasks end.
struct PrefetchGuard {
    running: Prefetching,
    manifest: Digest,
}

impl PrefetchGuard {
    fn enter(running: &Prefetching, manifest: &Digest) -> Option<Arc<PrefetchGuard>> {
        let mut set = running.lock().expect("poisoned");
        if set.contains(manifest) || set.len() >= MAX_PREFETCHES {
            return None;
        }
        set.insert(manifest.clone());
        Some(Arc::new(PrefetchGuard {
            running: running.clone(),
            manifest: manifest.clone(),
        }))
    }
}

impl Drop for PrefetchGuard {
    fn drop(&mut self) {
        self.running
            .lock()
            .expect("poisoned")
            .remove(&self.manifest);
    }
}

/// (bytes from the trackers, bytes from other peers) of a torrent so far.
fn peer_bytes(handle: &Handle, webseed: &WebSeed) -> (u64, u64) {
    let Some(live) = handle.live() else {
        return (0, 0);
    };
    let all = serde_json::from_str(r#"{"state":"all"}"#).expect("valid filter");
    let snap = live.per_peer_stats_snapshot(all);
    let mut out = (0, 0);
    for (addr, s) in snap.peers {
        let c = &s.counters;
        if c.fetched_bytes > 0 || c.times_i_stole > 0 || c.times_stolen_from_me > 0 {
            tracing::debug!(
                peer = %addr,
                fetched = c.fetched_bytes,
                pieces = c.downloaded_and_checked_pieces,
                piece_ms = c.total_piece_download_ms / u64::from(c.downloaded_and_checked_pieces.max(1)),
                stole = c.times_i_stole,
                stolen = c.times_stolen_from_me,
                "peer"
            );
        }
        if addr
            .parse::<SocketAddr>()
            .is_ok_and(|a| webseed.is_ours(&a))
        {
            out.0 += s.counters.fetched_bytes;
        } else {
            out.1 += s.counters.fetched_bytes;
        }
    }
    out
}

fn blob_response(
    digest: &Digest,
    len: u64,
    status: StatusCode,
    content_range: Option<String>,
    body: Body,
) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let d = HeaderValue::from_str(&digest.to_string()).expect("digests are ascii");
    h.insert("docker-content-digest", d.clone());
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{digest}\"")).expect("ascii"),
    );
    if let Some(cr) = content_range {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&cr).expect("ascii"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetches_are_one_per_manifest_and_capped() {
        let running = Arc::default();
        let manifest = |i: u8| Digest::sha256_of(&[i]);
        let guards: Vec<_> = (0..MAX_PREFETCHES as u8)
            .map(|i| PrefetchGuard::enter(&running, &manifest(i)).expect("under the cap"))
            .collect();
        assert!(
            PrefetchGuard::enter(&running, &manifest(0)).is_none(),
            "a second prefetch of one manifest"
        );
        let over = manifest(MAX_PREFETCHES as u8);
        assert!(
            PrefetchGuard::enter(&running, &over).is_none(),
            "a prefetch over the cap"
        );
        drop(guards.into_iter().next());
        assert!(
            PrefetchGuard::enter(&running, &over).is_some(),
            "a slot freed"
        );
        assert!(
            PrefetchGuard::enter(&running, &manifest(0)).is_some(),
            "the manifest whose prefetch ended"
        );
    }

    #[test]
    fn only_a_storm_of_steals_cuts_the_wait_for_a_stalled_swarm_short() {
        let stall = Duration::from_secs(5);
        let s = Duration::from_secs;
        assert!(storm_stalled(s(6), stall, STEAL_STORM));
        assert!(
            !storm_stalled(s(4), stall, 25_000),
            "not stalled long enough"
        );
        assert!(
            !storm_stalled(s(29), stall, 40),
            "a few steals: a slow swarm, waited for"
        );
    }

    #[test]
    fn blob_headers() {
        let d = Digest::sha256_of(b"x");
        let r = blob_response(
            &d,
            10,
            StatusCode::PARTIAL_CONTENT,
            Some("bytes 0-9/20".into()),
            Body::empty(),
        );
        let h = r.headers();
        assert_eq!(h["content-length"], "10");
        assert_eq!(h["docker-content-digest"], d.to_string().as_str());
        assert_eq!(h["content-range"], "bytes 0-9/20");
        assert_eq!(h["content-type"], "application/octet-stream");
    }
}

//! The proxy's Prometheus metrics (`GET /metrics`) and the per-image ledger behind the
//! savings in `GET /_bay/stats`: where the bytes of every blob came from, and why a download
//! went upstream instead of to the swarm.

use std::sync::Mutex;

use bay_common::metrics::prometheus_client::metrics::counter::Counter;
use bay_common::metrics::prometheus_client::metrics::family::Family;
use bay_common::metrics::prometheus_client::metrics::gauge::Gauge;
use bay_common::metrics::prometheus_client::registry::Registry;
use bay_common::metrics::{Ledger, Outcome, Reason, Source, catch_up};

/// How a blob GET was answered (`bay_blob_requests_total{outcome}`).
pub mod outcome {
    pub const CACHE_HIT: &str = "cache_hit";
    pub const SWARM: &str = "swarm";
    pub const UPSTREAM: &str = "upstream";
    pub const REFUSED: &str = "refused";
    pub const FAILED: &str = "failed";
}

/// Where the bytes sent to a client came from (`bay_blob_bytes_served_total{source}`) or
/// where this node received bytes from (`bay_blob_bytes_received_total{source}`).
pub mod source {
    pub const CACHE: &str = "cache";
    pub const SWARM: &str = "swarm";
    pub const PEERS: &str = "peers";
    pub const TRACKER_SEED: &str = "tracker_seed";
    pub const UPSTREAM: &str = "upstream";
}

/// Why bytes came from upstream instead of the swarm (`bay_fallbacks_total{reason}`).
pub mod reason {
    /// No tracker answered with a torrent (all down, or refused for a non-auth reason).
    pub const NO_TORRENT: &str = "no_torrent";
    /// The torrent could not be added or read (e.g. a full disk).
    pub const SWARM_UNUSABLE: &str = "swarm_unusable";
    /// No piece arrived for `--stall-timeout`.
    pub const STALL: &str = "stall";
    /// Reading from the swarm failed mid-stream.
    pub const SWARM_ERROR: &str = "swarm_error";
    /// A Range request whose swarm download did not end verified.
    pub const RANGE: &str = "range";
}

pub struct Metrics {
    registry: Registry,
    scrape: Mutex<()>,
    pub requests: Family<Outcome, Counter>,
    pub served: Family<Source, Counter>,
    pub received: Family<Source, Counter>,
    pub fallbacks: Family<Reason, Counter>,
    pub upstream_fetches: Counter,
    pub tracker_continuations: Counter,
    pub swarm_rejoins: Counter,
    pub swarm_downloads: Family<Outcome, Counter>,
    pub prefetches: Counter,
    pub commit_failures: Counter,
    pub exchange_sent: Counter,
    pub exchange_received: Counter,
    cache_blobs: Gauge,
    cache_bytes: Gauge,
    evictions: Counter,
    pub ledger: Ledger,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let requests = Family::<Outcome, Counter>::default();
        let served = Family::<Source, Counter>::default();
        let received = Family::<Source, Counter>::default();
        let fallbacks = Family::<Reason, Counter>::default();
        let upstream_fetches = Counter::default();
        let tracker_continuations = Counter::default();
        let swarm_rejoins = Counter::default();
        let swarm_downloads = Family::<Outcome, Counter>::default();
        let prefetches = Counter::default();
        let commit_failures = Counter::default();
        let exchange_sent = Counter::default();
        let exchange_received = Counter::default();
        let cache_blobs = Gauge::default();
        let cache_bytes = Gauge::default();
        let evictions = Counter::default();
        r.register(
            "bay_blob_requests",
            "Blob GETs, by outcome (cache_hit, swarm, upstream, refused, failed)",
            requests.clone(),
        );
        r.register(
            "bay_blob_bytes_served",
            "Blob bytes sent to clients, by where they came from (cache, swarm, upstream)",
            served.clone(),
        );
        r.register(
            "bay_blob_bytes_received",
            "Blob bytes this node received, by sender (peers, tracker_seed, upstream)",
            received.clone(),
        );
        r.register(
            "bay_fallbacks",
            "Blob downloads (or their remainders) taken from upstream instead of the swarm, by \
             reason (no_torrent, swarm_unusable, stall, swarm_error, range)",
            fallbacks.clone(),
        );
        r.register(
            "bay_upstream_fetches",
            "Blob GETs this proxy sent upstream",
            upstream_fetches.clone(),
        );
        r.register(
            "bay_tracker_continuations",
            "Client streams whose rest a tracker holding the blob sent after the swarm stalled \
             (instead of upstream)",
            tracker_continuations.clone(),
        );
        r.register(
            "bay_swarm_rejoins",
            "Client streams that continued from a tracker and went back to this node's own copy \
             (its download or the cached blob) once that was ahead of them",
            swarm_rejoins.clone(),
        );
        r.register(
            "bay_swarm_downloads",
            "Swarm downloads that ended, by outcome (cached, failed)",
            swarm_downloads.clone(),
        );
        r.register(
            "bay_prefetches",
            "Swarm downloads started because an image manifest named the blob, before any \
             client asked for it",
            prefetches.clone(),
        );
        r.register(
            "bay_cache_commit_failures",
            "Blobs that could not be cached: a verified blob from upstream or a finished swarm \
             download that could not be written or moved into the cache (the client got it; \
             the log says why)",
            commit_failures.clone(),
        );
        r.register(
            "bay_exchange_bytes_sent",
            "Bytes of pieces read early that this node passed on to other nodes while a tracker \
             fetched the blob",
            exchange_sent.clone(),
        );
        r.register(
            "bay_exchange_bytes_received",
            "Bytes of pieces other nodes passed on to this one while a tracker fetched the blob \
             (checked once the torrent came)",
            exchange_received.clone(),
        );
        r.register(
            "bay_cache_blobs",
            "Blobs held in the cache and seeded",
            cache_blobs.clone(),
        );
        r.register(
            "bay_cache_bytes",
            "Bytes of blobs held in the cache",
            cache_bytes.clone(),
        );
        r.register(
            "bay_cache_evictions",
            "Blobs evicted to stay under --cache-size",
            evictions.clone(),
        );
        Self {
            registry: r,
            scrape: Mutex::new(()),
            requests,
            served,
            received,
            fallbacks,
            upstream_fetches,
            tracker_continuations,
            swarm_rejoins,
            swarm_downloads,
            prefetches,
            commit_failures,
            exchange_sent,
            exchange_received,
            cache_blobs,
            cache_bytes,
            evictions,
            ledger: Ledger::default(),
        }
    }
}

impl Metrics {
    /// `usage`: (blobs, bytes) held now; `evictions` since start.
    pub fn render(&self, usage: (u64, u64), evictions: u64) -> axum::response::Response {
        let _one = self.scrape.lock().expect("scrape lock poisoned");
        self.cache_blobs.set(usage.0 as i64);
        self.cache_bytes.set(usage.1 as i64);
        catch_up(&self.evictions, evictions);
        bay_common::metrics::render(&self.registry)
    }

    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn requests(&self, outcome: &'static str) -> u64 {
        self.requests
            .get(&Outcome { outcome })
            .map_or(0, |c| c.get())
    }

    pub fn served(&self, source: &'static str, bytes: u64) {
        self.served.get_or_create(&Source { source }).inc_by(bytes);
    }

    pub fn received(&self, source: &'static str, bytes: u64) {
        self.received
            .get_or_create(&Source { source })
            .inc_by(bytes);
    }

    pub fn received_total(&self, source: &'static str) -> u64 {
        self.received.get(&Source { source }).map_or(0, |c| c.get())
    }

    pub fn fallback(&self, reason: &'static str) {
        self.fallbacks.get_or_create(&Reason { reason }).inc();
    }

    pub fn fallbacks_total(&self) -> u64 {
        let mut n = 0;
        for reason in [
            reason::NO_TORRENT,
            reason::SWARM_UNUSABLE,
            reason::STALL,
            reason::SWARM_ERROR,
            reason::RANGE,
        ] {
            n += self
                .fallbacks
                .get(&Reason { reason })
                .map_or(0, |c| c.get());
        }
        n
    }
}

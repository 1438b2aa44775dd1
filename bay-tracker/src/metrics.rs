//! The tracker's Prometheus metrics (`GET /metrics`) and the per-image ledger behind the
//! savings in `GET /v1/stats`.
//!
//! Counters move where the work happens; what is a reading of state (blobs held, peers,
//! bytes the seed uploaded) is brought up to date when scraped.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;

use bay_common::Digest;

use bay_common::metrics::prometheus_client::encoding::EncodeLabelSet;
use bay_common::metrics::prometheus_client::metrics::counter::Counter;
use bay_common::metrics::prometheus_client::metrics::family::Family;
use bay_common::metrics::prometheus_client::metrics::gauge::Gauge;
use bay_common::metrics::prometheus_client::registry::Registry;
use bay_common::metrics::{Ledger, Outcome, catch_up};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Event {
    pub event: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Serialises scrapes, which bring the state readings up to date.
    scrape: Mutex<()>,
    pub upstream_fetches: Family<Outcome, Counter>,
    pub upstream_bytes: Counter,
    /// Blob bytes a fetch read from nodes' early reads instead of upstream (`crate::offers`).
    pub node_bytes: Counter,
    /// Fetches waiting for a slot under `--upstream-concurrency`.
    pub upstream_queued: Gauge,
    pub torrent_requests: Family<Outcome, Counter>,
    pub announces: Family<Event, Counter>,
    pub scrapes: Counter,
    peers: Gauge,
    torrents: Gauge,
    blobs_held: Gauge,
    cache_bytes: Gauge,
    evictions: Counter,
    seed_uploaded: Counter,
    /// Blob bytes proxies' web seeds read over HTTP.
    pub piece_bytes: Counter,
    /// The part of `piece_bytes` read while the blob was still being fetched.
    pub early_bytes: Counter,
    /// Held blobs dropped because a piece read for a proxy no longer matched the torrent.
    pub damaged_blobs: Counter,
    pub ledger: Ledger,
    /// (proxy, blob) pairs already counted as served, so a proxy asking again for the same
    /// torrent (its stall recovery) does not count the blob twice.
    handed_out: Mutex<HashSet<(IpAddr, Digest)>>,
}

/// Pairs remembered in `handed_out`; past this the set starts again (a rare double count
/// beats unbounded memory).
const MAX_HANDED_OUT: usize = 1 << 16;

/// State read at scrape time.
pub struct Readings {
    pub peers: u64,
    pub swarms: u64,
    pub blobs_held: u64,
    pub bytes_held: u64,
    pub evictions: u64,
    pub seed_uploaded: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let upstream_fetches = Family::<Outcome, Counter>::default();
        let upstream_bytes = Counter::default();
        let node_bytes = Counter::default();
        let upstream_queued = Gauge::default();
        let torrent_requests = Family::<Outcome, Counter>::default();
        let announces = Family::<Event, Counter>::default();
        let scrapes = Counter::default();
        let peers = Gauge::default();
        let torrents = Gauge::default();
        let blobs_held = Gauge::default();
        let cache_bytes = Gauge::default();
        let evictions = Counter::default();
        let seed_uploaded = Counter::default();
        let piece_bytes = Counter::default();
        let early_bytes = Counter::default();
        let damaged_blobs = Counter::default();
        registry.register(
            "bay_upstream_fetches",
            "Blob fetches from upstream registries, by outcome (ok, failed)",
            upstream_fetches.clone(),
        );
        registry.register(
            "bay_upstream_bytes",
            "Blob bytes received from upstream registries",
            upstream_bytes.clone(),
        );
        registry.register(
            "bay_node_bytes",
            "Blob bytes a fetch read from the pieces nodes offered (what a tracker that died mid-fetch had fetched) instead of from upstream",
            node_bytes.clone(),
        );
        registry.register(
            "bay_upstream_queued_fetches",
            "Upstream fetches waiting for a slot under --upstream-concurrency",
            upstream_queued.clone(),
        );
        registry.register(
            "bay_torrent_requests",
            "Torrent requests from proxies, by outcome (ok, refused, not_held, failed)",
            torrent_requests.clone(),
        );
        registry.register(
            "bay_announce_requests",
            "BitTorrent announces, by event (started, completed, stopped, none, invalid)",
            announces.clone(),
        );
        registry.register("bay_scrape_requests", "BitTorrent scrapes", scrapes.clone());
        registry.register(
            "bay_peers",
            "Peers currently in the tracker's swarms",
            peers.clone(),
        );
        registry.register(
            "bay_torrents",
            "Torrents with peers currently announcing",
            torrents.clone(),
        );
        registry.register(
            "bay_cache_blobs",
            "Blobs held and seeded",
            blobs_held.clone(),
        );
        registry.register(
            "bay_cache_bytes",
            "Bytes of blobs held and seeded",
            cache_bytes.clone(),
        );
        registry.register(
            "bay_cache_evictions",
            "Blobs evicted to stay under --cache-size",
            evictions.clone(),
        );
        registry.register(
            "bay_seed_uploaded_bytes",
            "Bytes the tracker's BitTorrent seed uploaded to peers",
            seed_uploaded.clone(),
        );
        registry.register(
            "bay_piece_bytes_served",
            "Blob bytes served to proxies' web seeds over HTTP (GET /v1/pieces/...)",
            piece_bytes.clone(),
        );
        registry.register(
            "bay_early_bytes_served",
            "The part of bay_piece_bytes_served that proxies read while the blob was still being fetched from upstream (GET /v1/early/...)",
            early_bytes.clone(),
        );
        registry.register(
            "bay_damaged_blobs",
            "Held blobs dropped because a piece read from disk no longer matched the torrent",
            damaged_blobs.clone(),
        );
        Self {
            registry,
            scrape: Mutex::new(()),
            upstream_fetches,
            upstream_bytes,
            node_bytes,
            upstream_queued,
            torrent_requests,
            announces,
            scrapes,
            peers,
            torrents,
            blobs_held,
            cache_bytes,
            evictions,
            seed_uploaded,
            piece_bytes,
            early_bytes,
            damaged_blobs,
            ledger: Ledger::default(),
            handed_out: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn render(&self, now: Readings) -> axum::response::Response {
        let _one = self.scrape.lock().expect("scrape lock poisoned");
        self.peers.set(now.peers as i64);
        self.torrents.set(now.swarms as i64);
        self.blobs_held.set(now.blobs_held as i64);
        self.cache_bytes.set(now.bytes_held as i64);
        catch_up(&self.evictions, now.evictions);
        catch_up(&self.seed_uploaded, now.seed_uploaded);
        bay_common::metrics::render(&self.registry)
    }

    /// Records a torrent handed to the proxy at `to` in the savings ledger, once per proxy and
    /// blob.
    pub fn handed_out(&self, image: &str, to: IpAddr, digest: &Digest, size: u64) {
        let mut seen = self.handed_out.lock().expect("ledger poisoned");
        if seen.len() >= MAX_HANDED_OUT {
            seen.clear();
        }
        if seen.insert((to, digest.clone())) {
            self.ledger.served(image, size);
        }
    }

    pub fn upstream_fetch(&self, outcome: &'static str) {
        self.upstream_fetches
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    pub fn fetches_ok(&self) -> u64 {
        self.upstream_fetches
            .get(&Outcome { outcome: "ok" })
            .map_or(0, |c| c.get())
    }
}

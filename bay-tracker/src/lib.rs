//! bay-tracker: fetches blobs from allowlisted upstream registries once, verifies them, seeds
//! them as deterministic torrents, and runs the announce endpoint proxies swarm through.

pub mod announce;
pub mod config;
pub mod error;
pub mod fetch;
pub mod limit;
pub mod metrics;
pub mod offers;
pub mod pieces;
pub mod preheat;
pub mod routes;
pub mod seeder;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bay_common::upstream::{UpstreamClient, UpstreamOptions};
use tokio::net::TcpListener;
use tracing::Instrument;

pub use config::Config;

/// Runs the tracker on an already bound listener until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let congestion = bay_common::serve::set_congestion_control(&listener, &config.tcp_congestion)
        .map_err(|e| anyhow::anyhow!("--tcp-congestion: {e}"))?
        .unwrap_or_else(|| "the host's".into());
    let store = Arc::new(
        bay_common::store::Store::open(&config.data_dir, config.cache_size)
            .with_context(|| format!("opening data dir {}", config.data_dir.display()))?,
    );
    let peer_listen = SocketAddr::new(config.listen.ip(), config.peer_port);
    let seeder = Arc::new(
        seeder::Seeder::start(
            peer_listen,
            store.blob_dir(),
            &config.data_dir.join("seed-state"),
            config.seed_fast_resume,
            config.upload_limit,
        )
        .await
        .with_context(|| format!("starting the BitTorrent seed on {peer_listen}"))?,
    );
    let upstream = Arc::new(UpstreamClient::new(UpstreamOptions::with_timeout(
        config.upstream_timeout,
    ))?);
    let metrics = Arc::new(metrics::Metrics::default());
    let limits = limit::UpstreamLimits::new(config.upstream_concurrency, config.upstream_rate);
    let blobs = Arc::new(fetch::Blobs::new(
        store.clone(),
        seeder.clone(),
        upstream,
        metrics.clone(),
        limits,
        offers::Offers::new().context("building the client that reads pieces nodes offer")?,
    ));
    let preheats = Arc::new(preheat::Preheats::new(config.clone(), blobs.clone()));
    let pieces = Arc::new(pieces::Pieces::new(
        blobs.clone(),
        config.upload_limit,
        metrics.clone(),
    ));
    let state = Arc::new(routes::AppState {
        config: config.clone(),
        blobs: blobs.clone(),
        swarms: announce::Swarms::default(),
        slots: announce::Slots::default(),
        metrics,
        ready: Default::default(),
        preheat: preheats.clone(),
        pieces,
        early_slots: announce::Slots::default(),
    });
    tracing::info!(
        http = %listener.local_addr()?,
        peers = ?seeder.listen_addr(),
        upstreams = ?config.upstreams.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        announce = %config.announce_url(),
        tcp_congestion = %congestion,
        "bay-tracker listening"
    );

    let tasks = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    tasks.spawn({
        let state = state.clone();
        let stop = stop.clone();
        async move {
            reseed_leftovers(blobs, stop).await;
            state
                .ready
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        .instrument(tracing::info_span!("reseed"))
    });
    tasks
        .spawn(expire_peers(state.clone(), stop.clone()).instrument(tracing::info_span!("expire")));

    let drain = Duration::from_secs(config.drain_timeout);
    let result = bay_common::serve::serve(listener, routes::app(state), shutdown, drain).await;
    preheats.shutdown().await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    seeder.stop().await;
    if let Err(e) = store.clear_tmp() {
        tracing::warn!("emptying {}: {e}", store.tmp_dir().display());
    }
    result.context("serving HTTP")
}

/// Verifies and re-seeds what an earlier run left in the data dir, oldest first, so the
/// least-recently-used order survives a restart.
async fn reseed_leftovers(blobs: Arc<fetch::Blobs>, stop: tokio_util::sync::CancellationToken) {
    let leftovers = match blobs.store.leftovers() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("listing the blob dir: {e}");
            return;
        }
    };
    if leftovers.is_empty() {
        return;
    }
    tracing::info!(
        count = leftovers.len(),
        "verifying blobs left by an earlier run"
    );
    for digest in leftovers {
        if stop.is_cancelled() {
            return;
        }
        // Re-hashing a big blob takes a while: shutdown must not wait for it.
        let verified = tokio::select! {
            _ = stop.cancelled() => return,
            v = blobs.ensure(&digest, None) => v,
        };
        match verified {
            Ok(t) => tracing::info!(digest = %digest, size = t.size(), "re-seeding blob"),
            Err(e) => tracing::warn!(digest = %digest, "blob left on disk not re-seeded: {e}"),
        }
    }
}

async fn expire_peers(state: Arc<routes::AppState>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                state.swarms.expire(Instant::now());
                state.slots.expire(Instant::now());
                state.early_slots.expire(Instant::now());
            }
        }
    }
}

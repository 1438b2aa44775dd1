//! bay-proxy: a registry proxy for one machine whose blob GETs come from the BitTorrent swarm
//! of bay-trackers and other proxies, and everything else straight from upstream.

pub mod blob;
pub mod config;
pub mod early;
pub mod error;
pub mod exchange;
pub mod landing;
pub mod metrics;
pub mod passthrough;
pub mod peer_wire;
pub mod prefetch;
pub mod route;
pub mod routes;
pub mod swarm;
pub mod trackers;
pub mod wake;
pub mod webseed;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bay_common::store::Store;
use bay_common::upstream::{UpstreamClient, UpstreamOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::Config;

/// Runs the proxy on an already bound listener until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let store = Arc::new(
        Store::open(&config.data_dir, config.cache_size)
            .with_context(|| format!("opening data dir {}", config.data_dir.display()))?,
    );
    let trackers = Arc::new(trackers::Trackers::new(config.trackers.clone())?);
    let swarm = Arc::new(
        swarm::Swarm::start(
            config.peer_port,
            store.tmp_dir(),
            trackers.announce_urls(),
            config.upload_limit,
            swarm::Tuning {
                request_window: config.request_window.into(),
                peer_limit: config.peer_limit.into(),
            },
        )
        .await
        .with_context(|| format!("starting BitTorrent on port {}", config.peer_port))?,
    );
    let upstream = Arc::new(UpstreamClient::new(UpstreamOptions::with_timeout(
        config.upstream_timeout,
    ))?);
    let stop = CancellationToken::new();
    let blobs = blob::Blobs::new(
        store.clone(),
        swarm.clone(),
        trackers.clone(),
        upstream,
        config.stall_timeout(),
        landing::Writer::start().context("starting the writer thread")?,
        stop.clone(),
    )
    .early_reads(config.early_reads);
    let exchange = match config.early_reads {
        true => Some(
            exchange::Exchange::bind(
                config.exchange_port,
                blobs.metrics.exchange_received.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot listen on port {} (--exchange-port)",
                    config.exchange_port
                )
            })?,
        ),
        false => None,
    };
    let blobs = Arc::new(blobs.exchange(exchange.as_ref().map(|(x, _)| x.clone())));
    let state = Arc::new(routes::AppState {
        config: config.clone(),
        blobs: blobs.clone(),
        passthrough: passthrough::Passthrough::new()?,
        ready: Default::default(),
    });
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
            tracing::info!(metrics_listen = %l.local_addr()?, "serving metrics");
            let done = stop.clone();
            Some(tokio::spawn(bay_common::serve::serve(
                l,
                routes::metrics_app(state.clone()),
                async move { done.cancelled().await },
                Duration::ZERO,
            )))
        }
        None => None,
    };
    let exchange_server = exchange.map(|(x, l)| {
        let done = stop.clone();
        tracing::info!(exchange_port = x.port(), "passing early pieces on");
        tokio::spawn(bay_common::serve::serve(
            l,
            exchange::app(blobs.clone()),
            async move { done.cancelled().await },
            Duration::ZERO,
        ))
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        peer_port = config.peer_port,
        trackers = ?config.trackers.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        upstreams = ?config.upstreams.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "bay-proxy listening"
    );
    let reseed = tokio::spawn({
        let state = state.clone();
        let blobs = blobs.clone();
        async move {
            blobs.reseed_leftovers().await;
            state
                .ready
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        .instrument(tracing::info_span!("reseed"))
    });
    let drain = Duration::from_secs(config.drain_timeout);
    let result = bay_common::serve::serve(listener, routes::app(state), shutdown, drain).await;
    // Downloads stop (a finished one is still cached), librqbit stops announcing, then the
    // trackers hear that this node left every swarm and nothing partial stays on disk.
    let leaving = swarm.stopped_announces();
    stop.cancel();
    reseed.abort();
    for server in [metrics_server, exchange_server].into_iter().flatten() {
        let _ = server.await;
    }
    blobs.wait_downloads(Duration::from_secs(2)).await;
    swarm.stop().await;
    let told = trackers
        .announce_events(&leaving, Duration::from_secs(2))
        .await;
    if let Err(e) = store.clear_tmp() {
        tracing::warn!("emptying {}: {e}", store.tmp_dir().display());
    }
    tracing::info!(torrents = leaving.len(), announces = told, "stopped");
    result.context("serving HTTP")
}

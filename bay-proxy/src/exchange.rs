//! Pieces read early, passed on between nodes while the tracker still fetches the blob.
//!
//! Each piece leaves the tracker early once, to one node (`crate::early`). When the fetch
//! ends, a node of N then holds 1/N of the blob, and getting the rest from the others takes
//! almost as long again as the fetch took (`bench/RESULTS.md`, "Slices read while the tracker
//! fetches"). So each node also serves the pieces it holds on its exchange port, and reads the
//! pieces the others hold from them as they come: the nodes' links carry the blob during the
//! fetch instead of after it. No torrent exists yet, so nothing here is checked; the web seed
//! offers the pieces to librqbit, which checks each against the torrent once it comes.
//! Anyone who can derive the info hash can download the same bytes from the swarm, and this
//! serves nothing else.
//!
//! The port also serves the pieces librqbit verified of a download in progress: a tracker that
//! takes over the fetch of a blob whose only holder died or hangs reads them back from the
//! nodes instead of from upstream (`bay-tracker/src/offers.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bay_common::Digest;
use bay_common::metrics::prometheus_client::metrics::counter::Counter;
use bay_common::pool::Pool;
use bytes::Bytes;
use tokio::net::TcpListener;

use crate::blob::Blobs;
use crate::error::{ProxyError, chain};

/// Connecting to another node: they are on the same network; one that cannot be reached is
/// left alone a moment (`crate::early`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Between reads of a piece's bytes; the serving node waits up to 10 s for the piece itself.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a piece could not be read from another node.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The node answered: it does not hold the piece (yet).
    #[error("answered {0}")]
    NotHeld(reqwest::StatusCode),
    /// The node could not be reached, or its answer broke off.
    #[error("{0}")]
    Unreachable(String),
    /// The node sent something other than the piece.
    #[error("{0}")]
    Bad(String),
}

/// This node's side of passing pieces on: its port, and the client that reads from others.
pub struct Exchange {
    port: u16,
    client: reqwest::Client,
    received: Counter,
}

impl Exchange {
    /// Listens on `port` of every interface (0: a port the system picks).
    pub async fn bind(
        port: u16,
        received: Counter,
    ) -> std::io::Result<(Arc<Exchange>, TcpListener)> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(2)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?;
        let port = listener.local_addr()?.port();
        Ok((
            Arc::new(Exchange {
                port,
                client,
                received,
            }),
            listener,
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Reads piece `p` (`want` bytes) of a blob from the node at `node`.
    pub async fn read(
        &self,
        node: SocketAddr,
        digest: &Digest,
        p: u32,
        want: usize,
        pool: &Arc<Pool>,
    ) -> Result<Bytes, ExchangeError> {
        let url = format!("http://{node}{}", bay_common::api::exchange_path(digest, p));
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| ExchangeError::Unreachable(chain(&e)))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(ExchangeError::NotHeld(resp.status()));
        }
        crate::early::fill(resp, want, pool)
            .await
            .map_err(ExchangeError::Bad)
    }

    /// Counts bytes read from other nodes.
    pub fn count_in(&self, n: u64) {
        self.received.inc_by(n);
    }
}

/// The exchange port's one route: `GET /v1/exchange/<digest>/<piece>`.
pub fn app(blobs: Arc<Blobs>) -> Router {
    Router::new()
        .route("/v1/exchange/{digest}/{piece}", get(piece))
        .with_state(blobs)
}

async fn piece(
    State(blobs): State<Arc<Blobs>>,
    Path((digest, piece)): Path<(String, String)>,
) -> Response {
    let not_held = || ProxyError::PieceNotHeld {
        digest: digest.chars().take(80).collect(),
        piece: piece.chars().take(16).collect(),
    };
    let d: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return ProxyError::BadDigest(e).into_response(),
    };
    let Ok(p) = piece.parse::<u32>() else {
        return not_held().into_response();
    };
    let early = match blobs.early_holding(&d) {
        Some(holding) => holding.piece(p).await,
        None => None,
    };
    let piece = match early {
        Some(data) => Some(data),
        None => blobs.landed_piece(&d, p).await,
    };
    match piece {
        Some(data) => {
            blobs.metrics.exchange_sent.inc_by(data.len() as u64);
            data.into_response()
        }
        None => not_held().into_response(),
    }
}

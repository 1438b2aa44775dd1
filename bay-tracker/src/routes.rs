//! HTTP surface: torrents for proxies, the BitTorrent announce and scrape endpoints, health and
//! stats. Handlers parse, call a service, and map errors; the work lives elsewhere.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bay_common::announce::{self, AnnounceRequest};
use bay_common::api::{Held, INFO_HASH_HEADER, TORRENT_CONTENT_TYPE, TrackerStats};
use bay_common::metrics::Outcome;
use bay_common::upstream::Credentials;
use bay_common::{Digest, RepositoryName};
use tracing::Instrument;

use crate::announce::Swarms;
use crate::config::Config;
use crate::error::TrackerError;
use crate::fetch::{Blobs, Source};
use crate::metrics::{Event, Metrics, Readings};

pub struct AppState {
    pub config: Config,
    pub blobs: Arc<Blobs>,
    pub swarms: Swarms,
    pub slots: crate::announce::Slots,
    pub metrics: Arc<Metrics>,
    /// Set once blobs left by an earlier run are verified and seeded again.
    pub ready: AtomicBool,
    pub preheat: Arc<crate::preheat::Preheats>,
    pub pieces: Arc<crate::pieces::Pieces>,
    /// Slices of blobs still being fetched, by digest.
    pub early_slots: crate::announce::Slots<Digest>,
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/torrents/{*path}", get(torrent))
        .route("/announce", get(announce))
        .route("/scrape", get(scrape))
        .route("/v1/slots/{info_hash}", get(slot))
        .route("/v1/pieces/{info_hash}", get(pieces))
        .route("/v1/early/{*path}", get(early))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .merge(crate::preheat::router(state.preheat.clone()))
        .fallback(not_found)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Splits `<registry>/<name...>/blobs/<digest>`; the name may itself contain `blobs`.
fn split_torrent_path(path: &str) -> Result<(&str, &str, &str), TrackerError> {
    let bad = || TrackerError::BadPath(path.chars().take(256).collect());
    let (registry, rest) = path.split_once('/').ok_or_else(bad)?;
    let (name, digest) = rest.rsplit_once("/blobs/").ok_or_else(bad)?;
    if registry.is_empty() || name.is_empty() || digest.is_empty() {
        return Err(bad());
    }
    Ok((registry, name, digest))
}

/// What a caller of `GET /v1/torrents/…` holds of the blob from an early read
/// (`bay_common::api::Held`).
#[derive(serde::Deserialize)]
struct HeldQuery {
    exchange: Option<u16>,
    size: Option<u64>,
    held: Option<String>,
}

impl HeldQuery {
    fn parse(self) -> Result<Option<Held>, TrackerError> {
        match (self.exchange, self.size, self.held) {
            (None, None, None) => Ok(None),
            (Some(x), Some(size), Some(held)) => Held::parse(x, size, &held)
                .map(Some)
                .map_err(TrackerError::BadRequest),
            _ => Err(TrackerError::BadRequest(
                "exchange=, size= and held= come together".into(),
            )),
        }
    }
}

async fn torrent(
    State(state): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<bay_common::serve::Conn>,
    Path(path): Path<String>,
    query: Result<axum::extract::Query<HeldQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let held = match query {
        Ok(q) => q.0.parse(),
        Err(e) => Err(TrackerError::BadRequest(e.body_text())),
    };
    let held = match held {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    // Offered pieces are read back from the caller's own address only.
    let offer = held.map(|h| (peer_addr(conn.remote, h.exchange), h));
    match torrent_inner(&state, &path, &headers, conn, offer).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn torrent_inner(
    state: &Arc<AppState>,
    path: &str,
    headers: &HeaderMap,
    conn: bay_common::serve::Conn,
    offer: Option<(SocketAddr, Held)>,
) -> Result<Response, ErrorResponse> {
    let (digest, source) = source_of(state, path, headers)?;
    let span = tracing::info_span!("torrent", digest = %digest, repo = %source.name,
        registry = %source.registry);
    let image = format!("{}/{}", source.registry.authority(), source.name);
    let result = if only_if_cached(headers) {
        state
            .blobs
            .torrent_if_held(source, &digest)
            .instrument(span)
            .await
    } else {
        state
            .blobs
            .torrent_for(source, &digest, offer)
            .instrument(span)
            .await
    };
    let torrent = match result {
        Ok(t) => t,
        Err(e) => {
            let outcome = match *e {
                TrackerError::Refused(_) => "refused",
                TrackerError::NotHeld(_) => "not_held",
                _ => "failed",
            };
            state
                .metrics
                .torrent_requests
                .get_or_create(&Outcome { outcome })
                .inc();
            return Err(ErrorResponse::Shared(e));
        }
    };
    state
        .metrics
        .torrent_requests
        .get_or_create(&Outcome { outcome: "ok" })
        .inc();
    state
        .metrics
        .handed_out(&image, conn.remote.ip(), &digest, torrent.size());
    let body = torrent.to_metainfo(&[state.config.announce_url()]);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(TORRENT_CONTENT_TYPE),
            ),
            (
                header::HeaderName::from_static(INFO_HASH_HEADER),
                HeaderValue::from_str(&torrent.info_hash().to_hex()).expect("hex is ascii"),
            ),
        ],
        body,
    )
        .into_response())
}

/// The blob and where it comes from, for `<registry>/<name>/blobs/<digest>` and the caller's
/// credentials; only configured upstreams.
fn source_of(
    state: &AppState,
    path: &str,
    headers: &HeaderMap,
) -> Result<(Digest, Source), TrackerError> {
    let (registry, name, digest) = split_torrent_path(path)?;
    let digest: Digest = digest.parse()?;
    let name: RepositoryName = name.parse()?;
    let registry = state
        .config
        .upstream(registry)
        .ok_or_else(|| TrackerError::NotAllowed(registry.chars().take(256).collect()))?
        .clone();
    let source = Source {
        registry,
        name,
        creds: Credentials::from_client(headers.get(header::AUTHORIZATION)),
    };
    Ok((digest, source))
}

#[derive(serde::Deserialize)]
struct EarlyQuery {
    port: Option<u16>,
    /// The caller's exchange port (`bay_common::api::exchange_path`), if it passes pieces on.
    exchange: Option<u16>,
    /// The first piece whose holder the caller wants to know.
    from: Option<u32>,
}

/// `GET /v1/early/<registry>/<name>/blobs/<digest>[/slot]` (`bay_common::api::early_path`).
async fn early(
    State(state): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<bay_common::serve::Conn>,
    Path(path): Path<String>,
    axum::extract::Query(q): axum::extract::Query<EarlyQuery>,
    headers: HeaderMap,
) -> Response {
    match early_inner(&state, &path, q, &headers, conn).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn early_inner(
    state: &Arc<AppState>,
    path: &str,
    q: EarlyQuery,
    headers: &HeaderMap,
    conn: bay_common::serve::Conn,
) -> Result<Response, ErrorResponse> {
    let (path, slot) = match path.strip_suffix("/slot") {
        Some(p) => (p, true),
        None => (path, false),
    };
    let (digest, source) = source_of(state, path, headers)?;
    let span = tracing::debug_span!("early", digest = %digest, repo = %source.name);
    state
        .blobs
        .check_access(&source, &digest)
        .instrument(span)
        .await
        .map_err(ErrorResponse::Shared)?;
    let fetching = state
        .blobs
        .fetching(&digest)
        .ok_or_else(|| TrackerError::NotFetching(digest.to_string()))?;
    let holder = q
        .exchange
        .filter(|p| *p != 0)
        .map(|p| peer_addr(conn.remote, p));
    if !slot {
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        return Ok(state.pieces.early(&digest, fetching, range, holder)?);
    }
    let port = q
        .port
        .filter(|p| *p != 0)
        .ok_or_else(|| TrackerError::BadRequest("?port=1-65535 is required".into()))?;
    let slot = state
        .early_slots
        .slot(digest, peer_addr(conn.remote, port), Instant::now())
        .map_err(|e| TrackerError::Busy(e.to_string()))?;
    Ok(axum::Json(bay_common::api::EarlySlot {
        slot,
        size: fetching.size,
        holders: fetching.holders(holder, q.from.unwrap_or(0)),
    })
    .into_response())
}

/// Whether the caller asked for a held blob only (`Cache-Control: only-if-cached`).
fn only_if_cached(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("only-if-cached"))
}

/// An error either owned or shared by every waiter of a flight.
enum ErrorResponse {
    Own(TrackerError),
    Shared(Arc<TrackerError>),
}

impl From<TrackerError> for ErrorResponse {
    fn from(e: TrackerError) -> Self {
        ErrorResponse::Own(e)
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        match self {
            ErrorResponse::Own(e) => e.into_response(),
            ErrorResponse::Shared(e) => e.render(),
        }
    }
}

fn bencoded(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// Where peers reach the tracker's seed: `--peer-ip`, else the listen IP, else the address
/// the caller reached us on.
fn own_seed(state: &AppState, local: SocketAddr) -> SocketAddr {
    let ip = state
        .config
        .peer_ip
        .or_else(|| (!state.config.listen.ip().is_unspecified()).then(|| state.config.listen.ip()))
        .unwrap_or(local.ip());
    peer_addr(SocketAddr::new(ip, 0), state.config.peer_port)
}

/// The address a peer at `remote` is reachable on: v4-mapped v6 addresses become v4.
fn peer_addr(remote: SocketAddr, port: u16) -> SocketAddr {
    let ip = match remote.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    SocketAddr::new(ip, port)
}

async fn announce(
    State(state): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<bay_common::serve::Conn>,
    RawQuery(query): RawQuery,
) -> Response {
    let req = match AnnounceRequest::parse(query.as_deref().unwrap_or("")) {
        Ok(r) => r,
        Err(e) => {
            state
                .metrics
                .announces
                .get_or_create(&Event { event: "invalid" })
                .inc();
            return bencoded(announce::failure(&e.to_string()));
        }
    };
    let event = req.event.map_or("none", |e| e.as_str());
    state
        .metrics
        .announces
        .get_or_create(&Event { event })
        .inc();
    // bay-proxies take the tracker's pieces over HTTP (`crate::pieces`), in an order they
    // choose; handed the BitTorrent seed too, librqbit would ask it for everything in turn.
    let made = state.blobs.store.holds(&req.info_hash);
    let own_seed = (made && !req.peer_id.is_bay()).then(|| own_seed(&state, conn.local));
    let peer = peer_addr(conn.remote, req.port);
    let mut answer = state
        .swarms
        .announce(&req, peer, own_seed, made, Instant::now());
    // A bay leecher's first announce comes as its download starts, before it has a piece, and
    // is handed seeds only (leechers without pieces would never tell each other what they
    // get); it would meet the other leechers at its next announce, a second later. Its proxy
    // announces its first pieces within milliseconds of having them: the answer waits for
    // that, and then hands it the leechers as well. Not when there are seeds: the answer
    // hands those out at once, and the node's web seed then waits for a stall before it
    // reads anything, so its first pieces come from the seeds it has not been told of.
    let first = req.peer_id.is_bay()
        && made
        && req.event == Some(announce::Event::Started)
        && req.downloaded == 0
        && req.left > 0
        && answer
            .as_ref()
            .is_ok_and(|a| a.complete <= u32::from(own_seed.is_some()));
    if first
        && state
            .swarms
            .wait_for_pieces(&req.info_hash, &peer, FIRST_PIECES_WAIT)
            .await
        && let Some((downloaded, left)) = state.swarms.progress_of(&req.info_hash, &peer)
    {
        let now = AnnounceRequest {
            event: None,
            downloaded,
            left,
            ..req.clone()
        };
        answer = state
            .swarms
            .announce(&now, peer, own_seed, made, Instant::now());
    }
    match answer {
        Ok(resp) => bencoded(resp.encode(req.compact)),
        Err(e) => bencoded(announce::failure(&e.to_string())),
    }
}

/// Longest a bay leecher's first announce waits for its first pieces (see [`announce`]).
const FIRST_PIECES_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

async fn scrape(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Response {
    state.metrics.scrapes.inc();
    match announce::parse_scrape(query.as_deref().unwrap_or("")) {
        Ok(hashes) => {
            let entries = state.swarms.scrape(&hashes, |h| state.blobs.store.holds(h));
            bencoded(announce::encode_scrape(&entries))
        }
        Err(e) => bencoded(announce::failure(&e.to_string())),
    }
}

#[derive(serde::Deserialize)]
struct SlotQuery {
    port: u16,
}

async fn slot(
    State(state): State<Arc<AppState>>,
    ConnectInfo(conn): ConnectInfo<bay_common::serve::Conn>,
    Path(info_hash): Path<String>,
    axum::extract::Query(q): axum::extract::Query<SlotQuery>,
) -> Response {
    let bad = |msg: String| {
        crate::error::json_error(
            StatusCode::BAD_REQUEST,
            bay_common::api::ErrorCode::NameInvalid,
            msg,
        )
    };
    let Ok(ih) = announce::InfoHash::from_hex(&info_hash) else {
        return bad(format!("info hash {info_hash:?} is not 40 hex characters"));
    };
    if q.port == 0 {
        return bad("port must be 1-65535".into());
    }
    // Slices are handed out by a tracker that holds the blob (the one serving its pieces), so
    // made-up info hashes cost nothing here; a proxy asks the next tracker.
    if !state.blobs.store.holds(&ih) {
        return crate::error::json_error(
            StatusCode::NOT_FOUND,
            bay_common::api::ErrorCode::BlobUnknown,
            format!("{} is not held here", ih.to_hex()),
        );
    }
    let now = Instant::now();
    if let Some(t) = state.blobs.store.by_info_hash(&ih) {
        let early = state.early_slots.leechers(t.digest(), now);
        state.slots.adopt(ih, &early, now);
    }
    match state.slots.slot(ih, peer_addr(conn.remote, q.port), now) {
        Ok(mut s) => {
            s.seeds = state.swarms.seeds(&ih, now);
            axum::Json(s).into_response()
        }
        Err(e) => crate::error::json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            bay_common::api::ErrorCode::Unavailable,
            e.to_string(),
        ),
    }
}

async fn pieces(
    State(state): State<Arc<AppState>>,
    Path(info_hash): Path<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    match state.pieces.get(&info_hash, range).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let (blobs_held, bytes_held) = state.blobs.store.usage();
    let (swarms, peers) = state.swarms.usage();
    let m = &state.metrics;
    axum::Json(TrackerStats {
        blobs_held,
        bytes_held,
        upstream_fetches: m.fetches_ok(),
        upstream_bytes: m.upstream_bytes.get(),
        torrents_served: m
            .torrent_requests
            .get(&Outcome { outcome: "ok" })
            .map_or(0, |c| c.get()),
        swarms,
        peers,
        seed_uploaded_bytes: state.blobs.seeder.uploaded_bytes() + m.piece_bytes.get(),
        piece_bytes_served: m.piece_bytes.get(),
        early_bytes_served: m.early_bytes.get(),
        savings: m.ledger.report(),
    })
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (blobs_held, bytes_held) = state.blobs.store.usage();
    let (swarms, peers) = state.swarms.usage();
    state.metrics.render(Readings {
        peers,
        swarms,
        blobs_held,
        bytes_held,
        evictions: state.blobs.store.evictions(),
        seed_uploaded: state.blobs.seeder.uploaded_bytes(),
    })
}

/// 200 once start-up is done (blobs from an earlier run verified and seeded again); 503 before.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "verifying blobs left by an earlier run\n",
        )
            .into_response()
    }
}

async fn not_found() -> Response {
    let body = bay_common::api::ErrorBody::new(
        bay_common::api::ErrorCode::NameUnknown,
        "no such endpoint",
        serde_json::Value::Null,
    );
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_json(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torrent_paths() {
        let d = "sha256:".to_string() + &"a".repeat(64);
        let p = format!("127.0.0.2:5000/library/alpine/blobs/{d}");
        assert_eq!(
            split_torrent_path(&p).unwrap(),
            ("127.0.0.2:5000", "library/alpine", d.as_str())
        );
        let p = format!("r/a/blobs/b/blobs/{d}");
        assert_eq!(split_torrent_path(&p).unwrap().1, "a/blobs/b");
        for bad in ["", "r", "r/name", "r/blobs/x", "/a/blobs/x", "r/a/blobs/"] {
            assert!(split_torrent_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v4_mapped_peers() {
        let a: SocketAddr = "[::ffff:127.0.0.5]:1".parse().unwrap();
        assert_eq!(peer_addr(a, 7), "127.0.0.5:7".parse().unwrap());
    }
}

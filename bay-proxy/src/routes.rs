//! The HTTP surface: the registry API (blob GETs to [`crate::blob`], everything else passed
//! through) and the proxy's own endpoints under `/_bay/`, which no registry path can collide
//! with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bay_common::RepositoryName;
use tracing::Instrument;

use crate::blob::{BlobRequest, Blobs};
use crate::config::Config;
use crate::error::ProxyError;
use crate::passthrough::Passthrough;
use crate::{prefetch, route};

pub struct AppState {
    pub config: Config,
    pub blobs: Arc<Blobs>,
    pub passthrough: Passthrough,
    /// Set once the cache left by an earlier run is verified and seeded again.
    pub ready: AtomicBool,
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/_bay/healthz", get(|| async { "ok\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/_bay/stats", get(stats))
        .route("/_bay/readyz", get(readyz))
        .route("/readyz", get(readyz))
        .route("/_bay/metrics", get(metrics))
        .route("/metrics", get(metrics))
        .fallback(registry)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// What the --metrics-listen address serves: the metrics and the probes, nothing that reaches
/// a registry.
pub fn metrics_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.blobs.stats()).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.blobs.render_metrics()
}

/// 200 once start-up is done (the cache left by an earlier run verified and seeded again).
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "verifying the cache left by an earlier run\n",
        )
            .into_response()
    }
}

async fn registry(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    let upstream = match route::upstream_for(&state.config, Some(&host), req.uri().query()) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let blob = (req.method() == Method::GET)
        .then(|| route::blob_path(req.uri().path()))
        .flatten();
    let Some((name, digest)) = blob else {
        let manifest_of = (req.method() == Method::GET && state.config.prefetch)
            .then(|| route::manifest_repository(req.uri().path()))
            .flatten()
            .and_then(|n| n.parse::<RepositoryName>().ok());
        let authorization = req.headers().get(header::AUTHORIZATION).cloned();
        let answer = state.passthrough.forward(&upstream, &host, req).await;
        return match manifest_of {
            Some(name) => {
                prefetch::relay_manifest(answer, &state.blobs, &upstream, &name, authorization)
                    .await
            }
            None => answer,
        };
    };
    let (name, digest) = match route::parse_blob(name, digest) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let span = tracing::info_span!("blob", digest = %digest, repo = %name, registry = %upstream);
    let blob_req = BlobRequest {
        registry: upstream,
        name,
        digest,
        authorization: req.headers().get(header::AUTHORIZATION).cloned(),
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .map(str::to_string);
    state
        .blobs
        .get(blob_req, range.as_deref())
        .instrument(span)
        .await
        .unwrap_or_else(ProxyError::into_response)
}

//! Starts the swarm downloads of an image's blobs when its manifest passes through.
//!
//! skopeo and crane copy layers one after another, and docker and containerd a few at a
//! time, so each layer would be its own swarm that starts from nothing and ends in a slow
//! tail, layer after layer (`bench/RESULTS.md`). Once the whole image downloads as soon as
//! its manifest is seen, one layer's tail overlaps the next one's bulk and the links stay busy.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bay_common::manifest::{DOCKER_MANIFEST, MAX_MANIFEST_SIZE, Manifest, OCI_MANIFEST};
use bay_common::{Registry, RepositoryName};

use crate::blob::Blobs;

/// Relays upstream's answer to a manifest GET. When it is an image manifest, the blobs it
/// names start downloading from the swarm. The bytes reach the client unchanged; anything
/// else (indexes, errors, unknown types, no or a huge `Content-Length`) is streamed through.
pub async fn relay_manifest(
    response: Response,
    blobs: &Arc<Blobs>,
    registry: &Registry,
    name: &RepositoryName,
    authorization: Option<HeaderValue>,
) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let headers = response.headers();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_image = content_type.as_deref().is_some_and(|c| {
        let c = c.split(';').next().unwrap_or("").trim();
        c.eq_ignore_ascii_case(OCI_MANIFEST) || c.eq_ignore_ascii_case(DOCKER_MANIFEST)
    });
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n <= MAX_MANIFEST_SIZE as u64);
    if !is_image || !small {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_MANIFEST_SIZE).await {
        Ok(b) => b,
        Err(e) => {
            // Cut the client's answer short of its Content-Length, as relaying would have.
            tracing::warn!(repo = %name, "manifest body from upstream broke off: {e}");
            let cut = futures::stream::once(async move { Err::<bytes::Bytes, _>(e) });
            return Response::from_parts(parts, Body::from_stream(cut));
        }
    };
    match Manifest::parse(content_type.as_deref(), &bytes) {
        Ok(m) => {
            let digests = m.blobs().into_iter().map(|d| d.digest.clone()).collect();
            let manifest = bay_common::Digest::sha256_of(&bytes);
            blobs.prefetch(&manifest, registry, name, digests, authorization);
        }
        Err(e) => tracing::debug!(repo = %name, "not prefetching: {e}"),
    }
    Response::from_parts(parts, Body::from(bytes))
}

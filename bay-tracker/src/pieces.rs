//! Held blobs' bytes by info hash over HTTP: what proxies' web seeds fetch their pieces from
//! (`bay-proxy/src/webseed.rs`).
//!
//! Proxies could take every piece from the tracker's BitTorrent seed, but librqbit asks a seed
//! for whatever comes next in its own order, so N nodes that start together had the seed send
//! each blob 1.4–2.2 times and finish only when it was done (`bench/RESULTS.md`). Over HTTP the
//! proxy chooses what it takes: its own slice of the blob, and what no peer delivers. Only
//! held, verified blobs are served, to whoever knows the info hash, as the BitTorrent seed
//! does; `--upload-limit` applies here as it does there.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bay_common::announce::InfoHash;
use bay_common::range::ByteRange;
use bay_common::store::Store;
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::error::TrackerError;
use crate::limit::Rate;
use crate::metrics::Metrics;

/// Bytes per read of the blob file, and per step of the rate limit.
const CHUNK: usize = 64 * 1024;

pub struct Pieces {
    store: Arc<Store>,
    rate: Rate,
    metrics: Arc<Metrics>,
}

impl Pieces {
    pub fn new(store: Arc<Store>, upload_limit: Option<u64>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            rate: Rate::new(upload_limit),
            metrics,
        }
    }

    /// Answers `GET /v1/pieces/<info hash>`, whole or one `Range`.
    pub async fn get(
        self: &Arc<Self>,
        info_hash: &str,
        range: Option<&str>,
    ) -> Result<Response, TrackerError> {
        let ih = InfoHash::from_hex(info_hash)
            .map_err(|_| TrackerError::BadInfoHash(info_hash.chars().take(64).collect()))?;
        let torrent = self
            .store
            .by_info_hash(&ih)
            .ok_or_else(|| TrackerError::UnknownTorrent(ih.to_hex()))?;
        let size = torrent.size();
        let (status, r) = match range {
            Some(h) => {
                let r = ByteRange::parse(h, size)
                    .map_err(|_| TrackerError::BadRange(h.chars().take(64).collect(), size))?;
                (StatusCode::PARTIAL_CONTENT, r)
            }
            None => (
                StatusCode::OK,
                ByteRange {
                    start: 0,
                    end: size - 1,
                },
            ),
        };
        let mut file = tokio::fs::File::open(self.store.blob_path(torrent.digest())).await?;
        file.seek(std::io::SeekFrom::Start(r.start)).await?;
        let this = self.clone();
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(r.len()), CHUNK).then(
            move |chunk| {
                let this = this.clone();
                async move {
                    if let Ok(c) = &chunk {
                        this.rate.take(c.len()).await;
                        this.metrics.piece_bytes.inc_by(c.len() as u64);
                    }
                    chunk
                }
            },
        );
        let mut resp = Response::new(Body::from_stream(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.len()));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if status == StatusCode::PARTIAL_CONTENT {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&r.content_range(size)).expect("ascii"),
            );
        }
        Ok(resp)
    }
}

//! Held blobs' bytes by info hash over HTTP: what proxies' web seeds fetch their pieces from
//! (`bay-proxy/src/webseed.rs`).
//!
//! Proxies could take every piece from the tracker's BitTorrent seed, but librqbit asks a seed
//! for whatever comes next in its own order, so N nodes that start together had the seed send
//! each blob 1.4–2.2 times and finish only when it was done (`bench/RESULTS.md`). Over HTTP the
//! proxy chooses what it takes: its own slice of the blob, and what no peer delivers. Only
//! held, verified blobs are served, to whoever knows the info hash, as the BitTorrent seed
//! does; `--upload-limit` applies here as it does there.
//!
//! Every piece is checked against the torrent as it is read from disk. A blob was verified when
//! it was fetched, but a file that went bad since (bit rot, a disk error, a hand-edited file)
//! would otherwise be handed to every proxy again and again: each would throw the piece away,
//! and none would ever get it from here. The first bad piece ends the response there and drops
//! the blob, which the next request fetches from upstream again.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bay_common::announce::InfoHash;
use bay_common::range::ByteRange;
use bay_common::torrent::BlobTorrent;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::error::TrackerError;
use crate::fetch::Blobs;
use crate::limit::Rate;
use crate::metrics::Metrics;

/// Bytes per read of the blob file, and per step of the rate limit.
const CHUNK: usize = 64 * 1024;

pub struct Pieces {
    blobs: Arc<Blobs>,
    rate: Rate,
    metrics: Arc<Metrics>,
}

impl Pieces {
    pub fn new(blobs: Arc<Blobs>, upload_limit: Option<u64>, metrics: Arc<Metrics>) -> Self {
        Self {
            blobs,
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
        let store = &self.blobs.store;
        let torrent = store
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
        let path = store.blob_path(torrent.digest());
        let reader = PieceReader::open(&path, torrent, r.start, r.end + 1).await?;
        let blobs = self.blobs.clone();
        let pieces = futures::stream::unfold(Some(reader), move |reader| {
            let blobs = blobs.clone();
            async move {
                let mut reader = reader?;
                match reader.next_chunk().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(reader))),
                    Ok(None) => None,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            blobs.discard_damaged(&reader.torrent).await;
                        }
                        Some((Err(e), None))
                    }
                }
            }
        });
        let this = self.clone();
        let body = pieces.then(move |chunk| {
            let this = this.clone();
            async move {
                if let Ok(c) = &chunk {
                    this.rate.take(c.len()).await;
                    this.metrics.piece_bytes.inc_by(c.len() as u64);
                }
                chunk
            }
        });
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

/// Reads a byte range of a held blob in whole pieces, checking each against the torrent.
struct PieceReader {
    /// Positioned at the start of the piece that holds `next`, then read straight on.
    file: tokio::fs::File,
    torrent: Arc<BlobTorrent>,
    /// Next byte of the range to send, and the end of the range (exclusive).
    next: u64,
    end: u64,
    /// Checked bytes of the range not sent yet.
    pending: Bytes,
}

impl PieceReader {
    /// Reads bytes `start..end` of the blob at `path`.
    async fn open(
        path: &std::path::Path,
        torrent: Arc<BlobTorrent>,
        start: u64,
        end: u64,
    ) -> std::io::Result<Self> {
        let mut file = tokio::fs::File::open(path).await?;
        let pl = torrent.piece_length() as u64;
        file.seek(std::io::SeekFrom::Start(start / pl * pl)).await?;
        Ok(Self {
            file,
            torrent,
            next: start,
            end,
            pending: Bytes::new(),
        })
    }

    /// The next at most [`CHUNK`] bytes of the range; an `InvalidData` error for a piece that
    /// does not match the torrent.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.pending.is_empty() {
            if self.next >= self.end {
                return Ok(None);
            }
            let pl = self.torrent.piece_length() as u64;
            let i = (self.next / pl) as usize;
            let mut piece = vec![0; self.torrent.piece_size(i) as usize];
            match self.file.read_exact(&mut piece).await {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} ends inside piece {i}", self.torrent.digest()),
                    ));
                }
                r => r?,
            };
            let piece = Bytes::from(piece);
            if !self
                .torrent
                .clone()
                .piece_matches_blocking(i, piece.clone())
                .await
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "piece {i} of {} does not match the torrent",
                        self.torrent.digest()
                    ),
                ));
            }
            let start = i as u64 * pl;
            let to = (self.end - start).min(piece.len() as u64);
            self.pending = piece.slice((self.next - start) as usize..to as usize);
            self.next = start + to;
        }
        let n = self.pending.len().min(CHUNK);
        Ok(Some(self.pending.split_to(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bay_common::Digest;

    const PIECE: usize = 256 * 1024;

    /// A reader of `range` (inclusive) of `dir/blob` as the torrent of `data` describes it; the
    /// file is `data` unless the test wrote another one there first.
    async fn reader(
        dir: &std::path::Path,
        data: &[u8],
        range: std::ops::RangeInclusive<u64>,
    ) -> PieceReader {
        let torrent = Arc::new(BlobTorrent::from_bytes(Digest::sha256_of(data), data).unwrap());
        assert_eq!(torrent.piece_length() as usize, PIECE);
        let path = dir.join("blob");
        if !path.exists() {
            std::fs::write(&path, data).unwrap();
        }
        PieceReader::open(&path, torrent, *range.start(), range.end() + 1)
            .await
            .unwrap()
    }

    async fn read_all(r: &mut PieceReader) -> (Vec<u8>, Option<std::io::Error>) {
        let mut got = Vec::new();
        loop {
            match r.next_chunk().await {
                Ok(Some(c)) => {
                    assert!(!c.is_empty() && c.len() <= CHUNK);
                    got.extend_from_slice(&c);
                }
                Ok(None) => return (got, None),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    fn blob() -> Vec<u8> {
        (0..PIECE * 7 / 2).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn ranges_come_out_exact() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let last = data.len() as u64 - 1;
        for range in [
            0..=last,
            5..=5,
            1000..=(PIECE as u64 * 2 + 77),
            (PIECE as u64 * 3)..=last,
        ] {
            let mut r = reader(dir.path(), &data, range.clone()).await;
            let (got, err) = read_all(&mut r).await;
            assert!(err.is_none(), "{range:?}: {err:?}");
            assert!(
                got == data[*range.start() as usize..=*range.end() as usize],
                "{range:?}: wrong bytes"
            );
        }
    }

    #[tokio::test]
    async fn a_damaged_piece_ends_the_range_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let mut bad = data.clone();
        bad[2 * PIECE + 9] ^= 0x01;
        std::fs::write(dir.path().join("blob"), &bad).unwrap();
        let last = data.len() as u64 - 1;

        // Only whole checked pieces before the damaged one go out, then the error.
        let mut r = reader(dir.path(), &data, 100..=last).await;
        let (got, err) = read_all(&mut r).await;
        let err = err.expect("the damaged piece must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("piece 2 of sha256:"), "{err}");
        assert!(got == data[100..2 * PIECE], "sent {} bytes", got.len());

        // A range that does not touch it is served.
        let mut r = reader(dir.path(), &data, (3 * PIECE as u64)..=last).await;
        let (got, err) = read_all(&mut r).await;
        assert!(err.is_none() && got == data[3 * PIECE..]);

        // A file cut short is damaged too.
        std::fs::write(dir.path().join("blob"), &data[..3 * PIECE + 10]).unwrap();
        let mut r = reader(dir.path(), &data, 0..=last).await;
        let (got, err) = read_all(&mut r).await;
        assert_eq!(err.unwrap().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(got.len(), 3 * PIECE);
    }
}

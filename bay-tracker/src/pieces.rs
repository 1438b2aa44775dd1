//! Held blobs' bytes by info hash over HTTP: what proxies' web seeds fetch their pieces from
//! (`bay-proxy/src/webseed.rs`); and the bytes of a blob still being fetched from upstream,
//! which proxies waiting for its torrent read their slices of ([`Pieces::early`]).
//!
//! Proxies could take every piece from the tracker's BitTorrent seed, but librqbit asks a seed
//! for whatever comes next in its own order, so N nodes that start together had the seed send
//! each blob 1.4–2.2 times and finish only when it was done (`bench/RESULTS.md`). Over HTTP the
//! proxy chooses what it takes: its own slice of the blob, and what no peer delivers. Only
//! held, verified blobs are served, to whoever knows the info hash, as the BitTorrent seed
//! does; `--upload-limit` applies here as it does there.
//!
//! A held blob was verified when it was fetched (or re-read at start), and the store keeps its
//! file's identity from then ([`bay_common::store::FileStamp`]): while the file is unchanged its
//! pieces go out as they are, read in large blocks on the blocking pool. A file that changed
//! since (a hand-edited file, a copy put back) has every piece checked against the torrent as it
//! is read: the first bad piece ends the response there and drops the blob, which the next
//! request fetches from upstream again, instead of every proxy being handed the bad bytes again
//! and again. Checking every piece of every response cost 1.5 CPU-s per GiB served
//! (`bench/fastlink`); the stamp costs one `fstat` per response.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bay_common::Digest;
use bay_common::announce::InfoHash;
use bay_common::pool::{Pool, Pooled};
use bay_common::range::ByteRange;
use bay_common::torrent::BlobTorrent;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::watch;

use crate::error::TrackerError;
use crate::fetch::{Blobs, Fetching, Progress, Take};
use crate::limit::Rate;
use crate::metrics::Metrics;

/// Bytes per read of the blob file (whole pieces; more for larger pieces), and per response
/// body frame when no rate limit applies.
const READ: u64 = 1 << 20;
/// Bytes per step of the rate limit.
const RATE_STEP: usize = 64 * 1024;

/// Free read buffers kept for the next responses.
const POOL_BYTES: usize = 16 << 20;

pub struct Pieces {
    blobs: Arc<Blobs>,
    pool: Arc<Pool>,
    rate: Rate,
    metrics: Arc<Metrics>,
}

impl Pieces {
    pub fn new(blobs: Arc<Blobs>, upload_limit: Option<u64>, metrics: Arc<Metrics>) -> Self {
        Self {
            blobs,
            pool: Pool::new(POOL_BYTES),
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
        let file = std::fs::File::open(&path)?;
        let trusted = store.unchanged_since_verified(torrent.digest(), &file.metadata()?);
        let reader = PieceReader::new(
            file,
            torrent,
            r.start,
            r.end + 1,
            trusted,
            self.pool.clone(),
        );
        let blobs = self.blobs.clone();
        let blocks = futures::stream::unfold(Some(reader), move |reader| {
            let blobs = blobs.clone();
            async move {
                let reader = reader?;
                match reader.next_block().await {
                    (reader, Ok(Some(block))) => Some((Ok(block), Some(reader))),
                    (_, Ok(None)) => None,
                    (reader, Err(e)) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            blobs.discard_damaged(&reader.torrent).await;
                        }
                        Some((Err(e), None))
                    }
                }
            }
        });
        Ok(self.respond(blocks, status, r, size, false))
    }

    /// Answers `GET /v1/early/<registry>/<name>/blobs/<digest>` (checked by the caller): bytes of
    /// a blob still being fetched from upstream, each sent as soon as it is in the file, always
    /// as a 206 whose `Content-Range` says which part of the range asked for it is: the first
    /// piece in it that no proxy got early yet (416 if none is left), recorded as held by
    /// `holder` (the caller's exchange address). They are not verified yet: a proxy only uses
    /// them once the torrent exists, checking each piece against it. A fetch that fails cuts
    /// the response off.
    pub fn early(
        self: &Arc<Self>,
        digest: &Digest,
        fetching: Arc<Fetching>,
        range: Option<&str>,
        holder: Option<std::net::SocketAddr>,
    ) -> Result<Response, TrackerError> {
        let size = fetching.size;
        let r = match range {
            Some(h) => ByteRange::parse(h, size)
                .map_err(|_| TrackerError::BadRange(h.chars().take(64).collect(), size))?,
            None => ByteRange {
                start: 0,
                end: size - 1,
            },
        };
        // Opened first: a piece is marked sent only if it can be sent. Once verified the blob
        // is in the store: the pieces written last, in the moment before, may not have been
        // asked for yet.
        let open = |path: &std::path::Path| match std::fs::File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let file = match open(&fetching.path)? {
            Some(f) => f,
            None if *fetching.progress.borrow() == Progress::Verified => open(&fetching.stored)?
                .ok_or_else(|| TrackerError::NotFetching(digest.to_string()))?,
            None => return Err(TrackerError::NotFetching(digest.to_string())),
        };
        // Only pieces no proxy got early yet, from the first of them in the range on.
        let pl = fetching.piece_length();
        let piece = match fetching.take_unsent(r.start / pl, r.end / pl, holder) {
            Take::Piece(p) => p,
            Take::NoneLeft => return Err(TrackerError::AlreadySent(digest.to_string())),
            Take::Wait => return Err(TrackerError::OverShare(digest.to_string())),
        };
        let r = ByteRange {
            start: r.start.max(piece * pl),
            end: r.end.min((piece + 1) * pl - 1),
        };
        let status = StatusCode::PARTIAL_CONTENT;
        let reader = EarlyReader {
            file: Arc::new(file),
            progress: fetching.progress.clone(),
            digest: digest.clone(),
            size,
            next: r.start,
            end: r.end + 1,
            pool: self.pool.clone(),
        };
        let blocks = futures::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            match reader.next_block().await {
                Ok(Some(block)) => Some((Ok(block), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(self.respond(blocks, status, r, size, true))
    }

    /// The response for `blocks` of bytes `r` of a blob of `size`, paced by `--upload-limit`
    /// and counted.
    fn respond(
        self: &Arc<Self>,
        blocks: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
        status: StatusCode,
        r: ByteRange,
        size: u64,
        early: bool,
    ) -> Response {
        let this = self.clone();
        let body = blocks
            .map(move |block| {
                // A limited rate is paid in small steps, so a block is not one long burst.
                let steps: Vec<std::io::Result<Bytes>> = match block {
                    Ok(b) if this.rate.limited() => (0..b.len())
                        .step_by(RATE_STEP)
                        .map(|i| Ok(b.slice(i..(i + RATE_STEP).min(b.len()))))
                        .collect(),
                    other => vec![other],
                };
                futures::stream::iter(steps)
            })
            .flatten();
        let this = self.clone();
        let body = body.then(move |chunk| {
            let this = this.clone();
            async move {
                if let Ok(c) = &chunk {
                    this.rate.take(c.len()).await;
                    this.metrics.piece_bytes.inc_by(c.len() as u64);
                    if early {
                        this.metrics.early_bytes.inc_by(c.len() as u64);
                    }
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
        resp
    }
}

/// Reads a byte range of a blob being fetched, each block once the fetch has written it.
struct EarlyReader {
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
    digest: Digest,
    size: u64,
    next: u64,
    end: u64,
    pool: Arc<Pool>,
}

impl EarlyReader {
    async fn next_block(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.next >= self.end {
            return Ok(None);
        }
        let failed = || {
            std::io::Error::other(TrackerError::FetchFailed(self.digest.to_string()).to_string())
        };
        let written = loop {
            let written = match *self.progress.borrow_and_update() {
                Progress::Written(n) => n,
                Progress::Verified => self.size,
                Progress::Failed => return Err(failed()),
            };
            if written > self.next {
                break written;
            }
            if self.progress.changed().await.is_err() {
                // The fetch is gone; its last word says how it ended.
                if *self.progress.borrow() != Progress::Verified {
                    return Err(failed());
                }
            }
        };
        let to = written.min(self.end).min(self.next + READ);
        let at = self.next;
        let buf = self.pool.take((to - at) as usize);
        let file = self.file.clone();
        let block = tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
            use std::os::unix::fs::FileExt;
            let mut buf = buf;
            file.read_exact_at(buf.as_mut(), at)?;
            Ok(buf.into_bytes())
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        self.next = to;
        Ok(Some(block))
    }
}

/// Reads a byte range of a held blob in blocks of whole pieces, checking each piece against
/// the torrent unless the file is `trusted` (unchanged since it was verified).
struct PieceReader {
    file: Arc<std::fs::File>,
    pool: Arc<Pool>,
    torrent: Arc<BlobTorrent>,
    /// Next byte of the range to send, and the end of the range (exclusive).
    next: u64,
    end: u64,
    trusted: bool,
}

impl PieceReader {
    /// Reads bytes `start..end` of the blob in `file`.
    fn new(
        file: std::fs::File,
        torrent: Arc<BlobTorrent>,
        start: u64,
        end: u64,
        trusted: bool,
        pool: Arc<Pool>,
    ) -> Self {
        Self {
            file: Arc::new(file),
            pool,
            torrent,
            next: start,
            end,
            trusted,
        }
    }

    /// The next bytes of the range, up to a block of whole pieces; an `InvalidData` error
    /// for a piece that does not match the torrent (the pieces before it in the block are
    /// sent first). Reading and hashing are too long for a runtime worker
    /// ([`bay_common::runtime::in_place`]).
    async fn next_block(mut self) -> (Self, std::io::Result<Option<Bytes>>) {
        if self.next >= self.end {
            return (self, Ok(None));
        }
        let pl = self.torrent.piece_length() as u64;
        let first = self.next / pl;
        let pieces = (READ / pl).max(1);
        let block_start = first * pl;
        let block_end = ((first + pieces) * pl).min(self.torrent.size());
        let (file, torrent, trusted) = (self.file.clone(), self.torrent.clone(), self.trusted);
        let buf = self.pool.take((block_end - block_start) as usize);
        let read = bay_common::runtime::in_place(move || {
            read_pieces(&file, &torrent, block_start, trusted, buf)
        })
        .await;
        let (good, err) = match read {
            Ok(block) => (block, None),
            Err((good, e)) => (good, Some(e)),
        };
        // The part of the good pieces inside the range.
        let from = (self.next - block_start) as usize;
        let to = ((self.end - block_start) as usize).min(good.len());
        if from < to {
            self.next = block_start + to as u64;
            return (self, Ok(Some(good.slice(from..to))));
        }
        match err {
            Some(e) => (self, Err(e)),
            None => (self, Ok(None)),
        }
    }
}

/// Reads whole pieces of the blob from `start` into `buf`; on a piece that fails its check, or
/// a file that ends early, the good pieces before it and the error.
fn read_pieces(
    file: &std::fs::File,
    torrent: &BlobTorrent,
    start: u64,
    trusted: bool,
    mut buf: Pooled,
) -> Result<Bytes, (Bytes, std::io::Error)> {
    use std::os::unix::fs::FileExt;
    let want = buf.as_ref().len();
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf.as_mut()[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((Bytes::new(), e)),
        }
    }
    let pl = torrent.piece_length() as u64;
    let first = (start / pl) as usize;
    let mut good = 0;
    let mut failed = None;
    for (k, piece) in buf.as_ref()[..got].chunks(pl as usize).enumerate() {
        let i = first + k;
        if piece.len() as u64 != torrent.piece_size(i) {
            failed = Some(format!("{} ends inside piece {i}", torrent.digest()));
            break;
        }
        if !trusted && !torrent.piece_matches(i, piece) {
            failed = Some(format!(
                "piece {i} of {} does not match the torrent",
                torrent.digest()
            ));
            break;
        }
        good += piece.len();
    }
    if failed.is_none() && got < want {
        failed = Some(format!(
            "{} ends inside piece {}",
            torrent.digest(),
            first + got / pl as usize
        ));
    }
    let good = buf.into_bytes().slice(..good);
    match failed {
        None => Ok(good),
        Some(why) => Err((
            good,
            std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PIECE: usize = 256 * 1024;

    /// A reader of `range` (inclusive) of `dir/blob` as the torrent of `data` describes it; the
    /// file is `data` unless the test wrote another one there first.
    fn reader(
        dir: &std::path::Path,
        data: &[u8],
        range: std::ops::RangeInclusive<u64>,
        trusted: bool,
    ) -> PieceReader {
        let torrent = Arc::new(BlobTorrent::from_bytes(Digest::sha256_of(data), data).unwrap());
        assert_eq!(torrent.piece_length() as usize, PIECE);
        let path = dir.join("blob");
        if !path.exists() {
            std::fs::write(&path, data).unwrap();
        }
        let file = std::fs::File::open(&path).unwrap();
        PieceReader::new(
            file,
            torrent,
            *range.start(),
            range.end() + 1,
            trusted,
            Pool::new(1 << 20),
        )
    }

    async fn read_all(mut r: PieceReader) -> (Vec<u8>, Option<std::io::Error>) {
        let mut got = Vec::new();
        loop {
            let (next, block) = r.next_block().await;
            r = next;
            match block {
                Ok(Some(c)) => {
                    assert!(!c.is_empty() && c.len() as u64 <= READ);
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
            for trusted in [false, true] {
                let r = reader(dir.path(), &data, range.clone(), trusted);
                let (got, err) = read_all(r).await;
                assert!(err.is_none(), "{range:?}: {err:?}");
                assert!(
                    got == data[*range.start() as usize..=*range.end() as usize],
                    "{range:?}: wrong bytes"
                );
            }
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
        let r = reader(dir.path(), &data, 100..=last, false);
        let (got, err) = read_all(r).await;
        let err = err.expect("the damaged piece must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("piece 2 of sha256:"), "{err}");
        assert!(got == data[100..2 * PIECE], "sent {} bytes", got.len());

        // A range that does not touch it is served.
        let r = reader(dir.path(), &data, (3 * PIECE as u64)..=last, false);
        let (got, err) = read_all(r).await;
        assert!(err.is_none() && got == data[3 * PIECE..]);

        // A file cut short is damaged too.
        std::fs::write(dir.path().join("blob"), &data[..3 * PIECE + 10]).unwrap();
        let r = reader(dir.path(), &data, 0..=last, false);
        let (got, err) = read_all(r).await;
        assert_eq!(err.unwrap().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(got.len(), 3 * PIECE);
    }

    /// An early read sends only what the fetch has written, waits for the rest, and is cut
    /// off when the fetch fails.
    #[tokio::test]
    async fn early_reads_follow_the_fetch_and_stop_at_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let path = dir.path().join("fetching");
        std::fs::write(&path, &data[..PIECE]).unwrap();
        let (tx, rx) = watch::channel(Progress::Written(PIECE as u64 / 2));
        let size = data.len() as u64;
        let mut r = EarlyReader {
            file: Arc::new(std::fs::File::open(&path).unwrap()),
            progress: rx,
            digest: Digest::sha256_of(&data),
            size,
            next: 10,
            end: size,
            pool: Pool::new(1 << 20),
        };
        let first = r.next_block().await.unwrap().unwrap();
        assert!(first == data[10..PIECE / 2], "only the written part");
        // Nothing more until the fetch writes more.
        let waiting = tokio::time::timeout(Duration::from_millis(200), r.next_block()).await;
        assert!(waiting.is_err(), "a block came before it was written");
        std::fs::write(&path, &data).unwrap();
        tx.send_replace(Progress::Written(2 * PIECE as u64));
        let second = r.next_block().await.unwrap().unwrap();
        assert!(second == data[PIECE / 2..2 * PIECE]);
        tx.send_replace(Progress::Failed);
        let err = r.next_block().await.unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");

        // A verified fetch has every byte, whatever was published last.
        let (tx, rx) = watch::channel(Progress::Written(0));
        let mut r = EarlyReader {
            file: Arc::new(std::fs::File::open(&path).unwrap()),
            progress: rx,
            digest: Digest::sha256_of(&data),
            size,
            next: 2 * PIECE as u64,
            end: size,
            pool: Pool::new(1 << 20),
        };
        tx.send_replace(Progress::Verified);
        drop(tx);
        let mut got = Vec::new();
        while let Some(b) = r.next_block().await.unwrap() {
            got.extend_from_slice(&b);
        }
        assert!(got == data[2 * PIECE..]);
    }
}

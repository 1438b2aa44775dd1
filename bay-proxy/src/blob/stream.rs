//! A client's stream of a blob: from the swarm download's landing, a tracker or upstream,
//! hashed as it goes out, and cached when it came from upstream and its digest matched.

use super::*;

/// How many pieces from a stream's position on this node's download must hold before a stream
/// that continued from a tracker reads from it again: enough that it does not stall again at
/// once and go back to a tracker.
const REJOIN_AHEAD: u32 = 4;

/// Counts a client stream among a download's readers while it reads from the swarm.
pub(super) struct Reading(Arc<Download>);

impl Reading {
    pub(super) fn new(d: &Arc<Download>) -> Self {
        d.streams.fetch_add(1, Ordering::Relaxed);
        Reading(d.clone())
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.stream_ended.notify_waiters();
    }
}

/// Where the bytes of a response come from.
pub(super) enum Source {
    Swarm {
        reader: Reader,
        /// Counts the stream among the download's readers while it lives; None for a stream
        /// that came back from a tracker, which cannot vouch for the whole file, so the
        /// download does not wait for it before caching.
        _reading: Option<Reading>,
        download: Arc<Download>,
        last_progress: u64,
        /// When the stream last saw the download progress, while it waits for pieces.
        waiting_since: Option<Instant>,
    },
    /// The rest of the blob from a tracker that holds it, after the swarm stalled, piece by
    /// checked piece; `skip`: bytes of the first piece the client already has.
    Tracker {
        pieces: PieceStream,
        skip: usize,
    },
    /// `skip`: bytes still to drop because upstream ignored our Range.
    Upstream {
        resp: reqwest::Response,
        skip: u64,
    },
    File {
        file: tokio::fs::File,
    },
}

/// Writes a blob streamed from upstream into `tmp/` as it goes, so a verified fallback
/// download is cached and seeded like a swarm one.
pub(super) struct Tee {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    torrent: Option<TorrentBuilder>,
}

impl Tee {
    pub(super) async fn new(blobs: &Blobs, digest: &Digest, size: u64) -> Option<Tee> {
        let torrent = TorrentBuilder::new(digest.clone(), size).ok()?;
        let path = blobs.store.temp_path();
        match tokio::fs::File::create(&path).await {
            Ok(f) => Some(Tee {
                path,
                file: Some(f),
                torrent: Some(torrent),
            }),
            Err(e) => {
                tracing::warn!(digest = %digest, "cannot cache the blob, streaming only: {e}");
                blobs.metrics.commit_failures.inc();
                None
            }
        }
    }

    /// Returns false (and gives up caching) on a write error such as a full disk.
    async fn write(&mut self, chunk: &[u8]) -> bool {
        let (Some(f), Some(t)) = (self.file.as_mut(), self.torrent.as_mut()) else {
            return false;
        };
        t.update(chunk);
        if let Err(e) = f.write_all(chunk).await {
            tracing::warn!("cannot cache the blob, streaming only: {e}");
            self.file = None;
            let _ = std::fs::remove_file(&self.path);
            return false;
        }
        true
    }
}

impl Drop for VerifyingBody {
    fn drop(&mut self) {
        let ledger = &self.blobs.metrics.ledger;
        if self.to_client && !self.image.is_empty() {
            ledger.served(&self.image, self.sent);
        }
        if self.from_upstream > 0 {
            ledger.fetched(&self.image, self.from_upstream);
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Unless committed (renamed away), the partial file goes.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A response body that hashes what it sends and holds back the last chunk until the digest
/// matched; on swarm stalls it continues from upstream at the same offset.
pub(super) struct VerifyingBody {
    blobs: Arc<Blobs>,
    digest: Digest,
    /// Where to continue from if the swarm stalls; None for cached files.
    req: Option<BlobRequest>,
    source: Source,
    pub(super) size: u64,
    sent: u64,
    verifier: Option<Verifier>,
    held: Option<Bytes>,
    pub(super) tee: Option<Tee>,
    done: bool,
    started: Instant,
    from_upstream: u64,
    /// The stream changed its source: its digest covers bytes from more than one place, so a
    /// match vouches for neither the download's file nor the cached one, and a mismatch
    /// condemns neither.
    switched: bool,
    /// False when the body only fills the cache (a Range request's fallback).
    pub(super) to_client: bool,
    /// The ledger's key, `<registry>/<repository>`.
    pub(super) image: String,
}

impl VerifyingBody {
    pub(super) fn new(
        blobs: Arc<Blobs>,
        digest: Digest,
        req: Option<BlobRequest>,
        size: u64,
        source: Source,
    ) -> Self {
        Self {
            verifier: Some(Verifier::new(digest.algorithm())),
            blobs,
            digest,
            source,
            size,
            sent: 0,
            held: None,
            tee: None,
            done: false,
            started: Instant::now(),
            from_upstream: 0,
            switched: false,
            to_client: true,
            image: req.as_ref().map(BlobRequest::image).unwrap_or_default(),
            req,
        }
    }

    pub(super) fn into_body(self) -> Body {
        Body::from_stream(futures::stream::unfold(self, |mut b| async move {
            let item = b.next().await?;
            Some((item, b))
        }))
    }

    pub(super) async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.done {
            return None;
        }
        loop {
            if self.sent >= self.size {
                self.done = true;
                return self.finish().await;
            }
            let chunk = match self.read_chunk().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(
                        sent = self.sent,
                        size = self.size,
                        "blob stream failed: {e}"
                    );
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let chunk = if self.sent + chunk.len() as u64 > self.size {
                chunk.slice(..(self.size - self.sent) as usize)
            } else {
                chunk
            };
            self.sent += chunk.len() as u64;
            if self.to_client {
                let from = match self.source {
                    Source::File { .. } => source::CACHE,
                    // A tracker's copy is the swarm's, not the registry's.
                    Source::Swarm { .. } | Source::Tracker { .. } => source::SWARM,
                    Source::Upstream { .. } => source::UPSTREAM,
                };
                self.blobs.metrics.served(from, chunk.len() as u64);
            }
            if let Some(v) = self.verifier.as_mut() {
                v.update(&chunk);
            }
            if let Some(t) = self.tee.as_mut()
                && !t.write(&chunk).await
            {
                self.tee = None;
            }
            if let Some(prev) = self.held.replace(chunk) {
                return Some(Ok(prev));
            }
        }
    }

    async fn finish(&mut self) -> Option<std::io::Result<Bytes>> {
        let got = self.verifier.take().expect("finished once").finish();
        if let Source::Swarm { download, .. } = &self.source
            && got == self.digest
            && !self.switched
        {
            download.stream_verified.store(true, Ordering::Relaxed);
            download.stream_ended.notify_waiters();
        }
        if got != self.digest {
            tracing::error!(got = %got, "blob failed verification; cutting the response short");
            if matches!(self.source, Source::File { .. }) && !self.switched {
                // The cached copy went bad on disk: stop serving and seeding it, so the next
                // request fetches the blob again.
                self.blobs.discard(&self.digest).await;
            }
            return Some(Err(std::io::Error::other(format!(
                "{} failed verification",
                self.digest
            ))));
        }
        if let Some(tee) = self.tee.take() {
            self.commit(tee).await;
        }
        if matches!(self.source, Source::File { .. }) && !self.switched {
            // Changed on disk but still right (touched, copied back): trusted again.
            self.blobs.store.restamp(&self.digest);
        }
        if self.from_upstream > 0 {
            tracing::info!(
                size = self.size,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                from_upstream = self.from_upstream,
                "blob served from upstream"
            );
        }
        self.held.take().map(Ok)
    }

    /// Moves a verified upstream download into the cache and seeds it. A failure costs only
    /// the caching (the client got the verified blob): it is logged with its cause and counted
    /// (`bay_cache_commit_failures_total`).
    async fn commit(&mut self, tee: Tee) {
        if let Err(why) = self.try_commit(tee).await {
            tracing::warn!(digest = %self.digest, "verified blob from upstream not cached: {why}");
            self.blobs.metrics.commit_failures.inc();
        }
    }

    async fn try_commit(&mut self, mut tee: Tee) -> Result<(), String> {
        let mut file = tee
            .file
            .take()
            .ok_or("writing the cache copy failed earlier")?;
        file.flush()
            .await
            .map_err(|e| format!("flushing {}: {e}", tee.path.display()))?;
        drop(file);
        let torrent = tee
            .torrent
            .take()
            .ok_or("no torrent")?
            .finish()
            .map_err(|e| format!("building its torrent: {e}"))?;
        let torrent = Arc::new(torrent);
        let dest = self.blobs.store.blob_path(&self.digest);
        tokio::fs::rename(&tee.path, &dest)
            .await
            .map_err(|e| format!("moving it to {}: {e}", dest.display()))?;
        match self
            .blobs
            .swarm
            .add(
                Bytes::from(torrent.to_metainfo(&[])),
                self.blobs.store.blob_dir(),
            )
            .await
        {
            Ok(_) => {
                self.blobs.record(torrent).await;
                Ok(())
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&dest).await;
                Err(format!("seeding it: {e}"))
            }
        }
    }

    async fn read_chunk(&mut self) -> std::io::Result<Bytes> {
        loop {
            match &mut self.source {
                Source::File { file } => {
                    let mut buf = vec![0u8; CHUNK];
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "cached blob is short",
                        ));
                    }
                    buf.truncate(n);
                    return Ok(Bytes::from(buf));
                }
                Source::Upstream { resp, skip } => {
                    let chunk = resp
                        .chunk()
                        .await
                        .map_err(std::io::Error::other)?
                        .ok_or_else(|| {
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "upstream ended the blob early",
                            )
                        })?;
                    self.blobs
                        .metrics
                        .received(source::UPSTREAM, chunk.len() as u64);
                    self.from_upstream += chunk.len() as u64;
                    if *skip >= chunk.len() as u64 {
                        *skip -= chunk.len() as u64;
                        continue;
                    }
                    let chunk = chunk.slice(*skip as usize..);
                    *skip = 0;
                    return Ok(chunk);
                }
                Source::Tracker { .. } => {
                    if self.back_from_tracker().await {
                        continue;
                    }
                    let Source::Tracker { pieces, skip } = &mut self.source else {
                        unreachable!("still reading from the tracker")
                    };
                    match pieces.next_piece().await {
                        Ok(Some((_, piece))) => {
                            self.blobs
                                .metrics
                                .received(source::TRACKER_SEED, piece.len() as u64);
                            let chunk = piece.slice((*skip).min(piece.len())..);
                            *skip = 0;
                            return Ok(chunk);
                        }
                        Ok(None) => tracing::warn!(
                            at = self.sent,
                            "the tracker's answer ended early, continuing from upstream"
                        ),
                        Err(e) => tracing::warn!(
                            at = self.sent,
                            "reading the blob from the tracker failed, continuing from upstream: {e}"
                        ),
                    }
                    self.blobs.metrics.fallback(reason::SWARM_ERROR);
                    self.switch_to_upstream().await?;
                }
                Source::Swarm {
                    reader,
                    download,
                    last_progress,
                    waiting_since,
                    ..
                } => {
                    let reason =
                        match tokio::time::timeout(self.blobs.stall_timeout, reader.next_chunk())
                            .await
                        {
                            Ok(Ok(b)) if b.is_empty() => {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "swarm stream ended early",
                                ));
                            }
                            Ok(Ok(b)) => return Ok(b),
                            Ok(Err(e)) => {
                                tracing::warn!("swarm stream failed: {e}");
                                reason::SWARM_ERROR
                            }
                            Err(_) => {
                                let progress = download.arrived();
                                if progress > *last_progress {
                                    // Pieces are arriving, just not ours yet. Chunks count too: on a
                                    // busy swarm a piece can take seconds, and the supervisor still
                                    // gives up if none completes for `patience()`.
                                    *last_progress = progress;
                                    *waiting_since = None;
                                    continue;
                                }
                                if download.recovering.load(Ordering::Relaxed) {
                                    // Another tracker is fetching the blob to seed it; that costs
                                    // upstream one GET instead of one per proxy.
                                    continue;
                                }
                                let since = *waiting_since.get_or_insert_with(|| {
                                    Instant::now()
                                        .checked_sub(self.blobs.stall_timeout)
                                        .unwrap_or_else(Instant::now)
                                });
                                if since.elapsed() < self.blobs.patience()
                                    && download.seed_reachable()
                                    && download.outcome.borrow().is_none()
                                {
                                    // A tracker that answers but is busy serves us in turn (many
                                    // nodes starting on a slow link); each node that went upstream
                                    // instead would cost the registry another copy.
                                    continue;
                                }
                                // `since` counts from the last progress, so this is how long the
                                // client really waited (up to `patience()` with a seed reachable).
                                tracing::warn!(
                                    at = self.sent,
                                    "swarm made no progress for {:.0?}",
                                    since.elapsed()
                                );
                                reason::STALL
                            }
                        };
                    let sources = download.webseed.usable_sources();
                    let torrent = download.torrent.clone();
                    if self.switch_to_tracker(&sources, torrent).await {
                        continue;
                    }
                    tracing::warn!(at = self.sent, "continuing from upstream");
                    self.blobs.metrics.fallback(reason);
                    self.switch_to_upstream().await?;
                }
            }
        }
    }

    /// Continues with the rest of the blob from the first tracker that holds it, each piece
    /// checked against the torrent before the client gets it. The swarm stalls at a download's
    /// tail too (librqbit can pass its last piece back and forth between two fast peers without
    /// taking it from either); a tracker that seeds the blob has it, and upstream would send it
    /// once more.
    async fn switch_to_tracker(&mut self, sources: &[url::Url], torrent: Arc<BlobTorrent>) -> bool {
        let pl = torrent.piece_length() as u64;
        let first = (self.sent / pl) as u32;
        let start = first as u64 * pl;
        let run = first..torrent.piece_count() as u32;
        for base in sources {
            match self
                .blobs
                .trackers
                .pieces(base, torrent.info_hash(), start, self.size - 1)
                .await
            {
                Ok(resp) => {
                    tracing::info!(tracker = %base, at = self.sent, "continuing from the tracker");
                    self.blobs.metrics.tracker_continuations.inc();
                    self.switched = true;
                    self.source = Source::Tracker {
                        pieces: PieceStream::new(resp, torrent, run, true),
                        skip: (self.sent - start) as usize,
                    };
                    return true;
                }
                Err(e) => tracing::debug!("the tracker cannot continue the blob: {e}"),
            }
        }
        false
    }

    /// A stream that continued from a tracker goes back to this node's own copy once that is
    /// ahead of it: the download that went on in the background, or the blob it cached. In a
    /// warm pull whose only seed hung, the swarm got going again a minute later, and streams
    /// that went on reading a whole layer from the one tracker over its shared uplink ended
    /// minutes after the download (bench/RESULTS.md, "Every fault at once").
    async fn back_from_tracker(&mut self) -> bool {
        if let Some(d) = self.blobs.running(&self.digest)
            && d.unusable().is_none()
            && d.landing.verified_ahead(self.sent, REJOIN_AHEAD)
        {
            tracing::info!(at = self.sent, "back on this node's download");
            self.blobs.metrics.swarm_rejoins.inc();
            self.source = Source::Swarm {
                reader: d.landing.reader_from(self.sent),
                _reading: None,
                last_progress: d.arrived(),
                waiting_since: None,
                download: d,
            };
            return true;
        }
        if self.blobs.store.get(&self.digest).is_none() {
            return false;
        }
        let path = self.blobs.store.blob_path(&self.digest);
        let Ok(mut file) = tokio::fs::File::open(&path).await else {
            return false;
        };
        // Only a copy verified when cached and not changed since: the stream's own digest
        // check no longer covers the file as a whole.
        match file.metadata().await {
            Ok(meta)
                if self
                    .blobs
                    .store
                    .unchanged_since_verified(&self.digest, &meta) => {}
            _ => return false,
        }
        if file
            .seek(std::io::SeekFrom::Start(self.sent))
            .await
            .is_err()
        {
            return false;
        }
        tracing::info!(at = self.sent, "back on this node's cached copy");
        self.blobs.metrics.swarm_rejoins.inc();
        self.source = Source::File { file };
        true
    }

    async fn switch_to_upstream(&mut self) -> std::io::Result<()> {
        let Some(r) = &self.req else {
            return Err(std::io::Error::other("no upstream to continue from"));
        };
        self.blobs.metrics.upstream_fetches.inc();
        self.switched = true;
        let resp = self
            .blobs
            .upstream
            .get_blob_from(&r.registry, &r.name, &r.digest, &r.creds(), self.sent)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let skip = if resp.status() == StatusCode::PARTIAL_CONTENT {
            0
        } else {
            self.sent
        };
        self.source = Source::Upstream { resp, skip };
        Ok(())
    }
}

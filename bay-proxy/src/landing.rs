//! Where a swarm download's pieces land: the librqbit storage of the proxy's downloads.
//!
//! With librqbit's own file storage every 16 KiB chunk was a `pwrite` on the session's thread,
//! every finished piece was read back from the file to be checked, and the client's stream
//! read it from the file once more (`bench/RESULTS.md`, "Fast links"). Here librqbit writes a
//! piece's chunks into a buffer, checks the piece from there, and once it matched
//! ([`TorrentStorage::on_piece_completed`]) the very buffer goes to the client's stream
//! ([`Reader`]) without a copy, and to the file in one write by a thread of its own
//! ([`Writer`]), off the session's thread. A piece stays in memory until it is written and no
//! reader is about to take it; after that readers and uploads read it from the file.
//!
//! Only pieces librqbit verified in this download are ever read back: anything else in the
//! file (a half-written piece, a leftover) reads as missing, so librqbit's initial check of a
//! new download hashes nothing and asks peers for every piece.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use anyhow::Context as _;
use bay_common::pool::{Pool, Pooled};
use bay_common::torrent::BlobTorrent;
use bytes::Bytes;
use librqbit::storage::{
    BoxStorageFactory, StorageFactory, StorageFactoryExt as _, TorrentStorage,
};
use librqbit::{ManagedTorrentShared, TorrentMetadata};
use librqbit_core::lengths::ValidPieceIndex;
use tokio::sync::watch;

/// Verified pieces kept in memory ahead of a reader: what a client that keeps up with the
/// swarm takes without reading the file.
const READ_AHEAD: u64 = 4 << 20;
/// Verified bytes not yet written, past which librqbit's thread writes a piece itself: the
/// writer is behind (a slow disk), and librqbit is slowed down rather than memory growing.
const MAX_UNWRITTEN: u64 = 32 << 20;
/// Most bytes a [`Reader`] returns at once from the file.
const FILE_READ: u64 = 1 << 20;
/// Free piece buffers a proxy keeps for its next pieces.
pub const POOL_BYTES: usize = 32 << 20;

pub struct Landing {
    path: PathBuf,
    torrent: Arc<BlobTorrent>,
    file: OnceLock<Arc<File>>,
    state: Mutex<State>,
    /// Bumped whenever a piece is verified or written, or the landing fails.
    events: watch::Sender<u64>,
    writer: Writer,
    pool: Arc<Pool>,
    readers: AtomicUsize,
}

struct State {
    /// Pieces librqbit is writing, before its check.
    assembling: HashMap<u32, Pooled>,
    /// Verified pieces in memory.
    held: BTreeMap<u32, Bytes>,
    verified: Vec<bool>,
    written: Vec<bool>,
    written_count: u32,
    unwritten_bytes: u64,
    /// The furthest piece a reader has reached.
    reader_at: u32,
    failed: Option<String>,
}

impl Landing {
    /// A landing for `torrent`'s file at `path` (created when librqbit adds the torrent).
    pub fn new(path: PathBuf, torrent: Arc<BlobTorrent>, writer: Writer, pool: Arc<Pool>) -> Self {
        let n = torrent.piece_count();
        Self {
            path,
            torrent,
            file: OnceLock::new(),
            state: Mutex::new(State {
                assembling: HashMap::new(),
                held: BTreeMap::new(),
                verified: vec![false; n],
                written: vec![false; n],
                written_count: 0,
                unwritten_bytes: 0,
                reader_at: 0,
                failed: None,
            }),
            events: watch::Sender::new(0),
            writer,
            pool,
            readers: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("landing poisoned")
    }

    fn bump(&self) {
        self.events.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// librqbit's storage for this download.
    pub fn storage_factory(self: &Arc<Self>) -> BoxStorageFactory {
        Factory(self.clone()).boxed()
    }

    /// A reader of the verified blob from its first byte.
    pub fn reader(self: &Arc<Self>) -> Reader {
        self.reader_from(0)
    }

    /// A reader of the verified blob from byte `at`: a client stream that came back from a
    /// tracker to this node's download.
    pub fn reader_from(self: &Arc<Self>, at: u64) -> Reader {
        self.readers.fetch_add(1, Ordering::Relaxed);
        Reader {
            landing: self.clone(),
            next: at,
            events: self.events.subscribe(),
        }
    }

    /// Whether the piece holding byte `at` and the `ahead - 1` after it (fewer at the blob's
    /// end) are verified: a stream reading from `at` would not wait for librqbit soon.
    pub fn verified_ahead(&self, at: u64, ahead: u32) -> bool {
        let p = (at / self.torrent.piece_length() as u64) as usize;
        let st = self.lock();
        let end = (p + ahead as usize).min(st.verified.len());
        p < end && st.verified[p..end].iter().all(|v| *v)
    }

    /// Why writing the file failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Waits until every piece is in the file (an error if writing failed).
    pub async fn flushed(&self) -> Result<(), String> {
        let mut events = self.events.subscribe();
        loop {
            events.borrow_and_update();
            {
                let st = self.lock();
                if let Some(e) = &st.failed {
                    return Err(e.clone());
                }
                if st.written_count as usize == st.written.len() {
                    return Ok(());
                }
            }
            if events.changed().await.is_err() {
                return Err("landing dropped".into());
            }
        }
    }

    /// What a node offers of this download to a tracker that fetches the blob again
    /// (`bay_common::api::Held`): the pieces librqbit verified, read back on `exchange`.
    pub fn held(&self, exchange: u16) -> Option<bay_common::api::Held> {
        let verified: Vec<u32> = {
            let st = self.lock();
            (0..st.verified.len() as u32)
                .filter(|p| st.verified[*p as usize])
                .collect()
        };
        bay_common::api::Held::from_pieces(exchange, self.torrent.size(), verified)
    }

    /// Verified piece `p`, from memory or the file; None if it is not verified here. Reads
    /// the file: call it off the runtime's workers.
    pub fn verified_piece(&self, p: u32) -> anyhow::Result<Option<Bytes>> {
        if p as usize >= self.torrent.piece_count() {
            return Ok(None);
        }
        {
            let st = self.lock();
            if !st.verified[p as usize] {
                return Ok(None);
            }
            if let Some(data) = st.held.get(&p) {
                return Ok(Some(data.clone()));
            }
            // Verified and not held: written (pieces leave memory only once written).
        }
        let mut buf = vec![0u8; self.torrent.piece_size(p as usize) as usize];
        self.file()?.read_exact_at(&mut buf, self.piece_start(p))?;
        Ok(Some(Bytes::from(buf)))
    }

    fn piece_start(&self, p: u32) -> u64 {
        p as u64 * self.torrent.piece_length() as u64
    }

    /// Opens (creating) the file; librqbit does when it adds the torrent.
    fn open_file(&self) -> anyhow::Result<()> {
        if self.file.get().is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&self.path)
                .with_context(|| format!("opening {}", self.path.display()))?;
            let _ = self.file.set(Arc::new(f));
        }
        Ok(())
    }

    fn file(&self) -> anyhow::Result<&Arc<File>> {
        self.file.get().context("storage not initialized")
    }

    /// Writes verified piece `p` to the file (on the writer's thread, or librqbit's when the
    /// writer is behind).
    fn write_piece(&self, p: u32) {
        let Some(data) = self.lock().held.get(&p).cloned() else {
            return;
        };
        let result = self
            .file()
            .and_then(|f| Ok(f.write_all_at(&data, self.piece_start(p))?));
        {
            let mut st = self.lock();
            match result {
                Ok(()) => {
                    if !st.written[p as usize] {
                        st.written[p as usize] = true;
                        st.written_count += 1;
                        st.unwritten_bytes -= data.len() as u64;
                    }
                    self.trim(&mut st);
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "writing a verified piece failed: {e:#}");
                    st.failed
                        .get_or_insert_with(|| format!("writing {}: {e:#}", self.path.display()));
                }
            }
        }
        self.bump();
    }

    /// Drops written pieces no reader is about to take: behind the furthest reader, beyond
    /// [`READ_AHEAD`] of it, and all of them when nobody reads.
    fn trim(&self, st: &mut State) {
        let ahead = (READ_AHEAD / self.torrent.piece_length() as u64).max(1) as u32;
        let keep = if self.readers.load(Ordering::Relaxed) == 0 {
            0..0
        } else {
            st.reader_at..st.reader_at.saturating_add(ahead)
        };
        let State { held, written, .. } = st;
        held.retain(|p, _| !written[*p as usize] || keep.contains(p));
    }

    /// Calls `f` with each piece's part of the byte range `offset..offset + len`.
    fn by_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u32, usize, std::ops::Range<usize>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let pl = self.torrent.piece_length() as u64;
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let p = (at / pl) as u32;
            let within = (at - p as u64 * pl) as usize;
            let n = ((pl as usize - within).min(len - done)).max(1);
            anyhow::ensure!(
                (p as usize) < self.torrent.piece_count(),
                "offset {at} past the blob"
            );
            f(p, within, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

/// What librqbit holds: the landing, by reference.
struct Storage(Arc<Landing>);

impl TorrentStorage for Storage {
    fn init(&mut self, _: &ManagedTorrentShared, _: &TorrentMetadata) -> anyhow::Result<()> {
        self.0.open_file()
    }

    fn pread_exact(&self, file_id: usize, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        anyhow::ensure!(file_id == 0, "single-file torrents only");
        let l = &self.0;
        l.by_piece(offset, buf.len(), |p, within, range| {
            let out = &mut buf[range];
            {
                let st = l.lock();
                let mem = st
                    .held
                    .get(&p)
                    .map(|b| &b[..])
                    .or_else(|| st.assembling.get(&p).map(|b| b.as_ref()));
                if let Some(mem) = mem {
                    anyhow::ensure!(within + out.len() <= mem.len(), "read past piece {p}");
                    out.copy_from_slice(&mem[within..within + out.len()]);
                    return Ok(());
                }
                anyhow::ensure!(st.written[p as usize], "piece {p} is not here");
            }
            Ok(l.file()?
                .read_exact_at(out, l.piece_start(p) + within as u64)?)
        })
    }

    fn pwrite_all(&self, file_id: usize, offset: u64, buf: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(file_id == 0, "single-file torrents only");
        let l = &self.0;
        l.by_piece(offset, buf.len(), |p, within, range| {
            let mut st = l.lock();
            if st.verified[p as usize] {
                return Ok(()); // a late duplicate of a piece we have
            }
            let size = l.torrent.piece_size(p as usize) as usize;
            let piece = st.assembling.entry(p).or_insert_with(|| l.pool.take(size));
            let src = &buf[range];
            anyhow::ensure!(within + src.len() <= size, "write past piece {p}");
            piece.as_mut()[within..within + src.len()].copy_from_slice(src);
            Ok(())
        })
    }

    fn pwrite_all_vectored(
        &self,
        file_id: usize,
        offset: u64,
        bufs: [IoSlice<'_>; 2],
    ) -> anyhow::Result<usize> {
        let mut at = offset;
        for b in bufs {
            self.pwrite_all(file_id, at, &b)?;
            at += b.len() as u64;
        }
        Ok((at - offset) as usize)
    }

    fn on_piece_completed(&self, piece: ValidPieceIndex) -> anyhow::Result<()> {
        let l = &self.0;
        let p = piece.get();
        let write_here = {
            let mut st = l.lock();
            let buf = st
                .assembling
                .remove(&p)
                .with_context(|| format!("piece {p} completed but never written"))?;
            let data = buf.into_bytes();
            st.verified[p as usize] = true;
            st.unwritten_bytes += data.len() as u64;
            st.held.insert(p, data);
            st.unwritten_bytes > MAX_UNWRITTEN
        };
        l.bump();
        if write_here {
            l.write_piece(p);
        } else {
            l.writer.send(l.clone(), p);
        }
        Ok(())
    }

    fn remove_file(&self, _file_id: usize, _filename: &Path) -> anyhow::Result<()> {
        match std::fs::remove_file(&self.0.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn remove_directory_if_empty(&self, _path: &Path) -> anyhow::Result<()> {
        Ok(())
    }

    fn ensure_file_length(&self, file_id: usize, length: u64) -> anyhow::Result<()> {
        anyhow::ensure!(file_id == 0, "single-file torrents only");
        Ok(self.0.file()?.set_len(length)?)
    }

    fn take(&self) -> anyhow::Result<Box<dyn TorrentStorage>> {
        Ok(Box::new(Storage(self.0.clone())))
    }
}

#[derive(Clone)]
struct Factory(Arc<Landing>);

impl StorageFactory for Factory {
    type Storage = Storage;

    fn create(&self, _: &ManagedTorrentShared, _: &TorrentMetadata) -> anyhow::Result<Storage> {
        Ok(Storage(self.0.clone()))
    }

    fn clone_box(&self) -> BoxStorageFactory {
        self.clone().boxed()
    }
}

/// Reads a download's verified bytes in order, waiting for pieces.
pub struct Reader {
    landing: Arc<Landing>,
    next: u64,
    events: watch::Receiver<u64>,
}

enum Found {
    Held(Bytes),
    /// Bytes from the reader's position on that are in the file.
    Written(u64),
    Missing,
}

impl Reader {
    /// The next verified bytes: a piece (or its rest) from memory, or up to [`FILE_READ`] from
    /// the file. Empty at the end of the blob.
    pub async fn next_chunk(&mut self) -> std::io::Result<Bytes> {
        let l = self.landing.clone();
        let size = l.torrent.size();
        let pl = l.torrent.piece_length() as u64;
        loop {
            if self.next >= size {
                return Ok(Bytes::new());
            }
            self.events.borrow_and_update();
            let p = (self.next / pl) as u32;
            let within = (self.next - l.piece_start(p)) as usize;
            let found = {
                let mut st = l.lock();
                if let Some(e) = &st.failed {
                    return Err(std::io::Error::other(e.clone()));
                }
                if st.reader_at < p {
                    st.reader_at = p;
                    l.trim(&mut st);
                }
                match st.held.get(&p) {
                    Some(b) => Found::Held(b.clone()),
                    None if st.written[p as usize] => {
                        let end = (self.next + FILE_READ).min(size);
                        let mut q = p + 1;
                        while l.piece_start(q) < end && st.written[q as usize] {
                            q += 1;
                        }
                        Found::Written(end.min(l.piece_start(q)) - self.next)
                    }
                    None => Found::Missing,
                }
            };
            match found {
                Found::Held(b) => {
                    let part = b.slice(within..);
                    self.next += part.len() as u64;
                    return Ok(part);
                }
                Found::Written(n) => {
                    let at = self.next;
                    let file = l.file().map_err(std::io::Error::other)?.clone();
                    let data = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n as usize];
                        file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
                    })
                    .await
                    .map_err(std::io::Error::other)??;
                    self.next += data.len() as u64;
                    return Ok(data);
                }
                Found::Missing => {
                    if self.events.changed().await.is_err() {
                        return Err(std::io::Error::other("download ended"));
                    }
                }
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.landing.readers.fetch_sub(1, Ordering::Relaxed);
        let mut st = self.landing.lock();
        self.landing.trim(&mut st);
    }
}

/// The thread that writes verified pieces to their files, one per proxy.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<(Arc<Landing>, u32)>,
}

impl Writer {
    pub fn start() -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<(Arc<Landing>, u32)>();
        std::thread::Builder::new()
            .name("bay-writer".into())
            .spawn(move || {
                // Ends when every sender (every landing, and the proxy's) is gone.
                while let Ok((landing, p)) = rx.recv() {
                    landing.write_piece(p);
                }
            })?;
        Ok(Writer { tx })
    }

    fn send(&self, landing: Arc<Landing>, p: u32) {
        if let Err(mpsc::SendError((landing, p))) = self.tx.send((landing, p)) {
            landing.write_piece(p); // the thread is gone: write here
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bay_common::Digest;
    use librqbit_core::lengths::Lengths;

    const PIECE: usize = 256 * 1024;
    const CHUNK: usize = 16 * 1024;

    fn blob() -> Vec<u8> {
        (0..PIECE * 7 / 2).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn landing(path: PathBuf, data: &[u8]) -> (Arc<Landing>, Storage) {
        let torrent = Arc::new(BlobTorrent::from_bytes(Digest::sha256_of(data), data).unwrap());
        assert_eq!(torrent.piece_length() as usize, PIECE);
        let l = Arc::new(Landing::new(
            path,
            torrent,
            Writer::start().unwrap(),
            Pool::new(POOL_BYTES),
        ));
        l.open_file().unwrap();
        (l.clone(), Storage(l))
    }

    /// What librqbit does with a piece it downloads: its chunks, in any order, then the check
    /// (reading it back), then the completion.
    fn land(s: &Storage, data: &[u8], p: usize) {
        let start = p * PIECE;
        let end = (start + PIECE).min(data.len());
        let mut chunks: Vec<usize> = (start..end).step_by(CHUNK).collect();
        chunks.reverse();
        for c in chunks {
            let c_end = (c + CHUNK).min(end);
            let (a, b) = data[c..c_end].split_at((c_end - c) / 3);
            s.pwrite_all_vectored(0, c as u64, [IoSlice::new(a), IoSlice::new(b)])
                .unwrap();
        }
        let mut back = vec![0u8; end - start];
        for (i, part) in back.chunks_mut(64 * 1024).enumerate() {
            s.pread_exact(0, (start + i * 64 * 1024) as u64, part)
                .unwrap();
        }
        assert!(back == data[start..end], "piece {p} reads back as written");
        let lengths = Lengths::new(data.len() as u64, PIECE as u32).unwrap();
        s.on_piece_completed(lengths.validate_piece_index(p as u32).unwrap())
            .unwrap();
    }

    async fn read_all(r: &mut Reader) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let c = tokio::time::timeout(std::time::Duration::from_secs(5), r.next_chunk())
                .await
                .expect("a reader waits only for missing pieces")
                .unwrap();
            if c.is_empty() {
                return out;
            }
            out.extend_from_slice(&c);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_back_from_a_tracker_reads_on_from_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let (l, s) = landing(dir.path().join("blob"), &data);
        for p in 1..4 {
            land(&s, &data, p);
        }
        assert!(!l.verified_ahead(0, 1), "piece 0 is missing");
        assert!(!l.verified_ahead(5, 4), "piece 0 is missing");
        assert!(l.verified_ahead(PIECE as u64, 2));
        assert!(l.verified_ahead(PIECE as u64 + 5, 4), "fewer at the end");
        assert!(
            !l.verified_ahead(4 * PIECE as u64, 1),
            "past the last piece"
        );
        let at = PIECE + 5;
        let mut r = l.reader_from(at as u64);
        let mut got = Vec::new();
        loop {
            let chunk = r.next_chunk().await.unwrap();
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        assert!(got == data[at..], "{} bytes from {at}", got.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_download_offers_is_what_librqbit_verified_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let (l, s) = landing(dir.path().join("blob"), &data);
        assert!(l.held(7000).is_none(), "nothing verified, nothing offered");
        land(&s, &data, 0);
        land(&s, &data, 1);
        land(&s, &data, 3);
        // Half of piece 2 written, not verified.
        s.pwrite_all(0, 2 * PIECE as u64, &data[2 * PIECE..2 * PIECE + PIECE / 2])
            .unwrap();
        let held = l.held(7000).unwrap();
        assert_eq!(held.exchange, 7000);
        assert_eq!(held.size, data.len() as u64);
        assert_eq!(held.runs, vec![(0, 1), (3, 3)]);
        // Written and out of memory (nobody reads), they come back from the file.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while l.lock().written_count < 3 || !l.lock().held.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer wrote them"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for p in [0usize, 1, 3] {
            let end = ((p + 1) * PIECE).min(data.len());
            let got = l.verified_piece(p as u32).unwrap().unwrap();
            assert!(got == data[p * PIECE..end], "piece {p} reads back whole");
        }
        assert!(
            l.verified_piece(2).unwrap().is_none(),
            "a half piece is not offered"
        );
        assert!(
            l.verified_piece(4).unwrap().is_none(),
            "past the last piece"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verified_pieces_reach_the_reader_in_order_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let path = dir.path().join("blob");
        let (l, s) = landing(path.clone(), &data);
        let mut r = l.reader();
        // Pieces land out of order; the reader waits for piece 0, then takes them in order.
        let reading = tokio::spawn(async move { read_all(&mut r).await });
        for p in [2, 3, 0, 1] {
            land(&s, &data, p);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(reading.await.unwrap() == data, "the reader got the blob");
        l.flushed().await.unwrap();
        s.ensure_file_length(0, data.len() as u64).unwrap();
        assert!(
            std::fs::read(&path).unwrap() == data,
            "the file is the blob"
        );
        // Uploads read verified pieces back, from memory or from the file.
        let mut buf = vec![0u8; CHUNK];
        s.pread_exact(0, (3 * PIECE + 100) as u64, &mut buf)
            .unwrap();
        assert!(buf == data[3 * PIECE + 100..3 * PIECE + 100 + CHUNK]);
        // A late reader reads it all from the file.
        assert!(read_all(&mut l.reader()).await == data);
    }

    #[tokio::test]
    async fn only_pieces_verified_here_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let path = dir.path().join("blob");
        // A leftover with the right bytes: still not this download's, so librqbit's initial
        // check finds nothing to hash and asks peers for everything.
        std::fs::write(&path, &data).unwrap();
        let (_l, s) = landing(path, &data);
        let mut buf = vec![0u8; CHUNK];
        assert!(s.pread_exact(0, 0, &mut buf).is_err());
        // Written but not yet checked: readable, for librqbit's check only.
        s.pwrite_all(0, PIECE as u64, &data[PIECE..PIECE + CHUNK])
            .unwrap();
        s.pread_exact(0, PIECE as u64, &mut buf).unwrap();
        assert!(buf == data[PIECE..PIECE + CHUNK]);
        assert!(s.pread_exact(0, 0, &mut buf).is_err());
        assert!(
            s.pread_exact(0, data.len() as u64, &mut buf).is_err(),
            "past the end"
        );
    }

    #[tokio::test]
    async fn memory_is_given_up_once_written_and_not_about_to_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let data = blob();
        let (l, s) = landing(dir.path().join("blob"), &data);
        let r = l.reader();
        for p in 0..4 {
            land(&s, &data, p);
        }
        l.flushed().await.unwrap();
        // A reader at the start keeps what lies just ahead of it.
        assert_eq!(l.lock().held.len(), 4);
        drop(r);
        assert!(l.lock().held.is_empty(), "nobody reads: nothing held");
        assert_eq!(l.lock().unwritten_bytes, 0);
    }

    #[tokio::test]
    async fn a_failed_write_fails_the_readers_and_the_flush() {
        let data = blob();
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        let (l, s) = landing(PathBuf::from("/dev/full"), &data);
        let mut r = l.reader();
        land(&s, &data, 0);
        assert!(l.flushed().await.is_err());
        assert!(
            l.failure().unwrap().contains("/dev/full"),
            "{:?}",
            l.failure()
        );
        assert!(r.next_chunk().await.is_err());
    }
}

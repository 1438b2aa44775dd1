//! A web seed for this node's librqbit: pieces of a blob fetched over HTTP from a tracker that
//! holds it (bay-tracker's `GET /v1/pieces/<info hash>`), offered to librqbit by a peer of our
//! own on its peer port.
//!
//! Which pieces come from the tracker is decided here, not by librqbit. librqbit asks a seed
//! for whatever comes next in its own order, so with the tracker's BitTorrent seed every node
//! of a simultaneous pull took most pieces from it: the seed sent each blob 1.4–2.2 times, and
//! the pull ended when it was done (`bench/RESULTS.md`). Here each node fetches its own slice
//! of the blob (the tracker's slot table gives leechers distinct slices), which its peers then
//! get from it, and beyond that only what the swarm fails to deliver. librqbit 9.1 has neither
//! web seeds (BEP 19) nor super-seeding (BEP 16), which would do this together.
//!
//! The peer claims only pieces it holds in memory, so librqbit asks it for exactly those; it
//! learns what librqbit has from librqbit's BITFIELD and HAVE messages, and never fetches a
//! piece librqbit already has.
//!
//! A tracker's pieces are offered as they come: the tracker checked them (its copy is
//! verified), and librqbit checks every piece it receives against the torrent anyway, so a
//! second SHA-1 here only cost CPU (0.55 CPU-s per GiB, `bench/fastlink`). A piece that fails
//! librqbit's check makes it drop this peer; from then on the web seed checks every piece
//! itself before offering it, so the bad one is caught at its next read and its tracker is no
//! longer read from for this blob ([`BAD_SOURCE_PAUSE`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bay_common::api::Slot;
use bay_common::torrent::BlobTorrent;
use bytes::Buf as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::peer_wire::{self, Block, Frames, Message};
use crate::swarm::Handle;
use crate::trackers::Trackers;

/// Longest run of pieces asked for in one HTTP request. A run is cut short as soon as its next
/// piece is no longer wanted (the slice shrank, or librqbit got it elsewhere), which wastes
/// what the connection had buffered: short runs keep that small.
const RUN_BYTES: u64 = 1 << 20;
/// Fetched pieces waiting in memory for librqbit to take them; past this the fetcher waits.
const MAX_HELD_BYTES: u64 = 8 << 20;
/// A held piece librqbit has not asked for in this long got it elsewhere: it is dropped (and
/// fetched again should librqbit still ask for it).
const HELD_TTL: Duration = Duration::from_secs(30);
/// Pieces sent whole that are kept a little longer. At a download's tail librqbit can take a
/// piece away from us and give it back again and again (a peer it times at under 1 ms may steal
/// at once, and so may the peer it stole from); each time it asks for the piece anew, and
/// reading it from the tracker every time made this a tight loop of tracker reads.
const RECENT_PIECES: usize = 4;
/// ... and at most this many bytes of them (a big blob's pieces are up to 16 MiB), though the
/// last piece is always kept.
const RECENT_BYTES: usize = 4 << 20;
/// Shortest time the swarm may send nothing at all before this node fetches what it lacks
/// itself. It waits longer while the tracker is slow to send pieces (see [`fill_after`]).
const MIN_FILL_AFTER: Duration = Duration::from_secs(2);
/// ... namely this many times as long as a piece from the tracker takes.
const FILL_AFTER_PIECES: u32 = 3;

/// How long the swarm may send nothing before this node fetches what it lacks from the
/// tracker. While every node still reads its own slice from the tracker, peers have little to
/// give, and a node that finished its slice early sees them silent: as long as the tracker
/// takes for a few pieces, they are still reading theirs.
fn fill_after(piece_time: Duration) -> Duration {
    (piece_time * FILL_AFTER_PIECES).max(MIN_FILL_AFTER)
}
/// librqbit drops a peer that is silent for 10 s.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(4);
/// Pause before trying the trackers again, or reconnecting to librqbit.
const RETRY: Duration = Duration::from_millis(500);
/// How long a tracker that sent a piece failing its SHA-1 is not read from for this blob. Its
/// copy is bad, or something on the way changes the bytes: asked every [`RETRY`], it would
/// send the same bad piece again and again, to every node.
const BAD_SOURCE_PAUSE: Duration = Duration::from_secs(30);

/// Why reading a run of pieces from a tracker stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("piece {0} does not match the torrent")]
    Mismatch(u32),
    #[error("{0}")]
    Transfer(String),
}

/// A tracker's range answer cut into pieces, each checked against the torrent when `check`
/// is set: the web seed's reads (which leave the check to librqbit until a bad piece showed up)
/// and a client stream continuing from a tracker (which always checks) share it.
pub struct PieceStream {
    resp: reqwest::Response,
    torrent: Arc<BlobTorrent>,
    next: u32,
    end: u32,
    buf: BytesMut,
    check: bool,
    /// Bytes taken off the wire so far, whole pieces or not.
    received: u64,
}

impl PieceStream {
    /// `resp` answers for pieces `run`, from the first byte of `run.start`.
    pub fn new(
        resp: reqwest::Response,
        torrent: Arc<BlobTorrent>,
        run: Range<u32>,
        check: bool,
    ) -> Self {
        let buf = BytesMut::with_capacity(torrent.piece_size(run.start as usize) as usize);
        Self {
            resp,
            torrent,
            next: run.start,
            end: run.end,
            buf,
            check,
            received: 0,
        }
    }

    /// Bytes taken off the wire so far, including those of a piece cut short.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Checks every piece from the next one on.
    pub fn check_from_now(&mut self) {
        self.check = true;
    }

    /// The next whole piece; None once the run is done.
    pub async fn next_piece(&mut self) -> Result<Option<(u32, Bytes)>, ReadError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let size = self.torrent.piece_size(self.next as usize) as usize;
        while self.buf.len() < size {
            let chunk = self
                .resp
                .chunk()
                .await
                .map_err(|e| ReadError::Transfer(e.to_string()))?
                .ok_or_else(|| {
                    ReadError::Transfer(format!(
                        "the range ended at piece {} of {}..{}",
                        self.next, self.next, self.end
                    ))
                })?;
            self.received += chunk.len() as u64;
            self.buf.extend_from_slice(&chunk);
        }
        let data = self.buf.split_to(size).freeze();
        let piece = self.next;
        if self.check
            && !self
                .torrent
                .clone()
                .piece_matches_blocking(piece as usize, data.clone())
                .await
        {
            return Err(ReadError::Mismatch(piece));
        }
        self.next += 1;
        if self.next < self.end {
            let want = self.torrent.piece_size(self.next as usize) as usize;
            self.buf.reserve(want.saturating_sub(self.buf.len()));
        }
        Ok(Some((piece, data)))
    }
}

/// Largest block librqbit may ask for (it asks for 16 KiB).
const MAX_BLOCK: u32 = 128 * 1024;
/// Largest message accepted from librqbit: a BITFIELD of the most pieces a torrent can have.
const MAX_MESSAGE: usize = 1 << 20;

/// This node's turn at the trackers, shared by its web seeds: one reads at a time. With every
/// download of every node reading at once, a tracker's link is shared so many ways that no
/// node has a piece to trade for seconds; in turns, each node's first pieces arrive sooner.
///
/// A run of the node's own slice goes before a fill. The other nodes wait for the slice, and a
/// download that has not read its slice has nothing to trade: when a node lagged behind on two
/// layers and filled both, the third layer's web seed queued behind their fills for 30 s, got
/// nothing, and its download was given up (`bench/RESULTS.md`, N=16, 256 MiB).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    freed: Notify,
}

#[derive(Default)]
struct GateState {
    busy: bool,
    /// Web seeds waiting to read their slice.
    slices_waiting: usize,
}

/// The turn, until dropped.
pub struct Turn<'a>(&'a Gate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.lock().busy = false;
        self.0.freed.notify_waiters();
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().expect("gate poisoned")
    }

    /// Waits for the turn: for a run of the node's `slice`, as soon as it is free; for a fill,
    /// once no slice waits either.
    pub async fn take(&self, slice: bool) -> Turn<'_> {
        /// Counts a slice run as waiting until it has the turn or stops waiting (dropped).
        struct SliceWaiting<'a>(&'a Gate);
        impl Drop for SliceWaiting<'_> {
            fn drop(&mut self) {
                let none_left = {
                    let mut st = self.0.lock();
                    st.slices_waiting -= 1;
                    st.slices_waiting == 0
                };
                // A fill may be waiting only for slices: with the last one gone (its download
                // ended before it got the turn), the turn may be free for it now.
                if none_left {
                    self.0.freed.notify_waiters();
                }
            }
        }
        let _waiting = slice.then(|| {
            self.lock().slices_waiting += 1;
            SliceWaiting(self)
        });
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut st = self.lock();
                if !st.busy && (slice || st.slices_waiting == 0) {
                    st.busy = true;
                    return Turn(self);
                }
            }
            freed.await;
        }
    }
}

/// Which pieces this node fetches from the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// Pieces `[first, end)`: this node's slice.
    pub slice: (u32, u32),
    /// Other peers hold the whole blob: even the slice is fetched only when the swarm stalls.
    pub seeded: bool,
}

impl Plan {
    /// The slice a tracker's slot names, in whole pieces.
    pub fn from_slot(slot: &Slot, pieces: u32) -> Plan {
        let at = |f: f64| ((f.clamp(0.0, 1.0) * pieces as f64) as u32).min(pieces);
        let end = if slot.end >= 1.0 {
            pieces
        } else {
            at(slot.end)
        };
        Plan {
            slice: (at(slot.start), end.max(at(slot.start))),
            seeded: slot.seeds > 0,
        }
    }
}

pub struct WebSeed {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

struct Inner {
    torrent: Arc<BlobTorrent>,
    handle: Handle,
    /// This node's librqbit.
    peer: SocketAddr,
    trackers: Arc<Trackers>,
    sources: Vec<url::Url>,
    /// Per source: until when it is not read from, having sent a bad piece.
    paused_until: Mutex<Vec<Option<Instant>>>,
    gate: Arc<Gate>,
    /// Waiting for the node's turn at the trackers.
    queued: AtomicBool,
    /// Bytes of pieces read from trackers that matched the torrent.
    verified: AtomicU64,
    state: Mutex<State>,
    /// Pieces were fetched or asked for again: for the connection to librqbit.
    new_pieces: Notify,
    /// librqbit took or got pieces: for the fetcher.
    taken: Notify,
    plan: watch::Sender<Plan>,
    /// Piece bytes handed to librqbit.
    served: AtomicU64,
    /// Piece bytes read from trackers (more than `served` by what librqbit got elsewhere).
    read: AtomicU64,
    /// Whether a tracker sent good pieces since reading from every tracker last failed.
    source_ok: AtomicBool,
    /// Set once librqbit dropped our connection: pieces are checked here before they are
    /// offered from then on.
    checking: AtomicBool,
    /// Set once a plan came: until then a quiet swarm is not yet a stalled one.
    planned: AtomicBool,
    /// How long a piece from the tracker takes lately (a moving average).
    piece_time: Mutex<Duration>,
    /// Our connections' addresses, as librqbit names us among its peers.
    addrs: Mutex<Vec<SocketAddr>>,
}

/// What the fetcher and the connection to librqbit share.
struct State {
    /// librqbit has the piece: its BITFIELD, its HAVEs, or every block handed to it by us.
    local: Vec<bool>,
    /// We told librqbit we have it.
    offered: Vec<bool>,
    held: BTreeMap<u32, Held>,
    held_bytes: u64,
    /// Offered pieces librqbit asked for after we dropped them.
    wanted_again: BTreeSet<u32>,
    /// Requests waiting for those.
    pending: Vec<Block>,
    /// The last [`RECENT_PIECES`] pieces sent whole, newest last.
    recent: VecDeque<(u32, Bytes)>,
    /// Offered pieces whose HAVE the current connection has not sent yet.
    unannounced: Vec<u32>,
    /// Where a fill starts when this node has no slice (chosen at random, so nodes without
    /// one do not all fill the same pieces).
    fill_from: u32,
    /// Pieces other nodes got from the tracker while it fetched the blob (`crate::early`):
    /// left to the swarm even in this node's slice, and read only in a fill.
    elsewhere: Vec<bool>,
}

struct Held {
    data: Bytes,
    /// Blocks (by offset) librqbit has been sent.
    sent: BTreeMap<u32, u32>,
    since: Instant,
}

impl State {
    fn new(pieces: usize) -> Self {
        Self {
            local: vec![false; pieces],
            offered: vec![false; pieces],
            held: BTreeMap::new(),
            held_bytes: 0,
            wanted_again: BTreeSet::new(),
            pending: Vec::new(),
            recent: VecDeque::new(),
            unannounced: Vec::new(),
            fill_from: rand::random_range(0..pieces.max(1) as u32),
            elsewhere: vec![false; pieces],
        }
    }

    fn missing(&self, p: u32) -> bool {
        !self.local[p as usize] && !self.offered[p as usize]
    }

    /// The next pieces to fetch: those librqbit asked for again first, then this node's slice
    /// (unless seeds have the blob and the swarm is moving), then, once the swarm has
    /// sent nothing for a while ([`fill_after`]), whatever is still missing, from the slice's end
    /// on. At most `max` consecutive pieces.
    fn next_run(&self, plan: &Plan, stalled: bool, max: u32) -> Option<Range<u32>> {
        let pieces = self.local.len() as u32;
        if let Some(&p) = self.wanted_again.iter().next() {
            return Some(p..p + 1);
        }
        let run_from = |first: u32, limit: u32, take: &dyn Fn(u32) -> bool| {
            let mut end = first + 1;
            while end < limit && end - first < max && take(end) {
                end += 1;
            }
            first..end
        };
        let (a, b) = plan.slice;
        // Pieces other nodes got early are left to the swarm until it stalls.
        let mine = |p: u32| self.missing(p) && (stalled || !self.elsewhere[p as usize]);
        if (!plan.seeded || stalled)
            && let Some(first) = (a..b.min(pieces)).find(|p| mine(*p))
        {
            return Some(run_from(first, b.min(pieces), &mine));
        }
        if !stalled {
            return None;
        }
        let from = if b > a { b } else { self.fill_from };
        (0..pieces)
            .map(|i| (from + i) % pieces)
            .find(|p| self.missing(*p))
            .map(|first| run_from(first, pieces, &|p| self.missing(p)))
    }

    /// Drops held pieces librqbit has not asked for in [`HELD_TTL`].
    fn expire(&mut self, now: Instant) {
        let old: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) > HELD_TTL)
            .map(|(p, _)| *p)
            .collect();
        for p in old {
            if let Some(h) = self.held.remove(&p) {
                self.held_bytes -= h.data.len() as u64;
            }
        }
    }

    /// librqbit has piece `p` now.
    fn got(&mut self, p: u32) {
        let Some(l) = self.local.get_mut(p as usize) else {
            return;
        };
        *l = true;
        self.wanted_again.remove(&p);
        if let Some(h) = self.held.remove(&p) {
            self.held_bytes -= h.data.len() as u64;
        }
    }

    /// librqbit asks for piece `p`, which we do not hold: if we offered it and dropped it
    /// since, it is to be read again (true).
    fn asked_again(&mut self, p: u32) -> bool {
        let i = p as usize;
        if self.offered.get(i) != Some(&true) || self.held.contains_key(&p) {
            return false;
        }
        // Asking for it proves librqbit lacks it, even if we sent it whole: it failed the
        // check, and a librqbit with no piece sends no bitfield on the next connection to say
        // so (without this, the piece was read from the tracker again and again, unoffered).
        self.local[i] = false;
        self.wanted_again.insert(p);
        true
    }

    /// Takes the bytes of `block` for librqbit if we hold them; marks the piece as librqbit's
    /// once every byte of it went out (and keeps it among the recent ones). None for a block we
    /// do not hold.
    fn take_block(&mut self, block: Block) -> Option<Bytes> {
        let (begin, len) = (block.begin as usize, block.length as usize);
        let fits = |data: &Bytes| {
            block.length > 0 && block.length <= MAX_BLOCK && begin + len <= data.len()
        };
        let Some(h) = self.held.get_mut(&block.index) else {
            let (_, data) = self.recent.iter().rev().find(|(p, _)| *p == block.index)?;
            return fits(data).then(|| data.slice(begin..begin + len));
        };
        if !fits(&h.data) {
            return None;
        }
        let bytes = h.data.slice(begin..begin + len);
        h.sent.insert(block.begin, block.length);
        let covered: u64 = h.sent.values().map(|l| *l as u64).sum();
        if covered >= h.data.len() as u64 {
            let data = h.data.clone();
            self.got(block.index);
            let mut bytes: usize = self.recent.iter().map(|(_, d)| d.len()).sum();
            while !self.recent.is_empty()
                && (self.recent.len() == RECENT_PIECES || bytes + data.len() > RECENT_BYTES)
            {
                if let Some((_, old)) = self.recent.pop_front() {
                    bytes -= old.len();
                }
            }
            self.recent.push_back((block.index, data));
        }
        Some(bytes)
    }
}

impl WebSeed {
    /// Starts fetching per [`WebSeed::set_plan`] and serving librqbit at `peer`, until `stop`
    /// or [`WebSeed::stop`].
    pub fn start(
        torrent: Arc<BlobTorrent>,
        handle: Handle,
        peer: SocketAddr,
        trackers: Arc<Trackers>,
        sources: Vec<url::Url>,
        gate: Arc<Gate>,
        stop: CancellationToken,
    ) -> WebSeed {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::new(torrent.piece_count())),
            torrent,
            handle,
            peer,
            trackers,
            paused_until: Mutex::new(vec![None; sources.len()]),
            sources,
            gate,
            queued: AtomicBool::new(false),
            verified: AtomicU64::new(0),
            new_pieces: Notify::new(),
            taken: Notify::new(),
            plan: watch::Sender::new(Plan::default()),
            served: AtomicU64::new(0),
            read: AtomicU64::new(0),
            source_ok: AtomicBool::new(true),
            checking: AtomicBool::new(false),
            planned: AtomicBool::new(false),
            piece_time: Mutex::new(Duration::ZERO),
            addrs: Mutex::default(),
        });
        let stop = stop.child_token();
        let span = tracing::Span::current();
        tokio::spawn(
            inner
                .clone()
                .fetch_loop(stop.clone())
                .instrument(tracing::debug_span!(parent: &span, "webseed_fetch")),
        );
        tokio::spawn(
            inner
                .clone()
                .peer_loop(stop.clone())
                .instrument(tracing::debug_span!(parent: &span, "webseed_peer")),
        );
        WebSeed { inner, stop }
    }

    /// Ends both tasks: the download finished or was given up.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Offers pieces read before the torrent existed (`crate::early`), as pieces read from a
    /// tracker: librqbit checks them.
    pub fn preload(&self, pieces: Vec<(u32, Bytes)>) {
        for (p, data) in pieces {
            self.inner.offer_early(p, data);
        }
    }

    /// Where an early read that goes on after the torrent came sends what it learns: pieces,
    /// offered like [`Self::preload`]'s, and pieces to leave to peers, as
    /// [`Self::leave_to_peers`]. `from_nodes` counts the bytes other nodes passed on.
    pub fn early_sink(&self, from_nodes: Arc<AtomicU64>) -> crate::early::Sink {
        let inner = Arc::downgrade(&self.inner);
        let elsewhere = inner.clone();
        crate::early::Sink {
            piece: Arc::new(move |p, data: Bytes, from_node| {
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                // Once librqbit refused a piece of ours, a node's pieces are checked here.
                if inner.checking.load(Ordering::Relaxed)
                    && !inner.torrent.piece_matches(p as usize, &data)
                {
                    tracing::warn!(piece = p, "a node passed on a wrong piece; dropped");
                    return;
                }
                let len = data.len() as u64;
                if inner.offer_early(p, data) && from_node {
                    from_nodes.fetch_add(len, Ordering::Relaxed);
                }
            }),
            elsewhere: Arc::new(move |pieces: &[u32]| {
                if let Some(inner) = elsewhere.upgrade() {
                    inner.leave_to_peers(pieces);
                }
            }),
        }
    }

    /// Pieces other nodes got early: see [`State::elsewhere`].
    pub fn leave_to_peers(&self, pieces: &[u32]) {
        self.inner.leave_to_peers(pieces);
    }

    pub fn set_plan(&self, plan: Plan) {
        self.inner.planned.store(true, Ordering::Relaxed);
        self.inner.plan.send_if_modified(|p| {
            let changed = *p != plan;
            *p = plan;
            changed
        });
    }

    /// Piece bytes handed to librqbit so far.
    pub fn served(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// Piece bytes read from trackers so far.
    pub fn fetched(&self) -> u64 {
        self.inner.read.load(Ordering::Relaxed)
    }

    /// Bytes of good pieces read from trackers so far: a download whose web seed reads them
    /// is moving, however slowly librqbit takes them.
    pub fn verified(&self) -> u64 {
        self.inner.verified.load(Ordering::Relaxed)
    }

    /// Whether it waits for its turn at the trackers behind the node's other web seeds: its
    /// download is then queued, not stalled.
    pub fn queued(&self) -> bool {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Whether a tracker is sending good pieces (or nothing has failed yet).
    pub fn has_source(&self) -> bool {
        self.inner.source_ok.load(Ordering::Relaxed)
    }

    /// The trackers to read the blob from, best first, without those that sent a bad piece
    /// lately.
    pub fn usable_sources(&self) -> Vec<url::Url> {
        let paused = self.inner.paused_until.lock().expect("poisoned");
        let now = Instant::now();
        self.inner
            .sources
            .iter()
            .zip(paused.iter())
            .filter(|(_, until)| !until.is_some_and(|t| now < t))
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Whether `addr` is one of our connections as librqbit sees it.
    pub fn is_ours(&self, addr: &SocketAddr) -> bool {
        self.inner.addrs.lock().expect("poisoned").contains(addr)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("web seed state poisoned")
    }

    /// Offers a piece read before the torrent existed, counted as read from a tracker; false
    /// if the torrent has no such piece.
    fn offer_early(&self, p: u32, data: Bytes) -> bool {
        if p >= self.torrent.piece_count() as u32 {
            return false;
        }
        let len = data.len() as u64;
        self.read.fetch_add(len, Ordering::Relaxed);
        self.verified.fetch_add(len, Ordering::Relaxed);
        self.offer(p, data);
        true
    }

    fn leave_to_peers(&self, pieces: &[u32]) {
        let mut st = self.lock();
        for p in pieces {
            if let Some(e) = st.elsewhere.get_mut(*p as usize) {
                *e = true;
            }
        }
    }

    /// Bytes peers other than us have sent librqbit, whole pieces or not: on a busy swarm a
    /// piece can take seconds, and chunks arriving mean the swarm is moving.
    fn swarm_progress(&self) -> u64 {
        let received = self
            .handle
            .stats()
            .live
            .map_or(0, |l| l.snapshot.fetched_bytes);
        received.saturating_sub(self.served.load(Ordering::Relaxed))
    }

    async fn fetch_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut plan_rx = self.plan.subscribe();
        let pl = self.torrent.piece_length() as u64;
        let max = (RUN_BYTES / pl).max(1) as u32;
        let started = Instant::now();
        let mut last = (self.swarm_progress(), started);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let progress = self.swarm_progress();
            if progress != last.0 {
                last = (progress, Instant::now());
            }
            // Without a slot (the tracker's slot table did not answer) this node fills anyway,
            // only later.
            let patience = fill_after(*self.piece_time.lock().expect("poisoned"));
            let planned = self.planned.load(Ordering::Relaxed) || started.elapsed() >= 2 * patience;
            let stalled = planned && last.1.elapsed() >= patience;
            let plan = *plan_rx.borrow_and_update();
            let run = {
                let mut st = self.lock();
                st.expire(Instant::now());
                if st.held_bytes >= MAX_HELD_BYTES {
                    None
                } else {
                    st.next_run(&plan, stalled, max).map(|r| {
                        let own = (plan.slice.0..plan.slice.1).contains(&r.start)
                            || st.wanted_again.contains(&r.start);
                        (r, own)
                    })
                }
            };
            let Some(run) = run else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = plan_rx.changed() => {}
                    _ = self.taken.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            let (run, own) = run;
            if !self.fetch_run(run, own, &plan_rx, &stop).await {
                self.source_ok.store(false, Ordering::Relaxed);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }

    /// Reads `run` (of this node's slice, or a fill) from the first source that has it. False
    /// if none did.
    async fn fetch_run(
        &self,
        run: Range<u32>,
        own: bool,
        plan: &watch::Receiver<Plan>,
        stop: &CancellationToken,
    ) -> bool {
        let t = &self.torrent;
        let pl = t.piece_length() as u64;
        let start = run.start as u64 * pl;
        let end = (run.end as u64 * pl).min(t.size()) - 1;
        self.queued.store(true, Ordering::Relaxed);
        let turn = tokio::select! {
            _ = stop.cancelled() => None,
            t = self.gate.take(own) => Some(t),
        };
        self.queued.store(false, Ordering::Relaxed);
        let Some(_turn) = turn else {
            return true;
        };
        for (i, base) in self.sources.iter().enumerate() {
            if self.paused_until.lock().expect("poisoned")[i].is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let resp = match self.trackers.pieces(base, t.info_hash(), start, end).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("no pieces from {base}: {e}");
                    continue;
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return true,
                r = self.read_run(resp, run.clone(), plan) => match r {
                    Ok(()) => return true,
                    Err(e @ ReadError::Mismatch(_)) => {
                        tracing::warn!(
                            tracker = %base,
                            "reading pieces failed: {e}; not reading this blob from it for {BAD_SOURCE_PAUSE:?}"
                        );
                        self.paused_until.lock().expect("poisoned")[i] =
                            Some(Instant::now() + BAD_SOURCE_PAUSE);
                    }
                    Err(e) => tracing::warn!(tracker = %base, "reading pieces failed: {e}"),
                },
            }
        }
        false
    }

    /// Offers each piece of a range response once it arrived (and matched, once librqbit has
    /// refused one of ours); stops early when the next piece is no longer wanted.
    async fn read_run(
        &self,
        resp: reqwest::Response,
        run: Range<u32>,
        plan: &watch::Receiver<Plan>,
    ) -> Result<(), ReadError> {
        let check = self.checking.load(Ordering::Relaxed);
        let mut pieces = PieceStream::new(resp, self.torrent.clone(), run.clone(), check);
        let mut since = Instant::now();
        let mut counted = 0;
        loop {
            // librqbit may drop us for a bad piece while the run is read.
            if self.checking.load(Ordering::Relaxed) {
                pieces.check_from_now();
            }
            let next = pieces.next_piece().await;
            self.read
                .fetch_add(pieces.received() - counted, Ordering::Relaxed);
            counted = pieces.received();
            let Some((piece, data)) = next? else {
                break;
            };
            let size = data.len() as u64;
            self.source_ok.store(true, Ordering::Relaxed);
            self.verified.fetch_add(size, Ordering::Relaxed);
            tracing::debug!(piece, "piece read from the tracker");
            {
                let mut avg = self.piece_time.lock().expect("poisoned");
                *avg = (*avg * 2 + since.elapsed()) / 3;
            }
            since = Instant::now();
            self.offer(piece, data);
            let next = piece + 1;
            // A run in the slice stays in it (the slice shrinks as leechers arrive); a fill
            // goes on while the pieces are missing.
            let wanted = next < run.end && {
                let p = plan.borrow();
                let in_slice = |x: u32| (p.slice.0..p.slice.1).contains(&x);
                self.lock().missing(next) && (!in_slice(run.start) || in_slice(next))
            };
            if !wanted {
                return Ok(());
            }
        }
        Ok(())
    }

    fn offer(&self, piece: u32, data: Bytes) {
        {
            let mut st = self.lock();
            let i = piece as usize;
            if st.local[i] {
                st.wanted_again.remove(&piece);
                return; // librqbit got it meanwhile
            }
            st.wanted_again.remove(&piece);
            st.held_bytes += data.len() as u64;
            if let Some(old) = st.held.insert(
                piece,
                Held {
                    data,
                    sent: BTreeMap::new(),
                    since: Instant::now(),
                },
            ) {
                st.held_bytes -= old.data.len() as u64;
            }
            if !st.offered[i] {
                st.offered[i] = true;
                st.unannounced.push(piece);
            }
        }
        self.new_pieces.notify_one();
    }

    async fn peer_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let served = self.served.load(Ordering::Relaxed);
            if let Err(e) = self.session(&stop).await {
                tracing::debug!("web seed connection to librqbit ended: {e}");
                // librqbit drops a peer whose piece failed its check: if we sent any, one may
                // have been bad.
                if self.served.load(Ordering::Relaxed) > served
                    && !self.checking.swap(true, Ordering::Relaxed)
                {
                    // What we hold was not checked: librqbit asks for it again, and gets it
                    // read anew and checked.
                    let mut st = self.lock();
                    st.recent.clear();
                    st.held.clear();
                    st.held_bytes = 0;
                    drop(st);
                    tracing::info!(
                        "librqbit dropped the web seed; checking its pieces from now on"
                    );
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// One connection to librqbit: claims what we hold, then announces and serves pieces.
    /// Everything librqbit asked for by the time its requests were read goes out in one write.
    async fn session(&self, stop: &CancellationToken) -> std::io::Result<()> {
        let t = &self.torrent;
        let s = peer_wire::connect(self.peer, t.info_hash(), b"-BYSEED-").await?;
        self.addrs.lock().expect("poisoned").push(s.local_addr()?);
        let (mut r, mut w) = s.into_split();
        let mut input = BytesMut::with_capacity(64 * 1024);
        let mut out = Frames::default();
        let offered = {
            let mut st = self.lock();
            st.unannounced.clear();
            st.offered.clone()
        };
        out.push(peer_wire::bitfield(&offered));
        out.push(Bytes::from_static(&peer_wire::UNCHOKE));
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE_EVERY);
        loop {
            if out.has_remaining() {
                w.write_all_buf(&mut out).await?;
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = r.read_buf(&mut input) => {
                    if n? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    while let Some(m) = peer_wire::take_message(&mut input, MAX_MESSAGE)? {
                        self.on_message(m, &mut out);
                    }
                }
                _ = self.new_pieces.notified() => {
                    let (haves, ready) = {
                        let mut st = self.lock();
                        let haves = std::mem::take(&mut st.unannounced);
                        let pending = std::mem::take(&mut st.pending);
                        let (ready, waiting): (Vec<Block>, Vec<Block>) =
                            pending.into_iter().partition(|b| st.held.contains_key(&b.index));
                        st.pending = waiting;
                        (haves, ready)
                    };
                    for p in haves {
                        out.push(Bytes::copy_from_slice(&peer_wire::have(p)));
                    }
                    for b in ready {
                        self.serve(b, &mut out);
                    }
                }
                _ = keep_alive.tick() => out.push(Bytes::from_static(&peer_wire::KEEP_ALIVE)),
            }
        }
    }

    fn on_message(&self, m: Message, out: &mut Frames) {
        match m {
            Message::Bitfield(bits) => {
                // What librqbit has now, including that it lacks a piece we sent whole on an
                // earlier connection (it failed librqbit's check).
                let mut st = self.lock();
                for p in 0..st.local.len() {
                    if peer_wire::has_piece(&bits, p) {
                        st.got(p as u32);
                    } else {
                        st.local[p] = false;
                    }
                }
                drop(st);
                self.taken.notify_one();
            }
            Message::Have(p) => {
                self.lock().got(p);
                self.taken.notify_one();
            }
            Message::Request(b) => self.serve(b, out),
            Message::Cancel(b) => self.lock().pending.retain(|p| *p != b),
            Message::KeepAlive | Message::Other(_) => {}
        }
    }

    /// Queues `block` if we hold it; if we offered it but dropped it since, fetches it again.
    fn serve(&self, b: Block, out: &mut Frames) {
        let bytes = {
            let mut st = self.lock();
            match st.take_block(b) {
                Some(bytes) => Some(bytes),
                None => {
                    if st.asked_again(b.index) {
                        st.pending.push(b);
                        drop(st);
                        self.taken.notify_one();
                    }
                    None
                }
            }
        };
        if let Some(bytes) = bytes {
            out.push(Bytes::copy_from_slice(&peer_wire::piece_header(
                b.index, b.begin, b.length,
            )));
            self.served.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            out.push(bytes);
            self.taken.notify_one();
        }
    }
}

impl Drop for WebSeed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pieces: usize) -> State {
        let mut s = State::new(pieces);
        s.fill_from = 0;
        s
    }

    fn plan(a: u32, b: u32, seeded: bool) -> Plan {
        Plan {
            slice: (a, b),
            seeded,
        }
    }

    /// Pieces other nodes got early are not read for the slice, only in a fill.
    #[test]
    fn pieces_left_to_peers_wait_for_a_stall() {
        let mut s = state(12);
        s.elsewhere[5] = true;
        s.elsewhere[6] = true;
        let p = plan(4, 10, false);
        assert_eq!(s.next_run(&p, false, 8), Some(4..5));
        s.local[4] = true;
        assert_eq!(s.next_run(&p, false, 8), Some(7..10));
        for i in 7..10 {
            s.local[i] = true;
        }
        assert_eq!(s.next_run(&p, false, 8), None);
        // Stalled: the node that got them may be gone; they are read after all.
        assert_eq!(s.next_run(&p, true, 8), Some(5..7));
    }

    #[test]
    fn plans_from_slots() {
        let slot = |start, end, seeds| Slot {
            index: 0,
            start,
            end,
            seeds,
        };
        assert_eq!(Plan::from_slot(&slot(0.0, 1.0, 0), 10), plan(0, 10, false));
        assert_eq!(Plan::from_slot(&slot(0.5, 0.75, 2), 10), plan(5, 7, true));
        assert_eq!(Plan::from_slot(&slot(0.25, 0.5, 0), 3), plan(0, 1, false));
        assert_eq!(Plan::from_slot(&slot(0.9, 0.95, 0), 3), plan(2, 2, false));
    }

    #[test]
    fn the_slice_first_then_only_on_a_stall() {
        let mut s = state(20);
        let p = plan(4, 10, false);
        assert_eq!(s.next_run(&p, false, 4), Some(4..8));
        s.offered[4] = true;
        s.local[6] = true;
        // A run stops at a piece librqbit already has.
        assert_eq!(s.next_run(&p, false, 4), Some(5..6));
        for i in 4..10 {
            s.local[i] = true;
        }
        // The slice is done: nothing more while the swarm moves.
        assert_eq!(s.next_run(&p, false, 4), None);
        // Stalled: what is missing, from the slice's end on, wrapping around.
        assert_eq!(s.next_run(&p, true, 4), Some(10..14));
        for i in 10..20 {
            s.local[i] = true;
        }
        assert_eq!(s.next_run(&p, true, 4), Some(0..4));
        for i in 0..4 {
            s.local[i] = true;
        }
        assert_eq!(s.next_run(&p, true, 4), None);
    }

    #[test]
    fn seeds_mean_the_slice_waits_for_a_stall() {
        let s = state(8);
        let p = plan(2, 4, true);
        assert_eq!(s.next_run(&p, false, 8), None);
        assert_eq!(s.next_run(&p, true, 8), Some(2..4));
        // No slice at all: a stall fills from a random place.
        let mut s = state(8);
        s.fill_from = 5;
        assert_eq!(s.next_run(&Plan::default(), false, 8), None);
        assert_eq!(s.next_run(&Plan::default(), true, 8), Some(5..8));
    }

    #[test]
    fn pieces_asked_for_again_come_first() {
        let mut s = state(8);
        s.wanted_again.insert(6);
        assert_eq!(s.next_run(&plan(0, 8, false), false, 8), Some(6..7));
    }

    #[test]
    fn a_piece_sent_whole_and_asked_for_again_is_read_again() {
        let mut s = state(8);
        s.offered[3] = true;
        s.local[3] = true; // sent whole, then it failed librqbit's check
        assert!(!s.asked_again(5), "never offered: not ours to read");
        assert!(s.asked_again(3));
        assert!(!s.local[3]);
        assert_eq!(s.next_run(&plan(0, 8, true), false, 8), Some(3..4));
    }

    #[test]
    fn blocks_are_served_from_held_pieces_and_counted_once_whole() {
        let mut s = state(2);
        let data = Bytes::from(vec![7u8; 32 * 1024]);
        s.held.insert(
            1,
            Held {
                data: data.clone(),
                sent: BTreeMap::new(),
                since: Instant::now(),
            },
        );
        s.held_bytes = data.len() as u64;
        s.offered[1] = true;
        let b = |begin, length| Block {
            index: 1,
            begin,
            length,
        };
        assert_eq!(s.take_block(b(0, 16384)).unwrap().len(), 16384);
        // The same block twice (librqbit re-asks after a steal) is not the whole piece.
        assert!(s.take_block(b(0, 16384)).is_some());
        assert!(!s.local[1]);
        assert!(s.take_block(b(16384, 16385)).is_none(), "past the piece");
        assert!(s.take_block(b(16384, 0)).is_none(), "empty");
        assert_eq!(s.take_block(b(16384, 16384)).unwrap()[0], 7);
        assert!(s.local[1], "every byte went out");
        assert_eq!(s.held_bytes, 0);
        assert!(s.held.is_empty());
        // Asked for again (librqbit took it back from another peer): served from memory, not
        // fetched again.
        assert_eq!(s.take_block(b(16384, 16384)).unwrap().len(), 16384);
        assert!(s.take_block(b(16384, 16385)).is_none(), "past the piece");
        assert!(s.wanted_again.is_empty());
    }

    #[test]
    fn only_the_last_few_pieces_sent_are_kept() {
        let pieces = RECENT_PIECES as u32 + 2;
        let mut s = state(pieces as usize);
        for p in 0..pieces {
            s.held.insert(
                p,
                Held {
                    data: Bytes::from(vec![p as u8; 1024]),
                    sent: BTreeMap::new(),
                    since: Instant::now(),
                },
            );
            s.held_bytes += 1024;
            let whole = Block {
                index: p,
                begin: 0,
                length: 1024,
            };
            assert!(s.take_block(whole).is_some());
        }
        let again = |p| Block {
            index: p,
            begin: 0,
            length: 1024,
        };
        assert!(s.take_block(again(0)).is_none(), "the oldest went");
        assert!(s.take_block(again(1)).is_none());
        for p in 2..pieces {
            assert_eq!(s.take_block(again(p)).unwrap()[0], p as u8);
        }

        // Big pieces: as many as fit in RECENT_BYTES, and always the last.
        let big = RECENT_BYTES / 2 + 1;
        let mut s = state(3);
        for p in 0..3u32 {
            s.held.insert(
                p,
                Held {
                    data: Bytes::from(vec![p as u8; big]),
                    sent: BTreeMap::new(),
                    since: Instant::now(),
                },
            );
            s.held_bytes += big as u64;
            let mut begin = 0;
            while (begin as usize) < big {
                let length = (MAX_BLOCK as usize).min(big - begin as usize) as u32;
                assert!(
                    s.take_block(Block {
                        index: p,
                        begin,
                        length
                    })
                    .is_some()
                );
                begin += length;
            }
        }
        assert_eq!(s.recent.len(), 1);
        assert_eq!(s.recent[0].0, 2);
    }

    #[tokio::test]
    async fn the_nodes_slice_goes_before_fills() {
        let gate = Arc::new(Gate::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = gate.take(false).await;
        let wait = |slice: bool, name: &'static str| {
            let (gate, order) = (gate.clone(), order.clone());
            tokio::spawn(async move {
                let _t = gate.take(slice).await;
                order.lock().unwrap().push(name);
            })
        };
        // A fill queues first, then a slice run: the slice run gets the turn first.
        let fill = wait(false, "fill");
        tokio::task::yield_now().await;
        let slice = wait(true, "slice");
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.lock().slices_waiting == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slice run registers");
        drop(first);
        slice.await.unwrap();
        fill.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["slice", "fill"]);
        // A slice waiter that stops waiting (its download ended) no longer holds fills back.
        let held = gate.take(true).await;
        let quitter = wait(true, "quitter");
        while gate.lock().slices_waiting == 0 {
            tokio::task::yield_now().await;
        }
        quitter.abort();
        let _ = quitter.await;
        assert_eq!(gate.lock().slices_waiting, 0);
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), gate.take(false))
            .await
            .expect("a fill gets the free turn");
    }

    /// A fill that is already waiting when the last slice run gives up (its download ended
    /// before it got the turn) is woken: the gate is idle, and nobody else would wake it.
    #[test]
    fn a_fill_waiting_on_a_slice_that_leaves_is_woken() {
        use futures::task::{ArcWake, waker};
        use std::future::Future;
        use std::sync::atomic::AtomicBool;
        use std::task::{Context, Poll};

        struct Flag(AtomicBool);
        impl ArcWake for Flag {
            fn wake_by_ref(me: &Arc<Self>) {
                me.0.store(true, Ordering::SeqCst);
            }
        }
        let gate = Gate::default();
        let held = futures::executor::block_on(gate.take(false));
        let fill_woken = Arc::new(Flag(AtomicBool::new(false)));
        let fill_waker = waker(fill_woken.clone());
        let mut fill_cx = Context::from_waker(&fill_waker);
        let noop = futures::task::noop_waker();
        let mut noop_cx = Context::from_waker(&noop);

        let mut fill = Box::pin(gate.take(false));
        assert!(fill.as_mut().poll(&mut fill_cx).is_pending());
        let mut slice = Box::pin(gate.take(true));
        assert!(slice.as_mut().poll(&mut noop_cx).is_pending());
        // The turn is freed: the fill looks, sees a slice waiting, and waits again.
        drop(held);
        assert!(fill.as_mut().poll(&mut fill_cx).is_pending());
        fill_woken.0.store(false, Ordering::SeqCst);
        // The slice run stops waiting without taking the turn.
        drop(slice);
        assert!(
            fill_woken.0.load(Ordering::SeqCst),
            "the waiting fill was not woken"
        );
        assert!(matches!(fill.as_mut().poll(&mut fill_cx), Poll::Ready(_)));
    }

    /// A range answer as a tracker would send it, from `start` on, in uneven chunks.
    fn answer(data: &[u8], start: usize) -> reqwest::Response {
        let chunks: Vec<Result<Bytes, std::io::Error>> = data[start..]
            .chunks(100_003)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
        reqwest::Response::from(axum::http::Response::new(body))
    }

    #[tokio::test]
    async fn a_range_answer_is_cut_into_checked_pieces() {
        let data: Vec<u8> = (0..(3 * 256 * 1024 + 1000))
            .map(|i| (i % 251) as u8)
            .collect();
        let digest = bay_common::Digest::sha256_of(&data);
        let t = Arc::new(BlobTorrent::from_bytes(digest, &data).unwrap());
        let pl = t.piece_length() as usize;
        assert_eq!(t.piece_count(), 4);

        // From piece 1 to the end: every piece whole and in order, the last one short.
        let mut s = PieceStream::new(answer(&data, pl), t.clone(), 1..4, true);
        for p in 1..4u32 {
            let (i, piece) = s.next_piece().await.unwrap().unwrap();
            assert_eq!(i, p);
            let at = p as usize * pl;
            assert_eq!(piece, &data[at..(at + pl).min(data.len())]);
        }
        assert!(s.next_piece().await.unwrap().is_none());
        assert_eq!(s.received(), (data.len() - pl) as u64);

        // A flipped byte in piece 2: piece 1 comes, piece 2 does not.
        let mut bad = data.clone();
        bad[2 * pl + 7] ^= 0xff;
        let mut s = PieceStream::new(answer(&bad, pl), t.clone(), 1..4, true);
        assert_eq!(s.next_piece().await.unwrap().unwrap().0, 1);
        assert!(matches!(s.next_piece().await, Err(ReadError::Mismatch(2))));
        // Unchecked (the web seed before librqbit refused a piece), it passes.
        let mut s = PieceStream::new(answer(&bad, pl), t.clone(), 1..4, false);
        assert_eq!(s.next_piece().await.unwrap().unwrap().0, 1);
        assert_eq!(s.next_piece().await.unwrap().unwrap().0, 2);

        // An answer that ends inside piece 3.
        let short = &data[..3 * pl + 10];
        let mut s = PieceStream::new(answer(short, 2 * pl), t, 2..4, true);
        assert_eq!(s.next_piece().await.unwrap().unwrap().0, 2);
        assert!(matches!(s.next_piece().await, Err(ReadError::Transfer(_))));
        assert_eq!(
            s.received(),
            (pl + 10) as u64,
            "the cut piece's bytes count too"
        );
    }

    #[test]
    fn unrequested_pieces_expire() {
        let mut s = state(2);
        let long_ago = Instant::now() - HELD_TTL - Duration::from_secs(1);
        for (p, since) in [(0, long_ago), (1, Instant::now())] {
            s.held.insert(
                p,
                Held {
                    data: Bytes::from_static(b"abcd"),
                    sent: BTreeMap::new(),
                    since,
                },
            );
        }
        s.held_bytes = 8;
        s.expire(Instant::now());
        assert_eq!(s.held.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.held_bytes, 4);
    }
}

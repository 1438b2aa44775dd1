//! A blob read while the tracker is still fetching it from upstream.
//!
//! Cold, a blob's torrent exists only once the tracker has every byte (the pieces' hashes need
//! them all), and until then its uplink sat idle while its downlink fetched; the nodes then
//! pulled for as long again: cold took the fetch plus a warm pull (`bench/RESULTS.md`, "One
//! blob at a time"). So while a proxy waits for the torrent it reads, from the tracker that is
//! fetching the blob, the next piece no other node got, as the bytes land there, and it reads
//! the pieces the other nodes got from them (`crate::exchange`). It also keeps a slot there,
//! which the tracker carries over to the torrent. Once the torrent comes, the web seed offers
//! the pieces to librqbit like any piece read from a tracker, and librqbit checks each against
//! the torrent: bytes of a fetch that then failed its digest, a node that passed on wrong
//! bytes, or anything else wrong never reach a client or the cache.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bay_common::Digest;
use bay_common::api::{EarlyHolders, Held};
use bay_common::pool::{Pool, Pooled};
use bay_common::torrent::{BlobTorrent, piece_length_for};
use bytes::Bytes;
use reqwest::header::HeaderValue;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::exchange::{Exchange, ExchangeError};
use crate::trackers::{EarlyAnswer, Trackers};

/// How long a torrent request may take before the node looks for a fetch to read from: a held
/// blob's torrent comes sooner, and then nothing is asked.
const START_AFTER: Duration = Duration::from_millis(150);
/// Pause between looks for a fetch that has not started yet.
const LOOK_EVERY: Duration = Duration::from_millis(200);
/// How often the slot (and with it who holds which piece) is asked for: often, since a piece
/// can be passed on only once this node knows who holds it. Asking also keeps the slot.
const ASK_EVERY: Duration = Duration::from_millis(200);
/// Most bytes all of a node's early reads hold, waiting for their torrents: enough for a
/// 64 MiB layer whole, which is what passing pieces on between nodes is for, while the proxy
/// stays within its 128 MiB (`bench/RESULTS.md`).
pub const BUDGET: u64 = 72 << 20;
/// Most pieces read from other nodes at once, one per node.
const GATHER_AT_ONCE: usize = 16;
/// Pause before asking the tracker again when this node holds its share of the pieces sent.
const SHARE_WAIT: Duration = Duration::from_millis(20);
/// How long a node that failed a request is left alone, and a piece a node did not have is
/// not asked for again.
const REST_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// How long a node serving a piece waits for it to come from the tracker: on a 10 Mbit/s
/// link shared by 16 nodes' transfers a piece took more than 3 s to arrive, and a shorter wait
/// left the pieces to the swarm.
const SERVE_WAIT: Duration = Duration::from_secs(10);
/// How long a read goes on after its torrent came: it passes its pieces on to nodes whose
/// torrent came a moment later, and gathers the pieces it still lacks from the others, which
/// is quicker than the swarm's start (nodes sat idle 1.5-2 s there in `bench/swarm.sh`).
pub const LINGER: Duration = Duration::from_secs(3);

/// Where what a read learns after the torrent came goes: the web seed, which offers the pieces
/// to librqbit and leaves those other nodes hold to them.
#[derive(Clone)]
pub struct Sink {
    /// A piece, and whether another node passed it on.
    pub piece: Arc<dyn Fn(u32, Bytes, bool) + Send + Sync>,
    /// Pieces another node turned out to hold.
    pub elsewhere: Arc<Elsewhere>,
}

/// See [`Sink::elsewhere`].
pub type Elsewhere = dyn Fn(&[u32]) + Send + Sync;

/// Bytes read early, counted against the node's [`BUDGET`].
#[derive(Default)]
pub struct Budget(AtomicU64);

impl Budget {
    /// Takes `n` bytes if the budget then still has `leave` bytes free.
    fn take(&self, n: u64, leave: u64) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n + leave <= BUDGET).then_some(used + n)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::AcqRel);
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// What a blob's early read has so far.
#[derive(Default)]
struct Got {
    /// Size and piece length the tracker announced.
    shape: Option<(u64, u32)>,
    pieces: BTreeMap<u32, Bytes>,
    /// Of `pieces`, those read from other nodes.
    from_nodes: BTreeSet<u32>,
    /// Bytes of `pieces` read from the tracker.
    own: u64,
    /// Who holds which piece, as far as the tracker said.
    holders: Vec<Option<SocketAddr>>,
    /// Pieces before this one all went to some node: the tracker is asked about the rest.
    known: u32,
    /// Requests to other nodes that failed.
    failed: u32,
    /// Taken from the budget for pieces held or being read.
    bytes: u64,
    /// The tracker no longer fetches the blob: nothing more will be sent to anyone.
    fetch_over: bool,
    /// Set once the torrent came.
    sink: Option<Sink>,
    /// Finished or dropped: the budget is given back and nothing more is kept.
    closed: bool,
}

impl Got {
    fn close(&mut self, budget: &Budget) -> BTreeMap<u32, Bytes> {
        self.closed = true;
        budget.give(std::mem::take(&mut self.bytes));
        std::mem::take(&mut self.pieces)
    }

    /// Takes in what the tracker said about who holds which piece; the pieces whose holder
    /// it learnt.
    fn learn(&mut self, h: &EarlyHolders) -> Vec<u32> {
        let (size, pl) = self.shape.unwrap_or((0, 1));
        self.holders.resize(size.div_ceil(pl as u64) as usize, None);
        let mut new = Vec::new();
        for p in h.first..h.first + h.pieces.len() as u32 {
            if let (Some(node), Some(slot)) = (h.holder(p), self.holders.get_mut(p as usize)) {
                if slot.is_none() {
                    new.push(p);
                }
                *slot = Some(node);
            }
        }
        self.known = self.known.max(h.first_unsent());
        new
    }

    /// Budget that pieces from other nodes must leave for those this node still reads from
    /// the tracker: they are the only copies, and a node that stopped reading them would leave
    /// the tracker's uplink idle for the rest of the fetch. Its share is the blob over the
    /// nodes known to read it (at most half the budget: a bigger blob is shared in part).
    fn own_reserve(&self) -> u64 {
        let (size, pl) = self.shape.unwrap_or((0, 1));
        let mut nodes: Vec<SocketAddr> = self.holders.iter().flatten().copied().collect();
        nodes.sort();
        nodes.dedup();
        let share = size / (nodes.len() as u64 + 1) + 2 * pl as u64;
        share.min(BUDGET / 2).saturating_sub(self.own)
    }

    fn piece_size(&self, p: u32) -> u64 {
        let (size, pl) = self.shape.unwrap_or((0, 1));
        (pl as u64).min(size.saturating_sub(p as u64 * pl as u64))
    }
}

/// What an early read has when its torrent comes.
pub struct Finished {
    /// Whole pieces held, for the web seed to offer librqbit (which checks them).
    pub pieces: Vec<(u32, Bytes)>,
    /// Pieces other nodes got early and this one does not hold: for the swarm.
    pub elsewhere: Vec<u32>,
    /// Bytes of `pieces` that came from other nodes rather than the tracker.
    pub from_nodes: u64,
}

/// A running early read; dropping it stops the read and frees what it held.
pub struct Early {
    got: Arc<Mutex<Got>>,
    arrived: Arc<Notify>,
    budget: Arc<Budget>,
    stop: CancellationToken,
}

/// What an early read needs to ask the trackers.
pub struct Ask {
    pub trackers: Arc<Trackers>,
    /// `bay_common::api::early_path` of the blob.
    pub path: String,
    pub digest: Digest,
    pub authorization: Option<HeaderValue>,
    /// This node's BitTorrent port: the slot's key, as for a held blob's slot.
    pub peer_port: u16,
    /// Where this node passes pieces on, and how it reads them from others; None: it neither
    /// passes on nor reads from others.
    pub exchange: Option<Arc<Exchange>>,
}

impl Early {
    pub fn start(ask: Ask, budget: Arc<Budget>, pool: Arc<Pool>, stop: CancellationToken) -> Early {
        let got = Arc::new(Mutex::new(Got::default()));
        let arrived = Arc::new(Notify::new());
        let run = Arc::new(Reader {
            ask,
            got: got.clone(),
            arrived: arrived.clone(),
            budget: budget.clone(),
            pool,
        });
        let span = tracing::debug_span!("early", digest = %run.ask.digest);
        let s = stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = s.cancelled() => {}
                    _ = run.run() => {}
                }
            }
            .instrument(span),
        );
        Early {
            got,
            arrived,
            budget,
            stop,
        }
    }

    /// What was read, if it is of `torrent`'s shape. The read goes on, passing pieces on and
    /// sending those it gathers to `sink`, for as long as the returned [`Lingering`] is kept
    /// (see [`LINGER`]).
    pub fn finish(self, torrent: &BlobTorrent, sink: Sink) -> (Finished, Option<Lingering>) {
        let mut out = Finished {
            pieces: Vec::new(),
            elsewhere: Vec::new(),
            from_nodes: 0,
        };
        let mut got = self.got.lock().expect("poisoned");
        if got.shape != Some((torrent.size(), torrent.piece_length())) {
            drop(got);
            return (out, None);
        }
        let held = |p: &u32| got.holders.get(*p as usize).is_some_and(|h| h.is_some());
        out.elsewhere = (0..torrent.piece_count() as u32)
            .filter(|p| !got.pieces.contains_key(p) && held(p))
            .collect();
        for (p, data) in &got.pieces {
            if data.len() as u64 == torrent.piece_size(*p as usize) {
                if got.from_nodes.contains(p) {
                    out.from_nodes += data.len() as u64;
                }
                out.pieces.push((*p, data.clone()));
            }
        }
        got.sink = Some(sink);
        drop(got);
        (out, Some(Lingering(self)))
    }

    /// A handle that serves this read's pieces to other nodes.
    pub fn holding(&self) -> Holding {
        Holding {
            got: self.got.clone(),
            arrived: self.arrived.clone(),
        }
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        if let Ok(got) = self.got.lock() {
            tracing::debug!(
                pieces = got.pieces.len(),
                from_nodes = got.from_nodes.len(),
                failed = got.failed,
                fetch_over = got.fetch_over,
                "early read ended"
            );
        }
        self.stop.cancel();
        self.got.lock().expect("poisoned").close(&self.budget);
        self.arrived.notify_waiters();
    }
}

/// An early read whose torrent came, passing pieces on and gathering the rest until dropped.
pub struct Lingering(Early);

impl Lingering {
    pub fn holding(&self) -> Holding {
        self.0.holding()
    }
}

/// The pieces of an early read, as other nodes ask for them (`crate::exchange`).
#[derive(Clone)]
pub struct Holding {
    got: Arc<Mutex<Got>>,
    arrived: Arc<Notify>,
}

impl Holding {
    /// Whether both are of the same read.
    pub fn same(&self, other: &Holding) -> bool {
        Arc::ptr_eq(&self.got, &other.got)
    }

    /// What this read holds, to offer a tracker that fetches the blob anew: its first
    /// tracker died mid-fetch (bay-tracker's `offers`).
    pub fn held(&self, exchange: u16) -> Option<Held> {
        let got = self.got.lock().expect("poisoned");
        let (size, _) = got.shape?;
        let whole = got
            .pieces
            .iter()
            .filter(|(p, data)| data.len() as u64 == got.piece_size(**p))
            .map(|(p, _)| *p);
        Held::from_pieces(exchange, size, whole)
    }

    /// Piece `p` once it is here (the tracker may still be sending it), or None if it does
    /// not come within [`SERVE_WAIT`] or the read ends first.
    pub async fn piece(&self, p: u32) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + SERVE_WAIT;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let got = self.got.lock().expect("poisoned");
                if let Some(data) = got.pieces.get(&p) {
                    return Some(data.clone());
                }
                if got.closed {
                    return None;
                }
            }
            tokio::time::timeout_at(deadline, arrived).await.ok()?;
        }
    }
}

/// What one read from the tracker got.
enum Read {
    Piece(u32),
    NoneLeft,
    Wait,
}

struct Reader {
    ask: Ask,
    got: Arc<Mutex<Got>>,
    arrived: Arc<Notify>,
    budget: Arc<Budget>,
    pool: Arc<Pool>,
}

impl Reader {
    async fn run(self: &Arc<Self>) {
        tokio::time::sleep(START_AFTER).await;
        // The tracker that is fetching the blob, and the first slot it gave us.
        let (base, first) = loop {
            if let Some(found) = self.ask.trackers.early_slot(&self.ask, 0).await {
                break found;
            }
            tokio::time::sleep(LOOK_EVERY).await;
        };
        let size = first.size;
        {
            let mut got = self.got.lock().expect("poisoned");
            got.shape = Some((size, piece_length_for(size)));
            got.learn(&first.holders);
        }
        tracing::debug!(size, "reading pieces while the tracker fetches the blob");
        let slot = async {
            self.keep_slot(&base, size).await;
            self.got.lock().expect("poisoned").fetch_over = true;
        };
        // Two reads from the tracker at once: the node's downlink also carries what the other
        // nodes pass on, and with one the tracker's stream got too small a share of it to keep
        // up with the fetch (the pieces nobody took then went out after it, all to one node).
        tokio::join!(
            slot,
            self.read_own(&base, size),
            self.read_own(&base, size),
            self.gather(size)
        );
    }

    /// Asks for the slot now and then, learning who holds which piece; returns once the
    /// tracker no longer fetches the blob.
    async fn keep_slot(&self, base: &url::Url, size: u64) {
        loop {
            tokio::time::sleep(ASK_EVERY).await;
            let from = self.got.lock().expect("poisoned").known;
            match self.ask.trackers.early_slot_at(base, &self.ask, from).await {
                Ok(s) if s.size == size => {
                    let mut got = self.got.lock().expect("poisoned");
                    let new = got.learn(&s.holders);
                    let new: Vec<u32> = new
                        .into_iter()
                        .filter(|p| !got.pieces.contains_key(p))
                        .collect();
                    let sink = got.sink.clone();
                    drop(got);
                    if let Some(sink) = sink
                        && !new.is_empty()
                    {
                        (sink.elsewhere)(&new);
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads from the tracker, one piece at a time, the first piece no node got yet, until
    /// every piece went to some node.
    async fn read_own(&self, base: &url::Url, size: u64) {
        let pl = piece_length_for(size);
        loop {
            let budgeted = pl as u64;
            {
                let mut got = self.got.lock().expect("poisoned");
                if got.closed || !self.budget.take(budgeted, 0) {
                    tracing::debug!("the node's early reads hold their budget: the rest waits");
                    return;
                }
                got.bytes += budgeted;
            }
            let read = self.read_piece(base, size).await;
            let kept = match &read {
                Ok(Read::Piece(p)) => self.got.lock().expect("poisoned").piece_size(*p),
                _ => 0,
            };
            self.give_back(budgeted - kept);
            match read {
                Ok(Read::Piece(_)) => {}
                Ok(Read::Wait) => tokio::time::sleep(SHARE_WAIT).await,
                Ok(Read::NoneLeft) => return, // every piece went to some node
                Err(e) => {
                    tracing::debug!(tracker = %base, "early read stopped: {e}");
                    return;
                }
            }
        }
    }

    fn give_back(&self, n: u64) {
        let mut got = self.got.lock().expect("poisoned");
        if n > 0 && !got.closed {
            got.bytes -= n;
            self.budget.give(n);
        }
    }

    /// Reads the next piece nobody got from the tracker as the fetch writes it.
    async fn read_piece(&self, base: &url::Url, size: u64) -> Result<Read, String> {
        let pl = piece_length_for(size) as u64;
        let answer = self
            .ask
            .trackers
            .early_bytes(base, &self.ask, 0, size - 1)
            .await?;
        let (resp, a, b) = match answer {
            EarlyAnswer::Bytes(resp, a, b) => (resp, a, b),
            EarlyAnswer::NoneLeft => return Ok(Read::NoneLeft),
            EarlyAnswer::Wait => return Ok(Read::Wait),
        };
        let piece = (a / pl) as u32;
        let want = pl.min(size - a);
        if a % pl != 0 || b + 1 - a != want {
            return Err(format!("bytes {a}-{b} are not one piece"));
        }
        let data = fill(resp, want as usize, &self.pool).await?;
        self.keep(piece, data, false);
        Ok(Read::Piece(piece))
    }

    fn keep(&self, piece: u32, data: Bytes, from_node: bool) {
        let mut got = self.got.lock().expect("poisoned");
        if got.closed {
            return;
        }
        if from_node {
            got.from_nodes.insert(piece);
        } else {
            got.own += data.len() as u64;
        }
        got.pieces.insert(piece, data.clone());
        let sink = got.sink.clone();
        drop(got);
        self.arrived.notify_waiters();
        if let Some(sink) = sink {
            tracing::debug!(piece, from_node, "piece read after the torrent came");
            (sink.piece)(piece, data, from_node);
        }
    }

    /// Reads the pieces other nodes got from the tracker from them, the lowest first, one
    /// request per node at a time.
    async fn gather(self: &Arc<Self>, size: u64) {
        let Some(exchange) = self.ask.exchange.clone() else {
            return;
        };
        let pl = piece_length_for(size) as u64;
        let mut running: JoinSet<(SocketAddr, u32, Result<Bytes, ExchangeError>)> = JoinSet::new();
        let mut busy: HashSet<SocketAddr> = HashSet::new();
        let mut asked: HashMap<u32, SocketAddr> = HashMap::new();
        // Nodes that failed a request lately, until when: a congested link can delay a connect
        // or a piece past the timeouts now and then, and writing a node off for good left its
        // pieces to the swarm (three nodes of 16 in a 10 Mbit/s run).
        let mut resting: HashMap<SocketAddr, tokio::time::Instant> = HashMap::new();
        let mut retry_at: HashMap<u32, tokio::time::Instant> = HashMap::new();
        loop {
            {
                let mut got = self.got.lock().expect("poisoned");
                if got.closed {
                    return;
                }
                let mut wanted: Vec<(SocketAddr, u32)> = Vec::new();
                for (p, node) in got.holders.iter().enumerate() {
                    let p = p as u32;
                    let Some(node) = node else {
                        continue;
                    };
                    if busy.contains(node)
                        || resting
                            .get(node)
                            .is_some_and(|t| tokio::time::Instant::now() < *t)
                        || wanted.iter().any(|(n, _)| n == node)
                        || got.pieces.contains_key(&p)
                        || retry_at
                            .get(&p)
                            .is_some_and(|t| tokio::time::Instant::now() < *t)
                        || asked.contains_key(&p)
                    {
                        continue;
                    }
                    wanted.push((*node, p));
                }
                if wanted.is_empty() && running.is_empty() && got.fetch_over {
                    return; // every piece some node got is here, or could not be had
                }
                let reserve = got.own_reserve();
                for (node, p) in wanted {
                    if running.len() >= GATHER_AT_ONCE || !self.budget.take(pl, reserve) {
                        break;
                    }
                    got.bytes += pl;
                    busy.insert(node);
                    asked.insert(p, node);
                    let (exchange, digest, pool) =
                        (exchange.clone(), self.ask.digest.clone(), self.pool.clone());
                    let want = got.piece_size(p) as usize;
                    running.spawn(async move {
                        (node, p, exchange.read(node, &digest, p, want, &pool).await)
                    });
                }
            }
            let done = tokio::select! {
                done = running.join_next(), if !running.is_empty() => done,
                _ = tokio::time::sleep(ASK_EVERY / 2) => None,
            };
            let Some(Ok((node, p, result))) = done else {
                continue;
            };
            busy.remove(&node);
            asked.remove(&p);
            match result {
                Ok(data) => {
                    let kept = data.len() as u64;
                    exchange.count_in(kept);
                    self.keep(p, data, true);
                    self.give_back(pl - kept);
                }
                Err(e) => {
                    tracing::debug!(%node, piece = p, "not passed on: {e}");
                    let again = tokio::time::Instant::now() + REST_AFTER_FAILURE;
                    // A node that answered does not hold the piece (yet): asked again later.
                    // One that did not is left alone a moment.
                    match e {
                        ExchangeError::NotHeld(_) => retry_at.insert(p, again),
                        ExchangeError::Unreachable(_) | ExchangeError::Bad(_) => {
                            resting.insert(node, again)
                        }
                    };
                    self.got.lock().expect("poisoned").failed += 1;
                    self.give_back(pl);
                }
            }
        }
    }
}

/// Reads one piece of `want` bytes from `resp` into a buffer of the node's pool: fresh memory
/// for every read grew the proxy's RSS by 130 MiB now and then (tests/load.rs).
pub async fn fill(
    mut resp: reqwest::Response,
    want: usize,
    pool: &Arc<Pool>,
) -> Result<Bytes, String> {
    let mut buf: Pooled = pool.take(want);
    let mut filled = 0;
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if filled + chunk.len() > want {
            return Err(format!("more than the piece's {want} bytes came"));
        }
        buf.as_mut()[filled..filled + chunk.len()].copy_from_slice(&chunk);
        filled += chunk.len();
    }
    if filled < want {
        return Err(format!("the piece ended after {filled} of {want} bytes"));
    }
    Ok(buf.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let b = Budget::default();
        let reserve = 8 << 20;
        assert!(b.take(BUDGET - reserve - 10, 0));
        assert!(
            !b.take(11, reserve),
            "pieces from other nodes took the tracker's reserve"
        );
        assert!(b.take(10, reserve));
        assert!(b.take(reserve, 0));
        assert!(!b.take(1, 0), "more than the budget was handed out");
        b.give(BUDGET);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn the_tracker_reads_keep_the_nodes_share_of_the_budget() {
        let pl = 256 * 1024u64;
        let mut got = Got {
            shape: Some((64 << 20, pl as u32)),
            ..Default::default()
        };
        // Alone: the whole blob is its share, but at most half the budget.
        assert_eq!(got.own_reserve(), BUDGET / 2);
        // Among 8 nodes: an eighth and two pieces, less what it read already.
        let nodes: Vec<SocketAddr> = (1..8)
            .map(|i| format!("10.0.0.{i}:6883").parse().unwrap())
            .collect();
        got.holders = (0..256).map(|p| Some(nodes[p % 7])).collect();
        assert_eq!(got.own_reserve(), (8 << 20) + 2 * pl);
        got.own = 8 << 20;
        assert_eq!(got.own_reserve(), 2 * pl);
        got.own = 9 << 20;
        assert_eq!(got.own_reserve(), 0);
    }

    #[test]
    fn holders_are_learnt_piece_by_piece_and_asked_for_from_the_first_unsent() {
        let mut got = Got {
            shape: Some((6 * 256 * 1024, 256 * 1024)),
            ..Default::default()
        };
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:6883".parse().unwrap(),
            "10.0.0.2:6883".parse().unwrap(),
        );
        let h = EarlyHolders {
            nodes: vec![a, b],
            first: 0,
            pieces: vec![
                0,
                bay_common::api::NOT_PASSED_ON,
                1,
                bay_common::api::NOT_SENT,
            ],
        };
        assert_eq!(got.learn(&h), vec![0, 2]);
        assert_eq!(
            got.known, 3,
            "piece 3 is not sent yet: asked about from there"
        );
        assert_eq!(got.holders[..4], [Some(a), None, Some(b), None]);
        // The next answer is about pieces 3 on; indices are its own.
        let h = EarlyHolders {
            nodes: vec![b],
            first: 3,
            pieces: vec![0, 0, 0],
        };
        assert_eq!(got.learn(&h), vec![3, 4, 5]);
        assert_eq!(got.known, 6);
        assert_eq!(
            got.learn(&h),
            Vec::<u32>::new(),
            "nothing new the second time"
        );
    }

    #[tokio::test]
    async fn a_piece_is_served_once_it_arrives_and_not_after_the_read_ends() {
        let got = Arc::new(Mutex::new(Got::default()));
        let arrived = Arc::new(Notify::new());
        let holding = Holding {
            got: got.clone(),
            arrived: arrived.clone(),
        };
        let waiting = tokio::spawn({
            let h = holding.clone();
            async move { h.piece(2).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "served a piece that is not here");
        got.lock()
            .unwrap()
            .pieces
            .insert(2, Bytes::from_static(b"two"));
        arrived.notify_waiters();
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&b"two"[..]));
        // A piece that never comes: the read ends, and the waiter hears so at once.
        let waiting = tokio::spawn({
            let h = holding.clone();
            async move { h.piece(3).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        got.lock().unwrap().closed = true;
        arrived.notify_waiters();
        let r = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert_eq!(
            r.expect("still waiting after the read ended").unwrap(),
            None
        );
    }
}

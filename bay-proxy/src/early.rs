//! This node's slice of a blob, read while the tracker is still fetching it from upstream.
//!
//! Cold, a blob's torrent exists only once the tracker has every byte (the pieces' hashes need
//! them all), and until then its uplink sat idle while its downlink fetched; the nodes then
//! pulled for as long again: cold took the fetch plus a warm pull (`bench/RESULTS.md`, "One
//! blob at a time"). So while a proxy waits for the torrent it asks the tracker that is
//! fetching the blob for a slice (from the same kind of slot table as a held blob's, which the
//! tracker carries over to the torrent) and reads those bytes as they land there. Once the
//! torrent comes, the web seed offers them to librqbit like any piece read from a tracker, and
//! librqbit checks each against the torrent: bytes of a fetch that then failed its digest, or
//! anything else wrong, never reach a client or the cache.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bay_common::Digest;
use bay_common::pool::{Pool, Pooled};
use bay_common::torrent::{BlobTorrent, piece_length_for};
use bytes::Bytes;
use reqwest::header::HeaderValue;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::trackers::Trackers;
use crate::webseed::Plan;

/// How long a torrent request may take before the node looks for a fetch to read from: a held
/// blob's torrent comes sooner, and then nothing is asked.
const START_AFTER: Duration = Duration::from_millis(150);
/// Pause between looks for a fetch that has not started yet.
const LOOK_EVERY: Duration = Duration::from_millis(200);
/// How often the slice is asked for while reading (slices shrink as leechers arrive), at
/// first, and after [`FIRST_ASKS`] asks. Asking also keeps the slot.
const ASK_FIRST_EVERY: Duration = Duration::from_millis(200);
const FIRST_ASKS: u32 = 10;
const ASK_EVERY: Duration = Duration::from_secs(1);
/// Most bytes all of a node's early reads hold, waiting for their torrents.
pub const BUDGET: u64 = 32 << 20;

/// Bytes read early, counted against the node's [`BUDGET`].
#[derive(Default)]
pub struct Budget(AtomicU64);

impl Budget {
    fn take(&self, n: u64) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= BUDGET).then_some(used + n)
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
struct Got {
    /// Size and piece length the tracker announced.
    shape: Option<(u64, u32)>,
    pieces: BTreeMap<u32, Bytes>,
    /// Pieces the tracker sent other proxies early: this one gets them from its peers.
    elsewhere: std::collections::BTreeSet<u32>,
    /// Taken from the budget for pieces held or being read.
    bytes: u64,
    /// Finished or dropped: the budget is given back and nothing more is kept.
    closed: bool,
}

impl Got {
    fn close(&mut self, budget: &Budget) -> BTreeMap<u32, Bytes> {
        self.closed = true;
        budget.give(std::mem::take(&mut self.bytes));
        std::mem::take(&mut self.pieces)
    }
}

/// A running early read; dropping it stops the read and frees what it held.
pub struct Early {
    got: Arc<Mutex<Got>>,
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
}

impl Early {
    pub fn start(ask: Ask, budget: Arc<Budget>, pool: Arc<Pool>, stop: CancellationToken) -> Early {
        let got = Arc::new(Mutex::new(Got {
            shape: None,
            pieces: BTreeMap::new(),
            elsewhere: Default::default(),
            bytes: 0,
            closed: false,
        }));
        let run = Reader {
            ask,
            got: got.clone(),
            budget: budget.clone(),
            pool,
        };
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
        Early { got, budget, stop }
    }

    /// Stops reading; the whole pieces read, if they are of `torrent`'s shape, and the pieces
    /// the tracker sent other nodes instead.
    pub fn finish(self, torrent: &BlobTorrent) -> (Vec<(u32, Bytes)>, Vec<u32>) {
        self.stop.cancel();
        let mut got = self.got.lock().expect("poisoned");
        let shape = (torrent.size(), torrent.piece_length());
        let pieces = got.close(&self.budget);
        if got.shape != Some(shape) {
            return (Vec::new(), Vec::new());
        }
        let pieces = pieces
            .into_iter()
            .filter(|(p, data)| data.len() as u64 == torrent.piece_size(*p as usize))
            .collect();
        (
            pieces,
            std::mem::take(&mut got.elsewhere).into_iter().collect(),
        )
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        self.stop.cancel();
        self.got.lock().expect("poisoned").close(&self.budget);
    }
}

struct Reader {
    ask: Ask,
    got: Arc<Mutex<Got>>,
    budget: Arc<Budget>,
    pool: Arc<Pool>,
}

impl Reader {
    async fn run(&self) {
        tokio::time::sleep(START_AFTER).await;
        // The tracker that is fetching the blob, and the first slice it gave us.
        let (base, first) = loop {
            if let Some(found) = self.ask.trackers.early_slot(&self.ask).await {
                break found;
            }
            tokio::time::sleep(LOOK_EVERY).await;
        };
        let (size, pl) = (first.size, piece_length_for(first.size));
        let pieces = size.div_ceil(pl as u64) as u32;
        self.got.lock().expect("poisoned").shape = Some((size, pl));
        let mut plan = Plan::from_slot(&first.slot, pieces);
        tracing::debug!(?plan.slice, size, "reading a slice while the tracker fetches the blob");
        let mut asked = (1u32, Instant::now());
        loop {
            let every = if asked.0 < FIRST_ASKS {
                ASK_FIRST_EVERY
            } else {
                ASK_EVERY
            };
            if asked.1.elapsed() >= every {
                match self.ask.trackers.early_slot_at(&base, &self.ask).await {
                    Ok(s) if s.size == size => plan = Plan::from_slot(&s.slot, pieces),
                    // The fetch is over (or failed): the torrent answers next.
                    _ => return,
                }
                asked = (asked.0 + 1, Instant::now());
            }
            let Some(run) = self.next_run(&plan) else {
                tokio::time::sleep(every).await;
                continue;
            };
            let bytes = run_bytes(&run, pl, size);
            {
                let mut got = self.got.lock().expect("poisoned");
                if got.closed || !self.budget.take(bytes) {
                    tracing::debug!("the node's early reads hold their budget: the rest waits");
                    return;
                }
                got.bytes += bytes;
            }
            let mut received = run.start..run.start;
            let read = self.read(&base, run.clone(), pl, size, &mut received).await;
            // What was budgeted for pieces not read goes back.
            let missing = bytes - run_bytes(&received, pl, size);
            if missing > 0 {
                let mut got = self.got.lock().expect("poisoned");
                if !got.closed {
                    got.bytes -= missing;
                    self.budget.give(missing);
                }
            }
            if let Err(e) = read {
                tracing::debug!(tracker = %base, "early read stopped: {e}");
                return;
            }
        }
    }

    /// The next piece of the slice not read yet. One at a time: the slice may shrink
    /// meanwhile, and the read in flight when the torrent comes is cut off, its bytes wasted
    /// (at 1 MiB per read that was 0.12 S of the tracker's uplink in N=16, 10 Mbit/s cold runs).
    fn next_run(&self, plan: &Plan) -> Option<Range<u32>> {
        let got = self.got.lock().expect("poisoned");
        let (a, b) = plan.slice;
        let p = (a..b).find(|p| !got.pieces.contains_key(p) && !got.elsewhere.contains(p))?;
        Some(p..p + 1)
    }

    /// Reads pieces `run` (budgeted already) as the fetch writes them, or the part of it the
    /// tracker still has for early readers; `received` is what came.
    async fn read(
        &self,
        base: &url::Url,
        run: Range<u32>,
        pl: u32,
        size: u64,
        received: &mut Range<u32>,
    ) -> Result<(), String> {
        let start = run.start as u64 * pl as u64;
        let end = (run.end as u64 * pl as u64).min(size);
        let answer = self
            .ask
            .trackers
            .early_bytes(base, &self.ask, start, end - 1)
            .await?;
        let Some((mut resp, a, b)) = answer else {
            self.got.lock().expect("poisoned").elsewhere.extend(run);
            return Ok(());
        };
        let (first, last) = ((a / pl as u64) as u32, (b / pl as u64) as u32);
        if a % pl as u64 != 0 || (b + 1 != size && (b + 1) % pl as u64 != 0) {
            return Err(format!("bytes {a}-{b} are not whole pieces"));
        }
        self.got
            .lock()
            .expect("poisoned")
            .elsewhere
            .extend(run.start..first);
        let run = first..last + 1;
        *received = first..first;
        // Each piece in a buffer of the node's pool: fresh memory for every read grew the
        // proxy's RSS by 130 MiB now and then (tests/load.rs).
        let mut filling: Option<(Pooled, usize)> = None;
        let mut piece = first;
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            let mut c = &chunk[..];
            while !c.is_empty() && piece < run.end {
                let want = (pl as u64).min(size - piece as u64 * pl as u64) as usize;
                let (buf, filled) = filling.get_or_insert_with(|| (self.pool.take(want), 0));
                let n = (want - *filled).min(c.len());
                buf.as_mut()[*filled..*filled + n].copy_from_slice(&c[..n]);
                *filled += n;
                c = &c[n..];
                if *filled == want {
                    let (buf, _) = filling.take().expect("just filled");
                    let mut got = self.got.lock().expect("poisoned");
                    if got.closed {
                        return Ok(());
                    }
                    got.pieces.insert(piece, buf.into_bytes());
                    piece += 1;
                    received.end = piece;
                }
            }
        }
        if piece < run.end {
            return Err(format!("the range ended at piece {piece} of {run:?}"));
        }
        Ok(())
    }
}

fn run_bytes(run: &Range<u32>, pl: u32, size: u64) -> u64 {
    let start = run.start as u64 * pl as u64;
    (run.end as u64 * pl as u64).min(size).saturating_sub(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let b = Budget::default();
        assert!(b.take(BUDGET - 10));
        assert!(!b.take(11), "more than the budget was handed out");
        assert!(b.take(10));
        b.give(BUDGET);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn runs_cover_the_last_short_piece() {
        let pl = 256 * 1024;
        let size = 3 * pl as u64 + 5;
        assert_eq!(run_bytes(&(0..4), pl, size), size);
        assert_eq!(run_bytes(&(3..4), pl, size), 5);
        assert_eq!(run_bytes(&(1..2), pl, size), pl as u64);
    }
}

//! Pieces nodes offer to a fetch that starts over.
//!
//! A tracker killed mid-fetch takes what it had fetched with it, but the nodes keep their copy:
//! each piece it had fetched went early to some node (bay-proxy's early reads), and the nodes
//! hold the pieces while they wait for the torrent. When they ask the next tracker, they say
//! which pieces they hold (`bay_common::api::Held`); its fetch reads those from the nodes'
//! exchange ports, in order, and asks upstream only for the rest (a `Range` request). In the
//! chaos benchmark the second tracker fetched the dead one's half-done layers again from the
//! start, 0.11 S of upstream bytes (`bench/RESULTS.md`, "Every fault at once").
//!
//! Nothing a node sends is trusted: the blob's digest covers every byte, and a fetch whose
//! digest fails after it took bytes from nodes runs again from upstream alone (`crate::fetch`).
//! The tracker reads only from the address the offer came from (the caller's IP and the port it
//! named) and only the path of a piece of that blob.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bay_common::Digest;
use bay_common::api::Held;
use bay_common::torrent::piece_length_for;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

/// Nodes are on the tracker's network; one that does not answer at once is not waited for.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Between reads of a piece's bytes, as between nodes (bay-proxy's `exchange`).
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Pieces read from nodes at once (fewer of big pieces, see [`RUN_BYTES`]); each read goes
/// to another node where several hold it.
const AT_ONCE: u64 = 8;
/// Bytes of pieces asked for in one run, and held at once: memory stays bounded whatever the
/// piece length.
const RUN_BYTES: u64 = 32 << 20;
/// A whole piece must come within this, plus a second per 128 KiB of it: a node that trickles
/// its bytes does not hold the fetch up for long.
const PIECE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a fetch waits, once, for an offer of the next piece before it asks upstream.
pub const LATE_OFFERS: Duration = Duration::from_millis(250);
/// Gaps between offered pieces a fetch asks upstream for (each a `Range` request) before it
/// asks for all the rest.
pub const MAX_GAPS: usize = 16;
/// Blobs with offers kept, and offers kept per blob: a bound, not a tuning.
const MAX_BLOBS: usize = 1024;
const MAX_NODES: usize = 256;

/// Why a piece could not be read from a node.
enum ReadFailed {
    /// The node answered that it does not hold the piece.
    NotHeld(String),
    /// It could not be reached, broke off, sent the wrong length or took too long: none of its
    /// pieces are asked for again.
    Node(String),
}

/// One node's offer.
struct Offer {
    node: SocketAddr,
    held: Held,
}

/// The pieces nodes offered, per blob, while a fetch of it may still use them.
pub struct Offers {
    offers: Mutex<HashMap<Digest, Vec<Offer>>>,
    client: reqwest::Client,
}

impl Offers {
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Offers {
            offers: Mutex::default(),
            client,
        })
    }

    /// Records what the node at `node` (its exchange address) holds of `digest`, in place of
    /// what it offered before; one offer per IP, so one caller cannot offer through many
    /// ports.
    pub fn offer(&self, digest: &Digest, node: SocketAddr, held: Held) {
        let mut map = self.offers.lock().expect("offers poisoned");
        if map.len() >= MAX_BLOBS && !map.contains_key(digest) {
            return;
        }
        let offers = map.entry(digest.clone()).or_default();
        offers.retain(|o| o.node.ip() != node.ip());
        if offers.len() < MAX_NODES {
            offers.push(Offer { node, held });
        }
    }

    /// Drops the offers for `digest`: its fetch is over, or their bytes were wrong.
    pub fn forget(&self, digest: &Digest) {
        self.offers.lock().expect("offers poisoned").remove(digest);
    }

    /// The blob's size as the nodes offering pieces saw it (`crate::fetch` takes only offers of
    /// the size upstream's HEAD gave), if any node offered pieces.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        let map = self.offers.lock().expect("offers poisoned");
        Some(map.get(digest)?.first()?.held.size)
    }

    /// The first piece from `from` on that some node offers.
    pub fn next_offered(&self, digest: &Digest, size: u64, from: u32) -> Option<u32> {
        let map = self.offers.lock().expect("offers poisoned");
        map.get(digest)?
            .iter()
            .filter(|o| o.held.size == size)
            .flat_map(|o| o.held.runs.iter())
            .filter(|(_, last)| *last >= from)
            .map(|(first, _)| (*first).max(from))
            .min()
    }

    /// The first piece boundary in `[pos, pos + len]` (before the blob's end) whose piece some
    /// node offers: where a fetch streaming from upstream at `pos` leaves it for the nodes.
    pub fn offered_boundary(
        &self,
        digest: &Digest,
        size: u64,
        pos: u64,
        len: usize,
    ) -> Option<u64> {
        let pl = piece_length_for(size) as u64;
        let first = pos.div_ceil(pl);
        let last = ((pos + len as u64) / pl).min(size.div_ceil(pl).saturating_sub(1));
        if first > last {
            return None;
        }
        let p = self.next_offered(digest, size, first as u32)? as u64;
        (p <= last).then_some(p * pl)
    }

    /// The nodes offering piece `p` of the blob at `size`, the one to ask first first.
    fn holders(&self, digest: &Digest, size: u64, p: u32) -> Vec<SocketAddr> {
        let map = self.offers.lock().expect("offers poisoned");
        let mut nodes: Vec<SocketAddr> = map
            .get(digest)
            .into_iter()
            .flatten()
            .filter(|o| o.held.size == size && o.held.holds(p))
            .map(|o| o.node)
            .collect();
        // Turn by turn, so consecutive pieces come from different nodes' uplinks.
        if !nodes.is_empty() {
            let k = p as usize % nodes.len();
            nodes.rotate_left(k);
        }
        nodes
    }

    /// Drops `node`'s whole offer: it could not be reached, or did not send a piece in time.
    fn drop_node(&self, digest: &Digest, node: SocketAddr) {
        let mut map = self.offers.lock().expect("offers poisoned");
        if let Some(offers) = map.get_mut(digest) {
            offers.retain(|o| o.node != node);
        }
    }

    /// Withdraws piece `p` from `node`'s offer: the node answered that it does not hold it.
    fn withdraw(&self, digest: &Digest, node: SocketAddr, p: u32) {
        let mut map = self.offers.lock().expect("offers poisoned");
        if let Some(o) = map
            .get_mut(digest)
            .and_then(|offers| offers.iter_mut().find(|o| o.node == node))
        {
            let mut runs = Vec::with_capacity(o.held.runs.len() + 1);
            for &(a, b) in &o.held.runs {
                if (a..=b).contains(&p) {
                    if a < p {
                        runs.push((a, p - 1));
                    }
                    if p < b {
                        runs.push((p + 1, b));
                    }
                } else {
                    runs.push((a, b));
                }
            }
            o.held.runs = runs;
        }
    }

    /// The pieces from `from` on that some node offers, in order, read from the nodes, up to
    /// the first that could not be read (or a run's worth of bytes). The stream is empty when
    /// no node offers piece `from`; the caller then asks upstream for the rest.
    pub fn run_from<'a>(
        &'a self,
        digest: &'a Digest,
        size: u64,
        from: u32,
    ) -> impl Stream<Item = Option<Bytes>> + 'a {
        let pl = piece_length_for(size) as u64;
        let count = size.div_ceil(pl) as u32;
        let most = (RUN_BYTES / pl).max(1) as u32;
        let run: Vec<(u32, Vec<SocketAddr>)> = (from..count)
            .take(most as usize)
            .map(|p| (p, self.holders(digest, size, p)))
            .take_while(|(_, nodes)| !nodes.is_empty())
            .collect();
        futures::stream::iter(run)
            .map(move |(p, nodes)| {
                let want = pl.min(size - p as u64 * pl) as usize;
                self.read_piece(digest, p, want, nodes)
            })
            .buffered(AT_ONCE.min(RUN_BYTES / pl).max(1) as usize)
    }

    /// Piece `p` from the first of `nodes` that has it.
    async fn read_piece(
        &self,
        digest: &Digest,
        p: u32,
        want: usize,
        nodes: Vec<SocketAddr>,
    ) -> Option<Bytes> {
        for node in nodes {
            match self.read_from(node, digest, p, want).await {
                Ok(data) => return Some(data),
                Err(ReadFailed::NotHeld(e)) => {
                    tracing::debug!(%node, piece = p, "offered piece not read: {e}");
                    self.withdraw(digest, node, p);
                }
                Err(ReadFailed::Node(e)) => {
                    tracing::debug!(%node, piece = p, "node dropped from the offers: {e}");
                    self.drop_node(digest, node);
                }
            }
        }
        None
    }

    async fn read_from(
        &self,
        node: SocketAddr,
        digest: &Digest,
        p: u32,
        want: usize,
    ) -> Result<Bytes, ReadFailed> {
        let url = format!("http://{node}{}", bay_common::api::exchange_path(digest, p));
        let timeout = PIECE_TIMEOUT + Duration::from_secs(want as u64 / (128 << 10));
        let mut resp = self
            .client
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| ReadFailed::Node(e.to_string()))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(ReadFailed::NotHeld(format!("answered {}", resp.status())));
        }
        let mut buf = BytesMut::with_capacity(want);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ReadFailed::Node(e.to_string()))?
        {
            if buf.len() + chunk.len() > want {
                return Err(ReadFailed::Node(format!(
                    "more than the piece's {want} bytes came"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() != want {
            return Err(ReadFailed::Node(format!(
                "{} of the piece's {want} bytes came",
                buf.len()
            )));
        }
        Ok(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(node: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, node], 7000))
    }

    #[test]
    fn a_stream_is_left_only_at_the_boundary_of_an_offered_piece() {
        let offers = Offers::new().unwrap();
        let d = Digest::sha256_of(b"blob");
        let pl = 256 * 1024;
        let size = 10 * pl + 100;
        assert_eq!(offers.offered_boundary(&d, size, 0, 4 * pl as usize), None);
        offers.offer(&d, addr(1), Held::parse(1, size, "4-5,10-10").unwrap());
        // A chunk reaching piece 4's start, or crossing it, is cut there; one short of it not.
        assert_eq!(
            offers.offered_boundary(&d, size, 3 * pl, pl as usize),
            Some(4 * pl)
        );
        assert_eq!(
            offers.offered_boundary(&d, size, 3 * pl + 1, pl as usize),
            Some(4 * pl)
        );
        assert_eq!(
            offers.offered_boundary(&d, size, 3 * pl, pl as usize - 1),
            None
        );
        // Mid-piece 4 the next boundary is piece 5's; piece 6 is offered by nobody.
        assert_eq!(
            offers.offered_boundary(&d, size, 4 * pl + 1, pl as usize),
            Some(5 * pl)
        );
        assert_eq!(
            offers.offered_boundary(&d, size, 5 * pl + 1, pl as usize),
            None
        );
        // The last piece (10) is cut at its start; the blob's end is no boundary.
        assert_eq!(
            offers.offered_boundary(&d, size, 9 * pl + 5, pl as usize),
            Some(10 * pl)
        );
        assert_eq!(offers.offered_boundary(&d, size, 10 * pl + 1, 99), None);
        // Offers of another size do not count.
        assert_eq!(
            offers.offered_boundary(&d, size + 1, 3 * pl, pl as usize),
            None
        );
    }

    #[test]
    fn holders_follow_the_offers_and_what_was_withdrawn() {
        let offers = Offers::new().unwrap();
        let d = Digest::sha256_of(b"blob");
        let size = 10 * 256 * 1024;
        offers.offer(&d, addr(1), Held::parse(1, size, "0-4").unwrap());
        offers.offer(&d, addr(2), Held::parse(2, size, "3-6").unwrap());
        // An offer of another size (a wrong early read) is never used.
        offers.offer(&d, addr(3), Held::parse(3, size + 1, "0-9").unwrap());
        assert_eq!(offers.size(&d), Some(size));
        assert_eq!(offers.holders(&d, size, 0), vec![addr(1)]);
        let both = offers.holders(&d, size, 3);
        let mut sorted = both.clone();
        sorted.sort();
        assert_eq!(sorted, vec![addr(1), addr(2)]);
        assert_ne!(offers.holders(&d, size, 4), both, "turns rotate");
        assert!(offers.holders(&d, size, 7).is_empty());
        assert_eq!(offers.next_offered(&d, size, 0), Some(0));
        assert_eq!(offers.next_offered(&d, size, 5), Some(5));
        assert_eq!(
            offers.next_offered(&d, size, 7),
            None,
            "node 3's size is another"
        );
        offers.withdraw(&d, addr(2), 4);
        assert_eq!(offers.holders(&d, size, 4), vec![addr(1)]);
        assert_eq!(offers.holders(&d, size, 5), vec![addr(2)]);
        // A node's new offer replaces its old one.
        offers.offer(&d, addr(1), Held::parse(1, size, "8-9").unwrap());
        assert!(offers.holders(&d, size, 0).is_empty());
        // One offer per IP: another port of node 2 replaces its offer.
        offers.offer(
            &d,
            SocketAddr::from(([127, 0, 0, 2], 7001)),
            Held::parse(7001, size, "0-0").unwrap(),
        );
        assert_eq!(
            offers.holders(&d, size, 0),
            vec![SocketAddr::from(([127, 0, 0, 2], 7001))]
        );
        assert!(offers.holders(&d, size, 5).is_empty());
        // A node that could not be reached is dropped whole.
        offers.drop_node(&d, SocketAddr::from(([127, 0, 0, 2], 7001)));
        assert!(offers.holders(&d, size, 0).is_empty());
        offers.forget(&d);
        assert_eq!(offers.size(&d), None);
    }
}

//! Swarm state and the peer hand-out policy of the announce endpoint.
//!
//! The policy is what makes simultaneous librqbit leechers trade pieces
//! (`notes/librqbit-workaround.md`, "A"): a leecher that has nothing yet is handed only seeds,
//! and meets other leechers only once both have pieces. librqbit sends no bitfield while it has
//! nothing, and then never sends HAVEs on that connection, so two peers that meet empty never
//! learn what the other gets. Leechers are asked to re-announce every second so they meet
//! each other as soon as they have something; seeds every minute.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bay_common::announce::{
    AnnounceRequest, AnnounceResponse, Event, InfoHash, PeerId, ScrapeEntry,
};
use bay_common::api::Slot;
use rand::seq::{IndexedRandom, SliceRandom};

pub const LEECHER_INTERVAL: Duration = Duration::from_secs(1);
pub const SEED_INTERVAL: Duration = Duration::from_secs(60);
/// A peer that missed this many announce intervals (plus slack) is gone.
const MISSED_INTERVALS: u32 = 3;
const EXPIRY_SLACK: Duration = Duration::from_secs(10);
pub const DEFAULT_NUMWANT: usize = 50;
pub const MAX_NUMWANT: usize = 200;
/// Bounds on memory an announcer can make us spend.
const MAX_SWARMS: usize = 100_000;
const MAX_PEERS_PER_SWARM: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwarmError {
    #[error("tracker is tracking too many torrents")]
    TooManySwarms,
    #[error("swarm is full")]
    SwarmFull,
}

#[derive(Debug, Clone)]
struct Peer {
    peer_id: PeerId,
    left: u64,
    downloaded: u64,
    expires: Instant,
}

impl Peer {
    fn is_seed(&self) -> bool {
        self.left == 0
    }
    /// Has verified pieces to offer, so it has sent or will send a bitfield.
    fn has_pieces(&self) -> bool {
        self.left == 0 || self.downloaded > 0
    }
}

#[derive(Default)]
struct Swarm {
    peers: PeerTable,
    completed: u32,
}

/// A swarm's peers in two pools, seeds and leechers, each a `Vec` with an index by address:
/// an announce draws its handful of peers by random index instead of walking thousands, and
/// an empty leecher (offered seeds only) draws from the seeds alone.
#[derive(Default)]
struct PeerTable {
    seeds: Vec<(SocketAddr, Peer)>,
    leechers: Vec<(SocketAddr, Peer)>,
    /// Where each peer is: (in `seeds`?, position).
    at: HashMap<SocketAddr, (bool, usize)>,
}

impl PeerTable {
    fn len(&self) -> usize {
        self.at.len()
    }

    fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    fn seeds(&self) -> usize {
        self.seeds.len()
    }

    fn contains(&self, addr: &SocketAddr) -> bool {
        self.at.contains_key(addr)
    }

    fn pool(&mut self, seed: bool) -> &mut Vec<(SocketAddr, Peer)> {
        if seed {
            &mut self.seeds
        } else {
            &mut self.leechers
        }
    }

    /// Adds or updates a peer, moving it between pools if it became a seed; returns the old
    /// entry.
    fn insert(&mut self, addr: SocketAddr, peer: Peer) -> Option<Peer> {
        let old = self.remove(&addr);
        let seed = peer.is_seed();
        let pool = self.pool(seed);
        pool.push((addr, peer));
        let i = pool.len() - 1;
        self.at.insert(addr, (seed, i));
        old
    }

    fn remove(&mut self, addr: &SocketAddr) -> Option<Peer> {
        let (seed, i) = self.at.remove(addr)?;
        let pool = self.pool(seed);
        let (_, peer) = pool.swap_remove(i);
        if let Some((moved, _)) = pool.get(i) {
            let moved = *moved;
            self.at.insert(moved, (seed, i));
        }
        Some(peer)
    }

    fn retain(&mut self, keep: impl Fn(&Peer) -> bool) {
        let gone: Vec<SocketAddr> = self
            .seeds
            .iter()
            .chain(&self.leechers)
            .filter(|(_, p)| !keep(p))
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            self.remove(&a);
        }
    }

    /// Up to `room` distinct peers, uniformly at random among those `eligible`, seeds only
    /// unless `leechers_too`. Random probes find them in O(room) when most peers qualify; a
    /// full pass finishes the job when few do.
    fn sample(
        &self,
        room: usize,
        leechers_too: bool,
        eligible: impl Fn(&SocketAddr, &Peer) -> bool,
        rng: &mut impl rand::Rng,
    ) -> Vec<SocketAddr> {
        let n = self.seeds.len() + if leechers_too { self.leechers.len() } else { 0 };
        let nth = |i: usize| match self.seeds.get(i) {
            Some(e) => e,
            None => &self.leechers[i - self.seeds.len()],
        };
        let mut picked: Vec<SocketAddr> = Vec::with_capacity(room.min(n));
        if room == 0 || n == 0 {
            return picked;
        }
        if n > 4 * room {
            for _ in 0..8 * room {
                let (a, p) = nth(rng.random_range(0..n));
                if eligible(a, p) && !picked.contains(a) {
                    picked.push(*a);
                    if picked.len() == room {
                        return picked;
                    }
                }
            }
        }
        // Few qualify (or the swarm is small): take a uniform sample of all that do.
        let all: Vec<SocketAddr> = (0..n)
            .map(nth)
            .filter(|(a, p)| eligible(a, p))
            .map(|(a, _)| *a)
            .collect();
        all.choose_multiple(rng, room).copied().collect()
    }
}

#[derive(Default)]
pub struct Swarms {
    inner: Mutex<HashMap<InfoHash, Swarm>>,
}

impl Swarms {
    /// Records an announce from `peer` and chooses the peers to hand back. `own_seed` is the
    /// tracker's own seed for torrents it holds.
    pub fn announce(
        &self,
        req: &AnnounceRequest,
        peer: SocketAddr,
        own_seed: Option<SocketAddr>,
        now: Instant,
    ) -> Result<AnnounceResponse, SwarmError> {
        let mut swarms = self.inner.lock().expect("swarms poisoned");
        if !swarms.contains_key(&req.info_hash) && swarms.len() >= MAX_SWARMS {
            return Err(SwarmError::TooManySwarms);
        }
        let swarm = swarms.entry(req.info_hash).or_default();
        let left = if req.event == Some(Event::Completed) {
            0
        } else {
            req.left
        };
        let interval = if left == 0 {
            SEED_INTERVAL
        } else {
            LEECHER_INTERVAL
        };
        if req.event == Some(Event::Stopped) {
            swarm.peers.remove(&peer);
        } else {
            if !swarm.peers.contains(&peer) && swarm.peers.len() >= MAX_PEERS_PER_SWARM {
                return Err(SwarmError::SwarmFull);
            }
            let me = Peer {
                peer_id: req.peer_id,
                left,
                downloaded: req.downloaded,
                expires: now + interval * MISSED_INTERVALS + EXPIRY_SLACK,
            };
            let was_seed = swarm.peers.insert(peer, me).is_some_and(|p| p.is_seed());
            if left == 0 && !was_seed && req.event != Some(Event::Started) {
                swarm.completed += 1;
            }
        }
        let me_has_pieces = left == 0 || req.downloaded > 0;
        let numwant = req
            .numwant
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_NUMWANT)
            .min(MAX_NUMWANT);
        // Seeds need nobody (leechers connect to them); leechers always get the tracker's own
        // seed, the one peer sure to have it all, plus a random sample of the rest.
        let wants_peers = left != 0 && req.event != Some(Event::Stopped);
        let own = own_seed.filter(|_| wants_peers && numwant > 0);
        let room = if wants_peers {
            numwant.saturating_sub(own.is_some() as usize)
        } else {
            0
        };
        // Two bay-proxies that are handed each other both connect, and librqbit keeps both
        // connections (it keys incoming peers by their source port): every uploader then
        // serves each leecher twice over, pieces crawl, and librqbit re-fetches the slow ones
        // elsewhere (`bench/RESULTS.md`). So of two bay leechers, only the one with the lower
        // address is handed the other, and connects; the other takes the incoming connection.
        let bay = req.peer_id.is_bay();
        let mut rng = rand::rng();
        let mut sample = swarm.peers.sample(
            room,
            me_has_pieces,
            |addr, p| {
                *addr != peer
                    && Some(*addr) != own
                    && p.expires > now
                    && (p.is_seed() || p.has_pieces())
                    && (p.is_seed() || !bay || !p.peer_id.is_bay() || *addr > peer)
            },
            &mut rng,
        );
        sample.shuffle(&mut rng);
        let mut peers = Vec::with_capacity(sample.len() + 1);
        peers.extend(own);
        peers.extend(sample);
        let seeds = swarm.peers.seeds() as u32;
        let complete = seeds + own_seed.is_some() as u32;
        let incomplete = swarm.peers.len() as u32 - seeds;
        if swarm.peers.is_empty() {
            swarms.remove(&req.info_hash);
        }
        Ok(AnnounceResponse {
            interval: interval.as_secs() as u32,
            min_interval: Some(interval.as_secs() as u32),
            complete,
            incomplete,
            peers,
        })
    }

    /// Live seeds of a torrent (peers that announced they hold it all).
    pub fn seeds(&self, info_hash: &InfoHash, now: Instant) -> u32 {
        let swarms = self.inner.lock().expect("swarms poisoned");
        swarms.get(info_hash).map_or(0, |s| {
            s.peers
                .seeds
                .iter()
                .filter(|(_, p)| p.expires > now)
                .count() as u32
        })
    }

    pub fn scrape(
        &self,
        hashes: &[InfoHash],
        held: impl Fn(&InfoHash) -> bool,
    ) -> Vec<(InfoHash, ScrapeEntry)> {
        let swarms = self.inner.lock().expect("swarms poisoned");
        hashes
            .iter()
            .map(|h| {
                let s = swarms.get(h);
                let seeds = s.map_or(0, |s| s.peers.seeds());
                let total = s.map_or(0, |s| s.peers.len());
                (
                    *h,
                    ScrapeEntry {
                        complete: (seeds + held(h) as usize) as u32,
                        downloaded: s.map_or(0, |s| s.completed),
                        incomplete: (total - seeds) as u32,
                    },
                )
            })
            .collect()
    }

    /// Forgets peers that stopped announcing (librqbit never sends `stopped`).
    pub fn expire(&self, now: Instant) {
        let mut swarms = self.inner.lock().expect("swarms poisoned");
        swarms.retain(|_, s| {
            s.peers.retain(|p| p.expires > now);
            !s.peers.is_empty()
        });
    }

    /// (swarms, peers) tracked.
    pub fn usage(&self) -> (u64, u64) {
        let swarms = self.inner.lock().expect("swarms poisoned");
        (
            swarms.len() as u64,
            swarms.values().map(|s| s.peers.len() as u64).sum(),
        )
    }
}

/// Hands each leecher of a torrent a distinct slice to prioritise (the "B" of
/// `notes/librqbit-workaround.md`: distinct slices are needed, random ones swarm badly).
/// Leechers get indices in arrival order; index i starts at the van der Corput point of i
/// (0, ½, ¼, ¾, ⅛, …), so slices stay balanced however many arrive, and each slice ends where
/// the next live leecher's begins. Leechers ask again every second; those that stop asking
/// free their index.
#[derive(Default)]
pub struct Slots {
    inner: Mutex<HashMap<InfoHash, SlotTable>>,
}

/// Slot index and expiry per leecher of one torrent.
type SlotTable = HashMap<SocketAddr, (u32, Instant)>;

const SLOT_TTL: Duration = Duration::from_secs(10);

/// The i-th point of the base-2 van der Corput sequence.
fn corput(i: u32) -> f64 {
    i.reverse_bits() as f64 / (1u64 << 32) as f64
}

impl Slots {
    pub fn slot(
        &self,
        info_hash: InfoHash,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<Slot, SwarmError> {
        let mut all = self.inner.lock().expect("slots poisoned");
        if !all.contains_key(&info_hash) && all.len() >= MAX_SWARMS {
            return Err(SwarmError::TooManySwarms);
        }
        let table = all.entry(info_hash).or_default();
        table.retain(|_, (_, exp)| *exp > now);
        let index = match table.get(&peer) {
            Some((i, _)) => *i,
            None => {
                if table.len() >= MAX_PEERS_PER_SWARM {
                    return Err(SwarmError::SwarmFull);
                }
                let mut used: Vec<u32> = table.values().map(|(i, _)| *i).collect();
                used.sort_unstable();
                let mut free = 0;
                for u in used {
                    if u == free {
                        free += 1;
                    } else if u > free {
                        break;
                    }
                }
                free
            }
        };
        table.insert(peer, (index, now + SLOT_TTL));
        let start = corput(index);
        let end = table
            .values()
            .map(|(i, _)| corput(*i))
            .filter(|p| *p > start)
            .fold(1.0, f64::min);
        Ok(Slot {
            index,
            start,
            end,
            seeds: 0,
        })
    }

    pub fn expire(&self, now: Instant) {
        let mut all = self.inner.lock().expect("slots poisoned");
        all.retain(|_, t| {
            t.retain(|_, (_, exp)| *exp > now);
            !t.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(port: u16, left: u64, downloaded: u64) -> AnnounceRequest {
        AnnounceRequest {
            info_hash: InfoHash([7; 20]),
            peer_id: PeerId([port as u8; 20]),
            port,
            uploaded: 0,
            downloaded,
            left,
            event: None,
            compact: true,
            numwant: None,
            ip: None,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn empty_leechers_get_only_seeds() {
        let s = Swarms::default();
        let now = Instant::now();
        let seed = addr(1);
        s.announce(&req(1, 0, 100), seed, None, now).unwrap();
        s.announce(&req(2, 100, 0), addr(2), None, now).unwrap();
        let r = s.announce(&req(3, 100, 0), addr(3), None, now).unwrap();
        assert_eq!(
            r.peers,
            vec![seed],
            "empty leecher must not meet empty leechers"
        );
        assert_eq!(r.interval, 1);
        assert_eq!((r.complete, r.incomplete), (1, 2));
        // Once 2 and 3 have pieces they meet.
        s.announce(&req(2, 50, 50), addr(2), None, now).unwrap();
        let mut r = s.announce(&req(3, 60, 40), addr(3), None, now).unwrap();
        r.peers.sort();
        assert_eq!(r.peers, vec![seed, addr(2)]);
        // A seed is told to come back in a minute and handed nobody.
        let r = s.announce(&req(1, 0, 100), seed, None, now).unwrap();
        assert!(r.peers.is_empty());
        assert_eq!(r.interval, 60);
    }

    #[test]
    fn of_two_bay_leechers_only_the_lower_address_is_handed_the_other() {
        let s = Swarms::default();
        let now = Instant::now();
        let bay = |port: u16, left, downloaded| {
            let mut r = req(port, left, downloaded);
            r.peer_id = PeerId(*b"-BY0100-abcdefghijkl");
            r
        };
        for p in [10, 11, 12] {
            s.announce(&bay(p, 50, 50), addr(p), None, now).unwrap();
        }
        s.announce(&bay(20, 0, 100), addr(20), None, now).unwrap();
        let handed = |r: AnnounceResponse| {
            let mut p = r.peers;
            p.sort();
            p
        };
        let low = s.announce(&bay(10, 50, 50), addr(10), None, now).unwrap();
        assert_eq!(handed(low), vec![addr(11), addr(12), addr(20)]);
        // The highest bay leecher connects to nobody but the seed: the others connect to it.
        let high = s.announce(&bay(12, 50, 50), addr(12), None, now).unwrap();
        assert_eq!(handed(high), vec![addr(20)]);
        // Other clients are handed everyone, and are handed to everyone.
        let other = s.announce(&req(15, 50, 50), addr(15), None, now).unwrap();
        assert_eq!(handed(other), vec![addr(10), addr(11), addr(12), addr(20)]);
        let high = s.announce(&bay(12, 50, 50), addr(12), None, now).unwrap();
        assert_eq!(handed(high), vec![addr(15), addr(20)]);
    }

    #[test]
    fn own_seed_first_and_numwant() {
        let s = Swarms::default();
        let now = Instant::now();
        let own = SocketAddr::from(([127, 0, 0, 9], 6881));
        for p in 10..40 {
            s.announce(&req(p, 0, 1), addr(p), Some(own), now).unwrap();
        }
        let mut r = req(2, 100, 0);
        r.numwant = Some(5);
        let a = s.announce(&r, addr(2), Some(own), now).unwrap();
        assert_eq!(a.peers.len(), 5);
        assert_eq!(a.peers[0], own);
        r.numwant = Some(1_000_000_000);
        let a = s.announce(&r, addr(2), Some(own), now).unwrap();
        assert_eq!(a.peers.len(), 31);
        assert_eq!(a.complete, 31);
    }

    #[test]
    fn big_swarms_give_a_fair_sample() {
        let s = Swarms::default();
        let now = Instant::now();
        let own = SocketAddr::from(([127, 0, 0, 9], 6881));
        for p in 1000..4000 {
            s.announce(&req(p, 0, 1), addr(p), Some(own), now).unwrap();
        }
        let mut hits = std::collections::HashMap::<SocketAddr, u32>::new();
        for _ in 0..200 {
            let a = s
                .announce(&req(9, 100, 0), addr(9), Some(own), now)
                .unwrap();
            assert_eq!(a.peers.len(), DEFAULT_NUMWANT);
            assert_eq!(a.peers[0], own);
            let distinct: std::collections::HashSet<_> = a.peers.iter().collect();
            assert_eq!(distinct.len(), a.peers.len(), "a peer handed out twice");
            assert!(!a.peers.contains(&addr(9)), "a peer handed itself");
            assert_eq!((a.complete, a.incomplete), (3001, 1));
            for p in &a.peers[1..] {
                *hits.entry(*p).or_default() += 1;
            }
        }
        // 200 × 49 draws from 3000 seeds: about 3.3 each if the sample is uniform; a sampler
        // that favoured the start or end of the map would leave most of the swarm unseen.
        assert!(
            hits.len() > 2800,
            "only {} of 3000 seeds ever handed out",
            hits.len()
        );
        assert!(hits.values().all(|n| *n < 20), "{:?}", hits.values().max());
        let mut none = req(9, 100, 0);
        none.numwant = Some(0);
        assert!(
            s.announce(&none, addr(9), Some(own), now)
                .unwrap()
                .peers
                .is_empty()
        );
    }

    #[test]
    fn peer_table_matches_a_map_under_random_changes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut table = PeerTable::default();
        let mut model = HashMap::<SocketAddr, Peer>::new();
        let now = Instant::now();
        for step in 0..20_000 {
            let a = addr(rng.random_range(1..300));
            match rng.random_range(0..10) {
                0..=5 => {
                    let p = Peer {
                        peer_id: PeerId([0; 20]),
                        left: rng.random_range(0..3),
                        downloaded: 0,
                        expires: now + Duration::from_secs(rng.random_range(0..100)),
                    };
                    assert_eq!(
                        table.insert(a, p.clone()).map(|p| p.left),
                        model.insert(a, p).map(|p| p.left)
                    );
                }
                6..=8 => assert_eq!(
                    table.remove(&a).map(|p| p.left),
                    model.remove(&a).map(|p| p.left)
                ),
                _ => {
                    let cut = now + Duration::from_secs(rng.random_range(0..20));
                    table.retain(|p| p.expires > cut);
                    model.retain(|_, p| p.expires > cut);
                }
            }
            assert_eq!(table.len(), model.len(), "step {step}");
            assert_eq!(
                table.seeds(),
                model.values().filter(|p| p.is_seed()).count()
            );
            for (k, &(seed, i)) in &table.at {
                let pool = if seed { &table.seeds } else { &table.leechers };
                assert_eq!(pool[i].0, *k, "step {step}: index out of date");
                assert_eq!(pool[i].1.left, model[k].left);
            }
        }
    }

    #[test]
    fn stopped_and_expired_peers_leave() {
        let s = Swarms::default();
        let now = Instant::now();
        s.announce(&req(1, 0, 1), addr(1), None, now).unwrap();
        s.announce(&req(2, 10, 0), addr(2), None, now).unwrap();
        let mut stop = req(1, 0, 1);
        stop.event = Some(Event::Stopped);
        s.announce(&stop, addr(1), None, now).unwrap();
        let r = s.announce(&req(2, 10, 0), addr(2), None, now).unwrap();
        assert!(r.peers.is_empty());
        assert_eq!(s.usage(), (1, 1));
        s.expire(now + Duration::from_secs(3600));
        assert_eq!(s.usage(), (0, 0));
    }

    #[test]
    fn completion_is_counted_for_scrape() {
        let s = Swarms::default();
        let now = Instant::now();
        s.announce(&req(2, 10, 0), addr(2), None, now).unwrap();
        s.announce(&req(2, 0, 10), addr(2), None, now).unwrap();
        let e = s.scrape(&[InfoHash([7; 20]), InfoHash([8; 20])], |_| false);
        assert_eq!(
            (e[0].1.complete, e[0].1.downloaded, e[0].1.incomplete),
            (1, 1, 0)
        );
        assert_eq!((e[1].1.complete, e[1].1.incomplete), (0, 0));
    }

    #[test]
    fn slots_are_distinct_and_balanced() {
        let slots = Slots::default();
        let now = Instant::now();
        let ih = InfoHash([1; 20]);
        let got: Vec<Slot> = (1..=4)
            .map(|p| slots.slot(ih, addr(p), now).unwrap())
            .collect();
        assert_eq!(
            got.iter().map(|s| s.index).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // Asked again once all four are known, the slices tile the blob.
        let mut again: Vec<(f64, f64)> = (1..=4)
            .map(|p| slots.slot(ih, addr(p), now).unwrap())
            .map(|s| (s.start, s.end))
            .collect();
        again.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            again,
            vec![(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
        );
        // An index freed by a leecher that went away is reused.
        let later = now + Duration::from_secs(11);
        slots.slot(ih, addr(1), later).unwrap();
        let s = slots.slot(ih, addr(9), later).unwrap();
        assert_eq!(s.index, 1);
        assert_eq!((s.start, s.end), (0.5, 1.0));
    }
}

//! Swarm state and the peer hand-out policy of the announce endpoint.
//!
//! The policy is what makes simultaneous librqbit leechers trade pieces
//! (`docs/swarming.md`): a leecher that has nothing yet is handed only seeds,
//! and meets other leechers only once both have pieces. librqbit sends no bitfield while it has
//! nothing, and then never sends HAVEs on that connection, so two peers that meet empty never
//! learn what the other gets. Leechers are asked to re-announce every second so they meet
//! each other as soon as they have something; seeds every minute.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bay_common::announce::{
    AnnounceRequest, AnnounceResponse, Event, InfoHash, PeerId, ScrapeEntry,
};
use bay_common::api::Slot;
use lru::LruCache;
use rand::seq::{IndexedRandom, SliceRandom};

pub const LEECHER_INTERVAL: Duration = Duration::from_secs(1);
pub const SEED_INTERVAL: Duration = Duration::from_secs(60);
/// A peer that missed this many announce intervals (plus slack) is gone.
const MISSED_INTERVALS: u32 = 3;
const EXPIRY_SLACK: Duration = Duration::from_secs(10);
pub const DEFAULT_NUMWANT: usize = 50;
pub const MAX_NUMWANT: usize = 200;
/// Bounds on memory an announcer can make us spend. Swarms of torrents this tracker made (it
/// holds their blobs) are bounded by what it holds and by these.
const MAX_SWARMS: usize = 100_000;
const MAX_PEERS_PER_SWARM: usize = 10_000;
/// Swarms of torrents this tracker did not make: every proxy announces to every tracker, so
/// with several trackers most swarms are of torrents another one made, and anyone can make up
/// an info hash. They live in a small set where the least recently announced goes first, so a
/// flood of made-up hashes churns that set and costs nothing else.
const MAX_FOREIGN_SWARMS: usize = 4_096;
const MAX_FOREIGN_PEERS: usize = 256;
/// Peers one IP address may have in one swarm: several proxies on one machine share an
/// address, one client making up ports does not fill a swarm.
pub const MAX_PEERS_PER_IP: usize = 64;
/// Most peers looked at to fill one answer: sampling stays O(numwant) in any swarm.
const SAMPLE_LOOKS_PER_PEER: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwarmError {
    #[error("tracker is tracking too many torrents")]
    TooManySwarms,
    #[error("swarm is full")]
    SwarmFull,
    #[error("too many peers from {0} in this swarm")]
    TooManyFromIp(IpAddr),
}

#[derive(Debug, Clone)]
struct Peer {
    peer_id: PeerId,
    left: u64,
    downloaded: u64,
    expires: Instant,
    /// Its first announce in this swarm (kept across its later ones).
    joined: Instant,
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
    /// Peers per IP address.
    per_ip: HashMap<IpAddr, usize>,
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

    fn get(&self, addr: &SocketAddr) -> Option<&Peer> {
        let (seed, i) = *self.at.get(addr)?;
        let pool = if seed { &self.seeds } else { &self.leechers };
        pool.get(i).map(|(_, p)| p)
    }

    fn peers_at(&self, ip: &IpAddr) -> usize {
        self.per_ip.get(ip).copied().unwrap_or(0)
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
        *self.per_ip.entry(addr.ip()).or_default() += 1;
        old
    }

    fn remove(&mut self, addr: &SocketAddr) -> Option<Peer> {
        let (seed, i) = self.at.remove(addr)?;
        if let Some(n) = self.per_ip.get_mut(&addr.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&addr.ip());
            }
        }
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

    /// Up to `room` distinct peers, at random among those `eligible`, seeds only unless
    /// `leechers_too`. Random probes find them when most peers qualify; when few do, a pass over
    /// at most [`SAMPLE_LOOKS_PER_PEER`] × `room` peers from a random place finishes the job, so
    /// an answer costs O(room) however big the swarm.
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
        // Few qualify (or the swarm is small): a sample of those in a stretch of the swarm, all
        // of it when it is small.
        let looks = n.min(SAMPLE_LOOKS_PER_PEER * room);
        let from = if looks < n { rng.random_range(0..n) } else { 0 };
        let found: Vec<SocketAddr> = (0..looks)
            .map(|k| nth((from + k) % n))
            .filter(|(a, p)| eligible(a, p) && !picked.contains(a))
            .map(|(a, _)| *a)
            .collect();
        let more = room - picked.len();
        picked.extend(found.choose_multiple(rng, more).copied());
        picked
    }
}

pub struct Swarms {
    inner: Mutex<Tables>,
    /// Woken whenever a leecher's announce shows its first pieces.
    got_pieces: tokio::sync::Notify,
}

struct Tables {
    /// Torrents this tracker made.
    made: HashMap<InfoHash, Swarm>,
    /// Others, least recently announced first out.
    foreign: LruCache<InfoHash, Swarm>,
}

impl Default for Swarms {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Tables {
                made: HashMap::new(),
                foreign: LruCache::new(NonZeroUsize::new(MAX_FOREIGN_SWARMS).expect("not 0")),
            }),
            got_pieces: tokio::sync::Notify::new(),
        }
    }
}

impl Tables {
    /// The swarm of a torrent, made here (`made`) or not, created if need be.
    fn swarm(
        &mut self,
        info_hash: InfoHash,
        made: bool,
    ) -> Result<(&mut Swarm, usize), SwarmError> {
        if made {
            if !self.made.contains_key(&info_hash) {
                if self.made.len() >= MAX_SWARMS {
                    return Err(SwarmError::TooManySwarms);
                }
                // Held here now (fetched since peers first announced it): keep its peers.
                let was = self.foreign.pop(&info_hash).unwrap_or_default();
                self.made.insert(info_hash, was);
            }
            let s = self.made.get_mut(&info_hash).expect("just ensured");
            return Ok((s, MAX_PEERS_PER_SWARM));
        }
        let s = self.foreign.get_or_insert_mut(info_hash, Swarm::default);
        Ok((s, MAX_FOREIGN_PEERS))
    }

    fn get(&self, info_hash: &InfoHash) -> Option<&Swarm> {
        self.made
            .get(info_hash)
            .or_else(|| self.foreign.peek(info_hash))
    }

    fn remove(&mut self, info_hash: &InfoHash) {
        if self.made.remove(info_hash).is_none() {
            self.foreign.pop(info_hash);
        }
    }
}

impl Swarms {
    /// Records an announce from `peer` and chooses the peers to hand back. `own_seed` is the
    /// tracker's own seed for torrents it holds; `made` says whether this tracker made the
    /// torrent (holds its blob), which decides the bounds its swarm lives under.
    pub fn announce(
        &self,
        req: &AnnounceRequest,
        peer: SocketAddr,
        own_seed: Option<SocketAddr>,
        made: bool,
        now: Instant,
    ) -> Result<AnnounceResponse, SwarmError> {
        let mut tables = self.inner.lock().expect("swarms poisoned");
        let (swarm, max_peers) = tables.swarm(req.info_hash, made)?;
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
            if !swarm.peers.contains(&peer) {
                if swarm.peers.len() >= max_peers {
                    return Err(SwarmError::SwarmFull);
                }
                if swarm.peers.peers_at(&peer.ip()) >= MAX_PEERS_PER_IP {
                    return Err(SwarmError::TooManyFromIp(peer.ip()));
                }
            }
            let me = Peer {
                peer_id: req.peer_id,
                left,
                downloaded: req.downloaded,
                expires: now + interval * MISSED_INTERVALS + EXPIRY_SLACK,
                joined: swarm.peers.get(&peer).map_or(now, |p| p.joined),
            };
            let has_pieces = me.has_pieces();
            let old = swarm.peers.insert(peer, me);
            let was_seed = old.as_ref().is_some_and(|p| p.is_seed());
            if has_pieces && !old.is_some_and(|p| p.has_pieces()) {
                self.got_pieces.notify_waiters();
            }
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
        // elsewhere (`bench/RESULTS.md`). So of two bay leechers only the one that joined the
        // swarm later is handed the other, and connects; the other takes the incoming
        // connection. (By address instead, a leecher that announced first met the ones with
        // higher addresses only at its next announce, a second later.)
        let bay = req.peer_id.is_bay();
        let me_key = (swarm.peers.get(&peer).map_or(now, |p| p.joined), peer);
        let mut rng = rand::rng();
        let mut sample = swarm.peers.sample(
            room,
            me_has_pieces,
            |addr, p| {
                *addr != peer
                    && Some(*addr) != own
                    && p.expires > now
                    && (p.is_seed() || p.has_pieces())
                    && (p.is_seed() || !bay || !p.peer_id.is_bay() || (p.joined, *addr) < me_key)
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
            tables.remove(&req.info_hash);
        }
        Ok(AnnounceResponse {
            interval: interval.as_secs() as u32,
            min_interval: Some(interval.as_secs() as u32),
            complete,
            incomplete,
            peers,
        })
    }

    /// What `peer` last announced it has downloaded and has left of a torrent.
    pub fn progress_of(&self, info_hash: &InfoHash, peer: &SocketAddr) -> Option<(u64, u64)> {
        let tables = self.inner.lock().expect("swarms poisoned");
        let p = tables.get(info_hash)?.peers.get(peer)?;
        Some((p.downloaded, p.left))
    }

    /// Resolves once `peer` has announced pieces of the torrent, or after `patience`: whether
    /// it has.
    pub async fn wait_for_pieces(
        &self,
        info_hash: &InfoHash,
        peer: &SocketAddr,
        patience: Duration,
    ) -> bool {
        let has = || {
            self.progress_of(info_hash, peer)
                .is_some_and(|(downloaded, left)| downloaded > 0 || left == 0)
        };
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let woken = self.got_pieces.notified();
            if has() {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return has();
            }
        }
    }

    /// Live seeds of a torrent (peers that announced they hold it all).
    pub fn seeds(&self, info_hash: &InfoHash, now: Instant) -> u32 {
        let tables = self.inner.lock().expect("swarms poisoned");
        tables.get(info_hash).map_or(0, |s| {
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
        let tables = self.inner.lock().expect("swarms poisoned");
        hashes
            .iter()
            .map(|h| {
                let s = tables.get(h);
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
        let mut tables = self.inner.lock().expect("swarms poisoned");
        tables.made.retain(|_, s| {
            s.peers.retain(|p| p.expires > now);
            !s.peers.is_empty()
        });
        let mut empty = Vec::new();
        for (h, s) in tables.foreign.iter_mut() {
            s.peers.retain(|p| p.expires > now);
            if s.peers.is_empty() {
                empty.push(*h);
            }
        }
        for h in empty {
            tables.foreign.pop(&h);
        }
    }

    /// (swarms, peers) tracked.
    pub fn usage(&self) -> (u64, u64) {
        let tables = self.inner.lock().expect("swarms poisoned");
        let all = || {
            tables
                .made
                .values()
                .chain(tables.foreign.iter().map(|(_, s)| s))
        };
        (
            all().count() as u64,
            all().map(|s| s.peers.len() as u64).sum(),
        )
    }
}

/// Hands each leecher of a torrent a distinct slice to prioritise (`docs/swarming.md`:
/// distinct slices are needed, random ones swarm badly).
/// Leechers get indices in arrival order; index i starts at the van der Corput point of i
/// (0, ½, ¼, ¾, ⅛, …), so slices stay balanced however many arrive, and each slice ends where
/// the next live leecher's begins. Leechers ask again every second (five times a second at
/// first); those that stop asking free their index.
/// Keyed by info hash; a blob still being fetched has a table by digest
/// ([`Slots::adopt`] carries it over once the torrent exists).
pub struct Slots<K = InfoHash> {
    inner: Mutex<HashMap<K, SlotTable>>,
}

impl<K> Default for Slots<K> {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
        }
    }
}

/// Slot index and expiry per leecher of one torrent.
type SlotTable = HashMap<SocketAddr, (u32, Instant)>;

const SLOT_TTL: Duration = Duration::from_secs(10);

/// The i-th point of the base-2 van der Corput sequence.
fn corput(i: u32) -> f64 {
    i.reverse_bits() as f64 / (1u64 << 32) as f64
}

impl<K: std::hash::Hash + Eq> Slots<K> {
    /// The live leechers of a table and their indices.
    pub fn leechers(&self, key: &K, now: Instant) -> Vec<(SocketAddr, u32)> {
        let all = self.inner.lock().expect("slots poisoned");
        all.get(key).map_or_else(Vec::new, |t| {
            t.iter()
                .filter(|(_, (_, exp))| *exp > now)
                .map(|(a, (i, _))| (*a, *i))
                .collect()
        })
    }

    /// Starts the table of `key` with these leechers and indices, unless it has leechers of its
    /// own: those who read slices of a blob while it was fetched keep them for its torrent.
    pub fn adopt(&self, key: K, leechers: &[(SocketAddr, u32)], now: Instant) {
        if leechers.is_empty() {
            return;
        }
        let mut all = self.inner.lock().expect("slots poisoned");
        if !all.contains_key(&key) && all.len() >= MAX_SWARMS {
            return;
        }
        let table = all.entry(key).or_default();
        table.retain(|_, (_, exp)| *exp > now);
        if table.is_empty() {
            for (a, i) in leechers.iter().take(MAX_PEERS_PER_SWARM) {
                table.insert(*a, (*i, now + SLOT_TTL));
            }
        }
    }

    pub fn slot(&self, info_hash: K, peer: SocketAddr, now: Instant) -> Result<Slot, SwarmError> {
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
        s.announce(&req(1, 0, 100), seed, None, true, now).unwrap();
        s.announce(&req(2, 100, 0), addr(2), None, true, now)
            .unwrap();
        let r = s
            .announce(&req(3, 100, 0), addr(3), None, true, now)
            .unwrap();
        assert_eq!(
            r.peers,
            vec![seed],
            "empty leecher must not meet empty leechers"
        );
        assert_eq!(r.interval, 1);
        assert_eq!((r.complete, r.incomplete), (1, 2));
        // Once 2 and 3 have pieces they meet.
        s.announce(&req(2, 50, 50), addr(2), None, true, now)
            .unwrap();
        let mut r = s
            .announce(&req(3, 60, 40), addr(3), None, true, now)
            .unwrap();
        r.peers.sort();
        assert_eq!(r.peers, vec![seed, addr(2)]);
        // A seed is told to come back in a minute and handed nobody.
        let r = s.announce(&req(1, 0, 100), seed, None, true, now).unwrap();
        assert!(r.peers.is_empty());
        assert_eq!(r.interval, 60);
    }

    #[test]
    fn of_two_bay_leechers_only_the_later_one_is_handed_the_other() {
        let s = Swarms::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let bay = |port: u16, left, downloaded| {
            let mut r = req(port, left, downloaded);
            r.peer_id = PeerId(*b"-BY0100-abcdefghijkl");
            r
        };
        // They join in the order 12, 10, 11.
        for (i, p) in [12, 10, 11].into_iter().enumerate() {
            s.announce(&bay(p, 50, 50), addr(p), None, true, ms(i as u64))
                .unwrap();
        }
        s.announce(&bay(20, 0, 100), addr(20), None, true, ms(5))
            .unwrap();
        let handed = |r: AnnounceResponse| {
            let mut p = r.peers;
            p.sort();
            p
        };
        // The last to join connects to those before it, at once.
        let last = s
            .announce(&bay(11, 50, 50), addr(11), None, true, ms(10))
            .unwrap();
        assert_eq!(handed(last), vec![addr(10), addr(12), addr(20)]);
        // The first connects to nobody but the seed, however often it asks: the others
        // connect to it.
        let first = s
            .announce(&bay(12, 50, 50), addr(12), None, true, ms(1500))
            .unwrap();
        assert_eq!(handed(first), vec![addr(20)]);
        let middle = s
            .announce(&bay(10, 50, 50), addr(10), None, true, ms(1500))
            .unwrap();
        assert_eq!(handed(middle), vec![addr(12), addr(20)]);
        // Other clients are handed everyone, and are handed to everyone.
        let other = s
            .announce(&req(15, 50, 50), addr(15), None, true, ms(1600))
            .unwrap();
        assert_eq!(handed(other), vec![addr(10), addr(11), addr(12), addr(20)]);
        let first = s
            .announce(&bay(12, 50, 50), addr(12), None, true, ms(1700))
            .unwrap();
        assert_eq!(handed(first), vec![addr(15), addr(20)]);
        // Two that join at the same instant: the higher address connects to the lower.
        for p in [31, 30] {
            s.announce(&bay(p, 50, 50), addr(p), None, true, ms(2000))
                .unwrap();
        }
        let high = handed(
            s.announce(&bay(31, 50, 50), addr(31), None, true, ms(2001))
                .unwrap(),
        );
        let low = handed(
            s.announce(&bay(30, 50, 50), addr(30), None, true, ms(2001))
                .unwrap(),
        );
        assert!(
            high.contains(&addr(30)) && !low.contains(&addr(31)),
            "{high:?} {low:?}"
        );
    }

    #[test]
    fn own_seed_first_and_numwant() {
        let s = Swarms::default();
        let now = Instant::now();
        let own = SocketAddr::from(([127, 0, 0, 9], 6881));
        for p in 10..40 {
            s.announce(&req(p, 0, 1), addr(p), Some(own), true, now)
                .unwrap();
        }
        let mut r = req(2, 100, 0);
        r.numwant = Some(5);
        let a = s.announce(&r, addr(2), Some(own), true, now).unwrap();
        assert_eq!(a.peers.len(), 5);
        assert_eq!(a.peers[0], own);
        r.numwant = Some(1_000_000_000);
        let a = s.announce(&r, addr(2), Some(own), true, now).unwrap();
        assert_eq!(a.peers.len(), 31);
        assert_eq!(a.complete, 31);
    }

    #[test]
    fn big_swarms_give_a_fair_sample() {
        let s = Swarms::default();
        let now = Instant::now();
        let own = SocketAddr::from(([127, 0, 0, 9], 6881));
        // Spread over addresses: one address may have only MAX_PEERS_PER_IP peers in a swarm.
        let far = |p: u16| SocketAddr::from(([10, (p >> 8) as u8, p as u8, 1], p));
        for p in 1000..4000 {
            s.announce(&req(p, 0, 1), far(p), Some(own), true, now)
                .unwrap();
        }
        let mut hits = std::collections::HashMap::<SocketAddr, u32>::new();
        for _ in 0..200 {
            let a = s
                .announce(&req(9, 100, 0), addr(9), Some(own), true, now)
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
            s.announce(&none, addr(9), Some(own), true, now)
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
                        joined: now,
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
            assert_eq!(table.per_ip.values().sum::<usize>(), table.len());
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
        s.announce(&req(1, 0, 1), addr(1), None, true, now).unwrap();
        s.announce(&req(2, 10, 0), addr(2), None, true, now)
            .unwrap();
        let mut stop = req(1, 0, 1);
        stop.event = Some(Event::Stopped);
        s.announce(&stop, addr(1), None, true, now).unwrap();
        let r = s
            .announce(&req(2, 10, 0), addr(2), None, true, now)
            .unwrap();
        assert!(r.peers.is_empty());
        assert_eq!(s.usage(), (1, 1));
        s.expire(now + Duration::from_secs(3600));
        assert_eq!(s.usage(), (0, 0));
    }

    fn random_hash(rng: &mut impl rand::Rng) -> InfoHash {
        InfoHash(rng.random())
    }

    #[test]
    fn a_flood_of_made_up_torrents_stays_bounded_and_real_swarms_work() {
        let s = Swarms::default();
        let now = Instant::now();
        let mut rng = rand::rng();
        // A real swarm: a seed, announced to the tracker that made the torrent.
        s.announce(&req(1, 0, 100), addr(1), None, true, now)
            .unwrap();
        for i in 0..50_000u32 {
            let mut r = req(2, 100, 0);
            r.info_hash = random_hash(&mut rng);
            r.port = (i % 60_000) as u16 + 1;
            s.announce(&r, addr(r.port), None, false, now).unwrap();
        }
        let (swarms, peers) = s.usage();
        assert!(swarms <= 1 + MAX_FOREIGN_SWARMS as u64, "{swarms} swarms");
        assert!(peers <= 1 + MAX_FOREIGN_SWARMS as u64, "{peers} peers");
        // The real swarm is untouched: a leecher with pieces still meets the seed.
        let r = s
            .announce(&req(3, 50, 50), addr(3), None, true, now)
            .unwrap();
        assert_eq!(r.peers, vec![addr(1)]);
        // A torrent another tracker made: tracked too (proxies announce to every tracker), and
        // moved among the made ones once this tracker holds its blob.
        let mut other = req(4, 0, 100);
        other.info_hash = InfoHash([9; 20]);
        s.announce(&other, addr(4), None, false, now).unwrap();
        let mut leecher = req(5, 50, 50);
        leecher.info_hash = other.info_hash;
        let r = s.announce(&leecher, addr(5), None, true, now).unwrap();
        assert_eq!(r.peers, vec![addr(4)]);
    }

    #[test]
    fn one_address_cannot_fill_a_swarm() {
        let s = Swarms::default();
        let now = Instant::now();
        let ip = |last: u8, port: u16| SocketAddr::from(([10, 0, 0, last], port));
        for port in 1..=MAX_PEERS_PER_IP as u16 {
            s.announce(&req(port, 10, 1), ip(1, port), None, true, now)
                .unwrap();
        }
        let more = s.announce(&req(999, 10, 1), ip(1, 999), None, true, now);
        assert_eq!(more.unwrap_err(), SwarmError::TooManyFromIp(ip(1, 0).ip()));
        // Known peers of that address still announce; other addresses still get in.
        s.announce(&req(1, 0, 11), ip(1, 1), None, true, now)
            .unwrap();
        let r = s
            .announce(&req(7, 10, 1), ip(2, 7), None, true, now)
            .unwrap();
        assert!(!r.peers.is_empty());
        // One that leaves makes room.
        let mut stop = req(2, 10, 1);
        stop.event = Some(Event::Stopped);
        s.announce(&stop, ip(1, 2), None, true, now).unwrap();
        s.announce(&req(999, 10, 1), ip(1, 999), None, true, now)
            .unwrap();
    }

    #[test]
    fn completion_is_counted_for_scrape() {
        let s = Swarms::default();
        let now = Instant::now();
        s.announce(&req(2, 10, 0), addr(2), None, true, now)
            .unwrap();
        s.announce(&req(2, 0, 10), addr(2), None, true, now)
            .unwrap();
        let e = s.scrape(&[InfoHash([7; 20]), InfoHash([8; 20])], |_| false);
        assert_eq!(
            (e[0].1.complete, e[0].1.downloaded, e[0].1.incomplete),
            (1, 1, 0)
        );
        assert_eq!((e[1].1.complete, e[1].1.incomplete), (0, 0));
    }

    /// A first announce without pieces waits for the peer's next one with pieces, and no
    /// longer than it is told.
    #[tokio::test]
    async fn a_first_announce_can_wait_for_the_first_pieces() {
        let s = std::sync::Arc::new(Swarms::default());
        let now = Instant::now();
        let ih = InfoHash([7; 20]);
        s.announce(&req(1, 100, 0), addr(1), None, true, now)
            .unwrap();
        let waited = Instant::now();
        assert!(
            !s.wait_for_pieces(&ih, &addr(1), Duration::from_millis(300))
                .await
        );
        assert!(waited.elapsed() >= Duration::from_millis(300));
        let later = {
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Another peer's pieces do not count; this one's do.
                s.announce(&req(2, 50, 50), addr(2), None, true, Instant::now())
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                s.announce(&req(1, 90, 10), addr(1), None, true, Instant::now())
                    .unwrap();
            })
        };
        let waited = Instant::now();
        assert!(
            s.wait_for_pieces(&ih, &addr(1), Duration::from_secs(10))
                .await
        );
        let took = waited.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(5),
            "{took:?}"
        );
        later.await.unwrap();
        assert_eq!(s.progress_of(&ih, &addr(1)), Some((10, 90)));
    }

    #[test]
    fn slots_of_a_fetch_carry_over_to_its_torrent() {
        let early: Slots<&str> = Slots::default();
        let now = Instant::now();
        // Arrival order 3, 1, 2 while the blob is fetched.
        for p in [3, 1, 2] {
            early.slot("blob", addr(p), now).unwrap();
        }
        let torrent = Slots::default();
        let ih = InfoHash([2; 20]);
        torrent.adopt(ih, &early.leechers(&"blob", now), now);
        // Each keeps the slice it read early, whoever asks first now.
        for (p, index) in [(1, 1), (2, 2), (3, 0)] {
            let s = torrent.slot(ih, addr(p), now).unwrap();
            assert_eq!(s.index, index, "peer {p}");
            let e = early.slot("blob", addr(p), now).unwrap();
            assert_eq!((s.start, s.end), (e.start, e.end), "peer {p}");
        }
        // A table with leechers of its own is left alone.
        let other = [(addr(7), 5)];
        torrent.adopt(ih, &other, now);
        assert_eq!(torrent.slot(ih, addr(7), now).unwrap().index, 3);
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

//! The tracker's HTTP API as both sides see it, and the registry-style error body that every
//! bay HTTP surface answers with.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::announce::InfoHash;
use crate::digest::Digest;
use crate::reference::{Registry, RepositoryName};

/// Media type of `GET /v1/torrents/...` answers.
pub const TORRENT_CONTENT_TYPE: &str = "application/x-bittorrent";
/// Header carrying the hex info hash next to a torrent, so proxies can log it without parsing.
pub const INFO_HASH_HEADER: &str = "x-bay-info-hash";

/// Path of the torrent for a blob, relative to a tracker's base URL.
pub fn torrent_path(registry: &Registry, name: &RepositoryName, digest: &Digest) -> String {
    format!(
        "/v1/torrents/{}/{}/blobs/{}",
        registry.authority(),
        name,
        digest
    )
}

/// Path of a held blob's bytes by info hash, relative to a tracker's base URL: what proxies
/// fetch their pieces from (`Range: bytes=…`). Anyone who can download the torrent from the
/// tracker's BitTorrent seed can read this too; it serves nothing else.
pub fn pieces_path(info_hash: &InfoHash) -> String {
    format!("/v1/pieces/{}", info_hash.to_hex())
}

/// Path of a blob the tracker is still fetching from upstream, relative to its base URL:
/// `GET …/slot?port=<peer port>` answers an [`EarlySlot`], a `GET` of the path itself with
/// `Range: bytes=…` the bytes as they land. A proxy waiting for the torrent reads its slice
/// there, so the tracker's uplink works while its downlink fetches (`bay-tracker`'s `early`).
/// The caller's `Authorization` is checked with upstream as for a torrent.
pub fn early_path(registry: &Registry, name: &RepositoryName, digest: &Digest) -> String {
    format!(
        "/v1/early/{}/{}/blobs/{}",
        registry.authority(),
        name,
        digest
    )
}

/// The answer to an early slot request: the slice, as for a held blob's slot, the size
/// upstream announced (the piece length follows from it, `torrent::piece_length_for`), and
/// which other nodes got which pieces early.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlySlot {
    pub slot: Slot,
    pub size: u64,
    #[serde(default)]
    pub holders: EarlyHolders,
}

/// Which node got each piece of a blob early, so nodes pass pieces on between them while the
/// tracker still fetches: each piece leaves the tracker once, and a node's link then carries
/// the rest of the blob during the fetch instead of after it (`exchange_path`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyHolders {
    /// Exchange addresses (`ip:port`) of the nodes that hold pieces.
    pub nodes: Vec<std::net::SocketAddr>,
    /// Index of the piece `pieces[0]` is about: a node asks only from the first piece it did
    /// not know to be sent (`?from=`), so each answer stays a few bytes long.
    #[serde(default)]
    pub first: u32,
    /// Per piece from `first` on, an index into `nodes`, or [`NOT_SENT`], or [`NOT_PASSED_ON`].
    pub pieces: Vec<i32>,
}

/// In [`EarlyHolders::pieces`]: no node got the piece yet.
pub const NOT_SENT: i32 = -1;
/// In [`EarlyHolders::pieces`]: the asking node got the piece, or a node that passes nothing on.
pub const NOT_PASSED_ON: i32 = -2;

impl EarlyHolders {
    /// The node holding piece `p`, if another one does.
    pub fn holder(&self, p: u32) -> Option<std::net::SocketAddr> {
        let i = *self.pieces.get(p.checked_sub(self.first)? as usize)?;
        self.nodes.get(usize::try_from(i).ok()?).copied()
    }

    /// The first piece no node got yet, as far as this answer knows.
    pub fn first_unsent(&self) -> u32 {
        let sent = self.pieces.iter().take_while(|i| **i != NOT_SENT).count();
        self.first + sent as u32
    }
}

/// Path of one piece of a blob a proxy read early, on that proxy's exchange port: what other
/// proxies read it from while the tracker still fetches the blob. Only pieces the proxy holds
/// in memory for a fetch in flight are there; the bytes are checked against the torrent once
/// it exists, like any piece.
pub fn exchange_path(digest: &Digest, piece: u32) -> String {
    format!("/v1/exchange/{digest}/{piece}")
}

/// Pieces of a blob a node holds from an early read, offered with a torrent request to a
/// tracker that must fetch the blob anew: its first owner died mid-fetch, and what it had
/// fetched lives on only in the nodes' early reads. The tracker reads the pieces offered from
/// the caller's own address (its IP, this exchange port) before it asks upstream for the rest;
/// the blob's digest checks every byte before anything is kept. Query:
/// `exchange=<port>&size=<bytes>&held=<first>-<last>,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub exchange: u16,
    /// The blob's size as the early read learnt it: the piece length follows from it.
    pub size: u64,
    /// Runs of pieces held, first and last inclusive, in order.
    pub runs: Vec<(u32, u32)>,
}

/// Most runs a [`Held`] carries: its query stays well under any URL limit.
pub const MAX_HELD_RUNS: usize = 64;

impl Held {
    /// How long a tracker's fetch reads the pieces nodes offered of a blob of `size` bytes
    /// before it asks upstream for the rest, and so how long a node keeps serving what it
    /// offered, even from a download that gave up: 30 s plus a second per MiB (a node's
    /// 10 Mbit/s link moves about that).
    pub fn read_within(size: u64) -> Duration {
        Duration::from_secs(30 + size / (1 << 20))
    }

    /// From the pieces a node holds (in any order); None if it holds none.
    pub fn from_pieces(
        exchange: u16,
        size: u64,
        pieces: impl IntoIterator<Item = u32>,
    ) -> Option<Held> {
        let mut sorted: Vec<u32> = pieces.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for p in sorted {
            if let Some((_, last)) = runs.last_mut()
                && *last + 1 == p
            {
                *last = p;
            } else if runs.len() == MAX_HELD_RUNS {
                break;
            } else {
                runs.push((p, p));
            }
        }
        (!runs.is_empty()).then_some(Held {
            exchange,
            size,
            runs,
        })
    }

    pub fn to_query(&self) -> String {
        let runs: Vec<String> = self.runs.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        format!(
            "exchange={}&size={}&held={}",
            self.exchange,
            self.size,
            runs.join(",")
        )
    }

    /// Parses the three query values; the error names the offending one.
    pub fn parse(exchange: u16, size: u64, held: &str) -> Result<Held, String> {
        if exchange == 0 || size == 0 {
            return Err(format!("exchange={exchange} and size={size} must not be 0"));
        }
        let mut runs = Vec::new();
        for run in held.split(',') {
            let parsed = run
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
            match parsed {
                Some((a, b)) if a <= b && runs.last().is_none_or(|(_, l)| *l < a) => {
                    runs.push((a, b))
                }
                _ => {
                    return Err(format!(
                        "held={held:.80}: runs must be <first>-<last>, ascending"
                    ));
                }
            }
            if runs.len() > MAX_HELD_RUNS {
                return Err(format!("held: more than {MAX_HELD_RUNS} runs"));
            }
        }
        let pieces = size.div_ceil(crate::torrent::piece_length_for(size) as u64);
        if let Some((_, last)) = runs.last()
            && *last as u64 >= pieces
        {
            return Err(format!(
                "held={held:.80}: piece {last} is past the last of size={size}"
            ));
        }
        Ok(Held {
            exchange,
            size,
            runs,
        })
    }

    pub fn holds(&self, p: u32) -> bool {
        self.runs.iter().any(|(a, b)| (*a..=*b).contains(&p))
    }
}

/// Registry error codes (distribution-spec "Error Codes", plus distribution's extras).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    ManifestUnknown,
    Unauthorized,
    Denied,
    Unsupported,
    Toomanyrequests,
    RangeInvalid,
    SizeInvalid,
    Unavailable,
}

impl ErrorCode {
    /// The HTTP status distribution uses for the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown | ErrorCode::NameUnknown | ErrorCode::ManifestUnknown => 404,
            ErrorCode::DigestInvalid | ErrorCode::NameInvalid | ErrorCode::SizeInvalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::Toomanyrequests => 429,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::Unavailable => 503,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorItem {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// `{"errors":[{"code","message","detail"}]}`, what registry clients parse and show to users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub errors: Vec<ErrorItem>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>, detail: serde_json::Value) -> Self {
        Self {
            errors: vec![ErrorItem {
                code,
                message: message.into(),
                detail,
            }],
        }
    }
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("error bodies always serialize")
    }
}

/// `GET /v1/slots/<info hash hex>?port=<peer port>` on the tracker: the part of a blob this
/// leecher should fetch first, as fractions of its size. Leechers that start together then
/// want different pieces instead of walking the blob in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub index: u32,
    pub start: f64,
    pub end: f64,
    /// Peers in the swarm that hold the whole blob (not counting trackers): a leecher then
    /// gets its pieces from them rather than from the tracker.
    #[serde(default)]
    pub seeds: u32,
}

/// `GET /v1/stats` on the tracker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrackerStats {
    pub blobs_held: u64,
    pub bytes_held: u64,
    pub upstream_fetches: u64,
    pub upstream_bytes: u64,
    pub torrents_served: u64,
    pub swarms: u64,
    pub peers: u64,
    /// Blob bytes the tracker sent peers, over BitTorrent and as pieces over HTTP.
    pub seed_uploaded_bytes: u64,
    /// The part of `seed_uploaded_bytes` that proxies' web seeds read over HTTP.
    #[serde(default)]
    pub piece_bytes_served: u64,
    /// The part of `piece_bytes_served` read while the blob was still being fetched.
    #[serde(default)]
    pub early_bytes_served: u64,
    /// Blob bytes handed to proxies as torrents against bytes fetched upstream, per image.
    #[serde(default)]
    pub savings: SavingsReport,
}

/// `GET /_bay/stats` on a proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyStats {
    pub blobs_served: u64,
    pub cache_hits: u64,
    pub swarm_downloads: u64,
    /// Blobs (or their remainders) streamed from upstream because the swarm could not serve.
    pub fallbacks: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_trackers: u64,
    pub bytes_from_upstream: u64,
    pub blobs_held: u64,
    pub bytes_held: u64,
    /// Bytes of pieces passed on to and from other nodes while a tracker fetched the blob.
    #[serde(default)]
    pub exchange_bytes_sent: u64,
    #[serde(default)]
    pub exchange_bytes_received: u64,
    /// Blob bytes served to clients against bytes fetched upstream, per image.
    #[serde(default)]
    pub savings: SavingsReport,
}

/// Upstream traffic one image (`<registry>/<repository>`) cost against what was delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSavings {
    pub bytes_served: u64,
    pub bytes_from_upstream: u64,
    /// `bytes_served - bytes_from_upstream`, never below zero.
    #[serde(default)]
    pub bytes_saved: u64,
}

impl ImageSavings {
    pub fn with_saved(mut self) -> Self {
        self.bytes_saved = self.bytes_served.saturating_sub(self.bytes_from_upstream);
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavingsReport {
    pub total: ImageSavings,
    pub images: BTreeMap<String, ImageSavings>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::new(
            ErrorCode::DigestInvalid,
            "bad digest",
            serde_json::json!({"digest": "x"}),
        );
        let v: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"errors":[{"code":"DIGEST_INVALID","message":"bad digest","detail":{"digest":"x"}}]})
        );
        assert_eq!(ErrorCode::Toomanyrequests.status(), 429);
        let v = serde_json::to_value(ErrorCode::Toomanyrequests).unwrap();
        assert_eq!(v, "TOOMANYREQUESTS");
    }

    #[test]
    fn torrent_path_is_canonical() {
        let reg: Registry = "http://127.0.0.2:5000".parse().unwrap();
        let name: RepositoryName = "library/alpine".parse().unwrap();
        let d = Digest::sha256_of(b"");
        assert_eq!(
            torrent_path(&reg, &name, &d),
            format!("/v1/torrents/127.0.0.2:5000/library/alpine/blobs/{d}")
        );
    }

    #[test]
    fn held_pieces_round_trip_as_runs() {
        let h = Held::from_pieces(7000, 10 << 20, [5, 0, 1, 2, 9, 3, 10, 2]).unwrap();
        assert_eq!(h.runs, vec![(0, 3), (5, 5), (9, 10)]);
        assert_eq!(
            h.to_query(),
            "exchange=7000&size=10485760&held=0-3,5-5,9-10"
        );
        assert_eq!(Held::parse(7000, 10 << 20, "0-3,5-5,9-10").unwrap(), h);
        assert!(h.holds(3) && h.holds(9) && !h.holds(4) && !h.holds(11));
        assert_eq!(Held::from_pieces(1, 1, []), None);
        // Only the first MAX_HELD_RUNS runs are offered.
        let every_other = Held::from_pieces(1, 1, (0..1000).map(|p| p * 2)).unwrap();
        assert_eq!(every_other.runs.len(), MAX_HELD_RUNS);
    }

    #[test]
    fn held_refuses_what_it_cannot_read() {
        for bad in ["", "1", "3-1", "0-3,2-5", "0-3,x-5", "0-3,,5-6", "-1-2"] {
            let e = Held::parse(7000, 100, bad).unwrap_err();
            assert!(e.contains("held="), "{bad}: {e}");
        }
        // 1 MiB is four pieces: 0-3.
        assert!(Held::parse(7000, 1 << 20, "0-3").is_ok());
        let e = Held::parse(7000, 1 << 20, "0-4").unwrap_err();
        assert!(e.contains("past the last") && e.contains("0-4"), "{e}");
        assert!(
            Held::parse(0, 100, "0-1")
                .unwrap_err()
                .contains("exchange=0")
        );
        assert!(Held::parse(1, 0, "0-1").unwrap_err().contains("size=0"));
        let many: Vec<String> = (0..=MAX_HELD_RUNS)
            .map(|i| format!("{}-{}", 2 * i, 2 * i))
            .collect();
        assert!(
            Held::parse(1, 1, &many.join(","))
                .unwrap_err()
                .contains("more than")
        );
    }
}

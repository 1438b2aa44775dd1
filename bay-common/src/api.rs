//! The tracker's HTTP API as both sides see it, and the registry-style error body that every
//! bay HTTP surface answers with.

use std::collections::BTreeMap;

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
}

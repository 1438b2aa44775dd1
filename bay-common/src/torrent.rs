//! Deterministic single-file torrents for blobs.
//!
//! Every tracker and every machine must derive the same info hash for a blob without talking to
//! each other, so the info dict depends on nothing but the blob: `name` is the digest's file name,
//! `piece length` follows [`piece_length_for`], `pieces` are the SHA-1s of those pieces, `length`
//! is the size, and `private` is 1 (BEP 27: no DHT, no peer exchange; librqbit's peer exchange
//! otherwise has every pair of proxies connect twice and lets empty leechers meet, which the
//! trackers' hand-out policy exists to prevent). No dates, no creator. We build it ourselves
//! because librqbit's `create_torrent` appends a spurious piece hash when the size is a
//! multiple of the piece length.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha1::{Digest as _, Sha1};

use crate::announce::InfoHash;
use crate::digest::{Digest, DigestError};

/// Smallest piece we use. Fine-grained pieces mean frequent HAVE messages, which is what lets
/// leechers that start together trade pieces (`docs/swarming.md`; in the project's experiments
/// 1 MiB pieces swarmed clearly worse than 256 KiB).
pub const MIN_PIECE_LENGTH: u32 = 256 * 1024;
/// Largest piece we use: past it a torrent simply gets more pieces.
pub const MAX_PIECE_LENGTH: u32 = 16 * 1024 * 1024;
/// Piece count the rule aims to stay under, so the `pieces` string stays ≤ 80 KiB.
pub const TARGET_MAX_PIECES: u64 = 4096;

/// The piece-length rule: 256 KiB, doubled until the blob has at most 4096 pieces, capped at
/// 16 MiB. So blobs up to 1 GiB use 256 KiB pieces, up to 2 GiB 512 KiB, and so on.
/// Changing this changes every info hash: treat it as a wire format.
pub fn piece_length_for(size: u64) -> u32 {
    let mut len = MIN_PIECE_LENGTH;
    while len < MAX_PIECE_LENGTH && size.div_ceil(len as u64) > TARGET_MAX_PIECES {
        len *= 2;
    }
    len
}

#[derive(Debug, thiserror::Error)]
pub enum TorrentError {
    #[error("an empty blob cannot be a torrent")]
    Empty,
    #[error("blob size {got} differs from the {expected} bytes announced")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("not a valid torrent: {0}")]
    Malformed(String),
    #[error("torrent name {0:?} is not a blob digest: {1}")]
    Name(String, DigestError),
    #[error("torrent for {digest} does not follow bay's rule: {why}")]
    NotCanonical { digest: Digest, why: String },
}

/// The bencoded info dict. Field names are the BitTorrent keys; serde_bencode writes them in
/// sorted order, which BEP 3 requires for a stable info hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Info {
    length: u64,
    name: String,
    #[serde(rename = "piece length")]
    piece_length: u64,
    #[serde(with = "serde_bytes")]
    pieces: Vec<u8>,
    /// Always 1 (BEP 27): peers come from bay's trackers only, never from DHT or peer
    /// exchange, so the trackers' hand-out policy is the whole story of who meets whom.
    #[serde(default)]
    private: u8,
}

#[derive(Debug, Serialize, Deserialize)]
struct MetaInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    announce: Option<String>,
    #[serde(
        default,
        rename = "announce-list",
        skip_serializing_if = "Option::is_none"
    )]
    announce_list: Option<Vec<Vec<String>>>,
    info: Info,
}

/// A blob's torrent: the info dict plus what we derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobTorrent {
    digest: Digest,
    info: Info,
    info_hash: InfoHash,
}

impl BlobTorrent {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
    pub fn info_hash(&self) -> InfoHash {
        self.info_hash
    }
    pub fn size(&self) -> u64 {
        self.info.length
    }
    pub fn piece_length(&self) -> u32 {
        self.info.piece_length as u32
    }
    pub fn piece_count(&self) -> usize {
        self.info.pieces.len() / 20
    }
    /// The SHA-1 the torrent holds for piece `i`.
    pub fn piece_hash(&self, i: usize) -> Option<[u8; 20]> {
        let h = self.info.pieces.get(i * 20..i * 20 + 20)?;
        Some(h.try_into().expect("20 bytes"))
    }
    /// Whether `data` is piece `i` of the blob, by the SHA-1 the torrent holds for it.
    pub fn piece_matches(&self, i: usize, data: &[u8]) -> bool {
        data.len() as u64 == self.piece_size(i)
            && self.piece_hash(i) == Some(Sha1::digest(data).into())
    }
    /// [`Self::piece_matches`] on tokio's blocking pool. The sha1 crate takes 0.14 ms for a
    /// 256 KiB piece and 9.2 ms for a 16 MiB one with SHA-NI, 0.41 and 24.6 ms without
    /// (measured here), and a runtime worker that spends that long stalls every connection
    /// it serves.
    pub async fn piece_matches_blocking(self: Arc<Self>, i: usize, data: Bytes) -> bool {
        tokio::task::spawn_blocking(move || self.piece_matches(i, &data))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
    /// Bytes of the blob in piece `i` (the last piece is usually shorter).
    pub fn piece_size(&self, i: usize) -> u64 {
        let start = i as u64 * self.info.piece_length;
        self.info
            .piece_length
            .min(self.info.length.saturating_sub(start))
    }
    /// The file name inside the torrent (and so on disk in a librqbit output folder).
    pub fn file_name(&self) -> &str {
        &self.info.name
    }

    /// Hashes a whole in-memory blob. For streams use [`TorrentBuilder`].
    pub fn from_bytes(digest: Digest, data: &[u8]) -> Result<Self, TorrentError> {
        let mut b = TorrentBuilder::new(digest, data.len() as u64)?;
        b.update(data);
        b.finish()
    }

    /// The `.torrent` file: the info dict plus announce URLs (which do not affect the info hash,
    /// so each tracker can name itself).
    pub fn to_metainfo(&self, announce: &[String]) -> Vec<u8> {
        let meta = MetaInfo {
            announce: announce.first().cloned(),
            announce_list: (announce.len() > 1).then(|| vec![announce.to_vec()]),
            info: self.info.clone(),
        };
        serde_bencode::to_bytes(&meta).expect("bencoding plain structs cannot fail")
    }

    /// Reads a `.torrent` and checks it is exactly the torrent bay's rule gives for the digest in
    /// its name (size and piece length); the piece hashes themselves are checked by whoever
    /// downloads the data, and the blob's digest after that.
    pub fn from_metainfo(bytes: &[u8]) -> Result<Self, TorrentError> {
        let meta: MetaInfo =
            serde_bencode::from_bytes(bytes).map_err(|e| TorrentError::Malformed(e.to_string()))?;
        let info = meta.info;
        let digest = Digest::from_file_name(&info.name)
            .map_err(|e| TorrentError::Name(info.name.clone(), e))?;
        let not_canonical = |why: String| TorrentError::NotCanonical {
            digest: digest.clone(),
            why,
        };
        if info.length == 0 {
            return Err(TorrentError::Empty);
        }
        let expected_pl = piece_length_for(info.length);
        if info.piece_length != expected_pl as u64 {
            return Err(not_canonical(format!(
                "piece length {} for {} bytes, expected {expected_pl}",
                info.piece_length, info.length
            )));
        }
        if info.private != 1 {
            return Err(not_canonical(
                "not marked private (bay's torrents take peers from trackers only)".into(),
            ));
        }
        let pieces = info.length.div_ceil(expected_pl as u64);
        if info.pieces.len() as u64 != pieces * 20 {
            return Err(not_canonical(format!(
                "{} bytes of piece hashes, expected {}",
                info.pieces.len(),
                pieces * 20
            )));
        }
        let info_hash = hash_info(&info);
        Ok(Self {
            digest,
            info,
            info_hash,
        })
    }
}

fn hash_info(info: &Info) -> InfoHash {
    let bytes = serde_bencode::to_bytes(info).expect("bencoding plain structs cannot fail");
    InfoHash(Sha1::digest(&bytes).into())
}

/// Builds a [`BlobTorrent`] from bytes arriving in any chunking, so a fetch can hash pieces
/// while it streams the blob to disk instead of reading it again.
pub struct TorrentBuilder {
    digest: Digest,
    size: u64,
    piece_length: u64,
    seen: u64,
    piece: Sha1,
    in_piece: u64,
    pieces: Vec<u8>,
}

impl TorrentBuilder {
    pub fn new(digest: Digest, size: u64) -> Result<Self, TorrentError> {
        if size == 0 {
            return Err(TorrentError::Empty);
        }
        let piece_length = piece_length_for(size) as u64;
        Ok(Self {
            digest,
            size,
            piece_length,
            seen: 0,
            piece: Sha1::new(),
            in_piece: 0,
            pieces: Vec::with_capacity((size.div_ceil(piece_length) * 20) as usize),
        })
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.seen += data.len() as u64;
        while !data.is_empty() {
            let take = ((self.piece_length - self.in_piece) as usize).min(data.len());
            self.piece.update(&data[..take]);
            self.in_piece += take as u64;
            data = &data[take..];
            if self.in_piece == self.piece_length {
                self.pieces
                    .extend_from_slice(&std::mem::take(&mut self.piece).finalize());
                self.in_piece = 0;
            }
        }
    }

    pub fn finish(mut self) -> Result<BlobTorrent, TorrentError> {
        if self.seen != self.size {
            return Err(TorrentError::SizeMismatch {
                expected: self.size,
                got: self.seen,
            });
        }
        if self.in_piece > 0 {
            self.pieces.extend_from_slice(&self.piece.finalize());
        }
        let info = Info {
            length: self.size,
            name: self.digest.file_name(),
            piece_length: self.piece_length,
            pieces: self.pieces,
            private: 1,
        };
        let info_hash = hash_info(&info);
        Ok(BlobTorrent {
            digest: self.digest,
            info,
            info_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        // A fixed, boring pattern: golden hashes below depend on it.
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn piece_length_rule() {
        assert_eq!(piece_length_for(1), 256 * 1024);
        assert_eq!(piece_length_for(1 << 30), 256 * 1024);
        assert_eq!(piece_length_for((1 << 30) + 1), 512 * 1024);
        assert_eq!(piece_length_for(3 << 30), 1024 * 1024);
        assert_eq!(piece_length_for(1 << 40), MAX_PIECE_LENGTH);
    }

    #[test]
    fn pieces_match_only_their_own_bytes() {
        let data = blob(2 * 262_144 + 10);
        let t = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap();
        assert!(t.piece_matches(0, &data[..262_144]));
        assert!(t.piece_matches(2, &data[2 * 262_144..]));
        assert!(
            !t.piece_matches(1, &data[..262_144]),
            "another piece's bytes"
        );
        let mut bad = data[262_144..2 * 262_144].to_vec();
        bad[7] ^= 1;
        assert!(!t.piece_matches(1, &bad), "a flipped bit");
        assert!(
            !t.piece_matches(2, &data[2 * 262_144..2 * 262_144 + 9]),
            "short"
        );
        assert!(!t.piece_matches(3, &[]), "no such piece");
    }

    /// Hashing waits for the blocking pool instead of running inside the future's poll: with
    /// the pool's one thread busy, the check cannot finish, yet the runtime is free.
    #[test]
    fn pieces_are_hashed_off_the_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        let data = blob(2 * 262_144);
        let t = Arc::new(BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap());
        let piece = Bytes::copy_from_slice(&data[262_144..]);
        rt.block_on(async {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || held.recv());
            let mut check = Box::pin(t.clone().piece_matches_blocking(1, piece.clone()));
            assert!(
                futures::FutureExt::now_or_never(&mut check).is_none(),
                "hashed inside poll"
            );
            release.send(()).unwrap();
            busy.await.unwrap().unwrap();
            assert!(check.await);
            assert!(!t.piece_matches_blocking(0, piece).await);
        });
    }

    #[test]
    fn golden_info_hash() {
        // Pinned: if this changes, every deployed tracker and proxy disagrees on info hashes.
        // The value was computed independently (Python: hashlib + hand-written bencode).
        let data = blob(1_000_000);
        let digest = Digest::sha256_of(&data);
        let t = BlobTorrent::from_bytes(digest.clone(), &data).unwrap();
        assert_eq!(t.piece_count(), 4);
        assert_eq!(t.file_name(), format!("sha256-{}", digest.hex()));
        assert_eq!(
            t.info_hash().to_hex(),
            "de164d8a2514652a677b915a9c6fb0b30c1db8c6",
            "digest {digest}"
        );
    }

    #[test]
    fn piece_sizes_and_hashes() {
        use sha1::{Digest as _, Sha1};
        let data = blob(700_001);
        let t = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap();
        let sizes: Vec<u64> = (0..t.piece_count()).map(|i| t.piece_size(i)).collect();
        assert_eq!(sizes, vec![262_144, 262_144, 700_001 - 2 * 262_144]);
        assert_eq!(t.piece_size(3), 0);
        let last: [u8; 20] = Sha1::digest(&data[2 * 262_144..]).into();
        assert_eq!(t.piece_hash(2), Some(last));
        assert_eq!(t.piece_hash(3), None);
    }

    #[test]
    fn exact_multiple_has_no_extra_piece() {
        let data = blob(2 * 256 * 1024);
        let t = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap();
        assert_eq!(t.piece_count(), 2);
        assert_eq!(t.info.pieces.len(), 40);
    }

    #[test]
    fn chunking_does_not_change_the_hash() {
        let data = blob(700_001);
        let d = Digest::sha256_of(&data);
        let whole = BlobTorrent::from_bytes(d.clone(), &data).unwrap();
        for chunk in [1usize, 7, 4096, 262_144, 262_145] {
            let mut b = TorrentBuilder::new(d.clone(), data.len() as u64).unwrap();
            data.chunks(chunk).for_each(|c| b.update(c));
            assert_eq!(b.finish().unwrap(), whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn metainfo_round_trip_and_sorted_keys() {
        let data = blob(300_000);
        let t = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap();
        let bytes = t.to_metainfo(&["http://a/announce".into(), "http://b/announce".into()]);
        let back = BlobTorrent::from_metainfo(&bytes).unwrap();
        assert_eq!(back, t);
        // Announce URLs never change the info hash.
        let other = BlobTorrent::from_metainfo(&t.to_metainfo(&[])).unwrap();
        assert_eq!(other.info_hash(), t.info_hash());
        let text = String::from_utf8_lossy(&bytes);
        let info_at = text.find("4:infod").unwrap();
        let info = &text[info_at..];
        let keys = ["6:length", "4:name", "12:piece length", "6:pieces"];
        let pos: Vec<usize> = keys.iter().map(|k| info.find(k).unwrap()).collect();
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "keys out of order: {pos:?}"
        );
    }

    #[test]
    fn size_mismatch_and_empty_are_errors() {
        let d = Digest::sha256_of(b"abc");
        assert!(matches!(
            TorrentBuilder::new(d.clone(), 0),
            Err(TorrentError::Empty)
        ));
        let mut b = TorrentBuilder::new(d, 4).unwrap();
        b.update(b"abc");
        assert!(matches!(
            b.finish(),
            Err(TorrentError::SizeMismatch {
                expected: 4,
                got: 3
            })
        ));
    }

    #[test]
    fn foreign_torrents_are_rejected() {
        assert!(matches!(
            BlobTorrent::from_metainfo(b"garbage"),
            Err(TorrentError::Malformed(_))
        ));
        let data = blob(300_000);
        let t = BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap();
        let mut info = t.info.clone();
        info.name = "../../etc/passwd".into();
        let meta = MetaInfo {
            announce: None,
            announce_list: None,
            info: info.clone(),
        };
        let bytes = serde_bencode::to_bytes(&meta).unwrap();
        assert!(matches!(
            BlobTorrent::from_metainfo(&bytes),
            Err(TorrentError::Name(..))
        ));
        info.name = t.info.name.clone();
        info.piece_length = 1 << 20;
        let meta = MetaInfo {
            announce: None,
            announce_list: None,
            info,
        };
        let bytes = serde_bencode::to_bytes(&meta).unwrap();
        assert!(matches!(
            BlobTorrent::from_metainfo(&bytes),
            Err(TorrentError::NotCanonical { .. })
        ));
        // A public torrent of the same blob is not bay's either.
        let mut public = t.info.clone();
        public.private = 0;
        let meta = MetaInfo {
            announce: None,
            announce_list: None,
            info: public,
        };
        let bytes = serde_bencode::to_bytes(&meta).unwrap();
        assert!(matches!(
            BlobTorrent::from_metainfo(&bytes),
            Err(TorrentError::NotCanonical { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn metainfo_parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = BlobTorrent::from_metainfo(&bytes);
        }

        #[test]
        fn piece_count_covers_the_blob(size in 1u64..(1 << 42)) {
            let pl = piece_length_for(size) as u64;
            let pieces = size.div_ceil(pl);
            proptest::prop_assert!(pl.is_power_of_two());
            proptest::prop_assert!(pieces <= TARGET_MAX_PIECES || pl == MAX_PIECE_LENGTH as u64);
        }
    }
}

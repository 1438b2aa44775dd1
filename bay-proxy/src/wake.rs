//! Wakes librqbit's idle piece requesters while a download runs.
//!
//! In librqbit 9.1 a peer connection that finds nothing to request sleeps up to 5 s, and only a
//! peer dying with reserved pieces wakes it — not a HAVE from that peer. Between leechers that
//! is most of the time, so without a nudge the tail of a download comes from the seed alone
//! (`notes/librqbit-workaround.md`, "C": ~2.0× seed upload without it, ~1.3–1.5× with it).
//! The nudge: connect to our own peer port as a peer that claims every piece, wait for the
//! first REQUEST (librqbit reserved a piece for us), and hang up. librqbit releases the piece
//! and wakes every requester of the torrent, which then look at what their peers have now.
//! It is a workaround against librqbit internals; a 3-line upstream fix would replace it.

use std::net::SocketAddr;
use std::time::Duration;

use bay_common::announce::InfoHash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";
const MSG_UNCHOKE: u8 = 1;
const MSG_BITFIELD: u8 = 5;
const MSG_REQUEST: u8 = 6;
/// Bound on one nudge; it normally takes well under a millisecond.
const NUDGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest message we read and skip while waiting for the REQUEST.
const MAX_SKIP: usize = 1 << 20;

/// The handshake a peer sends first: protocol, no extensions, info hash, a random peer id.
fn handshake(info_hash: InfoHash) -> Vec<u8> {
    let mut m = Vec::with_capacity(68);
    m.push(PROTOCOL.len() as u8);
    m.extend_from_slice(PROTOCOL);
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&info_hash.0);
    m.extend_from_slice(b"-BYWAKE-");
    m.extend_from_slice(&rand::random::<[u8; 12]>());
    m
}

/// BITFIELD claiming all `pieces`, then UNCHOKE.
fn have_all(pieces: usize) -> Vec<u8> {
    let mut bits = vec![0xffu8; pieces.div_ceil(8)];
    if !pieces.is_multiple_of(8) {
        let last = bits.len() - 1;
        bits[last] = 0xff << (8 - pieces % 8);
    }
    let mut m = Vec::with_capacity(bits.len() + 10);
    m.extend_from_slice(&(bits.len() as u32 + 1).to_be_bytes());
    m.push(MSG_BITFIELD);
    m.extend_from_slice(&bits);
    m.extend_from_slice(&1u32.to_be_bytes());
    m.push(MSG_UNCHOKE);
    m
}

/// One nudge of the torrent at our own `peer`. Ok(true) when librqbit asked for a piece.
pub async fn nudge(peer: SocketAddr, info_hash: InfoHash, pieces: usize) -> std::io::Result<bool> {
    tokio::time::timeout(NUDGE_TIMEOUT, async {
        let mut s = TcpStream::connect(peer).await?;
        s.set_nodelay(true)?;
        s.write_all(&handshake(info_hash)).await?;
        let mut theirs = [0u8; 68];
        s.read_exact(&mut theirs).await?;
        if theirs[28..48] != info_hash.0 {
            return Ok(false);
        }
        s.write_all(&have_all(pieces)).await?;
        loop {
            let len = s.read_u32().await? as usize;
            if len == 0 {
                continue; // keep-alive
            }
            if len > MAX_SKIP {
                return Ok(false);
            }
            let mut msg = vec![0u8; len];
            s.read_exact(&mut msg).await?;
            if msg[0] == MSG_REQUEST {
                return Ok(true);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn have_all_bitfield() {
        let m = have_all(10);
        // len=3 (id + 2 bytes), bitfield 0xff 0xc0, then unchoke.
        assert_eq!(m, vec![0, 0, 0, 3, 5, 0xff, 0xc0, 0, 0, 0, 1, 1]);
        let m = have_all(16);
        assert_eq!(&m[..7], &[0, 0, 0, 3, 5, 0xff, 0xff]);
    }

    #[test]
    fn handshake_layout() {
        let h = handshake(InfoHash([9; 20]));
        assert_eq!(h.len(), 68);
        assert_eq!(h[0], 19);
        assert_eq!(&h[1..20], PROTOCOL);
        assert_eq!(&h[28..48], &[9; 20]);
        assert_eq!(&h[48..56], b"-BYWAKE-");
    }
}

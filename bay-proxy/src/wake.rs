//! Wakes librqbit's idle piece requesters while a download runs.
//!
//! In librqbit 9.1 a peer connection that finds nothing to request sleeps up to 5 s, and only a
//! peer dying with reserved pieces wakes it — not a HAVE from that peer. Between leechers that
//! is most of the time, so without a nudge the tail of a download comes from the seed alone
//! (`docs/swarming.md`: ~2.0× seed upload without it, ~1.3–1.5× with it).
//! The nudge: connect to our own peer port as a peer that claims every piece, wait for the
//! first REQUEST (librqbit reserved a piece for us), and hang up. librqbit releases the piece
//! and wakes every requester of the torrent, which then look at what their peers have now.
//! It is a workaround against librqbit internals; a 3-line upstream fix would replace it.

use std::net::SocketAddr;
use std::time::Duration;

use bay_common::announce::InfoHash;
use tokio::io::AsyncWriteExt;

use crate::peer_wire::{self, Message};

/// Bound on one nudge; it normally takes well under a millisecond.
const NUDGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest message we read and skip while waiting for the REQUEST.
const MAX_SKIP: usize = 1 << 20;

/// One nudge of the torrent at our own `peer`. Ok(true) when librqbit asked for a piece.
pub async fn nudge(peer: SocketAddr, info_hash: InfoHash, pieces: usize) -> std::io::Result<bool> {
    tokio::time::timeout(NUDGE_TIMEOUT, async {
        let mut s = peer_wire::connect(peer, info_hash, b"-BYWAKE-").await?;
        s.write_all(&peer_wire::bitfield(&vec![true; pieces]))
            .await?;
        s.write_all(&peer_wire::UNCHOKE).await?;
        loop {
            if let Message::Request(_) = peer_wire::read_message(&mut s, MAX_SKIP).await? {
                return Ok(true);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))
}

//! The few BitTorrent peer-wire messages (BEP 3) that bay's own peers speak to the local
//! librqbit: the wake-up nudge ([`crate::wake`]) and the web seed ([`crate::webseed`]).

use std::net::SocketAddr;

use bay_common::announce::InfoHash;
use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";
const MSG_UNCHOKE: u8 = 1;
const MSG_HAVE: u8 = 4;
const MSG_BITFIELD: u8 = 5;
const MSG_REQUEST: u8 = 6;
const MSG_PIECE: u8 = 7;
const MSG_CANCEL: u8 = 8;

/// What the other side sent, as far as bay's peers care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    KeepAlive,
    Have(u32),
    Bitfield(Bytes),
    Request(Block),
    Cancel(Block),
    /// Any other message, by id: nothing bay's peers act on.
    Other(u8),
}

/// A block of a piece, as REQUEST and CANCEL name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub index: u32,
    pub begin: u32,
    pub length: u32,
}

/// The handshake a peer sends first: protocol, no extensions, info hash, and a peer id that
/// starts with `tag` (so librqbit's logs name it) and ends in random bytes.
pub fn handshake(info_hash: InfoHash, tag: &[u8; 8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(68);
    m.push(PROTOCOL.len() as u8);
    m.extend_from_slice(PROTOCOL);
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&info_hash.0);
    m.extend_from_slice(tag);
    m.extend_from_slice(&rand::random::<[u8; 12]>());
    m
}

/// Connects to `peer` and trades handshakes for `info_hash`.
pub async fn connect(
    peer: SocketAddr,
    info_hash: InfoHash,
    tag: &[u8; 8],
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(peer).await?;
    s.set_nodelay(true)?;
    s.write_all(&handshake(info_hash, tag)).await?;
    let mut theirs = [0u8; 68];
    s.read_exact(&mut theirs).await?;
    if theirs[28..48] != info_hash.0 {
        return Err(std::io::Error::other(
            "the peer answered for another torrent",
        ));
    }
    Ok(s)
}

/// BITFIELD of `have` (one flag per piece, high bit first, spare bits zero).
pub fn bitfield(have: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; have.len().div_ceil(8)];
    for (i, _) in have.iter().enumerate().filter(|(_, h)| **h) {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    let mut m = Vec::with_capacity(bits.len() + 5);
    m.extend_from_slice(&(bits.len() as u32 + 1).to_be_bytes());
    m.push(MSG_BITFIELD);
    m.extend_from_slice(&bits);
    m
}

/// Whether piece `i` is set in a BITFIELD payload.
pub fn has_piece(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

pub const UNCHOKE: [u8; 5] = [0, 0, 0, 1, MSG_UNCHOKE];
pub const KEEP_ALIVE: [u8; 4] = [0; 4];

pub fn have(index: u32) -> [u8; 9] {
    let mut m = [0u8; 9];
    m[..4].copy_from_slice(&5u32.to_be_bytes());
    m[4] = MSG_HAVE;
    m[5..].copy_from_slice(&index.to_be_bytes());
    m
}

/// The header of a PIECE message carrying `len` bytes of piece `index` from `begin`.
pub fn piece_header(index: u32, begin: u32, len: u32) -> [u8; 13] {
    let mut m = [0u8; 13];
    m[..4].copy_from_slice(&(9 + len).to_be_bytes());
    m[4] = MSG_PIECE;
    m[5..9].copy_from_slice(&index.to_be_bytes());
    m[9..].copy_from_slice(&begin.to_be_bytes());
    m
}

/// Reads one message; one longer than `max` bytes is an error (bay's peers never ask for
/// pieces, so nothing big should come).
pub async fn read_message(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> std::io::Result<Message> {
    let len = r.read_u32().await? as usize;
    if len == 0 {
        return Ok(Message::KeepAlive);
    }
    if len > max {
        return Err(std::io::Error::other(format!("a {len}-byte message")));
    }
    let mut msg = vec![0u8; len];
    r.read_exact(&mut msg).await?;
    Ok(parse(Bytes::from(msg)))
}

/// Takes the next whole message off `buf`, bytes read so far; None until one is complete.
/// Reading into a buffer and taking messages off it is safe to cancel in a `select!`.
pub fn take_message(buf: &mut BytesMut, max: usize) -> std::io::Result<Option<Message>> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(std::io::Error::other(format!("a {len}-byte message")));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let msg = buf.split_to(len).freeze();
    Ok(Some(if len == 0 {
        Message::KeepAlive
    } else {
        parse(msg)
    }))
}

/// Messages waiting to go out, written with as few system calls as the socket takes
/// (`write_all_buf` writes them vectored) and without copying piece data into a buffer.
#[derive(Default)]
pub struct Frames {
    queue: VecDeque<Bytes>,
    remaining: usize,
}

impl Frames {
    pub fn push(&mut self, frame: impl Into<Bytes>) {
        let frame = frame.into();
        self.remaining += frame.len();
        self.queue.push_back(frame);
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.queue.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.queue.front_mut().expect("advanced past the end");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.queue.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, frame) in dst
            .iter_mut()
            .zip(self.queue.iter().filter(|f| !f.is_empty()))
        {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        n
    }
}

fn parse(msg: Bytes) -> Message {
    let u32_at = |i: usize| {
        msg.get(i..i + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    };
    let block = || {
        Some(Block {
            index: u32_at(1)?,
            begin: u32_at(5)?,
            length: u32_at(9)?,
        })
    };
    match msg[0] {
        MSG_HAVE if msg.len() == 5 => u32_at(1).map_or(Message::Other(MSG_HAVE), Message::Have),
        MSG_BITFIELD => Message::Bitfield(msg.slice(1..)),
        MSG_REQUEST if msg.len() == 13 => {
            block().map_or(Message::Other(MSG_REQUEST), Message::Request)
        }
        MSG_CANCEL if msg.len() == 13 => {
            block().map_or(Message::Other(MSG_CANCEL), Message::Cancel)
        }
        id => Message::Other(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitfields() {
        let mut have = vec![true; 10];
        // len=3 (id + 2 bytes), bitfield 0xff 0xc0.
        assert_eq!(bitfield(&have), vec![0, 0, 0, 3, 5, 0xff, 0xc0]);
        have[1] = false;
        have[9] = false;
        let m = bitfield(&have);
        assert_eq!(&m[5..], &[0xbf, 0x80]);
        assert!(has_piece(&m[5..], 0) && !has_piece(&m[5..], 1) && !has_piece(&m[5..], 9));
        assert!(!has_piece(&m[5..], 100));
        assert_eq!(bitfield(&[false; 3]), vec![0, 0, 0, 2, 5, 0]);
    }

    #[test]
    fn handshake_layout() {
        let h = handshake(InfoHash([9; 20]), b"-BYTEST-");
        assert_eq!(h.len(), 68);
        assert_eq!(h[0], 19);
        assert_eq!(&h[1..20], PROTOCOL);
        assert_eq!(&h[28..48], &[9; 20]);
        assert_eq!(&h[48..56], b"-BYTEST-");
    }

    #[tokio::test]
    async fn messages_round_trip() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&have(7));
        wire.extend_from_slice(&KEEP_ALIVE);
        wire.extend_from_slice(&[
            0,
            0,
            0,
            13,
            MSG_REQUEST,
            0,
            0,
            0,
            2,
            0,
            0,
            0x40,
            0,
            0,
            0,
            0x40,
            0,
        ]);
        wire.extend_from_slice(&[
            0, 0, 0, 13, MSG_CANCEL, 0, 0, 0, 2, 0, 0, 0x40, 0, 0, 0, 0x40, 0,
        ]);
        wire.extend_from_slice(&bitfield(&[true, false, true]));
        wire.extend_from_slice(&UNCHOKE);
        wire.extend_from_slice(&[0, 0, 0, 3, MSG_HAVE, 1, 2]); // a HAVE of the wrong length
        let mut r = &wire[..];
        let b = Block {
            index: 2,
            begin: 16384,
            length: 16384,
        };
        let mut got = Vec::new();
        for _ in 0..7 {
            got.push(read_message(&mut r, 1024).await.unwrap());
        }
        assert_eq!(
            got,
            vec![
                Message::Have(7),
                Message::KeepAlive,
                Message::Request(b),
                Message::Cancel(b),
                Message::Bitfield(Bytes::from_static(&[0xa0])),
                Message::Other(MSG_UNCHOKE),
                Message::Other(MSG_HAVE),
            ]
        );
        assert!(read_message(&mut r, 1024).await.is_err(), "end of input");
        let big = [0u8, 1, 0, 0, MSG_PIECE];
        assert!(read_message(&mut &big[..], 1024).await.is_err());
        assert_eq!(&piece_header(2, 16384, 10)[..5], &[0, 0, 0, 19, MSG_PIECE]);

        // The same bytes taken off a buffer as they arrive, in pieces of any size.
        for step in [1, 3, 7, wire.len()] {
            let mut buf = BytesMut::new();
            let mut taken = Vec::new();
            for part in wire.chunks(step) {
                buf.extend_from_slice(part);
                while let Some(m) = take_message(&mut buf, 1024).unwrap() {
                    taken.push(m);
                }
            }
            assert_eq!(taken, got, "fed {step} bytes at a time");
            assert!(buf.is_empty());
        }
        let mut buf = BytesMut::from(&big[..]);
        assert!(take_message(&mut buf, 1024).is_err(), "too big");
    }

    #[tokio::test]
    async fn frames_go_out_whole_and_in_order() {
        let mut f = Frames::default();
        f.push(Bytes::from_static(b"ab"));
        f.push(Bytes::new());
        f.push(Bytes::from(vec![7u8; 100_000]));
        f.push(Bytes::from_static(b"z"));
        assert_eq!(f.remaining(), 100_003);
        let mut out = Vec::new();
        out.write_all_buf(&mut f).await.unwrap();
        assert_eq!(out.len(), 100_003);
        assert_eq!(&out[..3], b"ab\x07");
        assert_eq!(out[100_002], b'z');
        assert!(!f.has_remaining());
        // Part way through a frame.
        f.push(Bytes::from_static(b"hello"));
        f.push(Bytes::from_static(b"world"));
        f.advance(7);
        assert_eq!(f.chunk(), b"rld");
        assert_eq!(f.remaining(), 3);
    }
}

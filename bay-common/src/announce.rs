//! BitTorrent HTTP tracker wire format: announce and scrape queries in, bencoded answers out.
//!
//! Covers BEP 3 (announce), BEP 7 (`peers6`), BEP 23 (compact peers) and BEP 48 (scrape).
//! Nothing here does I/O; the tracker server feeds raw query strings in and writes the bytes
//! out.

use crate::quote::shown;
use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest query string we parse. A scrape for [`MAX_SCRAPE_HASHES`] fully escaped hashes is
/// about 18 KiB; an announce is a few hundred bytes.
pub const MAX_QUERY_LEN: usize = 32 * 1024;

/// Most torrents one scrape may ask about, so a single request can't make the server build
/// an arbitrarily large answer.
pub const MAX_SCRAPE_HASHES: usize = 256;

/// How much of a rejected value an error message repeats.
const SHOWN_LEN: usize = 40;

/// Bytes `to_query` leaves unescaped: RFC 3986 unreserved characters.
const QUERY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a tracker request was refused. Each message is a short sentence naming the field,
/// because the server sends it verbatim as the bencoded `failure reason` that clients log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field} must be 20 bytes, got {got}")]
    Length { field: &'static str, got: usize },
    #[error("{field} must be {expected}, got {value:?}")]
    Invalid {
        field: &'static str,
        expected: &'static str,
        value: String,
    },
    #[error("{0} is given more than once")]
    Duplicate(&'static str),
    #[error("query string is longer than {} bytes", MAX_QUERY_LEN)]
    TooLong,
    #[error(
        "at most {} info_hash values may be scraped at once",
        MAX_SCRAPE_HASHES
    )]
    TooManyHashes,
}

/// SHA-1 of a torrent's bencoded info dict: the swarm's identity on the tracker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InfoHash(pub [u8; 20]);

impl InfoHash {
    /// Lowercase hex, the form used in logs, magnet links and the tracker's JSON API.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Accepts 40 hex characters in either case.
    pub fn from_hex(s: &str) -> Result<InfoHash, AnnounceError> {
        let mut out = [0u8; 20];
        hex::decode_to_slice(s, &mut out).map_err(|_| AnnounceError::Invalid {
            field: "info_hash",
            expected: "40 hex characters",
            value: shown(s, SHOWN_LEN),
        })?;
        Ok(InfoHash(out))
    }
}

impl fmt::Debug for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InfoHash({})", self.to_hex())
    }
}

impl fmt::Display for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Serialized as lowercase hex, since JSON has no byte strings.
impl Serialize for InfoHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for InfoHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<InfoHash, D::Error> {
        let s = String::deserialize(deserializer)?;
        InfoHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// The 20 bytes a client picks to name itself; often an ASCII prefix such as `-rQ9100-`
/// followed by random bytes, so it is shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 20]);

impl PeerId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A fresh Azureus-style id, `-BY0100-` and 12 random bytes, which names bay in
    /// trackers' and peers' logs.
    pub fn generate() -> PeerId {
        let mut id = *b"-BY0100-\0\0\0\0\0\0\0\0\0\0\0\0";
        rand::Rng::fill(&mut rand::rng(), &mut id[8..]);
        PeerId(id)
    }

    /// Whether the id is a bay-proxy's ([`PeerId::generate`]): such a peer takes a tracker's
    /// pieces over HTTP, so a tracker does not hand it its own BitTorrent seed.
    pub fn is_bay(&self) -> bool {
        self.0.starts_with(b"-BY")
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.to_hex())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The announce `event`. Regular re-announces carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Started,
    Completed,
    Stopped,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Started => "started",
            Event::Completed => "completed",
            Event::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `GET /announce?…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceRequest {
    pub info_hash: InfoHash,
    pub peer_id: PeerId,
    pub port: u16,
    pub uploaded: u64,
    pub downloaded: u64,
    pub left: u64,
    pub event: Option<Event>,
    /// Whether the client wants BEP 23 compact peer lists. Defaults to true when absent.
    pub compact: bool,
    /// How many peers the client wants. Unclamped: the server applies its own limit.
    pub numwant: Option<u32>,
    /// The address the client claims. The server decides whether to trust it over the
    /// connection's source address.
    pub ip: Option<IpAddr>,
}

impl AnnounceRequest {
    /// Parses the raw, still percent-encoded query string (without the leading `?`).
    ///
    /// `info_hash` and `peer_id` are percent-decoded as bytes, with `+` kept as a literal
    /// 0x2B, since they are binary and not form text. Unknown parameters (`key`,
    /// `no_peer_id`, `trackerid`, …) are ignored. A known parameter given twice is an error
    /// rather than first-or-last-wins, so no two parsers can disagree about what was meant.
    pub fn parse(raw_query: &str) -> Result<AnnounceRequest, AnnounceError> {
        let f = Fields::collect(raw_query)?;
        Ok(AnnounceRequest {
            info_hash: InfoHash(binary20("info_hash", f.info_hash)?),
            peer_id: PeerId(binary20("peer_id", f.peer_id)?),
            port: match number::<u16>("port", required("port", f.port)?, PORT)? {
                0 => return Err(invalid("port", PORT, "0")),
                port => port,
            },
            uploaded: number("uploaded", required("uploaded", f.uploaded)?, BYTES)?,
            downloaded: number("downloaded", required("downloaded", f.downloaded)?, BYTES)?,
            left: number("left", required("left", f.left)?, BYTES)?,
            event: f.event.map(parse_event).transpose()?.flatten(),
            compact: match f.compact.map(text).as_deref() {
                None | Some("1") => true,
                Some("0") => false,
                Some(other) => return Err(invalid("compact", "0 or 1", other)),
            },
            numwant: f
                .numwant
                .map(|v| number("numwant", v, "a number from 0 to 4294967295"))
                .transpose()?,
            ip: f
                .ip
                .map(|v| {
                    let v = text(v);
                    v.parse()
                        .map_err(|_| invalid("ip", "an IPv4 or IPv6 address", &v))
                })
                .transpose()?,
        })
    }

    /// The query string a client would send for this request, for tests and for bay's own
    /// announces. Always states `compact` so that `parse(to_query())` gives `self` back.
    pub fn to_query(&self) -> String {
        let mut q = format!(
            "info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact={}",
            escape(&self.info_hash.0),
            escape(&self.peer_id.0),
            self.port,
            self.uploaded,
            self.downloaded,
            self.left,
            u8::from(self.compact),
        );
        if let Some(event) = self.event {
            q.push_str("&event=");
            q.push_str(event.as_str());
        }
        if let Some(numwant) = self.numwant {
            q.push_str(&format!("&numwant={numwant}"));
        }
        if let Some(ip) = self.ip {
            q.push_str("&ip=");
            q.push_str(&escape(ip.to_string().as_bytes()));
        }
        q
    }
}

const PORT: &str = "a number from 1 to 65535";
const BYTES: &str = "a whole number of bytes";

/// The raw values of the parameters we understand, before validation.
#[derive(Default)]
struct Fields<'a> {
    info_hash: Option<&'a str>,
    peer_id: Option<&'a str>,
    port: Option<&'a str>,
    uploaded: Option<&'a str>,
    downloaded: Option<&'a str>,
    left: Option<&'a str>,
    event: Option<&'a str>,
    compact: Option<&'a str>,
    numwant: Option<&'a str>,
    ip: Option<&'a str>,
}

impl<'a> Fields<'a> {
    fn collect(raw_query: &'a str) -> Result<Fields<'a>, AnnounceError> {
        let mut f = Fields::default();
        for (key, value) in pairs(raw_query)? {
            let (name, slot) = match &*key {
                b"info_hash" => ("info_hash", &mut f.info_hash),
                b"peer_id" => ("peer_id", &mut f.peer_id),
                b"port" => ("port", &mut f.port),
                b"uploaded" => ("uploaded", &mut f.uploaded),
                b"downloaded" => ("downloaded", &mut f.downloaded),
                b"left" => ("left", &mut f.left),
                b"event" => ("event", &mut f.event),
                b"compact" => ("compact", &mut f.compact),
                b"numwant" => ("numwant", &mut f.numwant),
                b"ip" => ("ip", &mut f.ip),
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(AnnounceError::Duplicate(name));
            }
        }
        Ok(f)
    }
}

/// Splits `a=1&b=2` into percent-decoded keys and still-encoded values. Empty segments are
/// skipped; a segment without `=` has an empty value.
fn pairs(raw_query: &str) -> Result<impl Iterator<Item = (Cow<'_, [u8]>, &str)>, AnnounceError> {
    if raw_query.len() > MAX_QUERY_LEN {
        return Err(AnnounceError::TooLong);
    }
    Ok(raw_query
        .split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (key, value) = segment.split_once('=').unwrap_or((segment, ""));
            (Cow::from(percent_decode_str(key)), value)
        }))
}

fn required<'a>(field: &'static str, value: Option<&'a str>) -> Result<&'a str, AnnounceError> {
    value.ok_or(AnnounceError::Missing(field))
}

fn binary20(field: &'static str, value: Option<&str>) -> Result<[u8; 20], AnnounceError> {
    let bytes: Cow<[u8]> = percent_decode_str(required(field, value)?).into();
    <[u8; 20]>::try_from(&*bytes).map_err(|_| AnnounceError::Length {
        field,
        got: bytes.len(),
    })
}

/// Decodes a text parameter as a form value: `+` is a space, invalid UTF-8 is replaced (it
/// can only make validation fail).
fn text(value: &str) -> String {
    percent_decode_str(&value.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Plain decimal digits only: Rust's parsers would also take a leading `+`, and we want
/// `-1`, `1e9`, ` 5` and the empty string refused.
fn number<T: std::str::FromStr>(
    field: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<T, AnnounceError> {
    let value = text(value);
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(field, expected, &value));
    }
    value.parse().map_err(|_| invalid(field, expected, &value))
}

/// `event=` present but empty means no event, like an absent one.
fn parse_event(value: &str) -> Result<Option<Event>, AnnounceError> {
    match text(value).as_str() {
        "" => Ok(None),
        "started" => Ok(Some(Event::Started)),
        "completed" => Ok(Some(Event::Completed)),
        "stopped" => Ok(Some(Event::Stopped)),
        other => Err(invalid("event", "started, completed or stopped", other)),
    }
}

fn invalid(field: &'static str, expected: &'static str, value: &str) -> AnnounceError {
    AnnounceError::Invalid {
        field,
        expected,
        value: shown(value, SHOWN_LEN),
    }
}

fn escape(bytes: &[u8]) -> String {
    percent_encode(bytes, QUERY_ESCAPE).to_string()
}

/// A successful announce answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AnnounceResponse {
    /// Seconds the client should wait before announcing again.
    pub interval: u32,
    pub min_interval: Option<u32>,
    /// Seeders.
    pub complete: u32,
    /// Leechers.
    pub incomplete: u32,
    pub peers: Vec<SocketAddr>,
}

impl AnnounceResponse {
    /// The bencoded dict, keys in sorted order. `interval` and `peers` are always present
    /// because librqbit rejects answers without them.
    ///
    /// Compact: `peers` holds 6-byte IPv4 entries and `peers6` (only when non-empty) 18-byte
    /// IPv6 entries, each address then big-endian port. Otherwise `peers` is a list of
    /// `{ip, port}` dicts with no peer id. IPv4-mapped IPv6 addresses (from dual-stack
    /// sockets) are written as IPv4.
    pub fn encode(&self, compact: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.peers.len() * 24);
        out.push(b'd');
        put_bytes(&mut out, b"complete");
        put_int(&mut out, self.complete.into());
        put_bytes(&mut out, b"incomplete");
        put_int(&mut out, self.incomplete.into());
        put_bytes(&mut out, b"interval");
        put_int(&mut out, self.interval.into());
        if let Some(min_interval) = self.min_interval {
            put_bytes(&mut out, b"min interval");
            put_int(&mut out, min_interval.into());
        }
        let peers = self.peers.iter().map(|&p| unmap(p));
        if compact {
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for peer in peers {
                match peer {
                    SocketAddr::V4(a) => {
                        v4.extend_from_slice(&a.ip().octets());
                        v4.extend_from_slice(&a.port().to_be_bytes());
                    }
                    SocketAddr::V6(a) => {
                        v6.extend_from_slice(&a.ip().octets());
                        v6.extend_from_slice(&a.port().to_be_bytes());
                    }
                }
            }
            put_bytes(&mut out, b"peers");
            put_bytes(&mut out, &v4);
            if !v6.is_empty() {
                put_bytes(&mut out, b"peers6");
                put_bytes(&mut out, &v6);
            }
        } else {
            put_bytes(&mut out, b"peers");
            out.push(b'l');
            for peer in peers {
                out.push(b'd');
                put_bytes(&mut out, b"ip");
                put_bytes(&mut out, peer.ip().to_string().as_bytes());
                put_bytes(&mut out, b"port");
                put_int(&mut out, peer.port().into());
                out.push(b'e');
            }
            out.push(b'e');
        }
        out.push(b'e');
        out
    }
}

/// The bencoded answer to a refused announce or scrape: `d14:failure reason<len>:<reason>e`.
pub fn failure(reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len() + 24);
    out.push(b'd');
    put_bytes(&mut out, b"failure reason");
    put_bytes(&mut out, reason.as_bytes());
    out.push(b'e');
    out
}

/// Parses a raw scrape query: zero or more `info_hash` parameters, each 20 bytes; other
/// parameters are ignored. Zero means "everything", which the server may refuse. Repeated
/// hashes are kept once, in first-seen order.
pub fn parse_scrape(raw_query: &str) -> Result<Vec<InfoHash>, AnnounceError> {
    let mut hashes = Vec::new();
    for (key, value) in pairs(raw_query)? {
        if &*key != b"info_hash" {
            continue;
        }
        let hash = InfoHash(binary20("info_hash", Some(value))?);
        if !hashes.contains(&hash) {
            if hashes.len() == MAX_SCRAPE_HASHES {
                return Err(AnnounceError::TooManyHashes);
            }
            hashes.push(hash);
        }
    }
    Ok(hashes)
}

/// One torrent's counts in a scrape answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrapeEntry {
    /// Seeders.
    pub complete: u32,
    /// Completed downloads ever reported.
    pub downloaded: u32,
    /// Leechers.
    pub incomplete: u32,
}

/// `d5:filesd<hash>d8:completei…e10:downloadedi…e10:incompletei…eeee`, with the `files` keys
/// sorted by raw bytes as bencode requires. If a hash appears twice, the first entry wins.
pub fn encode_scrape(entries: &[(InfoHash, ScrapeEntry)]) -> Vec<u8> {
    let mut sorted: Vec<&(InfoHash, ScrapeEntry)> = entries.iter().collect();
    sorted.sort_by_key(|(hash, _)| hash.0);
    sorted.dedup_by_key(|(hash, _)| hash.0);
    let mut out = Vec::with_capacity(16 + sorted.len() * 80);
    out.extend_from_slice(b"d5:filesd");
    for (hash, entry) in sorted {
        put_bytes(&mut out, &hash.0);
        out.push(b'd');
        put_bytes(&mut out, b"complete");
        put_int(&mut out, entry.complete.into());
        put_bytes(&mut out, b"downloaded");
        put_int(&mut out, entry.downloaded.into());
        put_bytes(&mut out, b"incomplete");
        put_int(&mut out, entry.incomplete.into());
        out.push(b'e');
    }
    out.extend_from_slice(b"ee");
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(bytes);
}

fn put_int(out: &mut Vec<u8>, n: u64) {
    out.push(b'i');
    out.extend_from_slice(n.to_string().as_bytes());
    out.push(b'e');
}

fn unmap(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => peer,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_bencode::value::Value;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const HASH_Q: &str = "%124Vx%9A%BC%DE%F0%12%34%56%78%9a%bc%de%f0%124Vx";
    const HASH: [u8; 20] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde,
        0xf0, 0x12, 0x34, 0x56, 0x78,
    ];
    const PEER_Q: &str = "-rQ9100-%01%02%03%04%05%06%07%08%09%0A%0B%0C";
    const PEER: &[u8; 20] = b"-rQ9100-\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c";

    fn librqbit_query() -> String {
        format!(
            "info_hash={HASH_Q}&peer_id={PEER_Q}&event=started&port=47101&uploaded=0\
             &downloaded=0&left=20971520&compact=1&no_peer_id=0&key=1234567"
        )
    }

    fn err(query: &str) -> String {
        AnnounceRequest::parse(query).unwrap_err().to_string()
    }

    /// `librqbit_query()` with `key`'s parameter replaced (or dropped when `value` is None).
    fn with(key: &str, value: Option<&str>) -> String {
        let q = librqbit_query();
        let mut out: Vec<String> = q
            .split('&')
            .filter(|p| p.split('=').next() != Some(key))
            .map(str::to_owned)
            .collect();
        if let Some(v) = value {
            out.push(format!("{key}={v}"));
        }
        out.join("&")
    }

    #[test]
    fn parses_librqbit_announce() {
        let r = AnnounceRequest::parse(&librqbit_query()).unwrap();
        assert_eq!(
            r,
            AnnounceRequest {
                info_hash: InfoHash(HASH),
                peer_id: PeerId(*PEER),
                port: 47101,
                uploaded: 0,
                downloaded: 0,
                left: 20_971_520,
                event: Some(Event::Started),
                compact: true,
                numwant: None,
                ip: None,
            }
        );
        assert_eq!(
            r.info_hash.to_hex(),
            "123456789abcdef0123456789abcdef012345678"
        );
        assert_eq!(
            format!("{:?}", r.info_hash),
            "InfoHash(123456789abcdef0123456789abcdef012345678)"
        );
    }

    #[test]
    fn optional_fields() {
        let q = format!(
            "{}&numwant=50&ip=2001:db8::1&event=",
            with("compact", Some("0"))
                .replace("&event=started", "")
                .replace("event=started&", "")
        );
        let r = AnnounceRequest::parse(&q).unwrap();
        assert!(!r.compact);
        assert_eq!(r.event, None);
        assert_eq!(r.numwant, Some(50));
        assert_eq!(r.ip, Some("2001:db8::1".parse().unwrap()));

        let r = AnnounceRequest::parse(&with("compact", None)).unwrap();
        assert!(r.compact, "absent compact means compact");
        let r = AnnounceRequest::parse(&with("event", Some("completed"))).unwrap();
        assert_eq!(r.event, Some(Event::Completed));
        let r = AnnounceRequest::parse(&with("ip", Some("10.0.0.1"))).unwrap();
        assert_eq!(r.ip, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    }

    #[test]
    fn plus_is_a_literal_byte_in_binary_fields() {
        let q = with(
            "peer_id",
            Some("-rQ9100-+%02%03%04%05%06%07%08%09%0A%0B%0C"),
        );
        let r = AnnounceRequest::parse(&q).unwrap();
        assert_eq!(r.peer_id.0[8], b'+');
    }

    #[test]
    fn rejects_bad_fields() {
        let short = &HASH_Q[..HASH_Q.len() - 1];
        assert_eq!(
            err(&with("info_hash", Some(short))),
            "info_hash must be 20 bytes, got 19"
        );
        assert_eq!(
            err(&with("info_hash", Some(&format!("{HASH_Q}%00")))),
            "info_hash must be 20 bytes, got 21"
        );
        assert_eq!(
            err(&with("peer_id", Some("abc"))),
            "peer_id must be 20 bytes, got 3"
        );
        assert_eq!(err(&with("info_hash", None)), "info_hash is missing");
        assert_eq!(err(&with("peer_id", None)), "peer_id is missing");
        assert_eq!(err(&with("port", None)), "port is missing");
        assert_eq!(
            err(&with("port", Some("0"))),
            r#"port must be a number from 1 to 65535, got "0""#
        );
        assert_eq!(
            err(&with("port", Some("65536"))),
            r#"port must be a number from 1 to 65535, got "65536""#
        );
        assert_eq!(
            err(&with("left", Some("-1"))),
            r#"left must be a whole number of bytes, got "-1""#
        );
        assert_eq!(
            err(&with("uploaded", Some("abc"))),
            r#"uploaded must be a whole number of bytes, got "abc""#
        );
        assert_eq!(
            err(&with("downloaded", Some("+5"))),
            r#"downloaded must be a whole number of bytes, got " 5""#
        );
        assert_eq!(err(&with("left", None)), "left is missing");
        assert_eq!(err(&with("uploaded", None)), "uploaded is missing");
        assert_eq!(err(&with("downloaded", None)), "downloaded is missing");
        assert!(err(&with("left", Some(""))).starts_with("left must be"));
        assert!(err(&with("left", Some("18446744073709551616"))).starts_with("left must be"));
        assert_eq!(
            err(&with("numwant", Some("1e9"))),
            r#"numwant must be a number from 0 to 4294967295, got "1e9""#
        );
        assert!(err(&with("numwant", Some("4294967296"))).starts_with("numwant must be"));
        assert_eq!(
            err(&with("compact", Some("yes"))),
            r#"compact must be 0 or 1, got "yes""#
        );
        assert_eq!(
            err(&with("event", Some("paused"))),
            r#"event must be started, completed or stopped, got "paused""#
        );
        assert!(err(&with("ip", Some("example.com"))).starts_with("ip must be"));
        assert_eq!(
            err(&format!("{}&port=1", librqbit_query())),
            "port is given more than once"
        );
        assert_eq!(err(""), "info_hash is missing");
        assert_eq!(
            err(&"a".repeat(MAX_QUERY_LEN + 1)),
            format!("query string is longer than {MAX_QUERY_LEN} bytes")
        );
        let long = "9".repeat(1000);
        assert!(err(&with("left", Some(&long))).len() < 120);
    }

    #[test]
    fn compact_encoding() {
        let resp = AnnounceResponse {
            interval: 1800,
            min_interval: Some(60),
            complete: 2,
            incomplete: 1,
            peers: vec![
                "10.0.0.1:6881".parse().unwrap(),
                "[::1]:258".parse().unwrap(),
                "[::ffff:192.168.1.2]:80".parse().unwrap(),
            ],
        };
        let bytes = resp.encode(true);
        let mut expected = b"d8:completei2e10:incompletei1e8:intervali1800e12:min intervali60e\
                             5:peers12:\x0a\x00\x00\x01\x1a\xe1\xc0\xa8\x01\x02\x00\x50\
                             6:peers618:"
            .to_vec();
        expected.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        expected.extend_from_slice(&[0x01, 0x02, b'e']);
        assert_eq!(bytes, expected);

        let dict = decode_dict(&bytes);
        assert_eq!(dict[&b"interval"[..]], Value::Int(1800));
        assert_eq!(dict[&b"complete"[..]], Value::Int(2));
        assert!(matches!(&dict[&b"peers"[..]], Value::Bytes(b) if b.len() == 12));
        assert!(matches!(&dict[&b"peers6"[..]], Value::Bytes(b) if b.len() == 18));
    }

    #[test]
    fn compact_encoding_always_has_interval_and_peers() {
        let bytes = AnnounceResponse {
            interval: 30,
            ..Default::default()
        }
        .encode(true);
        assert_eq!(
            bytes,
            b"d8:completei0e10:incompletei0e8:intervali30e5:peers0:e"
        );
        let dict = decode_dict(&bytes);
        assert_eq!(dict[&b"peers"[..]], Value::Bytes(vec![]));
        assert!(!dict.contains_key(&b"peers6"[..]));
    }

    #[test]
    fn dict_encoding() {
        let resp = AnnounceResponse {
            interval: 900,
            min_interval: None,
            complete: 0,
            incomplete: 2,
            peers: vec![
                "127.0.0.1:6881".parse().unwrap(),
                "[::1]:7000".parse().unwrap(),
            ],
        };
        let bytes = resp.encode(false);
        assert_eq!(
            bytes,
            b"d8:completei0e10:incompletei2e8:intervali900e5:peersl\
              d2:ip9:127.0.0.14:porti6881ee\
              d2:ip3:::14:porti7000eeee"
        );
        let dict = decode_dict(&bytes);
        let Value::List(peers) = &dict[&b"peers"[..]] else {
            panic!("peers is not a list");
        };
        let Value::Dict(first) = &peers[0] else {
            panic!("peer is not a dict");
        };
        assert_eq!(first[&b"ip"[..]], Value::Bytes(b"127.0.0.1".to_vec()));
        assert_eq!(first[&b"port"[..]], Value::Int(6881));
        assert_eq!(
            AnnounceResponse {
                interval: 1,
                ..Default::default()
            }
            .encode(false),
            b"d8:completei0e10:incompletei0e8:intervali1e5:peerslee"
        );
    }

    #[test]
    fn failure_encoding() {
        let bytes = failure("port is missing");
        assert_eq!(bytes, b"d14:failure reason15:port is missinge");
        let dict = decode_dict(&bytes);
        assert_eq!(
            dict[&b"failure reason"[..]],
            Value::Bytes(b"port is missing".to_vec())
        );
        let unicode = failure("é");
        assert_eq!(unicode, "d14:failure reason2:ée".as_bytes());
    }

    #[test]
    fn scrape_parsing() {
        assert_eq!(parse_scrape("").unwrap(), vec![]);
        let other = "%FF".repeat(20);
        let q = format!("info_hash={HASH_Q}&info_hash={other}&x=1&info_hash={HASH_Q}");
        assert_eq!(
            parse_scrape(&q).unwrap(),
            vec![InfoHash(HASH), InfoHash([0xff; 20])]
        );
        assert_eq!(
            parse_scrape("info_hash=abc").unwrap_err().to_string(),
            "info_hash must be 20 bytes, got 3"
        );
        let many: Vec<String> = (0..=MAX_SCRAPE_HASHES)
            .map(|i| {
                let mut h = [0u8; 20];
                h[..8].copy_from_slice(&(i as u64).to_be_bytes());
                format!("info_hash={}", escape(&h))
            })
            .collect();
        assert_eq!(
            parse_scrape(&many[..MAX_SCRAPE_HASHES].join("&"))
                .unwrap()
                .len(),
            MAX_SCRAPE_HASHES
        );
        assert_eq!(
            parse_scrape(&many.join("&")).unwrap_err(),
            AnnounceError::TooManyHashes
        );
    }

    #[test]
    fn scrape_encoding() {
        let low = InfoHash([0x01; 20]);
        let high = InfoHash([0xfe; 20]);
        let entry = |c, d, i| ScrapeEntry {
            complete: c,
            downloaded: d,
            incomplete: i,
        };
        let bytes = encode_scrape(&[
            (high, entry(1, 2, 3)),
            (low, entry(4, 5, 6)),
            (high, entry(7, 7, 7)),
        ]);
        let mut expected = b"d5:filesd20:".to_vec();
        expected.extend_from_slice(&low.0);
        expected.extend_from_slice(b"d8:completei4e10:downloadedi5e10:incompletei6ee20:");
        expected.extend_from_slice(&high.0);
        expected.extend_from_slice(b"d8:completei1e10:downloadedi2e10:incompletei3eeee");
        assert_eq!(bytes, expected);

        let dict = decode_dict(&bytes);
        let Value::Dict(files) = &dict[&b"files"[..]] else {
            panic!("files is not a dict");
        };
        assert_eq!(files.len(), 2);
        assert_eq!(encode_scrape(&[]), b"d5:filesdee");
    }

    #[test]
    fn info_hash_hex() {
        let h = InfoHash(HASH);
        assert_eq!(InfoHash::from_hex(&h.to_hex()).unwrap(), h);
        assert_eq!(InfoHash::from_hex(&h.to_hex().to_uppercase()).unwrap(), h);
        assert!(InfoHash::from_hex("abc").is_err());
        assert!(InfoHash::from_hex(&"g".repeat(40)).is_err());
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", h.to_hex()));
        assert_eq!(serde_json::from_str::<InfoHash>(&json).unwrap(), h);
    }

    fn decode_dict(bytes: &[u8]) -> HashMap<Vec<u8>, Value> {
        match serde_bencode::from_bytes::<Value>(bytes).unwrap() {
            Value::Dict(d) => d,
            other => panic!("not a dict: {other:?}"),
        }
    }

    /// Re-encodes a decoded value with sorted keys; equal to the input only if that was
    /// canonical bencode.
    fn canonical(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Bytes(b) => put_bytes(out, b),
            Value::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Value::List(l) => {
                out.push(b'l');
                l.iter().for_each(|v| canonical(v, out));
                out.push(b'e');
            }
            Value::Dict(d) => {
                let mut keys: Vec<_> = d.keys().collect();
                keys.sort();
                out.push(b'd');
                for k in keys {
                    put_bytes(out, k);
                    canonical(&d[k], out);
                }
                out.push(b'e');
            }
        }
    }

    fn request() -> impl Strategy<Value = AnnounceRequest> {
        (
            any::<[u8; 20]>(),
            any::<[u8; 20]>(),
            1u16..,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::option::of(prop_oneof![
                Just(Event::Started),
                Just(Event::Completed),
                Just(Event::Stopped)
            ]),
            any::<bool>(),
            any::<Option<u32>>(),
            any::<Option<IpAddr>>(),
        )
            .prop_map(
                |(h, p, port, uploaded, downloaded, left, event, compact, numwant, ip)| {
                    AnnounceRequest {
                        info_hash: InfoHash(h),
                        peer_id: PeerId(p),
                        port,
                        uploaded,
                        downloaded,
                        left,
                        event,
                        compact,
                        numwant,
                        ip,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn to_query_round_trips(r in request()) {
            prop_assert_eq!(AnnounceRequest::parse(&r.to_query()).unwrap(), r);
        }

        #[test]
        fn arbitrary_queries_never_panic(q in any::<String>()) {
            let _ = AnnounceRequest::parse(&q);
            let _ = parse_scrape(&q);
            let _ = InfoHash::from_hex(&q);
        }

        #[test]
        fn query_like_strings_never_panic(q in "([a-z_]{1,10}=[%0-9A-Za-z+-]{0,30}&?){0,12}") {
            let _ = AnnounceRequest::parse(&q);
            let _ = parse_scrape(&q);
        }

        #[test]
        fn responses_are_canonical_bencode(
            interval in any::<u32>(),
            min_interval in any::<Option<u32>>(),
            complete in any::<u32>(),
            incomplete in any::<u32>(),
            peers in prop::collection::vec(any::<SocketAddr>(), 0..20),
            compact in any::<bool>(),
        ) {
            let bytes = AnnounceResponse { interval, min_interval, complete, incomplete, peers }
                .encode(compact);
            let value: Value = serde_bencode::from_bytes(&bytes).unwrap();
            let mut again = Vec::new();
            canonical(&value, &mut again);
            prop_assert_eq!(again, bytes);
        }

        #[test]
        fn scrapes_are_canonical_bencode(
            entries in prop::collection::vec((any::<[u8; 20]>(), any::<(u32, u32, u32)>()), 0..20),
        ) {
            let entries: Vec<_> = entries
                .into_iter()
                .map(|(h, (complete, downloaded, incomplete))| {
                    (InfoHash(h), ScrapeEntry { complete, downloaded, incomplete })
                })
                .collect();
            let bytes = encode_scrape(&entries);
            let value: Value = serde_bencode::from_bytes(&bytes).unwrap();
            let mut again = Vec::new();
            canonical(&value, &mut again);
            prop_assert_eq!(again, bytes);
        }
    }
}

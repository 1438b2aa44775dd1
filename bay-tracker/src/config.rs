//! Command-line and environment configuration of the tracker.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use bay_common::Registry;
use bay_common::flags::{parse_congestion, parse_registry, parse_seconds, parse_size};
use bay_common::logging::LogFormat;
use clap::Parser;

/// bay-tracker: fetches blobs from allowlisted upstream registries once, verifies their digest,
/// seeds each as a torrent, and tracks the swarm of bay-proxies that download them.
#[derive(Debug, Clone, Parser)]
#[command(name = "bay-tracker", version)]
pub struct Config {
    /// Address of the HTTP API (torrents, announce, scrape, health, stats).
    #[arg(long, env = "BAY_LISTEN", default_value = "0.0.0.0:6880")]
    pub listen: SocketAddr,

    /// BitTorrent port of the tracker's own seed. It listens on the --listen IP.
    #[arg(long, env = "BAY_PEER_PORT", default_value_t = 6881)]
    pub peer_port: u16,

    /// IP that peers use to reach the tracker's seed. Default: the --listen IP, or when that is
    /// unspecified (0.0.0.0), the address each announce arrived on.
    #[arg(long, env = "BAY_PEER_IP")]
    pub peer_ip: Option<IpAddr>,

    /// Upstream registry the tracker may fetch from (repeatable, or comma-separated in the env
    /// var). `host[:port]` means HTTPS; `http://host:port` allows plain HTTP. Requests for any
    /// other registry are refused.
    #[arg(long = "upstream", env = "BAY_UPSTREAM", value_delimiter = ',', value_parser = parse_registry)]
    pub upstreams: Vec<Registry>,

    /// Where verified blobs (blobs/), partial downloads (tmp/) and the seed's fast-resume state
    /// (seed-state/) live.
    #[arg(long, env = "BAY_DATA_DIR", default_value = "/var/lib/bay-tracker")]
    pub data_dir: PathBuf,

    /// Seed a blob the tracker has just verified without librqbit hashing all of it again (its
    /// fast resume: a piece bitfield, a torrent copy and a session file in seed-state/): a cold
    /// fetch answers sooner and costs less CPU. librqbit then rewrites the session file,
    /// listing every held blob, on each add, which costs more than the hash it saves when tens
    /// of thousands of blobs of a few MiB or less are held, and keeps each blob's bitfield file
    /// open (two open files per held blob, not one); `false` for such a cache
    /// (bench/RESULTS.md).
    #[arg(long, env = "BAY_SEED_FAST_RESUME", default_value_t = true, action = clap::ArgAction::Set)]
    pub seed_fast_resume: bool,

    /// Most bytes of blobs to keep; least recently requested blobs are evicted beyond it.
    /// Accepts a plain number or K/M/G/T (binary) suffixes, e.g. 50G.
    #[arg(long, env = "BAY_CACHE_SIZE", default_value = "50G", value_parser = parse_size)]
    pub cache_size: u64,

    /// Announce URL written into torrents. Default: http://<listen>/announce (with the peer IP
    /// when --listen is unspecified).
    #[arg(long, env = "BAY_ANNOUNCE_URL")]
    pub announce_url: Option<String>,

    /// Most bytes per second the seed uploads (K/M/G suffixes allowed), so a busy swarm leaves
    /// room on the link for everything else: applies to the BitTorrent seed and, separately,
    /// to the pieces proxies read over HTTP. Default: unlimited.
    #[arg(long, env = "BAY_UPLOAD_LIMIT", value_parser = parse_size)]
    pub upload_limit: Option<u64>,

    /// Most blob fetches from upstream at once; more wait their turn (their proxies wait for
    /// the torrent rather than going upstream themselves). 0: unlimited.
    #[arg(long, env = "BAY_UPSTREAM_CONCURRENCY", default_value_t = 16)]
    pub upstream_concurrency: usize,

    /// Most bytes per second all upstream fetches together receive (K/M/G suffixes allowed),
    /// so a cold burst cannot fill the site's internet link. Default: unlimited.
    #[arg(long, env = "BAY_UPSTREAM_RATE", value_parser = parse_size)]
    pub upstream_rate: Option<u64>,

    /// Log lines as `text`, or `json` (one object per line, every field of an event and its
    /// spans as a field) for log shippers. Text is coloured only on a terminal, never when
    /// NO_COLOR is set. The level filter is RUST_LOG (default info).
    #[arg(long, env = "BAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TCP congestion control of the connections the tracker serves, the first of these the
    /// kernel accepts (comma-separated; empty keeps the system's). Every first copy of a piece
    /// leaves through the tracker's uplink, and loss-based control wastes less of it: with BBR
    /// it resent 4-9 % of its segments in the shaped benchmark, under 3 % with CUBIC. Without
    /// CAP_NET_ADMIN only what net.ipv4.tcp_allowed_congestion_control lists can be used;
    /// reno always can.
    #[arg(long, env = "BAY_TCP_CONGESTION", default_value = "cubic,reno", value_delimiter = ',', value_parser = parse_congestion)]
    pub tcp_congestion: Vec<String>,

    /// Seconds any wait on an upstream registry may take: connecting, a HEAD, the first byte of
    /// an answer, each read of a blob's body. A registry that accepts and then hangs costs a
    /// client at most this long.
    #[arg(long, env = "BAY_UPSTREAM_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub upstream_timeout: std::time::Duration,

    /// Seconds that shutdown (SIGTERM) waits for requests in flight before cutting them.
    #[arg(long, env = "BAY_DRAIN_TIMEOUT", default_value_t = 5)]
    pub drain_timeout: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["bay-tracker"])
    }
}

impl Config {
    /// The announce URL torrents name.
    pub fn announce_url(&self) -> String {
        if let Some(u) = &self.announce_url {
            return u.clone();
        }
        let ip = if self.listen.ip().is_unspecified() {
            self.peer_ip.unwrap_or(self.listen.ip())
        } else {
            self.listen.ip()
        };
        format!(
            "http://{}/announce",
            SocketAddr::new(ip, self.listen.port())
        )
    }

    pub fn upstream(&self, authority: &str) -> Option<&Registry> {
        self.upstreams.iter().find(|r| r.authority() == authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_defaults() {
        let c = Config::parse_from([
            "bay-tracker",
            "--upstream",
            "http://127.0.0.2:5000",
            "--upstream",
            "registry-1.docker.io",
            "--listen",
            "127.0.0.3:7000",
        ]);
        assert_eq!(c.upstreams.len(), 2);
        assert!(c.upstream("127.0.0.2:5000").is_some());
        assert!(c.upstream("registry-1.docker.io").is_some());
        assert!(c.upstream("evil.example").is_none());
        assert_eq!(c.announce_url(), "http://127.0.0.3:7000/announce");
        let d = Config::default();
        assert_eq!(d.listen.port(), 6880);
        assert_eq!(d.peer_port, 6881);
        assert_eq!((d.upstream_concurrency, d.upstream_rate), (16, None));
        assert_eq!(d.tcp_congestion, ["cubic", "reno"]);
        let c = Config::parse_from(["bay-tracker", "--tcp-congestion", "bbr,reno"]);
        assert_eq!(c.tcp_congestion, ["bbr", "reno"]);
        let c = Config::parse_from(["bay-tracker", "--tcp-congestion", ""]);
        assert!(c.tcp_congestion.iter().all(|n| n.is_empty()));
        let c = Config::parse_from(["bay-tracker", "--upstream-rate", "10M"]);
        assert_eq!(c.upstream_rate, Some(10 << 20));
        assert!(Config::try_parse_from(["bay-tracker", "--upstream-rate", "fast"]).is_err());
        assert!(
            Config::try_parse_from(["bay-tracker", "--upstream", "ftp://x"]).is_err(),
            "bad upstream must be refused"
        );
    }
}

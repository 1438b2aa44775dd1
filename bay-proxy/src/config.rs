//! Command-line and environment configuration of the proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bay_common::Registry;
use bay_common::flags::{parse_registry, parse_seconds, parse_size};
use bay_common::logging::LogFormat;
use clap::Parser;

/// bay-proxy: a registry proxy for one machine. Point `p2p-<registry>` at it in /etc/hosts and
/// `docker pull p2p-<registry>/image`: manifests and everything else go straight to the
/// upstream registry, blobs come from the BitTorrent swarm of trackers and other proxies.
#[derive(Debug, Clone, Parser)]
#[command(name = "bay-proxy", version)]
pub struct Config {
    /// Address the registry API listens on. Docker tries plain HTTP on port 80 for names that
    /// resolve to 127.0.0.0/8, hence the default.
    #[arg(long, env = "BAY_LISTEN", default_value = "127.0.0.1:80")]
    pub listen: SocketAddr,

    /// Extra address that serves only /metrics, /healthz and /readyz, for a Prometheus that
    /// cannot reach --listen (which stays on loopback: on a shared network it would be an open
    /// registry proxy). Off by default.
    #[arg(long, env = "BAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Base URL of a bay-tracker, e.g. http://tracker-1:6880 (repeatable, or comma-separated in
    /// the env var). Torrents are announced to all of them.
    #[arg(long = "tracker", env = "BAY_TRACKER", value_delimiter = ',')]
    pub trackers: Vec<url::Url>,

    /// BitTorrent port this proxy seeds and downloads on (all interfaces).
    #[arg(long, env = "BAY_PEER_PORT", default_value_t = 6882)]
    pub peer_port: u16,

    /// Upstream registry this proxy may serve (repeatable, or comma-separated in the env var).
    /// `host[:port]` means HTTPS; `http://host:port` allows plain HTTP.
    #[arg(long = "upstream", env = "BAY_UPSTREAM", value_delimiter = ',', value_parser = parse_registry)]
    pub upstreams: Vec<Registry>,

    /// Upstream for requests whose Host has no `p2p-` prefix. Must also be an --upstream.
    #[arg(long, env = "BAY_DEFAULT_UPSTREAM", value_parser = parse_registry)]
    pub default_upstream: Option<Registry>,

    /// Where downloaded blobs (blobs/) and downloads in progress (tmp/) live.
    #[arg(long, env = "BAY_DATA_DIR", default_value = "/var/lib/bay-proxy")]
    pub data_dir: PathBuf,

    /// Most bytes of blobs to keep and seed; least recently used go first. Plain number or
    /// K/M/G/T suffix.
    #[arg(long, env = "BAY_CACHE_SIZE", default_value = "20G", value_parser = parse_size)]
    pub cache_size: u64,

    /// Seconds without swarm progress after which a blob is streamed from upstream instead.
    #[arg(long, env = "BAY_STALL_TIMEOUT", default_value_t = 5.0)]
    pub stall_timeout: f64,

    /// Most bytes per second the BitTorrent side uploads (K/M/G suffixes allowed), so a busy
    /// swarm leaves room on the link for everything else. Default: unlimited.
    #[arg(long, env = "BAY_UPLOAD_LIMIT", value_parser = parse_size)]
    pub upload_limit: Option<u64>,

    /// 16 KiB requests each BitTorrent connection keeps in flight (1-256). Fewer put fewer
    /// bytes in the queues of a downlink shared by many peers, where librqbit takes slow pieces
    /// over and fetches them twice (4 cut those bytes from 14 % to 0.5 % at 100 Mbit/s in
    /// bench/RESULTS.md, but a client's stream then lagged its download by seconds); more keep
    /// a fast, long-distance link busy.
    #[arg(long, env = "BAY_REQUEST_WINDOW", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub request_window: u16,

    /// Most BitTorrent connections per blob, downloading or seeding, incoming and outgoing
    /// together.
    #[arg(long, env = "BAY_PEER_LIMIT", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub peer_limit: u16,

    /// Start swarm downloads of an image's config and layers as soon as its manifest passes
    /// through, so a client that asks for blobs one after another (skopeo, crane) finds them
    /// already on their way and the swarm moves the whole image at once. Blobs already cached
    /// are skipped; a client that then skips a layer leaves it cached and seeded. `false`
    /// downloads only what clients ask for.
    #[arg(long, env = "BAY_PREFETCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefetch: bool,

    /// While a tracker is still fetching a blob from upstream (a cold pull), read this node's
    /// slice of it as the bytes land there, so the nodes hold the blob between them when its
    /// torrent exists (docs/swarming.md). `false` waits for the torrent, as before 2026-12.
    #[arg(long, env = "BAY_EARLY_READS", default_value_t = true, action = clap::ArgAction::Set)]
    pub early_reads: bool,

    /// TCP port (all interfaces) where this node passes pieces it read early on to other
    /// nodes while a tracker still fetches the blob, and the other nodes' proxies read them
    /// (docs/swarming.md). Other nodes must reach it, like the BitTorrent port; 0 lets the
    /// system pick one (the trackers learn it either way). Unused with --early-reads false.
    #[arg(long, env = "BAY_EXCHANGE_PORT", default_value_t = 6883)]
    pub exchange_port: u16,

    /// Log lines as `text`, or `json` (one object per line, every field of an event and its
    /// spans as a field) for log shippers. Text is coloured only on a terminal, never when
    /// NO_COLOR is set. The level filter is RUST_LOG (default info).
    #[arg(long, env = "BAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Seconds any wait on an upstream registry may take: connecting, a HEAD, the first byte of
    /// an answer, each read of a blob's body. A registry that accepts and then hangs costs a
    /// client at most this long.
    #[arg(long, env = "BAY_UPSTREAM_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub upstream_timeout: std::time::Duration,

    /// Seconds that shutdown (SIGTERM) waits for blob downloads and responses in flight before
    /// cutting them. Clients whose response is cut retry; nothing partial is cached.
    #[arg(long, env = "BAY_DRAIN_TIMEOUT", default_value_t = 5)]
    pub drain_timeout: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["bay-proxy"])
    }
}

impl Config {
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stall_timeout.clamp(0.1, 3600.0))
    }

    /// Checks what clap cannot: the default upstream must be allowlisted.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = &self.default_upstream
            && !self.upstreams.contains(d)
        {
            return Err(format!(
                "--default-upstream {d} is not among the --upstream registries"
            ));
        }
        for t in &self.trackers {
            if !matches!(t.scheme(), "http" | "https") {
                return Err(format!("--tracker {t}: only http(s) URLs are supported"));
            }
        }
        if !self.stall_timeout.is_finite() || self.stall_timeout <= 0.0 {
            return Err(format!(
                "--stall-timeout {}: must be a positive number of seconds",
                self.stall_timeout
            ));
        }
        Ok(())
    }

    /// The allowlisted upstream for an authority (`host[:port]`).
    pub fn upstream(&self, authority: &str) -> Option<&Registry> {
        self.upstreams.iter().find(|r| r.authority() == authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        let c = Config::parse_from([
            "bay-proxy",
            "--tracker",
            "http://127.0.0.3:6880",
            "--tracker",
            "http://127.0.0.4:6880",
            "--upstream",
            "http://127.0.0.2:5000",
            "--default-upstream",
            "http://127.0.0.2:5000",
        ]);
        assert_eq!(c.trackers.len(), 2);
        assert!(c.validate().is_ok());
        assert!(c.upstream("127.0.0.2:5000").is_some());
        let bad = Config::parse_from(["bay-proxy", "--default-upstream", "ghcr.io"]);
        let e = bad.validate().unwrap_err();
        assert!(e.contains("ghcr.io"), "{e}");
        assert_eq!(Config::default().listen.port(), 80);
        assert!(Config::default().prefetch);
        assert!(!Config::parse_from(["bay-proxy", "--prefetch", "false"]).prefetch);
        assert!(Config::try_parse_from(["bay-proxy", "--prefetch", "maybe"]).is_err());
        assert!(Config::default().early_reads);
        assert!(!Config::parse_from(["bay-proxy", "--early-reads", "false"]).early_reads);
        assert_eq!(Config::default().exchange_port, 6883);
        assert_eq!(
            Config::parse_from(["bay-proxy", "--exchange-port", "0"]).exchange_port,
            0
        );
        assert_eq!(Config::default().request_window, 16);
        assert_eq!(Config::default().peer_limit, 128);
        let c = Config::parse_from(["bay-proxy", "--request-window", "4", "--peer-limit", "8"]);
        assert_eq!((c.request_window, c.peer_limit), (4, 8));
        for bad in [
            ["--request-window", "0"],
            ["--request-window", "257"],
            ["--peer-limit", "0"],
        ] {
            let e = Config::try_parse_from(["bay-proxy", bad[0], bad[1]]).unwrap_err();
            assert!(e.to_string().contains(bad[1]), "{e}");
        }
    }
}

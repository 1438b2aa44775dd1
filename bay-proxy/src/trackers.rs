//! The configured trackers: which one to ask for a blob's torrent, and which are healthy.
//!
//! Every tracker derives the same torrent for a blob, but the upstream should be fetched once,
//! so all proxies ask the same tracker first for a given digest: the one ranking highest by
//! rendezvous (highest-random-weight) hashing of (tracker, digest). Removing a tracker moves
//! only the digests it ranked first for. A tracker that failed is skipped for a while.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bay_common::announce::InfoHash;
use bay_common::api::{self, Slot};
use bay_common::torrent::BlobTorrent;
use bay_common::upstream::Refusal;
use bay_common::{Digest, Registry, RepositoryName};
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use sha2::{Digest as _, Sha256};

/// How long a failed tracker is tried only after the healthy ones.
const COOL_DOWN: Duration = Duration::from_secs(30);
/// A torrent answer may take as long as the tracker needs to fetch the blob from upstream.
const TORRENT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A tracker busy fetching has its downlink full, and a full queue drops SYNs (retried by the
/// kernel after 1 s and 3 s): a connect must outlast two lost ones, or the proxy fails over
/// and the next tracker fetches the same blob from upstream again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// While a torrent request waits, the tracker's `/healthz` is asked this often; a tracker that
/// misses [`HEALTH_MISSES`] in a row (each given [`HEALTH_TIMEOUT`]) is taken for hung (a frozen
/// process: its kernel still accepts connections and nothing answers them), so the request
/// moves on in seconds instead of waiting out [`TORRENT_TIMEOUT`]. A tracker busy fetching a
/// big blob answers it at once.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTH_MISSES: u32 = 2;
/// Longest a tracker may go without sending piece bytes while a range is being read.
const PIECES_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// The same for a blob being fetched, which waits on upstream (paused, or slow): a read cut
/// off loses nothing, the pieces come later anyway.
const EARLY_READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TrackersError {
    #[error("no tracker is configured")]
    None,
    #[error("upstream refused through the tracker: {}", .0.status)]
    Refused(Box<Refusal>),
    #[error("every tracker failed; last: {0}")]
    AllFailed(String),
    /// The tracker could not get the blob from upstream (it answered 502 or 504): going
    /// upstream ourselves, or asking the next tracker, would wait on the same registry again.
    #[error("{tracker} could not get the blob from upstream: {status} {detail}")]
    UpstreamFailed {
        tracker: String,
        status: reqwest::StatusCode,
        detail: String,
    },
}

pub struct Trackers {
    urls: Vec<url::Url>,
    failed_at: Mutex<Vec<Option<Instant>>>,
    client: reqwest::Client,
    /// For piece ranges, which must keep flowing.
    pieces_client: reqwest::Client,
    /// For ranges of blobs being fetched, which come as fast as upstream sends them.
    early_client: reqwest::Client,
}

/// Why a torrent request got no answer to go by.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// No connection could be made, or the request's own time ran out: sent again once only
    /// when the tracker is asked to fetch.
    #[error("{0}")]
    Transport(String),
    /// A connection broke under the request or its answer (a pooled connection that had
    /// died or timed out, the tracker dying while it answered): sent again at once.
    #[error("{0}")]
    Broken(String),
    /// The tracker answered something that is not a torrent of the blob.
    #[error("{0}")]
    Answer(String),
    /// The tracker stopped answering its health checks while the request waited.
    #[error("{0}")]
    Hung(String),
}

/// Whether the kernel timed out an established connection under `e` (ETIMEDOUT), as opposed
/// to a timeout of reqwest's own.
fn kernel_timed_out(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
            && io.raw_os_error().is_some()
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A tracker's answer that is not a torrent but final.
enum Answer {
    Refused(Refusal),
    UpstreamFailed(reqwest::StatusCode, String),
}

/// What a tracker answers an early read.
pub enum EarlyAnswer {
    /// The bytes, from the first to the last (inclusive) of the part sent.
    Bytes(reqwest::Response, u64, u64),
    /// Other proxies got every piece asked for.
    NoneLeft,
    /// This proxy holds its share of the pieces sent so far: ask again shortly.
    Wait,
}

/// A torrent as a tracker handed it out.
pub struct Fetched {
    pub torrent: BlobTorrent,
    pub metainfo: Bytes,
    pub from: url::Url,
}

/// `exchange=<port>` for the tracker to record (and hand out) where this node passes the
/// pieces it reads early on, or nothing if it does not.
fn exchange_query(ask: &crate::early::Ask, sep: char) -> String {
    ask.exchange
        .as_ref()
        .map_or(String::new(), |x| format!("{sep}exchange={}", x.port()))
}

impl Trackers {
    pub fn new(urls: Vec<url::Url>) -> Result<Self, reqwest::Error> {
        let client = |connect: Duration, read: Duration| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(bay_common::upstream::IDLE_PER_HOST)
                .pool_idle_timeout(bay_common::upstream::IDLE_TIMEOUT)
                .connect_timeout(connect)
                .read_timeout(read)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
        };
        let pieces_client = client(Duration::from_secs(3), PIECES_READ_TIMEOUT)?;
        let early_client = client(Duration::from_secs(3), EARLY_READ_TIMEOUT)?;
        let client = client(CONNECT_TIMEOUT, TORRENT_TIMEOUT)?;
        Ok(Self {
            pieces_client,
            early_client,
            failed_at: Mutex::new(vec![None; urls.len()]),
            urls,
            client,
        })
    }

    pub fn announce_urls(&self) -> Vec<String> {
        self.urls
            .iter()
            .filter_map(|u| u.join("announce").ok())
            .map(|u| u.to_string())
            .collect()
    }

    /// Sends event announces (`stopped` at shutdown, `completed`) to every tracker, a few at a
    /// time, for at most `deadline` in all: shutdown must not hang on a dead tracker.
    pub async fn announce_events(
        &self,
        requests: &[bay_common::announce::AnnounceRequest],
        deadline: Duration,
    ) -> usize {
        use futures::StreamExt as _;
        let urls: Vec<String> = self
            .announce_urls()
            .iter()
            .flat_map(|u| {
                requests
                    .iter()
                    .map(move |r| format!("{u}?{}", r.to_query()))
            })
            .collect();
        let sends = urls.into_iter().map(|url| {
            let client = self.client.clone();
            async move {
                let resp = client.get(url).timeout(deadline).send().await;
                resp.is_ok_and(|r| r.status().is_success())
            }
        });
        let mut done = 0;
        let all = futures::stream::iter(sends)
            .buffer_unordered(16)
            .for_each(|ok| {
                done += usize::from(ok);
                async {}
            });
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("trackers did not take every announce within {deadline:?}");
        }
        done
    }

    /// Tracker indices in the order to ask for `digest`: rendezvous rank, with trackers that
    /// failed in the last `COOL_DOWN` moved to the back.
    pub fn ranked(&self, digest: &Digest) -> Vec<usize> {
        let mut order = rendezvous(&self.urls, &digest.to_string());
        let now = Instant::now();
        let failed = self.failed_at.lock().expect("poisoned");
        order.sort_by_key(|i| failed[*i].is_some_and(|t| now.duration_since(t) < COOL_DOWN));
        order
    }

    fn mark(&self, i: usize, ok: bool) {
        self.failed_at.lock().expect("poisoned")[i] = (!ok).then(Instant::now);
    }

    /// The blob's torrent from the first tracker that gives one, checked to be bay's torrent of
    /// that digest. With several trackers, those that hold the blob (or are fetching it) are
    /// asked first, in rank order, and only then the first by rank to fetch it: a tracker that
    /// restarted empty, or came back after its blobs were fetched by the next one, does not
    /// fetch from upstream what another tracker already has. A request that may start the
    /// fetch carries what `held` says this node holds of the blob (`api::Held`).
    pub async fn torrent(
        &self,
        registry: &Registry,
        name: &RepositoryName,
        digest: &Digest,
        authorization: Option<&HeaderValue>,
        held: &(dyn Fn() -> Option<api::Held> + Sync),
    ) -> Result<Fetched, TrackersError> {
        if self.urls.is_empty() {
            return Err(TrackersError::None);
        }
        let path = api::torrent_path(registry, name, digest);
        let mut last = String::new();
        // Trackers this call already could not reach: not sent the same request again.
        let mut lost = vec![false; self.urls.len()];
        // Trackers this call found hung: not asked again by it.
        let mut hung = vec![false; self.urls.len()];
        if self.urls.len() > 1 {
            for i in self.ranked(digest) {
                if self.cooling(i) {
                    continue;
                }
                // Asked again if the connection broke: with the owner passed over, the next
                // tracker would fetch the blob a second time (a lossy node's pooled connection
                // to the owner timed out in `bench/swarm.sh --chaos`, and upstream sent a 64
                // MiB layer 1.4 times).
                let mut answer = self.ask(i, &path, digest, authorization, None).await;
                if matches!(answer, Err(Failure::Broken(_))) {
                    answer = self.ask(i, &path, digest, authorization, None).await;
                }
                match answer {
                    Ok(Ok(fetched)) => return Ok(fetched),
                    Ok(Err(Answer::Refused(refusal))) => {
                        return Err(TrackersError::Refused(Box::new(refusal)));
                    }
                    // Not held there (504), or its upstream check failed: the next one.
                    Ok(Err(Answer::UpstreamFailed(..))) => {}
                    Err(e) => {
                        lost[i] |= matches!(e, Failure::Transport(_) | Failure::Broken(_));
                        hung[i] |= matches!(e, Failure::Hung(_));
                        last = e.to_string();
                    }
                }
            }
        }
        // Ranked again: a tracker that just failed (here or for another request) goes last, so
        // an unreachable owner costs one connect timeout, not one per pass.
        for i in self.ranked(digest) {
            if hung[i] {
                continue;
            }
            // A request that failed on its way (a dropped SYN, a pooled connection the tracker
            // had just closed) is sent once more before the next tracker is asked to fetch.
            let mut answer = self.ask(i, &path, digest, authorization, Some(held)).await;
            if !lost[i] && matches!(answer, Err(Failure::Transport(_) | Failure::Broken(_))) {
                answer = self.ask(i, &path, digest, authorization, Some(held)).await;
            }
            match answer {
                Ok(Ok(fetched)) => return Ok(fetched),
                Ok(Err(Answer::Refused(refusal))) => {
                    return Err(TrackersError::Refused(Box::new(refusal)));
                }
                Ok(Err(Answer::UpstreamFailed(status, detail))) => {
                    return Err(TrackersError::UpstreamFailed {
                        tracker: self.urls[i].to_string(),
                        status,
                        detail,
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(TrackersError::AllFailed(last))
    }

    fn cooling(&self, i: usize) -> bool {
        self.failed_at.lock().expect("poisoned")[i].is_some_and(|t| t.elapsed() < COOL_DOWN)
    }

    /// One torrent request to tracker `i`; without `held` it asks the tracker not to fetch
    /// the blob (`Cache-Control: only-if-cached`), with it the request offers what this node
    /// holds. A transport failure or an unexpected answer is the `Err`, and marks the tracker
    /// failed.
    async fn ask(
        &self,
        i: usize,
        path: &str,
        digest: &Digest,
        authorization: Option<&HeaderValue>,
        held: Option<&(dyn Fn() -> Option<api::Held> + Sync)>,
    ) -> Result<Result<Fetched, Answer>, Failure> {
        let base = &self.urls[i];
        let held_only = held.is_none();
        let mut url = base
            .join(path.trim_start_matches('/'))
            .map_err(|e| Failure::Answer(format!("{base}: {e}")))?;
        if let Some(h) = held.and_then(|h| h()) {
            url.set_query(Some(&h.to_query()));
        }
        let mut req = self.client.get(url).timeout(TORRENT_TIMEOUT);
        if let Some(auth) = authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        if held_only {
            req = req.header(header::CACHE_CONTROL, "only-if-cached");
        }
        let answer = async {
            let resp = req.send().await.map_err(|e| {
                let why = crate::error::chain(&e);
                // `is_timeout` alone would also take an established connection the kernel
                // gave up on (ETIMEDOUT), which is what broke in `bench/swarm.sh --chaos`.
                if e.is_connect() || (e.is_timeout() && !kernel_timed_out(&e)) {
                    Failure::Transport(why)
                } else {
                    Failure::Broken(why)
                }
            })?;
            let status = resp.status();
            if matches!(status.as_u16(), 401 | 403 | 404 | 429) {
                let mut headers = HeaderMap::new();
                for h in ["www-authenticate", "content-type", "retry-after"] {
                    for v in resp.headers().get_all(h) {
                        headers.append(h, v.clone());
                    }
                }
                let body = resp.bytes().await.unwrap_or_default();
                return Ok(Err(Answer::Refused(Refusal {
                    status,
                    headers,
                    body,
                })));
            }
            if matches!(status.as_u16(), 502 | 504) {
                let body = resp.bytes().await.unwrap_or_default();
                let detail = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                return Ok(Err(Answer::UpstreamFailed(status, detail)));
            }
            if !status.is_success() {
                return Err(Failure::Answer(format!("{base} answered {status}")));
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| Failure::Broken(crate::error::chain(&e)))?;
            let torrent =
                BlobTorrent::from_metainfo(&bytes).map_err(|e| Failure::Answer(e.to_string()))?;
            if torrent.digest() != digest {
                return Err(Failure::Answer(format!(
                    "{base} sent the torrent of {}",
                    torrent.digest()
                )));
            }
            Ok(Ok(Fetched {
                torrent,
                metainfo: bytes,
                from: base.clone(),
            }))
        };
        let result = tokio::select! {
            result = answer => result,
            why = self.hung(base) => Err(Failure::Hung(why)),
        };
        match &result {
            Ok(_) => self.mark(i, true),
            Err(e) => {
                tracing::warn!(tracker = %base, "torrent request failed: {e}");
                self.mark(i, false);
            }
        }
        result
    }

    /// Resolves once the tracker at `base` has missed [`HEALTH_MISSES`] health checks in a row.
    async fn hung(&self, base: &url::Url) -> String {
        let Ok(url) = base.join("healthz") else {
            return std::future::pending().await;
        };
        let mut misses = 0;
        loop {
            // After a miss the next check goes at once.
            if misses == 0 {
                tokio::time::sleep(HEALTH_EVERY).await;
            }
            let answered = self
                .pieces_client
                .get(url.clone())
                .timeout(HEALTH_TIMEOUT)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            misses = if answered { 0 } else { misses + 1 };
            if misses >= HEALTH_MISSES {
                return format!(
                    "{base} stopped answering: {misses} health checks of {}s each went \
                     unanswered while the torrent request waited",
                    HEALTH_TIMEOUT.as_secs()
                );
            }
        }
    }

    /// Bytes `start..=end` of a held blob from the tracker at `base` (see bay-tracker's
    /// `pieces`): a response whose body is exactly that range, or why not.
    pub async fn pieces(
        &self,
        base: &url::Url,
        info_hash: InfoHash,
        start: u64,
        end: u64,
    ) -> Result<reqwest::Response, String> {
        let url = base
            .join(api::pieces_path(&info_hash).trim_start_matches('/'))
            .map_err(|e| e.to_string())?;
        let resp = self
            .pieces_client
            .get(url)
            .header(header::RANGE, format!("bytes={start}-{end}"))
            .send()
            .await
            .map_err(|e| format!("{base}: {e}"))?;
        let want = format!("bytes {start}-{end}/");
        let range_ok = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(&want));
        if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT || !range_ok {
            return Err(format!("{base} answered {} for {want}", resp.status()));
        }
        Ok(resp)
    }

    /// The tracker fetching a blob now, and this node's slice of it: the first by rank that
    /// answers (the one a torrent request went to). None while no tracker is fetching it.
    pub async fn early_slot(
        &self,
        ask: &crate::early::Ask,
        from: u32,
    ) -> Option<(url::Url, api::EarlySlot)> {
        for i in self.ranked(&ask.digest) {
            if self.cooling(i) {
                continue;
            }
            let base = &self.urls[i];
            if let Ok(slot) = self.early_slot_at(base, ask, from).await {
                return Some((base.clone(), slot));
            }
        }
        None
    }

    /// This node's slice of a blob the tracker at `base` is fetching, and who holds which of
    /// its pieces from piece `from` on, or why not.
    pub async fn early_slot_at(
        &self,
        base: &url::Url,
        ask: &crate::early::Ask,
        from: u32,
    ) -> Result<api::EarlySlot, String> {
        let url = base
            .join(&format!(
                "{}/slot?port={}&from={from}{}",
                ask.path.trim_start_matches('/'),
                ask.peer_port,
                exchange_query(ask, '&')
            ))
            .map_err(|e| e.to_string())?;
        let mut req = self.client.get(url).timeout(Duration::from_secs(2));
        if let Some(auth) = &ask.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let resp = req.send().await.map_err(|e| format!("{base}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{base} answered {}", resp.status()));
        }
        let slot: api::EarlySlot = resp.json().await.map_err(|e| format!("{base}: {e}"))?;
        let s = &slot.slot;
        if slot.size == 0 || !(0.0..=1.0).contains(&s.start) || !(s.start..=1.0).contains(&s.end) {
            return Err(format!("{base} answered a bad slot {slot:?}"));
        }
        Ok(slot)
    }

    /// Bytes of `start..=end` of a blob the tracker at `base` is fetching, as they land there:
    /// the part no other proxy got early (its first and last byte), if any.
    pub async fn early_bytes(
        &self,
        base: &url::Url,
        ask: &crate::early::Ask,
        start: u64,
        end: u64,
    ) -> Result<EarlyAnswer, String> {
        let url = base
            .join(&format!(
                "{}{}",
                ask.path.trim_start_matches('/'),
                exchange_query(ask, '?')
            ))
            .map_err(|e| e.to_string())?;
        let mut req = self
            .early_client
            .get(url)
            .header(header::RANGE, format!("bytes={start}-{end}"));
        if let Some(auth) = &ask.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let resp = req.send().await.map_err(|e| format!("{base}: {e}"))?;
        if resp.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(EarlyAnswer::NoneLeft); // other proxies got all of it early
        }
        if resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Ok(EarlyAnswer::Wait);
        }
        // The tracker sends the first part of the range no other proxy got early.
        let part = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
        match part {
            Some((a, b))
                if resp.status() == reqwest::StatusCode::PARTIAL_CONTENT
                    && start <= a
                    && a <= b
                    && b <= end =>
            {
                Ok(EarlyAnswer::Bytes(resp, a, b))
            }
            _ => Err(format!(
                "{base} answered {} {part:?} for bytes {start}-{end}",
                resp.status()
            )),
        }
    }

    /// The tracker URLs to read a blob's pieces from, best first: `first` (which handed out the
    /// torrent, so holds the blob), then the rest in rank order.
    pub fn piece_sources(&self, digest: &Digest, first: &url::Url) -> Vec<url::Url> {
        let mut out = vec![first.clone()];
        out.extend(
            self.ranked(digest)
                .into_iter()
                .map(|i| self.urls[i].clone())
                .filter(|u| u != first),
        );
        out
    }

    /// This node's slice of a torrent to prioritise, from the first tracker by rank that
    /// answers (so every proxy asks the same one); one that failed a torrent request lately is
    /// skipped. A slot request's short timeout does not mark a tracker failed: one busy fetching
    /// may be slow to accept, and torrent requests would then fail over to a tracker that
    /// fetches the blob again.
    pub async fn slot(&self, info_hash: InfoHash, digest: &Digest, peer_port: u16) -> Option<Slot> {
        for i in self.ranked(digest) {
            if self.cooling(i) {
                continue;
            }
            let base = &self.urls[i];
            let Ok(url) = base.join(&format!("v1/slots/{}?port={peer_port}", info_hash.to_hex()))
            else {
                continue;
            };
            let resp = self
                .client
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(r) = resp
                && r.status().is_success()
                && let Ok(slot) = r.json::<Slot>().await
                && (0.0..=1.0).contains(&slot.start)
                && (slot.start..=1.0).contains(&slot.end)
            {
                return Some(slot);
            }
        }
        None
    }
}

/// Indices of `nodes` ordered by highest random weight for `key`.
pub fn rendezvous<T: AsRef<str>>(nodes: &[T], key: &str) -> Vec<usize> {
    let weight = |node: &str| {
        let h = Sha256::new()
            .chain_update(node.as_bytes())
            .chain_update([0])
            .chain_update(key.as_bytes())
            .finalize();
        u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
    };
    let mut order: Vec<(u64, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (weight(n.as_ref()), i))
        .collect();
    order.sort_by(|a, b| b.cmp(a));
    order.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_removed_trackers_digests() {
        let trackers: Vec<String> = (0..5).map(|i| format!("http://t{i}:6880/")).collect();
        let keys: Vec<String> = (0..2000).map(|i| format!("sha256:{i:064x}")).collect();
        let owner = |ts: &[String], k: &str| ts[rendezvous(ts, k)[0]].clone();
        let before: Vec<String> = keys.iter().map(|k| owner(&trackers, k)).collect();
        // Roughly balanced.
        for t in &trackers {
            let n = before.iter().filter(|o| *o == t).count();
            assert!((250..550).contains(&n), "{t} owns {n} of 2000");
        }
        let removed = &trackers[2];
        let rest: Vec<String> = trackers.iter().filter(|t| *t != removed).cloned().collect();
        for (k, old) in keys.iter().zip(&before) {
            let new = owner(&rest, k);
            if old != removed {
                assert_eq!(&new, old, "{k} moved although its owner stayed");
            }
        }
        // Order is stable and complete.
        let r = rendezvous(&trackers, &keys[0]);
        assert_eq!(r, rendezvous(&trackers, &keys[0]));
        let mut sorted = r.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    }

    /// A tracker that takes HTTP requests on a raw socket: `drop_first_fetch` closes the
    /// connection of the first request without `only-if-cached` unanswered. Counts the requests
    /// that would make it fetch.
    struct FakeTracker {
        url: url::Url,
        /// Torrent requests that may fetch (not `only-if-cached`).
        fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        /// Every request, answered or not.
        requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Steady,
        /// Loses the first request that may fetch, as a connection lost on its way.
        DropFirstFetch,
        /// Loses every request, as a tracker that is gone.
        DropAll,
        /// Holds the blob (answers `only-if-cached` with the torrent) but loses the first
        /// request of all, as a pooled connection that had died.
        HoldsDropFirst,
    }

    async fn fake_tracker(metainfo: Vec<u8>, mode: Mode) -> FakeTracker {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let fetches = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                seen.fetch_add(1, Ordering::SeqCst);
                if mode == Mode::DropAll {
                    continue;
                }
                if mode == Mode::HoldsDropFirst && seen.load(Ordering::SeqCst) == 1 {
                    continue;
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let held_only = head.contains("only-if-cached");
                let response = if held_only && mode != Mode::HoldsDropFirst {
                    let body = r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"not held"}]}"#;
                    format!(
                        "HTTP/1.1 504 Gateway Timeout\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                } else {
                    if !held_only
                        && counted.fetch_add(1, Ordering::SeqCst) == 0
                        && mode == Mode::DropFirstFetch
                    {
                        continue; // dropped unanswered, as a lost connection
                    }
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        metainfo.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&metainfo);
                    r
                };
                let _ = conn.write_all(&response).await;
                let _ = conn.shutdown().await;
            }
        });
        FakeTracker {
            url,
            fetches,
            requests,
        }
    }

    /// Two fake trackers serving one blob's torrent, `first` ranking first for its digest.
    async fn pair(first: Mode, second: Mode) -> (FakeTracker, FakeTracker, Digest) {
        loop {
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let salt = rand_salt();
            let data = [data.as_slice(), salt.as_slice()].concat();
            let digest = Digest::sha256_of(&data);
            let meta = BlobTorrent::from_bytes(digest.clone(), &data)
                .unwrap()
                .to_metainfo(&[]);
            let a = fake_tracker(meta.clone(), first).await;
            let b = fake_tracker(meta, second).await;
            let t = Trackers::new(vec![a.url.clone(), b.url.clone()]).unwrap();
            if t.ranked(&digest)[0] == 0 {
                return (a, b, digest);
            }
        }
    }

    #[tokio::test]
    async fn a_request_lost_on_its_way_is_sent_again_not_failed_over() {
        use std::sync::atomic::Ordering;
        // A blob whose first-ranked tracker is the one that loses a connection: the other
        // one, asked to fetch instead, would fetch the blob from upstream a second time.
        let (flaky, steady, digest) = pair(Mode::DropFirstFetch, Mode::Steady).await;
        let trackers = Trackers::new(vec![flaky.url.clone(), steady.url.clone()]).unwrap();
        let fetched = torrent(&trackers, &digest).await;
        assert_eq!(fetched.from, flaky.url);
        assert_eq!(fetched.torrent.digest(), &digest);
        assert_eq!(
            flaky.fetches.load(Ordering::SeqCst),
            2,
            "lost once, sent again"
        );
        assert_eq!(
            steady.fetches.load(Ordering::SeqCst),
            0,
            "no second fetch elsewhere"
        );
    }

    #[tokio::test]
    async fn an_unreachable_owner_is_asked_once_per_request() {
        use std::sync::atomic::Ordering;
        let (gone, steady, digest) = pair(Mode::DropAll, Mode::Steady).await;
        let trackers = Trackers::new(vec![gone.url.clone(), steady.url.clone()]).unwrap();
        let fetched = torrent(&trackers, &digest).await;
        assert_eq!(fetched.from, steady.url);
        // Each request to a gone tracker waits out a connect timeout in production: asked
        // for a held copy, then again to fetch, then once more, a pull waited three. Here the
        // connection is taken and closed unanswered, which is sent again once at once (as a
        // pooled connection that died); a connect failure is not.
        assert_eq!(gone.requests.load(Ordering::SeqCst), 2);
        assert_eq!(steady.fetches.load(Ordering::SeqCst), 1);
        // A second request for the blob does not wait on the gone tracker at all while it
        // cools down.
        torrent(&trackers, &digest).await;
        assert_eq!(gone.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_broken_connection_to_the_owner_is_not_a_reason_to_fetch_elsewhere() {
        use std::sync::atomic::Ordering;
        // The owner holds the blob (or is fetching it) but the request for a held copy goes
        // out on a connection that breaks: asked again at once, it answers, and the other
        // tracker is never asked, neither for a held copy nor to fetch the blob a second time.
        let (owner, other, digest) = pair(Mode::HoldsDropFirst, Mode::Steady).await;
        let trackers = Trackers::new(vec![owner.url.clone(), other.url.clone()]).unwrap();
        let fetched = torrent(&trackers, &digest).await;
        assert_eq!(fetched.from, owner.url);
        assert_eq!(owner.requests.load(Ordering::SeqCst), 2);
        assert_eq!(
            owner.fetches.load(Ordering::SeqCst),
            0,
            "a held copy was enough"
        );
        assert_eq!(other.requests.load(Ordering::SeqCst), 0);
    }

    /// The torrent of `digest` for a repository on a made-up registry (the fakes ignore both).
    async fn torrent(trackers: &Trackers, digest: &Digest) -> Fetched {
        let registry: Registry = "http://127.0.0.2:5000".parse().unwrap();
        let name: RepositoryName = "library/alpine".parse().unwrap();
        trackers
            .torrent(&registry, &name, digest, None, &|| None)
            .await
            .unwrap()
    }

    fn rand_salt() -> [u8; 8] {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes()
    }

    #[test]
    fn failed_trackers_go_last() {
        let urls: Vec<url::Url> = (0..3)
            .map(|i| format!("http://t{i}:6880/").parse().unwrap())
            .collect();
        let t = Trackers::new(urls).unwrap();
        let d = Digest::sha256_of(b"x");
        let first = t.ranked(&d)[0];
        t.mark(first, false);
        assert_eq!(*t.ranked(&d).last().unwrap(), first);
        t.mark(first, true);
        assert_eq!(t.ranked(&d)[0], first);
    }
}

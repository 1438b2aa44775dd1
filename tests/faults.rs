//! Faults, each an automated test (issue 8): a peer serving corrupted data, a peer killed
//! mid-transfer, an upstream answering 500, hanging, cutting the connection or sending wrong
//! bytes, a full cache directory, a proxy killed mid-download and restarted, and a tracker
//! whose copy of a blob went bad on disk or that sends bad pieces without knowing.
//!
//! Every test checks the two promises that matter when something breaks: a client never
//! receives a complete wrong blob, and nothing that failed its digest is cached. The real
//! binaries run on their own loopback addresses; the in-process fakes are an upstream registry
//! that misbehaves in ways `docker-registry` cannot be made to, and a relay in front of a real
//! tracker that changes the pieces it sends.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bay_common::Digest;
use bay_tests::{
    Image, Proxy, Registry, RegistryOptions, Scrape, Service, Tracker, bin_path, flip_byte,
    free_port, http_client, loopback_ip, sha256_file,
};
use reqwest::StatusCode;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REPO: &str = "test/img";
/// bay's piece length for blobs under 1 GiB.
const PIECE: u64 = 256 * 1024;
/// Longest any single pull in these tests may take before it counts as a hang.
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// The tests in this file move data under upload limits and kill processes at chosen moments:
/// they run one at a time so their timings do not depend on each other's load.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

struct Cluster {
    registry: Registry,
    image: Image,
    tracker: Tracker,
}

impl Cluster {
    /// Asks the tracker for the blob's torrent, so it fetches and seeds the blob now.
    async fn seed_on_tracker(&self, digest: &str) {
        let r = http_client()
            .get(format!(
                "{}/v1/torrents/{}/{REPO}/blobs/{digest}",
                self.tracker.url(),
                self.registry.authority(),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}

/// A registry holding a generated image with one layer per size, and a tracker for it.
async fn cluster(layers: &[u64], seed: u64, tracker_args: &[&str]) -> Cluster {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(layers, seed).unwrap();
    image
        .push(&registry, &format!("{REPO}:1"), None)
        .await
        .unwrap();
    let tracker = Tracker::start(&[registry.url()], tracker_args)
        .await
        .unwrap();
    Cluster {
        registry,
        image,
        tracker,
    }
}

fn blob_url(base: &str, digest: &str) -> String {
    format!("{base}/v2/{REPO}/blobs/{digest}")
}

/// What a client got for a blob GET.
#[derive(Debug)]
struct Pulled {
    /// None if no response (headers) arrived at all.
    status: Option<StatusCode>,
    content_length: Option<u64>,
    body: Vec<u8>,
    /// Why the body ended early (a cut connection, a timeout), if it did.
    error: Option<String>,
    elapsed: Duration,
}

impl Pulled {
    /// A 200 whose body arrived completely, as long as announced, and hashes to `digest`.
    fn verified(&self, digest: &str) -> bool {
        self.status == Some(StatusCode::OK)
            && self.error.is_none()
            && self.content_length == Some(self.body.len() as u64)
            && sha256_hex(&self.body) == digest
    }

    /// The promise of every fault test: whatever else happened, the client did not receive a
    /// whole body of the blob's length that is not the blob.
    fn assert_never_complete_and_wrong(&self, digest: &str, size: u64) {
        if self.error.is_none() && self.body.len() as u64 == size {
            assert_eq!(
                sha256_hex(&self.body),
                digest,
                "the client received a complete body of the blob's size that is not the blob \
                 (status {:?})",
                self.status
            );
        }
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "status {:?}, content-length {:?}, {} bytes received, error {:?}, after {:?}",
            self.status,
            self.content_length,
            self.body.len(),
            self.error,
            self.elapsed
        );
        if self.status != Some(StatusCode::OK) && self.body.len() < 4096 {
            s.push_str(&format!(", body {}", String::from_utf8_lossy(&self.body)));
        }
        s
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Digest::sha256_of(bytes).to_string()
}

/// GETs `url`, keeping whatever arrives before the body ends or fails; `received` counts the
/// body bytes as they come, for tests that act mid-transfer.
async fn pull(url: &str, received: Option<Arc<AtomicU64>>, timeout: Duration) -> Pulled {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap();
    let started = Instant::now();
    let mut resp = match client.get(url).send().await {
        Ok(resp) => resp,
        Err(e) => {
            return Pulled {
                status: None,
                content_length: None,
                body: Vec::new(),
                error: Some(format!("no response: {e:?}")),
                elapsed: started.elapsed(),
            };
        }
    };
    let status = Some(resp.status());
    let content_length = resp.content_length();
    let mut body = Vec::new();
    let mut error = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if let Some(r) = &received {
                    r.store(body.len() as u64, Ordering::Relaxed);
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    Pulled {
        status,
        content_length,
        body,
        error,
        elapsed: started.elapsed(),
    }
}

/// Waits until `counter` reaches `at_least`; fails if `done` finishes first or time runs out.
async fn wait_bytes(
    counter: &AtomicU64,
    at_least: u64,
    done: &tokio::task::JoinHandle<Pulled>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(
            !done.is_finished(),
            "the pull ended after {} bytes, before {at_least} arrived",
            counter.load(Ordering::Relaxed)
        );
        assert!(
            Instant::now() < deadline,
            "only {} of {at_least} bytes arrived within {timeout:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The files in `<data dir>/<sub>/`.
fn files_in(data_dir: &Path, sub: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(data_dir.join(sub)) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Every file in `<data dir>/blobs/` is named after a digest it hashes to.
fn assert_blob_dir_verified(data_dir: &Path) {
    for path in files_in(data_dir, "blobs") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let digest = Digest::from_file_name(&name)
            .unwrap_or_else(|e| panic!("{} is not a digest: {e}", path.display()));
        assert_eq!(
            sha256_file(&path).unwrap(),
            digest.to_string(),
            "{} is in the cache but fails its digest",
            path.display()
        );
    }
}

/// Nothing under `data_dir` is, or (unless `in_flight`) is a piece of, the blob `digest`: no
/// cached file in blobs/ and, once nothing is in flight, no partial download left in tmp/.
/// Polls briefly, since a failed download is cleaned up just after its response ended.
async fn assert_nothing_kept(who: &str, data_dir: &Path, digest: &str, in_flight: bool) {
    let cached = data_dir
        .join("blobs")
        .join(digest.parse::<Digest>().unwrap().file_name());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tmp = files_in(data_dir, "tmp");
        let blobs = files_in(data_dir, "blobs");
        if (in_flight || tmp.is_empty()) && !cached.exists() {
            assert_blob_dir_verified(data_dir);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who} kept something of a blob that failed: blobs/ {blobs:?}, tmp/ {tmp:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 1. A peer that serves corrupted data: proxy A's seeded copy is tampered with on disk.
/// Proxy B, pulling mostly from A (the tracker's seed is limited to 2 MiB/s), must notice A's
/// bad pieces, get them elsewhere and deliver the blob verified; A itself must not hand its
/// now-wrong copy to a client whole.
#[tokio::test(flavor = "multi_thread")]
async fn peer_serving_corrupted_data() {
    let _serial = serial().await;
    let c = cluster(&[8 << 20], 81, &["--upload-limit", "2M"]).await;
    let layer = c.image.layers[0].clone();
    let digest: Digest = layer.digest.parse().unwrap();
    let trackers = [c.tracker.url()];
    let a = Proxy::start(&trackers, &c.registry.url(), &["--stall-timeout", "20"])
        .await
        .unwrap();
    let first = pull(&blob_url(&a.url(), &layer.digest), None, PULL_TIMEOUT).await;
    assert!(first.verified(&layer.digest), "{}", first.summary());
    a.wait_held(1, Duration::from_secs(30)).await.unwrap();

    // Flip one byte in each piece of the middle half, writing in place: blobs/ and the
    // file librqbit seeds (tmp/, a hard link of the same inode) both change.
    let cached = a.data_dir().join("blobs").join(digest.file_name());
    let pieces = layer.size.div_ceil(PIECE);
    let tampered: Vec<u64> = (pieces / 4..pieces * 3 / 4).collect();
    for p in &tampered {
        flip_byte(&cached, p * PIECE + 1000).unwrap();
    }
    assert_ne!(sha256_file(&cached).unwrap(), layer.digest);
    let seeded = a.data_dir().join("tmp").join(digest.file_name());
    if seeded.exists() {
        assert_eq!(
            std::fs::metadata(&seeded).unwrap().ino(),
            std::fs::metadata(&cached).unwrap().ino(),
            "the seeded file is not the cached one"
        );
    }

    // B pulls: A is unlimited, the tracker's seed sends 2 MiB/s, so most pieces come from A.
    let b = Proxy::start(&trackers, &c.registry.url(), &["--stall-timeout", "20"])
        .await
        .unwrap();
    let got = pull(&blob_url(&b.url(), &layer.digest), None, PULL_TIMEOUT).await;
    assert!(
        got.verified(&layer.digest),
        "B did not deliver the blob verified: {}",
        got.summary()
    );
    let sb = b.wait_held(1, Duration::from_secs(30)).await.unwrap();
    assert_blob_dir_verified(b.data_dir());
    let b_log = b.log_text();
    assert!(
        b_log.contains("did not validate"),
        "B never received a bad piece from A, so the test proved nothing: {sb}"
    );
    assert_eq!(sb["fallbacks"], 0, "B had to go to upstream: {sb}");
    assert_eq!(
        c.registry.blob_gets(&layer.digest),
        1,
        "only the tracker may have fetched the blob from upstream"
    );
    eprintln!(
        "B: {} bad-piece disconnects from A; {sb}",
        b_log.matches("did not validate").count()
    );

    // A serves its cached copy re-hashed on the way out: never complete.
    let from_a = pull(&blob_url(&a.url(), &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!("GET of the tampered blob from A: {}", from_a.summary());
    from_a.assert_never_complete_and_wrong(&layer.digest, layer.size);
    assert!(
        from_a.status != Some(StatusCode::OK)
            || from_a.error.is_some() && (from_a.body.len() as u64) < layer.size,
        "A must cut the response short: {}",
        from_a.summary()
    );
    assert!(
        a.log_text().contains("failed verification"),
        "A does not log why it cut the response short"
    );

    // Having seen its copy fail, A drops it (no longer served or seeded) and the next GET
    // fetches the blob again, verified.
    let healed = pull(&blob_url(&a.url(), &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!("GET from A after that: {}", healed.summary());
    assert!(
        healed.verified(&layer.digest),
        "A keeps its damaged copy: {}",
        healed.summary()
    );
    a.wait_held(1, Duration::from_secs(30)).await.unwrap();
    assert_blob_dir_verified(a.data_dir());
}

/// 2. A peer killed mid-transfer: B pulls from A and the tracker's seed (both limited, so
/// the transfer takes seconds); A is SIGKILLed a quarter of the way; B finishes from the seed,
/// verified, without going to upstream.
#[tokio::test(flavor = "multi_thread")]
async fn peer_killed_mid_transfer() {
    let _serial = serial().await;
    let size = 16 << 20;
    let c = cluster(&[size], 82, &["--upload-limit", "4M"]).await;
    let layer = c.image.layers[0].clone();
    let trackers = [c.tracker.url()];
    let slow = ["--upload-limit", "2M", "--stall-timeout", "15"];
    let mut a = Proxy::start(&trackers, &c.registry.url(), &slow)
        .await
        .unwrap();
    let first = pull(&blob_url(&a.url(), &layer.digest), None, PULL_TIMEOUT).await;
    assert!(first.verified(&layer.digest), "{}", first.summary());
    a.wait_held(1, Duration::from_secs(30)).await.unwrap();

    let b = Proxy::start(&trackers, &c.registry.url(), &slow)
        .await
        .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let url = blob_url(&b.url(), &layer.digest);
    let counter = received.clone();
    let pulling = tokio::spawn(async move { pull(&url, Some(counter), PULL_TIMEOUT).await });
    wait_bytes(&received, layer.size / 4, &pulling, PULL_TIMEOUT).await;
    let at_kill = received.load(Ordering::Relaxed);
    a.kill();
    assert!(
        at_kill < layer.size,
        "B was done before A could be killed mid-transfer"
    );
    let got = pulling.await.unwrap();
    eprintln!(
        "A killed after B received {at_kill} of {} bytes; B: {}",
        layer.size,
        got.summary()
    );
    assert!(
        got.verified(&layer.digest),
        "B did not complete verified after A died: {}",
        got.summary()
    );
    let sb = b.wait_held(1, Duration::from_secs(30)).await.unwrap();
    eprintln!("B: {sb}");
    assert_blob_dir_verified(b.data_dir());
    assert!(
        sb["bytes_from_peers"].as_u64().unwrap() > 0,
        "B got nothing from A before A died, so the test proved nothing: {sb}"
    );
    assert_eq!(sb["fallbacks"], 0, "B had to go to upstream: {sb}");
    assert_eq!(c.registry.blob_gets(&layer.digest), 1);
}

/// How the fake upstream answers a blob GET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `500 Internal Server Error` with a registry error body.
    Status500,
    /// 200 with the full `Content-Length`, a quarter of the bytes, then silence forever.
    Hang,
    /// 200 with the full `Content-Length`, half the bytes, then the connection closes.
    Cut,
    /// 200 with the full `Content-Length` and every byte, one of them wrong.
    Corrupt,
    /// No fault: 200 with the whole blob, whatever `Range` was asked for (as a registry that
    /// ignores ranges).
    Whole,
}

/// An upstream registry in this process that knows one blob: `GET /v2/` is 200, a HEAD of the
/// blob is 200 with its length, a GET of it fails as told. Every answer closes the connection.
/// Dropping it stops the server and every connection it holds.
struct FakeUpstream {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    async fn start(blob: Arc<Vec<u8>>, digest: String, fault: Fault) -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind((loopback_ip(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(fake_serve(
                    sock,
                    blob.clone(),
                    digest.clone(),
                    fault,
                    log.clone(),
                ));
                while conns.try_join_next().is_some() {}
            }
        });
        FakeUpstream {
            addr,
            requests,
            task,
        }
    }

    /// `http://ip:port`, an upstream as bay's `--upstream` takes it.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many blob GETs reached it.
    fn blob_gets(&self) -> usize {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains("/blobs/"))
            .count()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_serve(
    mut sock: tokio::net::TcpStream,
    blob: Arc<Vec<u8>>,
    digest: String,
    fault: Fault,
    log: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.lines().next().unwrap_or_default().split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    log.lock().unwrap().push(format!("{method} {path}"));
    let size = blob.len().to_string();
    let is_blob = path == format!("/v2/{REPO}/blobs/{digest}");
    let blob_headers = [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", size.as_str()),
        ("Docker-Content-Digest", digest.as_str()),
    ];
    let reply = |status: &str, headers: &[(&str, &str)]| {
        let mut s = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        s.push_str("Docker-Distribution-API-Version: registry/2.0\r\n");
        for (k, v) in headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    };
    let json = |status: &str, body: &str| {
        let len = body.len().to_string();
        let mut out = reply(
            status,
            &[
                ("Content-Type", "application/json"),
                ("Content-Length", &len),
            ],
        );
        out.extend_from_slice(body.as_bytes());
        out
    };
    let out: Vec<u8> = match (method, is_blob) {
        ("GET", _) if path == "/v2/" => json("200 OK", "{}"),
        ("HEAD", true) => reply("200 OK", &blob_headers),
        ("GET", true) => match fault {
            Fault::Status500 => json(
                "500 Internal Server Error",
                r#"{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}"#,
            ),
            Fault::Whole => {
                let mut out = reply("200 OK", &blob_headers);
                out.extend_from_slice(&blob);
                out
            }
            Fault::Corrupt => {
                let mut out = reply("200 OK", &blob_headers);
                let mut wrong = blob.to_vec();
                let middle = wrong.len() / 2;
                wrong[middle] ^= 0xff;
                out.extend_from_slice(&wrong);
                out
            }
            Fault::Cut | Fault::Hang => {
                let sent = if fault == Fault::Cut {
                    blob.len() / 2
                } else {
                    blob.len() / 4
                };
                let mut out = reply("200 OK", &blob_headers);
                out.extend_from_slice(&blob[..sent]);
                if sock.write_all(&out).await.is_err() || sock.flush().await.is_err() {
                    return;
                }
                if fault == Fault::Hang {
                    std::future::pending::<()>().await;
                }
                // Cut: close with the body half sent.
                let _ = sock.shutdown().await;
                return;
            }
        },
        _ => json(
            "404 Not Found",
            r#"{"errors":[{"code":"NOT_FOUND","message":"unknown to the fake"}]}"#,
        ),
    };
    let _ = sock.write_all(&out).await;
    let _ = sock.shutdown().await;
}

/// A tracker and a proxy (with that tracker) whose only upstream is a fake failing as told.
struct FaultyUpstream {
    blob: Arc<Vec<u8>>,
    digest: String,
    // Declared first: stopped before the fake goes.
    proxy: Proxy,
    tracker: Tracker,
    fake: FakeUpstream,
}

async fn faulty_upstream(fault: Fault, seed: u8) -> FaultyUpstream {
    faulty_upstream_with(fault, seed, &[]).await
}

/// [`faulty_upstream`] with `args` for both the tracker and the proxy.
async fn faulty_upstream_with(fault: Fault, seed: u8, args: &[&str]) -> FaultyUpstream {
    // 4 MiB of bytes no other test uses.
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect();
    let digest = sha256_hex(&blob);
    let blob = Arc::new(blob);
    let fake = FakeUpstream::start(blob.clone(), digest.clone(), fault).await;
    let tracker = Tracker::start(&[fake.url()], args).await.unwrap();
    let mut proxy_args = vec!["--stall-timeout", "2"];
    proxy_args.extend_from_slice(args);
    let proxy = Proxy::start(&[tracker.url()], &fake.url(), &proxy_args)
        .await
        .unwrap();
    FaultyUpstream {
        blob,
        digest,
        proxy,
        tracker,
        fake,
    }
}

impl FaultyUpstream {
    /// Nothing of the blob kept by the tracker or the proxy (partial downloads allowed while
    /// `in_flight`), and neither holds a blob.
    async fn assert_nothing_cached(&self, in_flight: bool) {
        let (proxy, tracker) = (self.proxy.data_dir(), self.tracker.data_dir());
        assert_nothing_kept("the proxy", proxy, &self.digest, in_flight).await;
        assert_nothing_kept("the tracker", tracker, &self.digest, in_flight).await;
        let s = self.proxy.stats().await.unwrap();
        assert_eq!(s["blobs_held"], 0, "{s}");
        let t = self.tracker.stats().await.unwrap();
        assert_eq!(t["blobs_held"], 0, "{t}");
    }

    /// The blob GET through the proxy answered 200, then cut short of its length.
    fn assert_cut_short(&self, got: &Pulled) {
        let size = self.blob.len() as u64;
        got.assert_never_complete_and_wrong(&self.digest, size);
        assert_eq!(got.status, Some(StatusCode::OK), "{}", got.summary());
        assert_eq!(got.content_length, Some(size), "{}", got.summary());
        assert!(
            got.error.is_some() && (got.body.len() as u64) < size,
            "the body must end short of Content-Length with an error: {}",
            got.summary()
        );
    }
}

/// 3a. Upstream answers the blob GET with 500: the client gets a registry error, not a blob.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_answering_500() {
    let _serial = serial().await;
    let f = faulty_upstream(Fault::Status500, 1).await;
    let got = pull(&blob_url(&f.proxy.url(), &f.digest), None, PULL_TIMEOUT).await;
    eprintln!("upstream 500: {}", got.summary());
    got.assert_never_complete_and_wrong(&f.digest, f.blob.len() as u64);
    assert!(
        got.status.is_some_and(|s| s.is_server_error()),
        "{}",
        got.summary()
    );
    let body: serde_json::Value = serde_json::from_slice(&got.body)
        .unwrap_or_else(|e| panic!("not a registry error body ({e}): {}", got.summary()));
    let error = &body["errors"][0];
    assert!(
        error["code"].is_string() && error["message"].is_string(),
        "{body}"
    );
    assert!(f.fake.blob_gets() >= 1, "the fake saw no blob GET");
    f.assert_nothing_cached(false).await;
}

/// The client's answer when the tracker could not get the blob from upstream: a registry error
/// (502) that says so, at once; the proxy does not fetch the same broken answer again.
fn assert_error_via_tracker(f: &FaultyUpstream, got: &Pulled) {
    got.assert_never_complete_and_wrong(&f.digest, f.blob.len() as u64);
    assert_eq!(
        got.status,
        Some(StatusCode::BAD_GATEWAY),
        "{}",
        got.summary()
    );
    let body: serde_json::Value = serde_json::from_slice(&got.body)
        .unwrap_or_else(|e| panic!("not a registry error body ({e}): {}", got.summary()));
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("could not get the blob from upstream"),
        "{}",
        got.summary()
    );
    assert_eq!(
        f.fake.blob_gets(),
        1,
        "only the tracker's GET went upstream"
    );
}

/// The same fault, with no tracker: the proxy streams from upstream itself, and its client sees
/// a body cut short of its Content-Length; nothing is cached.
async fn without_a_tracker(f: &FaultyUpstream) -> Pulled {
    let p = Proxy::start(&[], &f.fake.url(), &["--stall-timeout", "2"])
        .await
        .unwrap();
    let got = pull(&blob_url(&p.url(), &f.digest), None, PULL_TIMEOUT).await;
    f.assert_cut_short(&got);
    assert_nothing_kept("the tracker-less proxy", p.data_dir(), &f.digest, false).await;
    got
}

/// 3c. Upstream cuts the connection after half the blob. Through the tracker, the client gets
/// a registry error at once; a proxy without one streams from upstream, and its client sees a
/// body cut short of its Content-Length (a prefix of the real blob). Nothing is cached anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_cutting_the_connection() {
    let _serial = serial().await;
    let f = faulty_upstream(Fault::Cut, 2).await;
    let got = pull(&blob_url(&f.proxy.url(), &f.digest), None, PULL_TIMEOUT).await;
    eprintln!("upstream cut: {}", got.summary());
    assert_error_via_tracker(&f, &got);
    f.assert_nothing_cached(false).await;
    let direct = without_a_tracker(&f).await;
    eprintln!("upstream cut, no tracker: {}", direct.summary());
    assert!(
        f.blob.starts_with(&direct.body),
        "what the client got is not a prefix of the blob"
    );
}

/// Upstream sends the whole length with one wrong byte. The tracker refuses it and says why,
/// and the client gets that as a registry error; without a tracker, the client's body stops
/// short of its Content-Length (the proxy held the last chunk back and the digest did not
/// match). Nothing is cached anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_sending_wrong_bytes() {
    let _serial = serial().await;
    let f = faulty_upstream(Fault::Corrupt, 3).await;
    let got = pull(&blob_url(&f.proxy.url(), &f.digest), None, PULL_TIMEOUT).await;
    eprintln!("upstream corrupt: {}", got.summary());
    assert_error_via_tracker(&f, &got);
    f.assert_nothing_cached(false).await;
    assert!(
        f.tracker.log_text().contains("failed verification"),
        "the tracker does not say why it refused the blob"
    );
    without_a_tracker(&f).await;
}

/// The same wrong byte, sent slowly (the tracker's upstream held to 1 MiB/s), so the proxy reads
/// its slice while the tracker still fetches (`bay-proxy/src/early.rs`): those bytes are not
/// checked yet, and when the blob fails its digest they must go nowhere. The client gets the
/// tracker's registry error, nothing is cached, and the bytes read early are dropped.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_sending_wrong_bytes_while_proxies_read_early() {
    let _serial = serial().await;
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ 9)
        .collect();
    let digest = sha256_hex(&blob);
    let blob = Arc::new(blob);
    let fake = FakeUpstream::start(blob.clone(), digest.clone(), Fault::Corrupt).await;
    let tracker = Tracker::start(&[fake.url()], &["--upstream-rate", "1M"])
        .await
        .unwrap();
    let proxy = Proxy::start(&[tracker.url()], &fake.url(), &["--stall-timeout", "2"])
        .await
        .unwrap();
    let f = FaultyUpstream {
        blob,
        digest,
        proxy,
        tracker,
        fake,
    };
    let got = pull(&blob_url(&f.proxy.url(), &f.digest), None, PULL_TIMEOUT).await;
    eprintln!("upstream corrupt, read early: {}", got.summary());
    assert_error_via_tracker(&f, &got);
    f.assert_nothing_cached(false).await;
    let t = f.tracker.stats().await.unwrap();
    assert!(
        t["early_bytes_served"].as_u64().unwrap() > 0,
        "the proxy read nothing while the tracker fetched, so the test proved nothing: {t}"
    );
    let s = f.proxy.stats().await.unwrap();
    assert_eq!(s["swarm_downloads"], 0, "{s}");
}

/// 3b. Upstream sends a quarter of the blob and then nothing, forever. While it hangs the
/// client has no complete blob, nothing is cached, and the proxy still answers other requests.
/// (How long until the hang surfaces as an error: `upstream_hanging_times_out`.)
#[tokio::test(flavor = "multi_thread")]
async fn upstream_hanging_never_delivers_or_caches() {
    let _serial = serial().await;
    let f = faulty_upstream(Fault::Hang, 4).await;
    let url = blob_url(&f.proxy.url(), &f.digest);
    let pulling = tokio::spawn(async move { pull(&url, None, Duration::from_secs(12)).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.fake.blob_gets() == 0 {
        assert!(Instant::now() < deadline, "the fake saw no blob GET");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The fake has sent its quarter and hangs from here on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = http_client()
        .get(format!("{}/_bay/healthz", f.proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "a hung upstream blocks the proxy"
    );
    f.assert_nothing_cached(true).await;
    let got = pulling.await.unwrap();
    eprintln!("upstream hang, client gave up at 12 s: {}", got.summary());
    got.assert_never_complete_and_wrong(&f.digest, f.blob.len() as u64);
    assert!(
        (got.body.len() as u64) < f.blob.len() as u64,
        "{}",
        got.summary()
    );
    f.assert_nothing_cached(true).await;
}

/// 3b, to the end: a hung upstream gives the client a clear error within `--upstream-timeout`
/// (here 3 s): the tracker's fetch gives up after it, and the proxy passes the tracker's 502
/// on instead of waiting on the same registry again itself.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_hanging_times_out() {
    let _serial = serial().await;
    let timeout = Duration::from_secs(3);
    let f = faulty_upstream_with(Fault::Hang, 5, &["--upstream-timeout", "3"]).await;
    let got = pull(
        &blob_url(&f.proxy.url(), &f.digest),
        None,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("upstream hang, to the end: {}", got.summary());
    got.assert_never_complete_and_wrong(&f.digest, f.blob.len() as u64);
    assert!(
        got.status.is_some_and(|s| s.is_server_error()),
        "the client should get a registry error: {}",
        got.summary()
    );
    assert!(
        got.elapsed < timeout + Duration::from_secs(3),
        "the client waited more than one upstream timeout: {}",
        got.summary()
    );
    assert_eq!(
        f.fake.blob_gets(),
        1,
        "only the tracker's GET went upstream"
    );
    f.assert_nothing_cached(false).await;
}

/// A tmpfs mounted on a temp dir; unmounted (lazily if still busy) and removed when dropped.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("bay-test-tmpfs-")
            .tempdir()
            .unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = std::process::Command::new("umount");
            if lazy {
                cmd.arg("--lazy");
            }
            cmd.arg(self.dir.path()).status().is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("bay-tests: could not unmount {}", self.dir.path().display());
        }
    }
}

/// A bay-proxy whose data dir is a 2 MiB tmpfs.
struct ProxyOnTmpfs {
    // Declared first: the process goes before its mount.
    service: Service,
    url: String,
    mount: Tmpfs,
}

impl ProxyOnTmpfs {
    async fn start(tracker: &str, upstream: &str) -> ProxyOnTmpfs {
        let mount = Tmpfs::mount("2m");
        let ip = loopback_ip();
        let port = free_port(ip);
        let peer_port = free_port(std::net::Ipv4Addr::UNSPECIFIED);
        let args = [
            "--listen".to_string(),
            format!("{ip}:{port}"),
            "--peer-port".into(),
            peer_port.to_string(),
            "--exchange-port".into(),
            "0".into(),
            "--data-dir".into(),
            mount.path().display().to_string(),
            "--upstream".into(),
            upstream.into(),
            "--default-upstream".into(),
            upstream.into(),
            "--tracker".into(),
            tracker.into(),
            "--stall-timeout".into(),
            "2".into(),
        ];
        let mut service = Service::spawn(
            "bay-proxy-tmpfs",
            bin_path("bay-proxy"),
            &args,
            [("RUST_LOG", "info,bay_proxy=debug"), ("NO_COLOR", "1")],
        )
        .unwrap();
        let url = format!("http://{ip}:{port}");
        service
            .wait_http_ok(&format!("{url}/_bay/healthz"), Duration::from_secs(60))
            .await
            .unwrap();
        ProxyOnTmpfs {
            service,
            url,
            mount,
        }
    }

    async fn stats(&self) -> serde_json::Value {
        http_client()
            .get(format!("{}/_bay/stats", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// 4. The cache directory is full (a 2 MiB tmpfs, an 8 MiB blob) and no tracker answers: the
/// pull streams from upstream, complete and verified, and the proxy logs why it cached nothing.
#[tokio::test(flavor = "multi_thread")]
async fn full_cache_dir_direct_from_upstream() {
    let _serial = serial().await;
    let mut c = cluster(&[8 << 20], 84, &[]).await;
    let layer = c.image.layers[0].clone();
    let mut p = ProxyOnTmpfs::start(&c.tracker.url(), &c.registry.url()).await;
    c.tracker.kill();
    let got = pull(&blob_url(&p.url, &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!("full cache dir, no tracker: {}", got.summary());
    assert!(got.verified(&layer.digest), "{}", got.summary());
    let log = p.service.log_text();
    assert!(
        log.contains("cannot cache the blob, streaming only"),
        "the proxy does not log why it cached nothing"
    );
    assert!(p.service.is_running(), "the proxy died");
    assert_nothing_kept("the proxy", p.mount.path(), &layer.digest, false).await;
    let s = p.stats().await;
    assert_eq!(s["blobs_held"], 0, "{s}");
    // Still works the second time (the failed write left no space taken).
    let again = pull(&blob_url(&p.url, &layer.digest), None, PULL_TIMEOUT).await;
    assert!(again.verified(&layer.digest), "{}", again.summary());
}

/// 4, with the swarm: the tracker seeds the blob, the proxy's librqbit writes pieces into
/// tmp/ on the full tmpfs. The pull must still complete verified (continuing from the tracker
/// or upstream when the swarm cannot progress), and the proxy must log why.
#[tokio::test(flavor = "multi_thread")]
async fn full_cache_dir_with_the_swarm() {
    let _serial = serial().await;
    let c = cluster(&[8 << 20], 85, &[]).await;
    let layer = c.image.layers[0].clone();
    let mut p = ProxyOnTmpfs::start(&c.tracker.url(), &c.registry.url()).await;
    let got = pull(&blob_url(&p.url, &layer.digest), None, PULL_TIMEOUT).await;
    let log = p.service.log_text();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("WARN") || l.contains("ERROR") || l.contains("No space left on device")
        })
        .collect();
    eprintln!(
        "full cache dir, with the swarm: {}\nproxy warnings:\n{}",
        got.summary(),
        why.join("\n")
    );
    assert!(got.verified(&layer.digest), "{}", got.summary());
    assert!(p.service.is_running(), "the proxy died");
    assert!(
        log.contains("continuing from the tracker")
            || log.contains("continuing from upstream")
            || log.contains("streaming from upstream"),
        "the proxy does not log where it continued from"
    );
    assert!(
        log.contains("No space left on device") || log.contains("cannot cache"),
        "the proxy does not log that the disk is full"
    );
    // The failed download is dropped, its partial file with it: the space is free again.
    assert_nothing_kept("the proxy", p.mount.path(), &layer.digest, false).await;
    let s = p.stats().await;
    assert_eq!(s["blobs_held"], 0, "{s}");
    // A second client asking now, while the failed download is still registered, must be
    // served too.
    let again = pull(&blob_url(&p.url, &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!("second pull: {}", again.summary());
    assert!(again.verified(&layer.digest), "{}", again.summary());
}

/// 5. The proxy is SIGKILLed mid-download and restarted: the client saw a truncated body, the
/// restart kept nothing partial (tmp/ wiped, nothing unverified in blobs/), and the next pull
/// is complete and verified.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_killed_mid_download_and_restarted() {
    let _serial = serial().await;
    let size = 12 << 20;
    let c = cluster(&[size], 86, &["--upload-limit", "2M"]).await;
    let layer = c.image.layers[0].clone();
    let mut p = Proxy::start(
        &[c.tracker.url()],
        &c.registry.url(),
        &["--stall-timeout", "20"],
    )
    .await
    .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let url = blob_url(&p.url(), &layer.digest);
    let counter = received.clone();
    let pulling = tokio::spawn(async move { pull(&url, Some(counter), PULL_TIMEOUT).await });
    // Killed as soon as the body is flowing: the download takes about 6 s at the seed's
    // 2 MB/s, but how much of it the client has seen by then varies from run to run (its
    // stream shares the seed with the slice readers), so waiting for a fixed share of the
    // body could outlast the download.
    wait_bytes(&received, 256 << 10, &pulling, PULL_TIMEOUT).await;
    p.kill();
    let cut = pulling.await.unwrap();
    eprintln!("proxy killed mid-download: {}", cut.summary());
    cut.assert_never_complete_and_wrong(&layer.digest, layer.size);
    assert!(
        cut.error.is_some() && (cut.body.len() as u64) < layer.size,
        "the client must see a truncated body: {}",
        cut.summary()
    );
    let bytes = c.image.blob_bytes(&layer.digest).unwrap();
    assert!(
        bytes.starts_with(&cut.body),
        "the truncated body is not a prefix of the blob"
    );

    p.restart().await.unwrap();
    assert!(
        files_in(p.data_dir(), "tmp").is_empty(),
        "tmp/ not wiped at start: {:?}",
        files_in(p.data_dir(), "tmp")
    );
    assert_blob_dir_verified(p.data_dir());

    // Watch blobs/ during the whole second pull: nothing unverified may ever appear there.
    let data_dir = p.data_dir().to_owned();
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = {
        let watching = watching.clone();
        tokio::task::spawn_blocking(move || {
            let mut checks = 0;
            while watching.load(Ordering::Relaxed) {
                assert_blob_dir_verified(&data_dir);
                checks += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            checks
        })
    };
    let got = pull(&blob_url(&p.url(), &layer.digest), None, PULL_TIMEOUT).await;
    let held = p.wait_held(1, Duration::from_secs(30)).await;
    watching.store(false, Ordering::Relaxed);
    let checks = watch.await.expect("a file in blobs/ failed its digest");
    eprintln!(
        "after restart: {} ({checks} checks of blobs/)",
        got.summary()
    );
    assert_eq!(
        got.body, bytes,
        "the pull after the restart is not the blob"
    );
    assert!(got.verified(&layer.digest), "{}", got.summary());
    let held = held.unwrap();
    assert_eq!(held["blobs_held"], 1, "{held}");
    assert_blob_dir_verified(p.data_dir());
    assert!(
        p.data_dir()
            .join("blobs")
            .join(layer.digest.parse::<Digest>().unwrap().file_name())
            .exists()
    );
}

/// 6. The tracker's copy goes bad on disk after it was verified: the tracker checks every piece
/// it reads for a proxy, sends none that fails, drops the blob and fetches it from upstream again
/// when it is next asked for it. The client gets the blob whole and verified, and the next proxy
/// gets it from the tracker's fresh copy.
#[tokio::test(flavor = "multi_thread")]
async fn tracker_serving_corrupted_pieces() {
    let _serial = serial().await;
    let size = 4 << 20;
    let c = cluster(&[size], 87, &[]).await;
    let layer = c.image.layers[0].clone();
    let digest: Digest = layer.digest.parse().unwrap();
    c.seed_on_tracker(&layer.digest).await;
    let held = c.tracker.data_dir().join("blobs").join(digest.file_name());
    flip_byte(&held, 2 * PIECE + 5).unwrap();
    let p = Proxy::start(
        &[c.tracker.url()],
        &c.registry.url(),
        &["--stall-timeout", "2"],
    )
    .await
    .unwrap();
    let got = pull(&blob_url(&p.url(), &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!("pull through a tracker with a bad copy: {}", got.summary());
    assert!(got.verified(&layer.digest), "{}", got.summary());
    assert!(
        c.tracker
            .log_text()
            .contains("held blob no longer matches its torrent"),
        "the tracker did not notice its bad piece"
    );
    assert!(
        !p.log_text().contains("did not validate"),
        "librqbit was offered a bad piece"
    );
    assert_blob_dir_verified(p.data_dir());
    let m = Scrape::of(&c.tracker.url()).await.unwrap();
    assert_eq!(m.get("bay_damaged_blobs_total").unwrap(), 1.0);

    // The bad copy is gone: the next request for the torrent (the first proxy's stall
    // recovery, or this second proxy) fetched the blob again, and the second proxy gets all of
    // it from the tracker.
    let q = Proxy::start(&[c.tracker.url()], &c.registry.url(), &[])
        .await
        .unwrap();
    let again = pull(&blob_url(&q.url(), &layer.digest), None, PULL_TIMEOUT).await;
    assert!(again.verified(&layer.digest), "{}", again.summary());
    let m = Scrape::of(&c.tracker.url()).await.unwrap();
    assert!(
        m.get(r#"bay_upstream_fetches_total{outcome="ok"}"#)
            .unwrap()
            >= 2.0,
        "the tracker did not fetch the dropped blob again"
    );
    let s = q.stats().await.unwrap();
    assert_eq!(s["fallbacks"], 0, "{s}");
    assert_eq!(s["bytes_from_upstream"], 0, "{s}");
    let held = c.tracker.data_dir().join("blobs").join(digest.file_name());
    assert_eq!(
        sha256_file(&held).unwrap(),
        layer.digest,
        "the tracker's new copy is not the blob"
    );
}

/// A tracker's API behind a relay that flips one byte of the blob in every `/v1/pieces` answer
/// that covers it: a tracker (or a network path to it) that goes bad in a way the tracker itself
/// cannot see. Everything else passes through unchanged.
struct TamperingRelay {
    addr: SocketAddr,
    tampered: Arc<AtomicU64>,
    trickled: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// What the relay does to `/v1/pieces` answers.
#[derive(Clone, Copy)]
enum RelayFault {
    /// Flips the byte at this blob offset.
    FlipByteAt(u64),
    /// Refuses (503) every request but one for the whole blob of this size: the web seed's
    /// runs fail, a client stream continuing from the start gets through.
    OnlyWholeBlob(u64),
    /// Refuses the web seed's runs until a request for the whole blob of this size comes, then
    /// lets them through; sends that whole blob at 160 KiB/s.
    SlowWholeBlob(u64),
}

struct RelayState {
    target: String,
    fault: RelayFault,
    tampered: Arc<AtomicU64>,
    /// Bytes of the slow whole blob handed to the connection so far.
    trickled: Arc<AtomicU64>,
    whole_asked: std::sync::atomic::AtomicBool,
    client: reqwest::Client,
}

impl TamperingRelay {
    async fn start(target: &str, at: u64) -> TamperingRelay {
        Self::with_fault(target, RelayFault::FlipByteAt(at)).await
    }

    async fn with_fault(target: &str, fault: RelayFault) -> TamperingRelay {
        let listener = tokio::net::TcpListener::bind((loopback_ip(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let tampered = Arc::new(AtomicU64::new(0));
        let trickled = Arc::new(AtomicU64::new(0));
        let state = Arc::new(RelayState {
            target: target.trim_end_matches('/').to_string(),
            fault,
            tampered: tampered.clone(),
            trickled: trickled.clone(),
            whole_asked: Default::default(),
            client: http_client(),
        });
        let app = axum::Router::new().fallback(relay).with_state(state);
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TamperingRelay {
            addr,
            tampered,
            trickled,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many answers it changed or refused.
    fn tampered(&self) -> u64 {
        self.tampered.load(Ordering::Relaxed)
    }

    /// How much of the slow whole blob went out before the reader stopped reading it.
    fn trickled(&self) -> u64 {
        self.trickled.load(Ordering::Relaxed)
    }
}

impl Drop for TamperingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    axum::extract::State(relay): axum::extract::State<Arc<RelayState>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let pieces = parts.uri.path().starts_with("/v1/pieces/");
    if let (true, RelayFault::OnlyWholeBlob(size)) = (pieces, relay.fault) {
        let whole = format!("bytes=0-{}", size - 1);
        if parts
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            != Some(&whole)
        {
            relay.tampered.fetch_add(1, Ordering::Relaxed);
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    let mut slow = false;
    if let (true, RelayFault::SlowWholeBlob(size)) = (pieces, relay.fault) {
        let whole = format!("bytes=0-{}", size - 1);
        let range = parts
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok());
        if range == Some(&whole) {
            relay.whole_asked.store(true, Ordering::Relaxed);
            slow = true;
        } else if !relay.whole_asked.load(Ordering::Relaxed) {
            relay.tampered.fetch_add(1, Ordering::Relaxed);
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    let mut out = relay
        .client
        .request(parts.method.clone(), format!("{}{path}", relay.target))
        .body(body);
    for (k, v) in &parts.headers {
        if k != header::HOST {
            out = out.header(k, v);
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = resp.status();
    let mut headers = resp.headers().clone();
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::CONNECTION);
    if slow {
        // 16 KiB every 100 ms, counted as each goes to the connection.
        let trickled = relay.trickled.clone();
        let body = futures::stream::unfold(
            (resp, axum::body::Bytes::new(), trickled),
            |(mut resp, mut rest, trickled)| async move {
                if rest.is_empty() {
                    rest = resp.chunk().await.ok()??;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let part = rest.split_to(rest.len().min(16 << 10));
                trickled.fetch_add(part.len() as u64, Ordering::Relaxed);
                Some((Ok::<_, std::io::Error>(part), (resp, rest, trickled)))
            },
        );
        return (status, headers, axum::body::Body::from_stream(body)).into_response();
    }
    let Ok(bytes) = resp.bytes().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut bytes = bytes.to_vec();
    // "bytes S-E/T": where this answer starts in the blob.
    let start = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|s| s.parse::<u64>().ok());
    if let (true, Some(start), RelayFault::FlipByteAt(at)) = (pieces, start, relay.fault)
        && (start..start + bytes.len() as u64).contains(&at)
    {
        bytes[(at - start) as usize] ^= 0xff;
        relay.tampered.fetch_add(1, Ordering::Relaxed);
    }
    (status, headers, bytes).into_response()
}

/// 7. A tracker hands out a bad piece it does not know is bad (here a relay in front of it
/// flips a byte of piece 2): the proxy's web seed trusts a tracker's pieces and leaves the
/// check to librqbit, which refuses the piece and drops the web seed; from then on the web seed
/// checks every piece itself, catches the bad one when it reads it again, and stops reading the
/// blob from that tracker for a while. The pieces before the bad one are used; the rest comes
/// from upstream once the swarm stalls (trackers hand bay-proxies no BitTorrent seed, see
/// bay-tracker's `announce` route). Nothing bad reaches the client or the cache.
#[tokio::test(flavor = "multi_thread")]
async fn tracker_sending_pieces_it_does_not_know_are_bad() {
    let _serial = serial().await;
    let c = cluster(&[4 << 20], 88, &[]).await;
    let layer = c.image.layers[0].clone();
    let relay = TamperingRelay::start(&c.tracker.url(), 2 * PIECE + 5).await;
    let p = Proxy::start(&[relay.url()], &c.registry.url(), &["--stall-timeout", "2"])
        .await
        .unwrap();
    let got = pull(&blob_url(&p.url(), &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!(
        "pull through a tampering relay: {} ({} answers tampered with)",
        got.summary(),
        relay.tampered()
    );
    assert!(got.verified(&layer.digest), "{}", got.summary());
    // The bad piece went out twice (offered on trust, then read again and caught), not at
    // every retry: once caught, the tracker is not asked for this blob's pieces for a while.
    assert_eq!(relay.tampered(), 2, "bad answers sent");
    let log = p.log_text();
    assert_eq!(
        log.matches("did not validate").count(),
        1,
        "librqbit should have been handed the bad piece exactly once"
    );
    assert!(
        log.contains("checking its pieces from now on"),
        "the web seed did not start checking"
    );
    assert!(
        log.contains("piece 2 does not match the torrent"),
        "the proxy did not notice the bad piece"
    );
    assert_blob_dir_verified(p.data_dir());
    let s = p.stats().await.unwrap();
    assert!(s["fallbacks"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        s["bytes_from_upstream"].as_u64().unwrap() <= layer.size - 2 * PIECE,
        "the good pieces before the bad one were not used: {s}"
    );
    // The tracker's own copy is good: it saw nothing to drop.
    let m = Scrape::of(&c.tracker.url()).await.unwrap();
    assert_eq!(m.get("bay_damaged_blobs_total").unwrap(), 0.0);
}

/// Tests 8 and 9: a 4 MiB layer pulled through a proxy whose one tracker sits behind a relay
/// with `fault`, so the swarm stalls and the client's stream continues from the tracker. Checks
/// what both expect: the pull verified, the web seed refused, the stream continued from the
/// tracker once, upstream sent the blob once (to the tracker) and the proxy never went there.
async fn stalled_onto_the_tracker(
    seed: u64,
    fault: fn(u64) -> RelayFault,
) -> (Cluster, TamperingRelay, Proxy) {
    let c = cluster(&[4 << 20], seed, &[]).await;
    let layer = c.image.layers[0].clone();
    let relay = TamperingRelay::with_fault(&c.tracker.url(), fault(layer.size)).await;
    let p = Proxy::start(&[relay.url()], &c.registry.url(), &["--stall-timeout", "2"])
        .await
        .unwrap();
    let got = pull(&blob_url(&p.url(), &layer.digest), None, PULL_TIMEOUT).await;
    eprintln!(
        "pull with the web seed refused: {} ({} piece requests refused, {} of {} bytes sent \
         slowly)",
        got.summary(),
        relay.tampered(),
        relay.trickled(),
        layer.size
    );
    assert!(got.verified(&layer.digest), "{}", got.summary());
    assert!(relay.tampered() > 0, "the web seed was never refused");
    assert!(
        p.log_text().contains("continuing from the tracker"),
        "the stream did not continue from the tracker"
    );
    let s = p.stats().await.unwrap();
    assert_eq!(s["fallbacks"], 0, "{s}");
    assert_eq!(s["bytes_from_upstream"], 0, "{s}");
    assert_eq!(
        c.registry.blob_gets(&layer.digest),
        1,
        "upstream sent it again"
    );
    let m = Scrape::of(&p.url()).await.unwrap();
    assert_eq!(m.get("bay_tracker_continuations_total").unwrap(), 1.0);
    (c, relay, p)
}

/// 8. The swarm stalls while a tracker that holds the blob still answers (here a relay in front
/// of it refuses the web seed's runs of pieces and lets only a request for the whole blob
/// through): the client's stream continues from the tracker, each piece checked against the
/// torrent, and upstream sends the blob only once, to the tracker. Before, it went upstream a
/// second time; a swarm whose last piece librqbit keeps passing between two peers stalls the
/// same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stream_continues_from_the_tracker_not_upstream() {
    let _serial = serial().await;
    let (c, _relay, p) = stalled_onto_the_tracker(89, RelayFault::OnlyWholeBlob).await;
    let m = Scrape::of(&p.url()).await.unwrap();
    assert_eq!(
        m.get(r#"bay_blob_bytes_served_total{source="swarm"}"#)
            .unwrap(),
        c.image.layers[0].size as f64
    );
    assert_blob_dir_verified(p.data_dir());
}

/// 9. The swarm stalls, the client's stream continues from the tracker, and then the swarm gets
/// going again (here a relay refuses the web seed's runs until the stream asks for the whole
/// blob, lets them through after, and sends that whole blob at 160 KiB/s): the stream goes back
/// to this node's own download, or the blob it cached, instead of reading the rest over the one
/// tracker's link. In a warm pull whose only seed hung, streams that stayed on the tracker
/// ended minutes after their download.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_on_the_tracker_goes_back_to_the_swarm_once_it_is_ahead() {
    let _serial = serial().await;
    let (c, relay, p) = stalled_onto_the_tracker(90, RelayFault::SlowWholeBlob).await;
    let size = c.image.layers[0].size;
    let log = p.log_text();
    assert!(
        log.contains("back on this node's download")
            || log.contains("back on this node's cached copy"),
        "the stream did not go back to the swarm"
    );
    assert!(
        relay.trickled() < size / 2,
        "the stream read {} of {size} bytes from the tracker",
        relay.trickled()
    );
    let m = Scrape::of(&p.url()).await.unwrap();
    assert_eq!(m.get("bay_swarm_rejoins_total").unwrap(), 1.0);
    p.wait_held(1, Duration::from_secs(30)).await.unwrap();
    assert_blob_dir_verified(p.data_dir());
}

/// A BitTorrent peer that claims every piece, takes requests and never sends a byte, keeping
/// the connection alive: a peer that hangs with pieces reserved on it. Counts the requests.
struct BlackHolePeer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHolePeer {
    async fn start(info_hash: bay_common::announce::InfoHash, pieces: usize) -> BlackHolePeer {
        use bay_proxy::peer_wire::{self, Message};
        let listener = tokio::net::TcpListener::bind((loopback_ip(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut theirs = [0u8; 68];
                    if s.read_exact(&mut theirs).await.is_err() || theirs[28..48] != info_hash.0 {
                        return;
                    }
                    let mut hello = peer_wire::handshake(info_hash, b"-XXHOLE-");
                    hello.extend_from_slice(&peer_wire::bitfield(&vec![true; pieces]));
                    hello.extend_from_slice(&peer_wire::UNCHOKE);
                    if s.write_all(&hello).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.into_split();
                    // Alive as far as a peer can tell: a keep-alive every 2 s.
                    let alive = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            if w.write_all(&peer_wire::KEEP_ALIVE).await.is_err() {
                                return;
                            }
                        }
                    });
                    while let Ok(m) = peer_wire::read_message(&mut r, 1 << 20).await {
                        if let Message::Request(_) = m {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    alive.abort();
                });
            }
        });
        BlackHolePeer {
            addr,
            requests,
            task,
        }
    }

    /// Tells the tracker it seeds `info_hash`, from its own address, as any client would.
    async fn announce(&self, tracker: &str, info_hash: bay_common::announce::InfoHash) {
        let hash: String = info_hash.0.iter().map(|b| format!("%{b:02X}")).collect();
        let client = reqwest::Client::builder()
            .no_proxy()
            .local_address(self.addr.ip())
            .build()
            .unwrap();
        let r = client
            .get(format!(
                "{tracker}/announce?info_hash={hash}&peer_id=-XXHOLE-000000000000&port={}\
                 &uploaded=0&downloaded=0&left=0&compact=1&event=started",
                self.addr.port()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.bytes().await.unwrap();
        assert!(
            !body.windows(14).any(|w| w == b"failure reason"),
            "the tracker refused the announce: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

impl Drop for BlackHolePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 9. A peer in the swarm claims every piece, accepts requests and never answers (alive as far
/// as TCP and keep-alives tell). Two proxies pull the blob at once: librqbit reserves pieces on
/// the peer, and the swarm must get them elsewhere. Both pulls end verified, upstream sends the
/// blob once (to the tracker), and no client stream needed the tracker to finish it.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_takes_requests_and_never_answers() {
    let _serial = serial().await;
    let size = 16 << 20;
    let c = cluster(&[size], 90, &[]).await;
    let layer = c.image.layers[0].clone();
    let digest: Digest = layer.digest.parse().unwrap();
    let bytes = c.image.blob_bytes(&layer.digest).unwrap();
    let torrent = bay_common::torrent::BlobTorrent::from_bytes(digest, &bytes).unwrap();
    c.seed_on_tracker(&layer.digest).await;
    let hole = BlackHolePeer::start(torrent.info_hash(), torrent.piece_count()).await;
    hole.announce(&c.tracker.url(), torrent.info_hash()).await;

    let args = ["--stall-timeout", "4"];
    let a = Proxy::start(&[c.tracker.url()], &c.registry.url(), &args)
        .await
        .unwrap();
    let b = Proxy::start(&[c.tracker.url()], &c.registry.url(), &args)
        .await
        .unwrap();
    let started = Instant::now();
    let (ua, ub) = (
        blob_url(&a.url(), &layer.digest),
        blob_url(&b.url(), &layer.digest),
    );
    let (ga, gb) = tokio::join!(pull(&ua, None, PULL_TIMEOUT), pull(&ub, None, PULL_TIMEOUT));
    eprintln!(
        "two pulls past a black-hole peer: {} / {} ({} requests went into the hole, {:?})",
        ga.summary(),
        gb.summary(),
        hole.requests.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(ga.verified(&layer.digest), "{}", ga.summary());
    assert!(gb.verified(&layer.digest), "{}", gb.summary());
    assert!(
        hole.requests.load(Ordering::Relaxed) > 0,
        "no proxy asked the black hole for a piece: this tested nothing"
    );
    assert_eq!(
        c.registry.blob_gets(&layer.digest),
        1,
        "upstream sent it again"
    );
    for p in [&a, &b] {
        let s = p.stats().await.unwrap();
        assert_eq!(s["fallbacks"], 0, "{s}");
        let m = Scrape::of(&p.url()).await.unwrap();
        assert_eq!(
            m.get("bay_tracker_continuations_total").unwrap(),
            0.0,
            "the swarm did not get around the black hole by itself"
        );
    }
}

/// Offers that come after a fetch began make it leave upstream's stream at an offered piece
/// and ask for the rest with a `Range`. An upstream that ignores the range sends the whole
/// blob again: the fetch reads past what its file already holds and keeps the right blob.
#[tokio::test(flavor = "multi_thread")]
async fn late_offers_with_an_upstream_that_ignores_ranges() {
    offers_with_an_upstream_that_ignores_ranges(true).await;
}

/// The same for offers that come with the request starting the fetch: the nodes' pieces, then
/// the rest, which upstream sends as the whole blob.
#[tokio::test(flavor = "multi_thread")]
async fn first_offers_with_an_upstream_that_ignores_ranges() {
    offers_with_an_upstream_that_ignores_ranges(false).await;
}

/// A node offers four pieces (8-11 after a plain request started the fetch when `late`, else
/// 0-3 with the request that starts it); upstream ignores every `Range`.
async fn offers_with_an_upstream_that_ignores_ranges(late: bool) {
    let _serial = serial().await;
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ 0x5a)
        .collect();
    let digest = sha256_hex(&blob);
    let fake = FakeUpstream::start(Arc::new(blob.clone()), digest.clone(), Fault::Whole).await;
    let tracker = Tracker::start(&[fake.url()], &["--upstream-rate", "1M"])
        .await
        .unwrap();
    let pl = bay_common::torrent::piece_length_for(blob.len() as u64) as usize;
    let (held, query) = if late {
        (8..=11, "8-11")
    } else {
        (0..=3, "0-3")
    };
    let node = bay_tests::ExchangeNode::start(blob.clone(), &[held], false).await;
    let url = format!(
        "{}/v1/torrents/{}/{REPO}/blobs/{digest}",
        tracker.url(),
        fake.addr
    );
    let offer = async {
        node.client()
            .get(format!(
                "{url}?exchange={}&size={}&held={query}",
                node.port,
                blob.len()
            ))
            .send()
            .await
            .unwrap()
    };
    let answers = if late {
        // The first request starts the fetch; the offer comes while upstream sends piece 0
        // or 1.
        let (first, late) = tokio::join!(http_client().get(&url).send(), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            offer.await
        });
        vec![first.unwrap(), late]
    } else {
        vec![offer.await]
    };
    let right =
        bay_common::torrent::BlobTorrent::from_bytes(digest.parse().unwrap(), &blob).unwrap();
    for r in answers {
        assert_eq!(r.status(), StatusCode::OK, "{}", tracker.log_text());
        let t = bay_common::torrent::BlobTorrent::from_metainfo(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(t.info_hash(), right.info_hash());
    }
    let kept = tracker.data_dir().join("blobs").join(right.file_name());
    assert_eq!(sha256_file(&kept).unwrap(), digest);
    assert_eq!(node.served(), 4 * pl as u64, "{}", tracker.log_text());
    // The ignored range, after the whole blob the late offer interrupted.
    assert_eq!(
        fake.blob_gets(),
        if late { 2 } else { 1 },
        "{}",
        tracker.log_text()
    );
    assert!(
        tracker.log_text().contains("upstream did not resume"),
        "{}",
        tracker.log_text()
    );
}

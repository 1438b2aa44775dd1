//! High availability: three trackers, three proxies; the tracker that owns a layer (ranks first
//! for its digest) is killed in the middle of a pull, and every pull still finishes verified
//! while upstream sends that layer at most twice and every other blob once.

use std::time::{Duration, Instant};

use bay_proxy::trackers::rendezvous;
use bay_tests::{
    Image, Proxy, Registry, RegistryOptions, Scrape, Tracker, sha256_file, skopeo_pull,
};

const LINK: &str = "8M";

fn owner(tracker_urls: &[String], digest: &str) -> usize {
    // The proxy ranks trackers by their parsed URL, which ends in '/'.
    let normalized: Vec<String> = tracker_urls
        .iter()
        .map(|u| url::Url::parse(u).unwrap().to_string())
        .collect();
    rendezvous(&normalized, digest)[0]
}

/// Two trackers of `registry` and their URLs, in the order the proxies are given them.
async fn two_trackers(registry: &Registry) -> ([Tracker; 2], Vec<String>) {
    let trackers = [
        Tracker::start(&[registry.url()], &[]).await.unwrap(),
        Tracker::start(&[registry.url()], &[]).await.unwrap(),
    ];
    let urls = trackers.iter().map(|t| t.url()).collect();
    (trackers, urls)
}

/// The first image of layers `sizes` (seeds from `seed` on) for which `wanted` holds: which
/// tracker ranks first for a blob depends on the trackers' random ports, so tests that need a
/// given owner pick their image after the trackers started.
fn image_where(sizes: &[u64], seed: u64, wanted: impl Fn(&Image) -> bool) -> Image {
    (seed..)
        .map(|seed| Image::generate(sizes, seed).unwrap())
        .find(|image| wanted(image))
        .unwrap()
}

async fn pull_all(proxies: &[Proxy], image: &Image, reference: &str) -> Vec<Duration> {
    let started = Instant::now();
    let outs: Vec<tempfile::TempDir> = proxies
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let pulls = proxies.iter().zip(&outs).map(|(p, out)| async move {
        skopeo_pull(&p.authority(), reference, out.path(), None)
            .await
            .unwrap();
        started.elapsed()
    });
    let times = futures::future::join_all(pulls).await;
    for out in &outs {
        for blob in image.layers.iter().chain([&image.config]) {
            let path = out.path().join(blob.digest.trim_start_matches("sha256:"));
            assert_eq!(sha256_file(&path).unwrap(), blob.digest);
        }
    }
    times
}

/// Has the tracker at `tracker_url` fetch and seed `digest` of `repo` (a torrent request).
async fn seed_on(tracker_url: &str, registry: &Registry, repo: &str, digest: &str) {
    let r = bay_tests::http_client()
        .get(format!(
            "{tracker_url}/v1/torrents/{}/{repo}/blobs/{digest}",
            registry.authority()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
}

/// Waits (at most 60 s) until `tracker`'s counter `metric` reaches `at_least`.
async fn reached(tracker: &Tracker, metric: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = Scrape::of(&tracker.url())
            .await
            .map_or(0.0, |s| s.value(metric));
        if got >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{metric} reached only {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills `tracker` once its counter `metric` reaches `at_least` (within 60 s).
async fn kill_at(tracker: &mut Tracker, metric: &str, at_least: f64) {
    reached(tracker, metric, at_least).await;
    tracker.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_losing_the_owning_tracker() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let calm = Image::generate(&[16 << 20, 16 << 20, 16 << 20], 1).unwrap();
    calm.push(&registry, "ha/calm:1", None).await.unwrap();
    let stormy = Image::generate(&[24 << 20, 24 << 20, 24 << 20], 2).unwrap();
    stormy.push(&registry, "ha/stormy:1", None).await.unwrap();

    let mut trackers = Vec::new();
    for _ in 0..3 {
        trackers.push(
            Tracker::start(&[registry.url()], &["--upload-limit", LINK])
                .await
                .unwrap(),
        );
    }
    let urls: Vec<String> = trackers.iter().map(|t| t.url()).collect();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let args = ["--upload-limit", LINK, "--stall-timeout", "4"];
        proxies.push(Proxy::start(&urls, &registry.url(), &args).await.unwrap());
    }

    // All trackers up.
    let calm_times = pull_all(&proxies, &calm, "ha/calm:1").await;
    for blob in calm.layers.iter().chain([&calm.config]) {
        assert_eq!(registry.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }

    // The owner of the first layer dies while the three proxies pull.
    let victim_layer = stormy.layers[0].digest.clone();
    let victim = owner(&urls, &victim_layer);
    let pulls = {
        let proxies = &proxies;
        let stormy = &stormy;
        async move { pull_all(proxies, stormy, "ha/stormy:1").await }
    };
    let t0 = Instant::now();
    let killer = async {
        registry
            .wait_blob_gets(&victim_layer, 1, Duration::from_secs(60))
            .await
            .unwrap();
        // Let the swarm get going on it, then pull the plug.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        trackers[victim].kill();
        eprintln!("killed tracker {victim} ({})", urls[victim]);
        t0.elapsed()
    };
    let (stormy_times, killed_at) = tokio::join!(pulls, killer);
    // Otherwise this tested nothing: the tracker died while every pull was still running.
    for t in &stormy_times {
        assert!(
            *t > killed_at,
            "a pull ended ({t:?}) before the tracker was killed ({killed_at:?})"
        );
    }

    for blob in stormy.layers.iter().chain([&stormy.config]) {
        let gets = registry.blob_gets(&blob.digest);
        if owner(&urls, &blob.digest) == victim {
            // The next owner fetches it again, whole or (reading first what the nodes got
            // through the swarm) in ranges: never more than twice its bytes.
            let answers = registry.blob_get_answers(&blob.digest);
            let sent: u64 = answers.iter().map(|(_, bytes)| bytes).sum();
            assert!(
                (blob.size..=2 * blob.size).contains(&sent),
                "{}: upstream sent {sent} bytes of {}: {answers:?}",
                blob.digest,
                blob.size
            );
        } else {
            assert_eq!(
                gets, 1,
                "{} is not the dead tracker's: {gets} GETs",
                blob.digest
            );
        }
    }
    let mut fallbacks = 0;
    for p in &proxies {
        fallbacks += p.stats().await.unwrap()["fallbacks"].as_u64().unwrap();
    }
    eprintln!(
        "3 trackers, 3 proxies, uploads {LINK}B/s: 48 MiB with all trackers up: {calm_times:?}; \
         72 MiB with the owner of a layer killed mid-pull (at {killed_at:?}): {stormy_times:?}; \
         upstream GETs of that layer: {}; fallbacks to upstream: {fallbacks}",
        registry.blob_gets(&victim_layer)
    );
    // The proxies wait for the next tracker to seed the layer rather than each going upstream:
    // at most one of them may have (the second upstream GET allowed above).
    assert!(fallbacks <= 1, "{fallbacks} fallbacks to upstream");
}

/// The owner dies while it is still fetching a layer from upstream (2 MiB/s here, so the
/// 16 MiB fetch takes 8 s). What it had fetched went to the proxies early, piece by piece; their
/// requests to the other tracker offer those pieces, and its fetch reads them back from the
/// proxies and asks upstream only for the rest. Without that, upstream sent the layer once
/// and a half (the dead tracker's half, then all of it again).
#[tokio::test(flavor = "multi_thread")]
async fn a_tracker_killed_mid_fetch_leaves_what_it_fetched_to_the_next_one() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let mut trackers = [
        Tracker::start(&[registry.url()], &["--upstream-rate", "2M"])
            .await
            .unwrap(),
        Tracker::start(&[registry.url()], &["--upstream-rate", "2M"])
            .await
            .unwrap(),
    ];
    let urls: Vec<String> = trackers.iter().map(|t| t.url()).collect();
    let image = Image::generate(&[16 << 20], 41).unwrap();
    image.push(&registry, "ha/midfetch:1", None).await.unwrap();
    let layer = image.layers[0].clone();
    let victim = owner(&urls, &layer.digest);
    let survivor = 1 - victim;
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Proxy::start(&urls, &registry.url(), &[]).await.unwrap());
    }
    let pulls = pull_all(&proxies, &image, "ha/midfetch:1");
    // The registry logs a GET only once it is answered: the owner's own count says how far
    // its fetch got. Killed at 40 %, with the pieces sent on early.
    let killer = kill_at(
        &mut trackers[victim],
        "bay_upstream_bytes_total",
        0.4 * layer.size as f64,
    );
    tokio::join!(pulls, killer);

    let scrape = Scrape::of(&trackers[survivor].url()).await.unwrap();
    let from_nodes = scrape.value("bay_node_bytes_total") as u64;
    // Of this layer and the config blob.
    let from_upstream = scrape.value("bay_upstream_bytes_total") as u64;
    // What the registry wrote for each GET of the layer. The dead owner's count includes what
    // sat in its socket's receive buffer, unread under `--upstream-rate`.
    let gets = registry.blob_get_answers(&layer.digest);
    let mut fallbacks = 0;
    for p in &proxies {
        fallbacks += p.stats().await.unwrap()["fallbacks"].as_u64().unwrap();
    }
    eprintln!(
        "16 MiB layer, owner killed 40 % into its 8 s fetch: the next tracker read {from_nodes} \
         bytes from the proxies and {from_upstream} from upstream; the registry's GETs of the \
         layer (status, bytes): {gets:?}; fallbacks {fallbacks}"
    );
    assert!(
        from_nodes >= layer.size * 3 / 10,
        "the next tracker took only {from_nodes} bytes from the proxies: {}",
        trackers[survivor].log_text()
    );
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1], (206, layer.size - from_nodes));
    assert_eq!(fallbacks, 0);
}

/// The only tracker holding a layer dies while three proxies pull it (a warm pull): their
/// downloads stall and ask the next tracker, which fetches the layer again, but reads first the
/// pieces the proxies already verified through the swarm from their exchange ports, and asks
/// upstream only for the rest.
#[tokio::test(flavor = "multi_thread")]
async fn a_tracker_killed_mid_pull_leaves_what_the_nodes_got_to_the_next_one() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    // The holder sends slowly, so the pull is still going when it dies.
    let mut trackers = [
        Tracker::start(&[registry.url()], &["--upload-limit", "2M"])
            .await
            .unwrap(),
        Tracker::start(&[registry.url()], &["--upload-limit", "2M"])
            .await
            .unwrap(),
    ];
    let urls: Vec<String> = trackers.iter().map(|t| t.url()).collect();
    let image = Image::generate(&[16 << 20], 43).unwrap();
    image.push(&registry, "ha/midpull:1", None).await.unwrap();
    let layer = image.layers[0].clone();
    let victim = owner(&urls, &layer.digest);
    let survivor = 1 - victim;
    seed_on(&urls[victim], &registry, "ha/midpull", &layer.digest).await;
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(
            Proxy::start(&urls, &registry.url(), &["--stall-timeout", "2"])
                .await
                .unwrap(),
        );
    }
    let pulls = pull_all(&proxies, &image, "ha/midpull:1");
    let killer = kill_at(
        &mut trackers[victim],
        "bay_piece_bytes_served_total",
        0.4 * layer.size as f64,
    );
    tokio::join!(pulls, killer);

    let scrape = Scrape::of(&trackers[survivor].url()).await.unwrap();
    let from_nodes = scrape.value("bay_node_bytes_total") as u64;
    let gets = registry.blob_get_answers(&layer.digest);
    let mut fallbacks = 0;
    for p in &proxies {
        fallbacks += p.stats().await.unwrap()["fallbacks"].as_u64().unwrap();
    }
    eprintln!(
        "16 MiB layer, its only holder killed 40 % into a warm pull by three proxies: the next \
         tracker read {from_nodes} bytes from the proxies; the registry's GETs of the layer \
         (status, bytes): {gets:?}; fallbacks {fallbacks}"
    );
    assert!(
        from_nodes >= layer.size * 3 / 10,
        "the next tracker took only {from_nodes} bytes from the proxies: {}",
        trackers[survivor].log_text()
    );
    // The holder's fetch, then only ranges: the gaps between the pieces the nodes offered and
    // the tail after them.
    assert_eq!(gets[0], (200, layer.size), "{gets:?}");
    assert!(
        gets[1..].iter().all(|(status, _)| *status == 206),
        "{gets:?}"
    );
    let again: u64 = gets[1..].iter().map(|(_, bytes)| bytes).sum();
    assert_eq!(again, layer.size - from_nodes, "{gets:?}");
    assert_eq!(fallbacks, 0);
}

/// A tracker that comes back empty (restarted without its volume, or after the next tracker
/// fetched its blobs while it was down) must not fetch from upstream what another tracker of
/// the set holds: the proxies ask every tracker for a held copy before one fetches.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_owner_does_not_fetch_what_another_tracker_holds() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let (trackers, urls) = two_trackers(&registry).await;
    // The trackers' ports are random, so which one ranks first for a blob is too: pick an
    // image whose blobs give each tracker something to own (1 in 16 would not).
    let image = image_where(&[8 << 20, 8 << 20, 8 << 20, 8 << 20], 3, |image| {
        let owners: Vec<usize> = image
            .layers
            .iter()
            .chain([&image.config])
            .map(|b| owner(&urls, &b.digest))
            .collect();
        owners.contains(&0) && owners.contains(&1)
    });
    image.push(&registry, "ha/held:1", None).await.unwrap();
    let blobs: Vec<_> = image.layers.iter().chain([&image.config]).collect();
    // Each blob is held by the tracker that does not rank first for it, as after a failover.
    let mut owners = [0u64; 2];
    for blob in &blobs {
        let owner = owner(&urls, &blob.digest);
        owners[owner] += 1;
        seed_on(&urls[1 - owner], &registry, "ha/held", &blob.digest).await;
    }
    assert!(owners.iter().all(|&n| n > 0), "owners {owners:?}");

    let proxies = [
        Proxy::start(&urls, &registry.url(), &[]).await.unwrap(),
        Proxy::start(&urls, &registry.url(), &[]).await.unwrap(),
    ];
    pull_all(&proxies, &image, "ha/held:1").await;
    for blob in &blobs {
        assert_eq!(registry.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }
    for (i, t) in trackers.iter().enumerate() {
        let stats = t.stats().await.unwrap();
        assert_eq!(
            stats["upstream_fetches"].as_u64(),
            Some(blobs.len() as u64 - owners[i]),
            "tracker {i} fetched only what it was asked for directly: {stats}"
        );
    }
    let mut fallbacks = 0;
    for p in &proxies {
        fallbacks += p.stats().await.unwrap()["fallbacks"].as_u64().unwrap();
    }
    assert_eq!(fallbacks, 0);
}

/// A listener whose accept queue is full: the kernel drops every SYN sent to it, as for a
/// tracker whose node vanished, so a connect to it waits out the proxy's connect timeout.
async fn unreachable_tracker() -> (String, tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let ip = bay_tests::loopback_ip();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((ip, 0).into()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(conn)) => fill.push(conn),
            Ok(Err(e)) => panic!("connect {addr}: {e}"),
            Err(_) => break, // dropped: the queue is full
        }
        assert!(fill.len() < 8, "{addr} keeps accepting connections");
    }
    (format!("http://{addr}"), listener, fill)
}

/// The tracker that ranks first for a blob is unreachable (its SYNs vanish): each request for
/// the blob waits one connect timeout for it, not one per pass, and a request whose torrent
/// arrives after another request already finished the download is served from the cache,
/// not sent to upstream (seen in the compose test, where a prefetch finished a layer while
/// docker's GET of it still waited on the killed tracker).
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_owner_costs_one_connect_timeout_and_no_upstream_fallback() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let (gone_url, _listener, _fill) = unreachable_tracker().await;
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let urls = vec![gone_url.clone(), tracker.url()];
    // An image whose layer ranks the unreachable tracker first.
    let image = image_where(&[1 << 20], 400, |image| {
        owner(&urls, &image.layers[0].digest) == 0
    });
    image.push(&registry, "ha/gone:1", None).await.unwrap();
    let proxy = Proxy::start(&urls, &registry.url(), &[]).await.unwrap();

    let digest = &image.layers[0].digest;
    let url = format!("{}/v2/ha/gone/blobs/{digest}", proxy.url());
    let get = |delay: Duration| {
        let url = url.clone();
        async move {
            tokio::time::sleep(delay).await;
            let r = bay_tests::http_client()
                .get(&url)
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::OK);
            r.bytes().await.unwrap()
        }
    };
    // The second GET starts while the first still waits on the unreachable tracker, so it
    // gets its torrent after the first has downloaded the blob.
    let (first, second) = tokio::join!(get(Duration::ZERO), get(Duration::from_secs(5)));
    for body in [first, second] {
        assert_eq!(bay_common::Digest::sha256_of(&body).to_string(), *digest);
    }

    assert_eq!(
        registry.blob_gets(digest),
        1,
        "upstream sent the layer once"
    );
    let stats = proxy.stats().await.unwrap();
    assert_eq!(stats["fallbacks"].as_u64(), Some(0), "{stats}");
    let gone_host = url::Url::parse(&gone_url).unwrap().to_string();
    let waits = proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("torrent request failed") && l.contains(&gone_host))
        .count();
    assert_eq!(
        waits,
        2,
        "one connect timeout per request\n{}",
        proxy.log_text()
    );
}

/// Freezes a process (SIGSTOP) until dropped: the kernel still accepts connections to its
/// sockets, and nothing answers them, as with a hung tracker.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        let ok = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -STOP {pid}");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A tracker that hangs (its process frozen) costs a pull seconds, not the 30 minutes a torrent
/// request may wait while a tracker fetches a big blob: the proxy checks a tracker's health
/// while it waits on it, and passes over one that stopped answering. It is asked both ways
/// here: for a held copy (every blob) and to fetch (the blobs it ranks first for).
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_tracker_is_passed_over_not_waited_on() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let (trackers, urls) = two_trackers(&registry).await;
    // An image with a blob the frozen tracker (0) ranks first for.
    let image = image_where(&[2 << 20, 2 << 20], 700, |image| {
        owner(&urls, &image.layers[0].digest) == 0
    });
    image.push(&registry, "ha/frozen:1", None).await.unwrap();
    let proxy = Proxy::start(&urls, &registry.url(), &[]).await.unwrap();
    let _frozen = Frozen::new(trackers[0].pid().unwrap());

    let started = Instant::now();
    let out = tempfile::tempdir().unwrap();
    let pulled = tokio::time::timeout(
        Duration::from_secs(120),
        skopeo_pull(&proxy.authority(), "ha/frozen:1", out.path(), None),
    )
    .await;
    assert!(
        matches!(pulled, Ok(Ok(_))),
        "the pull did not finish past a frozen tracker in 120 s: {pulled:?}"
    );
    eprintln!("pull past a frozen tracker: {:?}", started.elapsed());
    for blob in image.layers.iter().chain([&image.config]) {
        let path = out.path().join(blob.digest.trim_start_matches("sha256:"));
        assert_eq!(sha256_file(&path).unwrap(), blob.digest);
        assert_eq!(registry.blob_gets(&blob.digest), 1, "{}", blob.digest);
    }
    let stats = proxy.stats().await.unwrap();
    assert_eq!(stats["fallbacks"].as_u64(), Some(0), "{stats}");
    assert!(
        proxy.log_text().contains("stopped answering"),
        "the proxy did not say why it passed the tracker over"
    );
}

/// A download that gives up (its only tracker hangs) keeps serving the pieces it verified on
/// its exchange port, as long as a tracker's fetch reads what nodes offered
/// (`Held::read_within`): every node stalled on a hung tracker gives up at about the same
/// time, and before this the fetch that took their offers found nothing left to read.
#[tokio::test(flavor = "multi_thread")]
async fn a_download_that_gave_up_still_serves_the_pieces_it_offered() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[16 << 20], 751).unwrap();
    image.push(&registry, "ha/gaveup:1", None).await.unwrap();
    let layer = image.layers[0].clone();
    let bytes = image.blob_bytes(&layer.digest).unwrap();
    // The tracker sends slowly, so the download is still going when it hangs.
    let tracker = Tracker::start(&[registry.url()], &["--upload-limit", "2M"])
        .await
        .unwrap();
    seed_on(&tracker.url(), &registry, "ha/gaveup", &layer.digest).await;
    let mut proxy = Proxy::start(&[tracker.url()], &registry.url(), &["--stall-timeout", "2"])
        .await
        .unwrap();
    let url = format!("{}/v2/ha/gaveup/blobs/{}", proxy.url(), layer.digest);
    let pull = tokio::spawn(async move {
        let r = bay_tests::http_client()
            .get(url)
            .timeout(Duration::from_secs(240))
            .send()
            .await?;
        r.error_for_status()?.bytes().await
    });
    reached(
        &tracker,
        "bay_piece_bytes_served_total",
        4.0 * (1 << 20) as f64,
    )
    .await;
    let frozen = Frozen::new(tracker.pid().unwrap());

    let deadline = Instant::now() + Duration::from_secs(90);
    while !proxy.log_text().contains("giving up") {
        assert!(
            Instant::now() < deadline,
            "the download did not give up: {}",
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exchange = proxy.exchange_port().expect("the proxy's exchange port");
    let pl = bay_common::torrent::piece_length_for(layer.size) as usize;
    let count = bytes.len().div_ceil(pl);
    let mut served = 0;
    for p in 0..count {
        let r = bay_tests::http_client()
            .get(format!(
                "http://{}:{exchange}/v1/exchange/{}/{p}",
                proxy.ip(),
                layer.digest
            ))
            .send()
            .await
            .unwrap();
        if r.status() == reqwest::StatusCode::OK {
            let got = r.bytes().await.unwrap();
            let want = &bytes[p * pl..((p + 1) * pl).min(bytes.len())];
            assert!(got == want, "piece {p} served wrong after the give-up");
            served += 1;
        } else {
            assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND, "piece {p}");
        }
    }
    eprintln!("after the download gave up, its exchange port served {served} of {count} pieces");
    assert!(
        served > 0 && served < count,
        "served {served} of {count} pieces after giving up\n{}",
        proxy.log_text()
    );

    // The client's pull still ends with the blob once the tracker answers again.
    drop(frozen);
    let body = pull.await.unwrap().unwrap();
    assert_eq!(
        bay_common::Digest::sha256_of(&body).to_string(),
        layer.digest
    );
    // What was read after the give-up is logged as the proxy stops serving it.
    proxy.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(
        proxy.log_text().contains(&format!("pieces_read={served}")),
        "{}",
        proxy.log_text()
    );
}

/// The other side of the health check: a tracker that takes longer to fetch a blob than a hung
/// one takes to be found out (here 20 s, upstream held to 256 KiB/s) answers its health checks
/// and is waited for, not passed over for upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_tracker_busy_fetching_is_waited_for() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[5 << 20], 750).unwrap();
    image.push(&registry, "ha/slow:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], &["--upstream-rate", "256K"])
        .await
        .unwrap();
    let proxy = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();
    let layer = &image.layers[0];
    let started = Instant::now();
    let body = bay_tests::http_client()
        .get(format!("{}/v2/ha/slow/blobs/{}", proxy.url(), layer.digest))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        bay_common::Digest::sha256_of(&body).to_string(),
        layer.digest
    );
    // Otherwise the health check was never put to the test.
    assert!(
        took > Duration::from_secs(16),
        "the fetch took only {took:?}"
    );
    assert_eq!(registry.blob_gets(&layer.digest), 1);
    let stats = proxy.stats().await.unwrap();
    assert_eq!(stats["fallbacks"].as_u64(), Some(0), "{stats}");
    assert!(!proxy.log_text().contains("stopped answering"));
}

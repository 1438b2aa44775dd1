//! bay-tracker against a real docker-registry: fetch once, verify, seed, hand out torrents, and
//! refuse what it must refuse.

use std::time::Duration;

use bay_common::torrent::BlobTorrent;
use bay_tests::{
    ExchangeNode, Image, Registry, RegistryOptions, Tracker, aria2_download, http_client,
    sha256_file,
};
use reqwest::StatusCode;

const TIMEOUT: Duration = Duration::from_secs(120);

fn torrent_url(tracker: &Tracker, registry: &Registry, repo: &str, digest: &str) -> String {
    format!(
        "{}/v1/torrents/{}/{repo}/blobs/{digest}",
        tracker.url(),
        registry.authority()
    )
}

async fn setup(layers: &[u64], extra: &[&str]) -> (Registry, Image, Tracker) {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(layers, 7).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], extra).await.unwrap();
    (registry, image, tracker)
}

#[tokio::test(flavor = "multi_thread")]
async fn tracker_fetches_verifies_and_seeds_to_a_standard_client() {
    let (registry, image, tracker) = setup(&[3 << 20, 1 << 20, 300_000], &[]).await;
    let layer = &image.layers[0];
    let resp = http_client()
        .get(torrent_url(&tracker, &registry, "test/img", &layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", tracker.log_text());
    assert_eq!(
        resp.headers()["content-type"],
        bay_common::api::TORRENT_CONTENT_TYPE
    );
    let bytes = resp.bytes().await.unwrap();
    let torrent = BlobTorrent::from_metainfo(&bytes).unwrap();
    assert_eq!(torrent.digest().to_string(), layer.digest);
    assert_eq!(torrent.size(), layer.size);
    // Determinism: the torrent we compute from the pushed bytes has the same info hash.
    let local = BlobTorrent::from_bytes(
        layer.digest.parse().unwrap(),
        &image.blob_bytes(&layer.digest).unwrap(),
    )
    .unwrap();
    assert_eq!(local.info_hash(), torrent.info_hash());
    assert!(
        tracker
            .data_dir()
            .join("blobs")
            .join(torrent.file_name())
            .exists()
    );

    // aria2c, a standard client, downloads it from the tracker's seed via its announce.
    let out = tempfile::tempdir().unwrap();
    let path = aria2_download(&bytes, torrent.file_name(), out.path(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(sha256_file(&path).unwrap(), layer.digest);
    assert_eq!(registry.blob_gets(&layer.digest), 1);
    assert_eq!(registry.blob_gets(&image.layers[1].digest), 0);

    // The announce endpoint now knows the torrent; scrape reports the seed.
    let stats: serde_json::Value = tracker.stats().await.unwrap();
    assert_eq!(stats["blobs_held"], 1);
    assert_eq!(stats["upstream_fetches"], 1);
    assert!(
        stats["seed_uploaded_bytes"].as_u64().unwrap() >= layer.size,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_cause_one_upstream_get() {
    let (registry, image, tracker) = setup(&[16 << 20, 4 << 20, 2 << 20], &[]).await;
    let client = http_client();
    let one = &image.layers[0].digest;
    let mut requests = Vec::new();
    for _ in 0..16 {
        requests.push(
            client
                .get(torrent_url(&tracker, &registry, "test/img", one))
                .send(),
        );
    }
    // Different blobs go in parallel with the same burst.
    for l in &image.layers[1..] {
        requests.push(
            client
                .get(torrent_url(&tracker, &registry, "test/img", &l.digest))
                .send(),
        );
    }
    let responses = futures::future::join_all(requests).await;
    let mut hashes = std::collections::HashSet::new();
    for (i, r) in responses.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        if i < 16 {
            hashes.insert(r.bytes().await.unwrap());
        }
    }
    assert_eq!(hashes.len(), 1, "every caller gets the same torrent");
    assert_eq!(registry.blob_gets(one), 1, "single flight");
    for l in &image.layers[1..] {
        assert_eq!(registry.blob_gets(&l.digest), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn only_if_cached_never_fetches_but_joins_a_running_fetch() {
    // Upstream at 4 MiB/s: the fetch of the 8 MiB layer is still running when it is joined.
    let (registry, image, tracker) = setup(&[8 << 20], &["--upstream-rate", "4M"]).await;
    let client = http_client();
    let layer = &image.layers[0].digest;
    let url = torrent_url(&tracker, &registry, "test/img", layer);
    let held_only = || {
        client
            .get(&url)
            .header("cache-control", "max-age=0, only-if-cached")
            .send()
    };

    // Not held: 504 (RFC 9111 for only-if-cached with nothing stored), a registry-style
    // error naming the blob, and upstream asked for nothing but the access check.
    let r = held_only().await.unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains(layer.as_str()),
        "{body}"
    );
    assert_eq!(registry.blob_gets(layer), 0);
    assert_eq!(tracker.stats().await.unwrap()["upstream_fetches"], 0);

    // While a fetch runs, it waits for it and gets the same torrent.
    let (fetching, joined) = tokio::join!(client.get(&url).send(), async {
        registry.wait_blob_gets(layer, 1, TIMEOUT).await.unwrap();
        held_only().await.unwrap()
    });
    let fetching = fetching.unwrap();
    assert_eq!(fetching.status(), StatusCode::OK);
    assert_eq!(joined.status(), StatusCode::OK);
    assert_eq!(
        fetching.bytes().await.unwrap(),
        joined.bytes().await.unwrap()
    );
    assert_eq!(held_only().await.unwrap().status(), StatusCode::OK);
    assert_eq!(registry.blob_gets(layer), 1);
}

/// GET with the path exactly as given; returns (status, body).
async fn raw_get(tracker: &Tracker, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((tracker.ip(), tracker.port()))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_registry_errors() {
    let (registry, image, tracker) = setup(&[100_000], &[]).await;
    let client = http_client();
    let layer = &image.layers[0].digest;
    let json = |r: reqwest::Response| async move {
        let status = r.status();
        assert_eq!(r.headers()["content-type"], "application/json");
        (status, r.json::<serde_json::Value>().await.unwrap())
    };

    let r = client
        .get(format!(
            "{}/v1/torrents/evil.example:5000/test/img/blobs/{layer}",
            tracker.url()
        ))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert_eq!(body["errors"][0]["detail"]["registry"], "evil.example:5000");

    for (digest, code) in [
        ("sha256:1234", "DIGEST_INVALID"),
        ("md5:abcd", "DIGEST_INVALID"),
        (&format!("sha256:{}", "A".repeat(64)), "DIGEST_INVALID"),
    ] {
        let r = client
            .get(torrent_url(&tracker, &registry, "test/img", digest))
            .send()
            .await
            .unwrap();
        let (status, body) = json(r).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{digest}");
        assert_eq!(body["errors"][0]["code"], code, "{digest}");
    }
    // Sent raw: an HTTP client library would resolve the dot segments before sending.
    for name in [
        "Test/img",
        "test/%2e%2e/img",
        "test//img",
        "test/..",
        "/etc/passwd",
        "a%00b",
    ] {
        let path = format!("/v1/torrents/{}/{name}/blobs/{layer}", registry.authority());
        let (status, body) = raw_get(&tracker, &path).await;
        assert_eq!(status, 400, "{name}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_INVALID", "{name}");
    }

    // Unknown blob: upstream's 404 is passed back.
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = client
        .get(torrent_url(&tracker, &registry, "test/img", &missing))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Malformed announces get a bencoded failure, and the tracker keeps serving.
    for q in [
        "info_hash=abc&peer_id=12345678901234567890&port=1&uploaded=0&downloaded=0&left=0",
        "info_hash=12345678901234567890&peer_id=12345678901234567890&uploaded=0&downloaded=0&left=0",
        "info_hash=12345678901234567890&peer_id=12345678901234567890&port=0&uploaded=0&downloaded=0&left=0",
        "info_hash=12345678901234567890&peer_id=12345678901234567890&port=1&uploaded=0&downloaded=0&left=-1",
        "info_hash=12345678901234567890&peer_id=12345678901234567890&port=1&uploaded=0&downloaded=0&left=0&numwant=1e9",
        "",
    ] {
        let r = client
            .get(format!("{}/announce?{q}", tracker.url()))
            .send()
            .await
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert!(body.starts_with(b"d14:failure reason"), "{q}: {body:?}");
    }
    let ok = client
        .get(format!("{}/healthz", tracker.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_upstream_challenge_is_passed_back() {
    let registry = Registry::start(RegistryOptions {
        htpasswd: Some(("alice".into(), "s3cret".into())),
    })
    .await
    .unwrap();
    let image = Image::generate(&[500_000], 3).unwrap();
    image
        .push(&registry, "private/img:1", Some(("alice", "s3cret")))
        .await
        .unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let client = http_client();
    let url = torrent_url(&tracker, &registry, "private/img", &image.layers[0].digest);

    let anon = client.get(&url).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    let challenge = anon.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Basic"), "{challenge}");

    let wrong = client
        .get(&url)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let ok = client
        .get(&url)
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    // Held now, but still not handed to a caller upstream refuses.
    let anon = client.get(&url).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    assert!(!tracker.log_text().contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reseeds_verified_blobs_and_drops_bad_ones() {
    let (registry, image, mut tracker) = setup(&[2 << 20, 1 << 20], &[]).await;
    let client = http_client();
    let (a, b) = (&image.layers[0], &image.layers[1]);
    for l in [a, b] {
        let r = client
            .get(torrent_url(&tracker, &registry, "test/img", &l.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    tracker.kill();
    let blobs = tracker.data_dir().join("blobs");
    // Tamper with b on disk and leave a partial download behind.
    let b_path = blobs.join(b.digest.replace(':', "-"));
    let mut data = std::fs::read(&b_path).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&b_path, data).unwrap();
    std::fs::write(tracker.data_dir().join("tmp/leftover.part"), b"partial").unwrap();
    tracker.restart().await.unwrap();

    for l in [a, b] {
        let r = client
            .get(torrent_url(&tracker, &registry, "test/img", &l.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(
        registry.blob_gets(&a.digest),
        1,
        "a was re-seeded from disk"
    );
    assert_eq!(
        registry.blob_gets(&b.digest),
        2,
        "tampered b was fetched again"
    );
    assert_eq!(sha256_file(&b_path).unwrap(), b.digest);
    assert!(!tracker.data_dir().join("tmp/leftover.part").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_size_evicts_least_recently_requested() {
    let (registry, image, tracker) =
        setup(&[1 << 20, 1 << 20, 1 << 20], &["--cache-size", "2600K"]).await;
    let client = http_client();
    let get = |d: &str| {
        client
            .get(torrent_url(&tracker, &registry, "test/img", d))
            .send()
    };
    let [a, b, c] = [0, 1, 2].map(|i| image.layers[i].digest.clone());
    assert_eq!(get(&a).await.unwrap().status(), StatusCode::OK);
    assert_eq!(get(&b).await.unwrap().status(), StatusCode::OK);
    assert_eq!(get(&a).await.unwrap().status(), StatusCode::OK); // a is now the newer
    assert_eq!(get(&c).await.unwrap().status(), StatusCode::OK);
    let blobs = tracker.data_dir().join("blobs");
    let on_disk = |d: &str| blobs.join(d.replace(':', "-")).exists();
    assert!(on_disk(&a) && on_disk(&c));
    assert!(!on_disk(&b), "b was least recently requested");
    assert_eq!(get(&b).await.unwrap().status(), StatusCode::OK);
    assert_eq!(registry.blob_gets(&b), 2);
}

/// The info hash the tracker announces in its header, ours, aria2's and Transmission's agree.
#[tokio::test(flavor = "multi_thread")]
async fn standard_clients_agree_on_the_info_hash() {
    // 2 pieces exactly: the size librqbit's own torrent maker gets wrong.
    let (registry, image, tracker) = setup(&[512 * 1024 - 1536], &[]).await;
    let layer = &image.layers[0];
    assert_eq!(layer.size, 512 * 1024);
    let resp = http_client()
        .get(torrent_url(&tracker, &registry, "test/img", &layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let header = resp.headers()[bay_common::api::INFO_HASH_HEADER]
        .to_str()
        .unwrap()
        .to_string();
    let bytes = resp.bytes().await.unwrap();
    let ours = BlobTorrent::from_metainfo(&bytes).unwrap();
    assert_eq!(ours.piece_count(), 2);
    assert_eq!(ours.info_hash().to_hex(), header);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob.torrent");
    std::fs::write(&file, &bytes).unwrap();
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    let aria2 = run("aria2c", &["--show-files".as_ref(), file.as_os_str()]);
    assert!(aria2.contains(&format!("info hash: {header}")), "{aria2}");
    let transmission = run("transmission-show", &[file.as_os_str()]);
    assert!(
        transmission.contains(&format!("hash: {header}")),
        "{transmission}"
    );
}

/// Compact peers in an announce answer (6 bytes each), found by the `5:peers` key.
fn compact_peers(body: &[u8]) -> usize {
    let at = body
        .windows(7)
        .position(|w| w == b"5:peers")
        .expect("an announce answer lists peers")
        + 7;
    let digits: Vec<u8> = body[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    String::from_utf8(digits).unwrap().parse::<usize>().unwrap() / 6
}

/// Held blobs' bytes by info hash, for proxies' web seeds: ranges as asked, clear errors for
/// the rest; and bay-proxies (peer ids `-BY…`) are not handed the tracker's BitTorrent seed,
/// which other clients still get.
#[tokio::test(flavor = "multi_thread")]
async fn pieces_by_info_hash_and_no_bittorrent_seed_for_bay_proxies() {
    let (registry, image, tracker) = setup(&[1 << 20], &[]).await;
    let layer = &image.layers[0];
    let client = http_client();
    let bytes = client
        .get(torrent_url(&tracker, &registry, "test/img", &layer.digest))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let torrent = BlobTorrent::from_metainfo(&bytes).unwrap();
    let blob = image.blob_bytes(&layer.digest).unwrap();
    let url = format!(
        "{}/v1/pieces/{}",
        tracker.url(),
        torrent.info_hash().to_hex()
    );

    let r = client
        .get(&url)
        .header("range", "bytes=262144-524287")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 262144-524287/{}", layer.size).as_str()
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &blob[262_144..524_288]);
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], &blob[..]);

    let code = |v: serde_json::Value| v["errors"][0]["code"].as_str().unwrap().to_owned();
    let r = client
        .get(&url)
        .header("range", format!("bytes={}-", layer.size))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(code(r.json().await.unwrap()), "RANGE_INVALID");
    let r = client
        .get(format!("{}/v1/pieces/{}", tracker.url(), "0".repeat(40)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(code(r.json().await.unwrap()), "BLOB_UNKNOWN");
    let r = client
        .get(format!("{}/v1/pieces/not-hex", tracker.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("NAME_INVALID") && body.contains("not-hex"),
        "{body}"
    );

    let stats: serde_json::Value = client
        .get(format!("{}/v1/stats", tracker.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["piece_bytes_served"].as_u64().unwrap(),
        262_144 + layer.size,
        "{stats}"
    );

    let announce = |peer_id: &[u8; 20]| {
        let req = bay_common::announce::AnnounceRequest {
            info_hash: torrent.info_hash(),
            peer_id: bay_common::announce::PeerId(*peer_id),
            port: 40_000,
            uploaded: 0,
            downloaded: 0,
            left: layer.size,
            event: Some(bay_common::announce::Event::Started),
            compact: true,
            numwant: None,
            ip: None,
        };
        client
            .get(format!("{}/announce?{}", tracker.url(), req.to_query()))
            .send()
    };
    let bay = announce(b"-BY0100-abcdefghijkl").await.unwrap();
    assert_eq!(compact_peers(&bay.bytes().await.unwrap()), 0);
    let other = announce(b"-AR1360-abcdefghijkl").await.unwrap();
    assert_eq!(compact_peers(&other.bytes().await.unwrap()), 1);
}

/// `/announce?...` for `info_hash`, as a BitTorrent client asks.
fn announce_url(tracker: &Tracker, info_hash: &[u8; 20], port: u16, left: u64) -> String {
    let hash: String = info_hash.iter().map(|b| format!("%{b:02X}")).collect();
    let peer_id: String = (0..20)
        .map(|i| format!("%{:02X}", (port as usize + i) as u8))
        .collect();
    format!(
        "{}/announce?info_hash={hash}&peer_id={peer_id}&port={port}&uploaded=0&downloaded={}\
         &left={left}&compact=1",
        tracker.url(),
        100 - left.min(100)
    )
}

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// A flood of announces for made-up info hashes and ports: the tracker's memory stays flat
/// (swarms it did not make live in a small bounded set) and a real swarm is still answered
/// at once.
#[tokio::test(flavor = "multi_thread")]
async fn an_announce_flood_leaves_memory_flat_and_real_swarms_answered() {
    let (registry, image, tracker) = setup(&[300_000], &[]).await;
    let layer = &image.layers[0];
    let bytes = http_client()
        .get(torrent_url(&tracker, &registry, "test/img", &layer.digest))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let real = BlobTorrent::from_metainfo(&bytes).unwrap().info_hash().0;
    let pid = tracker.pid().unwrap();
    let flood = |rounds: u32| {
        let tasks = (0..8u32).map(|t| {
            let urls: Vec<String> = (0..rounds / 8)
                .map(|i| {
                    let hash: [u8; 20] = rand::random();
                    announce_url(&tracker, &hash, ((t * rounds + i) % 60_000 + 1) as u16, 100)
                })
                .collect();
            async move {
                let client = http_client();
                for url in urls {
                    let r = client.get(url).send().await.unwrap();
                    assert_eq!(r.status(), StatusCode::OK);
                    r.bytes().await.unwrap();
                }
            }
        });
        futures::future::join_all(tasks)
    };
    flood(20_000).await;
    let after_some = vm_rss(pid);
    flood(40_000).await;
    let after_more = vm_rss(pid);
    eprintln!(
        "tracker RSS after 20,000 made-up announces {} MiB, after 60,000 {} MiB",
        after_some >> 20,
        after_more >> 20
    );
    assert!(
        after_more <= after_some + (8 << 20),
        "memory grew from {after_some} to {after_more} bytes"
    );
    let stats: serde_json::Value = tracker.stats().await.unwrap();
    assert!(stats["swarms"].as_u64().unwrap() <= 4_097, "{stats}");

    // The real torrent: a seed, then a leecher with pieces that is handed that seed.
    let started = std::time::Instant::now();
    http_client()
        .get(announce_url(&tracker, &real, 40_001, 0))
        .send()
        .await
        .unwrap();
    let answer = http_client()
        .get(announce_url(&tracker, &real, 40_002, 50))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a real announce took {took:?}"
    );
    let ports = compact_peer_ports(&answer);
    assert!(
        ports.contains(&40_001),
        "the leecher was not handed the seed: {ports:?} in {answer:?}"
    );
}

/// The ports of the compact `peers` of a bencoded announce answer.
fn compact_peer_ports(answer: &[u8]) -> Vec<u16> {
    let at = answer
        .windows(7)
        .position(|w| w == b"5:peers")
        .expect("no peers key")
        + 7;
    let colon = at + answer[at..].iter().position(|b| *b == b':').unwrap();
    let len: usize = std::str::from_utf8(&answer[at..colon])
        .unwrap()
        .parse()
        .unwrap();
    answer[colon + 1..colon + 1 + len]
        .chunks(6)
        .map(|p| u16::from_be_bytes([p[4], p[5]]))
        .collect()
}

/// The torrent request at `url` offering pieces `held` of a blob of `size`, as `node`'s proxy
/// sends it.
async fn offer(node: &ExchangeNode, url: &str, size: u64, held: &str) -> reqwest::Response {
    node.client()
        .get(format!(
            "{url}?exchange={}&size={size}&held={held}",
            node.port
        ))
        .send()
        .await
        .unwrap()
}

/// Checks that `resp` is the torrent of `blob` and that the tracker keeps the right bytes.
async fn assert_right_blob(tracker: &Tracker, digest: &str, blob: &[u8], resp: reqwest::Response) {
    assert_eq!(resp.status(), StatusCode::OK, "{}", tracker.log_text());
    let torrent = BlobTorrent::from_metainfo(&resp.bytes().await.unwrap()).unwrap();
    let right = BlobTorrent::from_bytes(digest.parse().unwrap(), blob).unwrap();
    assert_eq!(torrent.info_hash(), right.info_hash());
    let kept = tracker.data_dir().join("blobs").join(torrent.file_name());
    assert_eq!(sha256_file(&kept).unwrap(), digest);
}

/// A tracker fetching a blob that nodes already hold part of (its first tracker died
/// mid-fetch) reads the pieces they offer from them and asks upstream, docker-registry here,
/// only for the rest: upstream sends the blob's tail once, in a 206.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_takes_the_pieces_nodes_offer_and_only_the_rest_from_upstream() {
    let (registry, image, tracker) = setup(&[8 << 20], &[]).await;
    let layer = &image.layers[0];
    let blob = image.blob_bytes(&layer.digest).unwrap();
    let pl = bay_common::torrent::piece_length_for(layer.size) as u64;
    // Two nodes: one holds pieces 0-11, the other 8-19 (pieces both hold are read from
    // either).
    let a = ExchangeNode::start(blob.clone(), &[0..=11], false).await;
    let b = ExchangeNode::start(blob.clone(), &[8..=19], false).await;
    let url = torrent_url(&tracker, &registry, "test/img", &layer.digest);

    // A malformed offer is refused with the offending value, and fetches nothing.
    let r = offer(&a, &url, layer.size, "5-2").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().await.unwrap();
    assert!(body.contains("held=5-2"), "{body}");
    assert_eq!(registry.blob_gets(&layer.digest), 0);

    // As after the first tracker died mid-fetch: a's request starts the fetch, b's joins it a
    // moment later, and the fetch reads what either holds, in order.
    let (ra, rb) = tokio::join!(offer(&a, &url, layer.size, "0-11"), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        offer(&b, &url, layer.size, "8-19").await
    });
    assert_right_blob(&tracker, &layer.digest, &blob, ra).await;
    assert_right_blob(&tracker, &layer.digest, &blob, rb).await;

    let scrape = bay_tests::Scrape::of(&tracker.url()).await.unwrap();
    let from_nodes = scrape.value("bay_node_bytes_total") as u64;
    let from_upstream = scrape.value("bay_upstream_bytes_total") as u64;
    let gets = registry.blob_get_answers(&layer.digest);
    eprintln!(
        "from nodes {from_nodes} (a {}, b {}), from upstream {from_upstream}, registry's answers {gets:?}",
        a.served(),
        b.served()
    );
    assert!(
        from_nodes >= 12 * pl,
        "the tracker took only {from_nodes} bytes from the nodes: {}",
        tracker.log_text()
    );
    assert_eq!(a.served() + b.served(), from_nodes);
    assert!(b.served() > 0, "b's offer was never used");
    assert_eq!(from_nodes + from_upstream, layer.size);
    // Upstream's own count: the tail, in a 206.
    assert_eq!(gets, vec![(206, from_upstream)]);
}

/// Nodes that offer wrong bytes cost a second fetch, never a wrong blob: the digest catches
/// them and upstream sends the whole blob again.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_nodes_offer_are_caught_and_the_blob_fetched_again() {
    let (registry, image, tracker) = setup(&[4 << 20], &[]).await;
    let layer = &image.layers[0];
    let blob = image.blob_bytes(&layer.digest).unwrap();
    let liar = ExchangeNode::start(blob.clone(), &[0..=7], true).await;
    let url = torrent_url(&tracker, &registry, "test/img", &layer.digest);
    let r = offer(&liar, &url, layer.size, "0-7").await;
    assert_right_blob(&tracker, &layer.digest, &blob, r).await;
    let pl = bay_common::torrent::piece_length_for(layer.size) as u64;
    assert_eq!(liar.served(), 8 * pl, "the offered pieces were never read");
    // The tail after the nodes' pieces, then the whole blob again.
    assert_eq!(
        registry.blob_get_answers(&layer.digest),
        vec![(206, layer.size - 8 * pl), (200, layer.size)]
    );
    assert!(
        tracker.log_text().contains("failed its check"),
        "{}",
        tracker.log_text()
    );
}

/// A piece that was on its way to a node when the first tracker died is held by none: the
/// fetch asks upstream for that gap alone and goes on with the nodes' pieces after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_gap_between_offered_pieces_comes_from_upstream_alone() {
    let (registry, image, tracker) = setup(&[8 << 20], &[]).await;
    let layer = &image.layers[0];
    let blob = image.blob_bytes(&layer.digest).unwrap();
    let pl = bay_common::torrent::piece_length_for(layer.size) as u64;
    let node = ExchangeNode::start(blob.clone(), &[0..=5, 10..=19], false).await;
    let url = torrent_url(&tracker, &registry, "test/img", &layer.digest);
    let r = offer(&node, &url, layer.size, "0-5,10-19").await;
    assert_right_blob(&tracker, &layer.digest, &blob, r).await;
    assert_eq!(node.served(), 16 * pl);
    // Upstream: pieces 6-9, then everything from piece 20 on, each a 206.
    assert_eq!(
        registry.blob_get_answers(&layer.digest),
        vec![(206, 4 * pl), (206, layer.size - 20 * pl)]
    );
}

/// Offers that come after upstream began to send are taken too: in a warm pull whose tracker
/// hung, the node whose request started the other tracker's fetch may hold nothing while the
/// next ones hold pieces. Upstream's stream is left at the first boundary whose piece a node
/// offers and taken up again after the nodes' pieces, in a 206.
#[tokio::test(flavor = "multi_thread")]
async fn offers_that_come_after_the_fetch_began_are_taken_too() {
    let (registry, image, tracker) = setup(&[16 << 20], &["--upstream-rate", "2M"]).await;
    let layer = &image.layers[0];
    let blob = image.blob_bytes(&layer.digest).unwrap();
    let pl = bay_common::torrent::piece_length_for(layer.size) as u64;
    let node = ExchangeNode::start(blob.clone(), &[16..=47], false).await;
    let url = torrent_url(&tracker, &registry, "test/img", &layer.digest);
    // The first request offers nothing and starts the fetch; the node's offer comes while
    // upstream still sends the first of the 16 pieces before the offered ones (2 s of them).
    let (first, late) = tokio::join!(http_client().get(&url).send(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        offer(&node, &url, layer.size, "16-47").await
    });
    assert_right_blob(&tracker, &layer.digest, &blob, first.unwrap()).await;
    assert_right_blob(&tracker, &layer.digest, &blob, late).await;

    let scrape = bay_tests::Scrape::of(&tracker.url()).await.unwrap();
    let from_nodes = scrape.value("bay_node_bytes_total") as u64;
    let gets = registry.blob_get_answers(&layer.digest);
    eprintln!(
        "from nodes {from_nodes}, from upstream {}, registry's answers {gets:?}",
        scrape.value("bay_upstream_bytes_total")
    );
    assert_eq!(from_nodes, 32 * pl, "{}", tracker.log_text());
    assert_eq!(node.served(), 32 * pl);
    // The whole blob asked for first and left at piece 16; after the nodes' pieces, the rest.
    assert_eq!(gets.first().map(|g| g.0), Some(200), "{gets:?}");
    assert_eq!(gets.last(), Some(&(206, layer.size - 48 * pl)), "{gets:?}");
    assert_eq!(gets.len(), 2, "{gets:?}");
}

/// An offer of a size upstream's HEAD does not confirm is ignored: the size would set what the
/// fetch reserves for piece hashes (a caller's `size=18446744073709551615` aborted an earlier
/// build), and its pieces cannot be the blob's.
#[tokio::test(flavor = "multi_thread")]
async fn an_offer_of_another_size_is_ignored() {
    let (registry, image, tracker) = setup(&[2 << 20], &[]).await;
    let layer = &image.layers[0];
    let blob = image.blob_bytes(&layer.digest).unwrap();
    let node = ExchangeNode::start(blob, &[0..=3], false).await;
    let url = torrent_url(&tracker, &registry, "test/img", &layer.digest);
    for size in [u64::MAX, layer.size + 1] {
        let r = offer(&node, &url, size, "0-0").await;
        assert_eq!(r.status(), StatusCode::OK, "{}", tracker.log_text());
    }
    assert_eq!(node.served(), 0);
    assert_eq!(
        registry.blob_get_answers(&layer.digest),
        vec![(200, layer.size)]
    );
}

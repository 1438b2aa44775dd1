//! Preheating against a real docker-registry: the tracker resolves an image (a multi-platform
//! index included), fetches and seeds every blob, and a later pull through a proxy costs the
//! registry no blob GET at all. Refusals are relayed; docker-registry's own push
//! notifications start preheats.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use bay_tests::{
    Image, Proxy, Registry, RegistryOptions, Service, Tracker, free_port, http_client, loopback_ip,
    run_with_timeout, sha256_file,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// `POST /v1/preheat` with `{"image": image}`; returns (status, headers, JSON body).
async fn preheat(
    tracker: &Tracker,
    image: &str,
    creds: Option<(&str, &str)>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = http_client()
        .post(format!("{}/v1/preheat", tracker.url()))
        .json(&json!({ "image": image }));
    if let Some((user, password)) = creds {
        req = req.basic_auth(user, Some(password));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

async fn get_json(url: &str) -> (StatusCode, Value) {
    let resp = http_client().get(url).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap_or(Value::Null))
}

/// Polls the job at `location` until it has finished; returns its last status.
async fn wait_finished(tracker: &Tracker, location: &str) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = get_json(&format!("{}{location}", tracker.url())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["state"] == "done" || body["state"] == "failed" {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "preheat not finished after {TIMEOUT:?}: {body}\n{}",
            tracker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a preheat that must be accepted and waits until it is done.
async fn preheat_done(tracker: &Tracker, image: &str) -> Value {
    let (status, headers, body) = preheat(tracker, image, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let location = headers["location"].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!("/v1/preheat/{}", body["id"].as_str().unwrap())
    );
    let done = wait_finished(tracker, &location).await;
    assert_eq!(done["state"], "done", "{done}\n{}", tracker.log_text());
    done
}

async fn tracker_stats(tracker: &Tracker) -> Value {
    get_json(&format!("{}/v1/stats", tracker.url())).await.1
}

fn held_by_tracker(tracker: &Tracker, digest: &str) -> bool {
    tracker
        .data_dir()
        .join("blobs")
        .join(digest.replace(':', "-"))
        .is_file()
}

/// `skopeo copy` of one platform of `reference` through `authority` into `dest`.
async fn skopeo_pull_platform(authority: &str, reference: &str, arch: &str, dest: &Path) {
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "--override-os",
        "linux",
        "--override-arch",
        arch,
        "copy",
        "--retry-times=0",
        "--src-tls-verify=false",
        "--src-no-creds",
    ]);
    cmd.arg(format!("docker://{authority}/{reference}"));
    cmd.arg(format!("dir:{}", dest.display()));
    let out = run_with_timeout(&mut cmd, TIMEOUT).await.unwrap();
    assert!(
        out.status.success(),
        "skopeo pull of {arch}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every blob of `image` is in the `dir:` copy and matches its digest.
fn check_dir_copy(dir: &Path, image: &Image) {
    for blob in image.layers.iter().chain([&image.config]) {
        let path = dir.join(blob.digest.trim_start_matches("sha256:"));
        assert_eq!(sha256_file(&path).unwrap(), blob.digest);
    }
}

/// Pushes `images` as one tag each, then an OCI index of them (amd64, arm64, ...) as `tag`;
/// returns the index digest.
async fn push_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
    images: &[(&Image, &str)],
) -> String {
    let mut manifests = Vec::new();
    for (image, arch) in images {
        image
            .push(registry, &format!("{repo}:{arch}"), None)
            .await
            .unwrap();
        manifests.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest.digest,
            "size": image.manifest.size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .unwrap();
    let resp = http_client()
        .put(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
        .header("content-type", OCI_INDEX)
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "{:?}",
        resp.text().await
    );
    bay_common::Digest::sha256_of(&index).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn preheated_index_is_pulled_without_upstream_blob_gets() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    // Same seed and first layer size: the two platforms share their first layer.
    let amd64 = Image::generate(&[3 << 20, 300_000], 21).unwrap();
    let arm64 = Image::generate(&[3 << 20, 500_000], 21).unwrap();
    assert_eq!(amd64.layers[0], arm64.layers[0]);
    let index_digest = push_index(
        &registry,
        "test/multi",
        "1",
        &[(&amd64, "amd64"), (&arm64, "arm64")],
    )
    .await;
    let mut blobs: Vec<_> = [&amd64, &arm64]
        .iter()
        .flat_map(|i| i.layers.iter().chain([&i.config]))
        .cloned()
        .collect();
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    blobs.dedup();
    assert_eq!(blobs.len(), 5);
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();

    let image = format!("{}/test/multi:1", registry.authority());
    let (status, headers, body) = preheat(&tracker, &image, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["image"], image);
    assert_eq!(body["digest"], index_digest);
    assert!(
        ["resolving", "fetching", "done"].contains(&body["state"].as_str().unwrap()),
        "{body}"
    );
    // A proxy's torrent request while the job runs joins its flight.
    let shared = &amd64.layers[0].digest;
    let resp = http_client()
        .get(format!(
            "{}/v1/torrents/{}/test/multi/blobs/{shared}",
            tracker.url(),
            registry.authority()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let done = wait_finished(&tracker, headers["location"].to_str().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}\n{}", tracker.log_text());
    assert_eq!(done["blobs_total"], 5, "deduplicated: {done}");
    assert_eq!(done["blobs_done"], 5, "{done}");
    let bytes: u64 = blobs.iter().map(|b| b.size).sum();
    assert_eq!(done["bytes_total"], bytes);
    assert_eq!(done["bytes_done"], bytes);
    assert_eq!(done["errors"], json!([]));

    // The tracker holds and seeds every blob, each fetched from upstream once.
    let stats = tracker_stats(&tracker).await;
    assert_eq!(stats["blobs_held"], 5, "{stats}");
    for b in &blobs {
        assert!(
            held_by_tracker(&tracker, &b.digest),
            "{} not held",
            b.digest
        );
        assert_eq!(registry.blob_gets(&b.digest), 1, "{}", b.digest);
    }
    // Platform manifests were read by digest.
    let log = registry.access_log();
    for m in [&amd64.manifest, &arm64.manifest] {
        let path = format!("/v2/test/multi/manifests/{}", m.digest);
        assert!(
            log.iter()
                .any(|e| e.method == "GET" && e.uri == path && e.status == 200),
            "{path} not fetched"
        );
    }

    // Both platforms pulled through a proxy: not one blob GET reaches the registry.
    let before = registry.access_log().len();
    let proxy = Proxy::start(&[tracker.url()], &registry.url(), &[])
        .await
        .unwrap();
    for (image, arch) in [(&amd64, "amd64"), (&arm64, "arm64")] {
        let out = tempfile::tempdir().unwrap();
        skopeo_pull_platform(&proxy.authority(), "test/multi:1", arch, out.path()).await;
        check_dir_copy(out.path(), image);
    }
    let after = registry.access_log();
    let blob_gets: Vec<_> = after[before..]
        .iter()
        .filter(|e| e.method == "GET" && e.uri.contains("/blobs/"))
        .collect();
    assert!(
        blob_gets.is_empty(),
        "blob GETs after the preheat: {blob_gets:?}"
    );
    for b in &blobs {
        assert_eq!(registry.blob_gets(&b.digest), 1, "{}", b.digest);
    }
    let s = proxy.wait_held(5, TIMEOUT).await.unwrap();
    assert_eq!(s["fallbacks"], 0, "{s}");

    // Preheating again finds everything held: done, still no blob GET.
    let again = preheat_done(
        &tracker,
        &format!("{}/test/multi@{index_digest}", registry.authority()),
    )
    .await;
    assert_eq!(again["blobs_done"], 5, "{again}");
    for b in &blobs {
        assert_eq!(registry.blob_gets(&b.digest), 1, "{}", b.digest);
    }
    let (status, list) = get_json(&format!("{}/v1/preheat", tracker.url())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_preheats_get_registry_errors_and_upstream_refusals() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[200_000], 5).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let reg = registry.authority();

    let (status, _, body) = preheat(&tracker, "evil.example:5000/test/img:1", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert_eq!(body["errors"][0]["detail"]["registry"], "evil.example:5000");

    // Upstream's 404 comes back as upstream wrote it.
    let (status, headers, body) = preheat(&tracker, &format!("{reg}/test/img:nope"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(headers["content-type"].to_str().unwrap().contains("json"));
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN", "{body}");

    for (image, code) in [
        ("no-registry", "NAME_INVALID"),
        (&format!("{reg}/Test/img:1") as &str, "NAME_INVALID"),
        (&format!("{reg}/test/img:bad/tag"), "NAME_INVALID"),
        (&format!("{reg}/test/img@sha256:1234"), "DIGEST_INVALID"),
    ] {
        let (status, _, body) = preheat(&tracker, image, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{image}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{image}: {body}");
    }
    let resp = http_client()
        .post(format!("{}/v1/preheat", tracker.url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_INVALID");

    let (status, body) =
        get_json(&format!("{}/v1/preheat/{}", tracker.url(), "0".repeat(32))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");

    // By digest, a single-platform manifest: its config and layer.
    let done = preheat_done(
        &tracker,
        &format!("{reg}/test/img@{}", image.manifest.digest),
    )
    .await;
    assert_eq!(done["blobs_total"], 2, "{done}");
    assert_eq!(done["digest"], image.manifest.digest);
    assert_eq!(registry.blob_gets(&image.layers[0].digest), 1);
    assert_eq!(registry.blob_gets(&image.config.digest), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_challenge_is_relayed_and_credentials_used() {
    let registry = Registry::start(RegistryOptions {
        htpasswd: Some(("alice".into(), "s3cret".into())),
    })
    .await
    .unwrap();
    let image = Image::generate(&[300_000], 9).unwrap();
    image
        .push(&registry, "private/img:1", Some(("alice", "s3cret")))
        .await
        .unwrap();
    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let name = format!("{}/private/img:1", registry.authority());

    let (status, headers, _) = preheat(&tracker, &name, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Basic"), "{challenge}");
    let (status, _, _) = preheat(&tracker, &name, Some(("alice", "wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(tracker_stats(&tracker).await["blobs_held"], 0);

    let (status, headers, body) = preheat(&tracker, &name, Some(("alice", "s3cret"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let done = wait_finished(&tracker, headers["location"].to_str().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["blobs_done"], 2);
    assert_eq!(tracker_stats(&tracker).await["blobs_held"], 2);
    assert!(!tracker.log_text().contains("s3cret"));
}

/// A `docker-registry` configured to notify the tracker of every push, on `ip:port`.
async fn notifying_registry(
    ip: std::net::Ipv4Addr,
    port: u16,
    endpoint: &str,
) -> (Service, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {data:?}\n\
         http:\n  addr: \"{ip}:{port}\"\n  secret: bay-tests\n\
         notifications:\n  endpoints:\n    - name: bay\n      url: {endpoint:?}\n      \
         timeout: 5s\n      threshold: 3\n      backoff: 1s\n      \
         ignoredmediatypes:\n        - application/octet-stream\n"
    );
    let path = dir.path().join("config.yml");
    std::fs::write(&path, config).unwrap();
    let mut service = Service::spawn(
        "docker-registry-notifying",
        "docker-registry",
        [OsStr::new("serve"), path.as_os_str()],
        std::iter::empty::<(&str, &str)>(),
    )
    .unwrap();
    service
        .wait_http_ok(&format!("http://{ip}:{port}/v2/"), TIMEOUT)
        .await
        .unwrap();
    (service, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_push_notifications_start_preheats() {
    let ip = loopback_ip();
    let port = free_port(ip);
    let authority = format!("{ip}:{port}");
    let tracker = Tracker::start(&[format!("http://{authority}")], &[])
        .await
        .unwrap();
    let (registry, _dir) =
        notifying_registry(ip, port, &format!("{}/v1/notifications", tracker.url())).await;
    let image = Image::generate(&[1 << 20, 100_000], 33).unwrap();
    image
        .push_to(&authority, "test/hook:1", None)
        .await
        .unwrap();

    // The registry sends the manifest push; the tracker preheats the image by digest.
    let want = format!("{authority}/test/hook@{}", image.manifest.digest);
    let deadline = Instant::now() + TIMEOUT;
    let job = loop {
        let (_, list) = get_json(&format!("{}/v1/preheat", tracker.url())).await;
        let job = list
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["image"] == want.as_str())
            .cloned();
        if let Some(j) = job.filter(|j| j["state"] == "done" || j["state"] == "failed") {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "no finished preheat of {want}: {list}\nregistry:\n{}\ntracker:\n{}",
            registry.log_tail(30),
            tracker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["blobs_done"], 3, "{job}");
    for b in image.layers.iter().chain([&image.config]) {
        assert!(
            held_by_tracker(&tracker, &b.digest),
            "{} not held",
            b.digest
        );
    }

    // Pushes to registries outside the allowlist are ignored, not fetched.
    let foreign = json!({"events": [{
        "action": "push",
        "target": {
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest.digest,
            "repository": "test/hook",
            "url": format!("http://evil.example:5000/v2/test/hook/manifests/{}", image.manifest.digest),
        },
        "request": {"host": "evil.example:5000"},
    }]});
    let resp = http_client()
        .post(format!("{}/v1/notifications", tracker.url()))
        .header(
            "content-type",
            "application/vnd.docker.distribution.events.v1+json",
        )
        .body(foreign.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["preheats"], json!([]));
}

//! Logs that tools can read: text without colour codes when written to a file or a pipe, and
//! `--log-format json` with one object per line whose fields include the blob line's digest,
//! size, time and bytes by source.

use std::time::Duration;

use bay_tests::{Image, Proxy, Registry, RegistryOptions, Service, Tracker, bin_path, http_client};

/// A tracker started without NO_COLOR and with its output to a file writes no ANSI escapes.
#[tokio::test(flavor = "multi_thread")]
async fn text_logs_to_a_file_carry_no_colour_codes() {
    let data = tempfile::tempdir().unwrap();
    let ip = bay_tests::loopback_ip();
    let port = bay_tests::free_port(ip);
    let args = [
        "--listen".to_owned(),
        format!("{ip}:{port}"),
        "--peer-port".to_owned(),
        bay_tests::free_port(ip).to_string(),
        "--data-dir".to_owned(),
        data.path().display().to_string(),
        "--upstream".to_owned(),
        "http://127.0.0.1:9".to_owned(),
    ];
    let mut tracker = Service::spawn(
        "bay-tracker",
        bin_path("bay-tracker"),
        &args,
        [("RUST_LOG", "info")],
    )
    .unwrap();
    tracker
        .wait_http_ok(
            &format!("http://{ip}:{port}/healthz"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let log = tracker.log_text();
    assert!(log.contains("bay-tracker listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log:?}"
    );
}

/// With `--log-format json` every line the proxy and the tracker write is a JSON object, and
/// the lines for a blob (downloaded from the swarm, fetched from upstream) have its figures and
/// its digest as fields.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_have_the_blob_line_as_fields() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[1 << 20], 51).unwrap();
    image.push(&registry, "test/logs:1", None).await.unwrap();
    let layer = image.layers[0].clone();
    let tracker = Tracker::start(&[registry.url()], &["--log-format", "json"])
        .await
        .unwrap();
    let proxy = Proxy::start(
        &[tracker.url()],
        &registry.url(),
        &["--log-format", "json", "--prefetch", "false"],
    )
    .await
    .unwrap();
    let r = http_client()
        .get(format!(
            "{}/v2/test/logs/blobs/{}",
            proxy.url(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    proxy.wait_held(1, Duration::from_secs(30)).await.unwrap();

    let v = json_line(&proxy.log_text(), "blob downloaded from the swarm");
    assert_eq!(v["size"], layer.size, "{v}");
    assert!(v["elapsed_ms"].is_u64(), "{v}");
    assert_eq!(
        v["from_trackers"].as_u64().unwrap() + v["from_peers"].as_u64().unwrap(),
        layer.size,
        "{v}"
    );
    let spans = v["spans"]
        .as_array()
        .unwrap_or_else(|| panic!("no spans: {v}"));
    assert!(
        spans
            .iter()
            .any(|s| s["digest"] == layer.digest.as_str() && s["repo"] == "test/logs"),
        "the digest and repository are not fields: {v}"
    );

    let v = json_line(
        &tracker.log_text(),
        "fetched and verified blob from upstream",
    );
    assert_eq!(v["size"], layer.size, "{v}");
    assert!(
        v["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["digest"] == layer.digest.as_str())),
        "the tracker's digest is not a field: {v}"
    );
}

/// Checks that every line of `log` is a JSON object with a timestamp and a level, and returns
/// the one whose message is `message`.
fn json_line(log: &str, message: &str) -> serde_json::Value {
    let mut found = None;
    for line in log.lines().filter(|l| !l.starts_with("==== bay-tests")) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"] == message {
            found = Some(v);
        }
    }
    found.unwrap_or_else(|| panic!("no {message:?} line in:\n{log}"))
}

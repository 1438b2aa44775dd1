//! Bad command lines get a one-line error naming the offending value, and a non-zero exit.

use std::process::Command;

use bay_tests::bin_path;

fn fails_naming(bin: &str, args: &[&str], needle: &str) {
    let out = Command::new(bin_path(bin))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{bin} {args:?} succeeded");
    let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(
        first.contains(needle),
        "{bin} {args:?}: first line {first:?} does not name {needle:?}; stderr:\n{err}"
    );
}

#[test]
fn bad_flags_name_the_value() {
    fails_naming("bay-tracker", &["--cache-size", "12Q"], "12Q");
    fails_naming(
        "bay-tracker",
        &["--upstream", "ftp://x.example"],
        "ftp://x.example",
    );
    fails_naming("bay-tracker", &["--listen", "nowhere"], "nowhere");
    fails_naming(
        "bay-proxy",
        &["--upstream", "http://a.example/path"],
        "http://a.example/path",
    );
    fails_naming("bay-proxy", &["--stall-timeout", "soon"], "soon");
    fails_naming("bay-proxy", &["--upstream-timeout", "0"], "\"0\"");
    fails_naming("bay-tracker", &["--upstream-timeout", "later"], "later");
    fails_naming("bay-tracker", &["--tcp-congestion", "cu-bic"], "cu-bic");
    fails_naming("bay-proxy", &["--log-format", "xml"], "xml");
    fails_naming("bay-proxy", &["--tracker", "not a url"], "not a url");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    fails_naming(
        "bay-proxy",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--default-upstream",
            "ghcr.io",
        ],
        "ghcr.io",
    );
    // A well-formed name the kernel does not have fails at start, before anything is served.
    fails_naming(
        "bay-tracker",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--tcp-congestion",
            "no_such_cc",
        ],
        "no_such_cc",
    );
}

#[test]
fn occupied_port_is_named() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    fails_naming(
        "bay-tracker",
        &["--listen", &addr, "--data-dir", &data],
        &addr,
    );
}

/// An unprivileged tracker may use only what `net.ipv4.tcp_allowed_congestion_control` lists
/// (Reno always is): with the default `--tcp-congestion cubic,reno` it takes CUBIC where that
/// is allowed and Reno where not, and with `cubic` alone where CUBIC is not allowed it refuses
/// to start, saying so. Run as uid 65534 through `setpriv`, which needs root.
#[test]
fn an_unprivileged_tracker_takes_the_first_congestion_control_it_may_use() {
    use std::os::unix::fs::PermissionsExt;
    let test = "an_unprivileged_tracker_takes_the_first_congestion_control_it_may_use";
    let Some(setpriv) = bay_tests::find_program("/usr/bin/setpriv", "setpriv") else {
        return bay_tests::skip(test, "setpriv (util-linux) is not installed");
    };
    if !std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        return bay_tests::skip(test, "dropping privileges needs root");
    }
    let allowed =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control").unwrap();
    let cubic_allowed = allowed.split_whitespace().any(|n| n == "cubic");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ip = bay_tests::loopback_ip();
    let tracker = |congestion: &str| {
        let args: Vec<String> = [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            &bin_path("bay-tracker").display().to_string(),
            "--listen",
            &format!("{ip}:{}", bay_tests::free_port(ip)),
            "--peer-port",
            &bay_tests::free_port(ip).to_string(),
            "--data-dir",
            &dir.path().display().to_string(),
            "--tcp-congestion",
            congestion,
        ]
        .map(String::from)
        .to_vec();
        bay_tests::Service::spawn("tracker-nobody", &setpriv, args, [("RUST_LOG", "info")]).unwrap()
    };

    let mut default = tracker("cubic,reno");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let listening = loop {
        let log = default.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("bay-tracker listening")) {
            break line.to_owned();
        }
        assert!(default.is_running(), "it exited: {log}");
        assert!(
            std::time::Instant::now() < deadline,
            "never listened: {log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let want = if cubic_allowed { "cubic" } else { "reno" };
    assert!(
        listening.contains(&format!("tcp_congestion={want}")),
        "allowed: {allowed:?}; {listening}"
    );
    default.kill();

    if !cubic_allowed {
        let mut only = tracker("cubic");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while only.is_running() {
            assert!(std::time::Instant::now() < deadline, "{}", only.log_text());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let log = only.log_text();
        assert!(
            log.contains("cubic: not in net.ipv4.tcp_allowed_congestion_control"),
            "{log}"
        );
    }
}

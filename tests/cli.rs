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

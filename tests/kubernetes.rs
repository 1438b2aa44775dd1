//! The Kubernetes manifests in `deploy/kubernetes/` are valid objects for the Kubernetes API:
//! checked with `kubernetes-validate` (PyPI), which holds the API's published schemas, in
//! strict mode (no unknown fields). A manifest with a misspelt field must fail the same check,
//! so the check is known to look. What it cannot check, it does not claim: the manifests are
//! not applied to a cluster here, so scheduling, probes against a running pod and the init
//! container's script are untested (the script's output format is checked below).

use std::path::{Path, PathBuf};
use std::process::Command;

use bay_tests::{find_program, skip};

/// The Kubernetes release validated against.
const KUBERNETES: &str = "1.30.0";

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(validator: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(validator)
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn kubernetes_manifests_are_valid_objects() {
    let Some(validator) = find_program("kubernetes-validate", "kubernetes-validate") else {
        skip(
            "kubernetes manifests test",
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
        return;
    };
    let files = manifests();
    assert!(files.len() >= 4, "{files:?}");
    let (ok, out) = validate(&validator, &files);
    assert!(ok, "{out}");
    for kind in [
        "namespace/bay",
        "configmap/bay",
        "service/bay-tracker",
        "statefulset/bay-tracker",
        "daemonset/bay-proxy",
    ] {
        assert!(
            out.contains(&format!("passed for resource {kind}")),
            "{kind} was not validated:\n{out}"
        );
    }

    // The same check refuses a field the API does not know.
    let dir = tempfile::tempdir().unwrap();
    let proxy = files.iter().find(|f| f.ends_with("30-proxy.yaml")).unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(proxy).unwrap();
    assert!(text.contains("containerPort:"));
    std::fs::write(&broken, text.replace("containerPort:", "containerport:")).unwrap();
    let (ok, out) = validate(&validator, &[broken]);
    assert!(!ok, "a misspelt field passed:\n{out}");
}

/// The grace periods leave room for the services' own drain, and the proxy's init container
/// writes the hosts.toml containerd expects for each upstream.
#[test]
fn kubernetes_manifests_agree_with_the_services() {
    let read = |name: &str| {
        let path = manifests().into_iter().find(|f| f.ends_with(name)).unwrap();
        std::fs::read_to_string(path).unwrap()
    };
    let value = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                let rest = l.trim().strip_prefix(key)?.trim();
                rest.trim_matches('"').parse().ok()
            })
            .unwrap_or_else(|| panic!("{key} missing"))
    };
    let drain = value(&read("10-config.yaml"), "BAY_DRAIN_TIMEOUT:");
    for (file, after_drain) in [("20-tracker.yaml", 2 + 1), ("30-proxy.yaml", 2 + 2 + 2)] {
        let grace = value(&read(file), "terminationGracePeriodSeconds:");
        assert!(
            grace >= drain + after_drain,
            "{file}: {grace} s of grace for a {drain} s drain"
        );
    }

    // Prometheus scrapes each pod where the service serves its metrics on every interface:
    // the tracker's API, the proxy's metrics address (its registry API is on loopback only).
    let env_port = |text: &str, var: &str| -> u64 {
        let mut lines = text
            .lines()
            .skip_while(|l| !l.contains(&format!("name: {var}")));
        lines.next().unwrap_or_else(|| panic!("{var} missing"));
        let v = lines
            .next()
            .unwrap()
            .trim()
            .strip_prefix("value:")
            .unwrap()
            .trim();
        let v = v.trim_matches('"');
        assert!(
            v.starts_with("0.0.0.0:"),
            "{var} = {v} is not on every interface"
        );
        v.rsplit(':').next().unwrap().parse().unwrap()
    };
    for (file, var) in [
        ("20-tracker.yaml", "BAY_LISTEN"),
        ("30-proxy.yaml", "BAY_METRICS_LISTEN"),
    ] {
        let text = read(file);
        assert_eq!(
            value(&text, "prometheus.io/port:"),
            env_port(&text, var),
            "{file}: the scrape port is not where {var} serves /metrics"
        );
        assert!(text.contains("prometheus.io/path: /metrics"), "{file}");
    }

    // Run the init container's script on two upstreams into a scratch directory.
    let proxy = read("30-proxy.yaml");
    let script: String = proxy
        .split("            - |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("              ") || l.is_empty())
        .map(|l| l.strip_prefix("              ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let scratch = tempfile::tempdir().unwrap();
    let script = script.replace("chown 10001:10001 /cache", "true").replace(
        "/certs.d",
        &scratch.path().join("certs.d").display().to_string(),
    );
    let out = Command::new("bash")
        .args(["-ceu", &script])
        .env("BAY_UPSTREAM", "registry-1.docker.io,http://10.0.0.9:5000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let hosts = |name: &str| {
        std::fs::read_to_string(scratch.path().join("certs.d").join(name).join("hosts.toml"))
            .unwrap()
    };
    let docker = hosts("docker.io");
    assert!(
        docker.contains("server = \"https://registry-1.docker.io\""),
        "{docker}"
    );
    assert!(
        docker.contains("[host.\"http://127.0.0.1:5000\"]"),
        "{docker}"
    );
    assert!(
        docker.contains("capabilities = [\"pull\", \"resolve\"]"),
        "{docker}"
    );
    let local = hosts("10.0.0.9:5000");
    assert!(
        local.contains("server = \"http://10.0.0.9:5000\""),
        "{local}"
    );
}

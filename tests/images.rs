//! The container images of `docker/`: both targets of `docker/Dockerfile` are built in a
//! private `dockerd` from the workspace's binaries, then a tracker and a proxy container run
//! with `--network host` on loopback addresses, and skopeo pulls an image through the proxy
//! container: every blob intact, each sent by the registry once, the proxy's from the swarm.
//! Both containers must report healthy through the images' own HEALTHCHECK, and the tracker
//! must run as a non-root user.
//!
//! The private daemon starts empty and cannot pull `debian:bookworm-slim`, so the base is made
//! from Debian packages: `debootstrap --variant=minbase --include=ca-certificates bookworm`
//! from the mirror apt uses, `docker import`ed as `bay-test-base:bookworm`. It already has
//! ca-certificates and libssl3, so the Dockerfile runs no apt and the build has no network.
//! debootstrap takes a minute or two and downloads ~50 MB; the root filesystem is cached as
//! `target/bay-test-cache/bookworm-minbase.tar` (~130 MB) for later runs (delete it to renew).
//!
//! Needs root and Debian's `docker.io`, and `debootstrap` while the cache is empty. Where
//! Docker or debootstrap is not installed, or apt has no bookworm source, the test prints
//! `SKIPPED: image test: <reason>` and returns (under `CI=true` it fails instead); where Docker
//! is installed but dockerd cannot start, it fails.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bay_tests::{
    Dockerd, Image, Registry, RegistryOptions, bin_path, free_port, http_client, loopback_ip,
    run_with_timeout, sha256_file, skip, skopeo_pull, wait_http_ok,
};

const SUITE: &str = "bookworm";
const BASE_IMAGE: &str = "bay-test-base:bookworm";
const BASE_TARBALL: &str = "bookworm-minbase.tar";
const TRACKER_IMAGE: &str = "bay-tracker:test";
const PROXY_IMAGE: &str = "bay-proxy:test";
/// The uid docker/Dockerfile gives the `bay` user.
const BAY_UID: u32 = 10001;
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const BUILD_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// `docker/` of this checkout.
fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("docker")
}

/// `target/bay-test-cache/`, next to the profile directory this test runs from
/// (`target/debug/deps/images-<hash>`), so it follows CARGO_TARGET_DIR and is gitignored.
fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test executable has a parent dir");
    if dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
        dir = dir.parent().expect("deps dir has a parent");
    }
    dir.parent()
        .expect("profile dir has a parent")
        .join("bay-test-cache")
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A Debian mirror as apt is configured to use it.
#[derive(Debug)]
struct AptSource {
    uri: String,
    /// Signed-By, when it names a keyring file.
    keyring: Option<PathBuf>,
}

/// Where apt gets Debian `SUITE` from: the first enabled `deb` source with that suite and the
/// `main` component, in `/etc/apt/sources.list` or `/etc/apt/sources.list.d/*.{list,sources}`.
fn apt_source() -> Option<AptSource> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        match path.extension()?.to_str()? {
            "list" => one_line_source(&text),
            "sources" => deb822_source(&text),
            _ => None,
        }
    })
}

/// Usable by debootstrap (not `cdrom:`, `mirror+file:` or the like).
fn debootstrap_uri(uri: &str) -> bool {
    ["http://", "https://", "file:/"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

/// `deb [signed-by=/k.gpg arch=amd64] http://deb.debian.org/debian bookworm main` lines.
fn one_line_source(text: &str) -> Option<AptSource> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(bracketed) => bracketed.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (uri, suite) = (words.next()?, words.next()?);
        let main = words.any(|c| c == "main");
        (suite == SUITE && main && debootstrap_uri(uri)).then(|| AptSource {
            uri: uri.to_owned(),
            keyring: options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(PathBuf::from)
                .filter(|p| p.is_file()),
        })
    })
}

/// deb822 stanzas: `Types: deb`, `URIs: ...`, `Suites: bookworm ...`, `Components: main`.
fn deb822_source(text: &str) -> Option<AptSource> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        let has = |name: &str, word: &str| {
            field(name).is_some_and(|v| v.split_whitespace().any(|w| w == word))
        };
        if !has("Types", "deb")
            || !has("Suites", SUITE)
            || !has("Components", "main")
            || field("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"))
        {
            return None;
        }
        let uri = field("URIs")?
            .split_whitespace()
            .find(|u| debootstrap_uri(u))?
            .to_owned();
        Some(AptSource {
            uri,
            keyring: field("Signed-By")
                .map(PathBuf::from)
                .filter(|p| p.is_file()),
        })
    })
}

/// apt's HTTP proxy setting (`Acquire::http::Proxy`), if any, so debootstrap's downloads take
/// the same path as apt's.
async fn apt_http_proxy() -> Option<String> {
    let mut cmd = tokio::process::Command::new("apt-config");
    cmd.args(["shell", "PROXY", "Acquire::http::Proxy"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30))
        .await
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let value = text.trim().strip_prefix("PROXY=")?.trim_matches('\'');
    (!value.is_empty() && value != "DIRECT").then(|| value.to_owned())
}

/// Makes `tarball`: a minbase bookworm root filesystem with ca-certificates (and so libssl3),
/// apt's package caches and lists removed, `/dev` empty (Docker mounts its own).
async fn build_base_tarball(debootstrap: &Path, source: &AptSource, tarball: &Path) -> Result<()> {
    let cache = tarball.parent().expect("tarball has a dir");
    std::fs::create_dir_all(cache).with_context(|| format!("create {}", cache.display()))?;
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(cache)
        .context("create debootstrap dir")?;
    let rootfs = work.path().join("rootfs");

    // In a mount namespace of its own, the /proc, /sys and /dev mounts debootstrap makes in
    // the target vanish with it, even if it is killed at the timeout.
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"])
        .arg(debootstrap)
        .args(["--variant=minbase", "--include=ca-certificates"]);
    if let Some(keyring) = &source.keyring {
        cmd.arg(format!("--keyring={}", keyring.display()));
    }
    cmd.arg(SUITE).arg(&rootfs).arg(&source.uri);
    if let Some(proxy) = apt_http_proxy().await {
        cmd.env("http_proxy", proxy);
    }
    let started = Instant::now();
    eprintln!(
        "debootstrap {SUITE} from {} into {} (a minute or two; cached afterwards)",
        source.uri,
        rootfs.display()
    );
    let out = run_with_timeout(&mut cmd, DEBOOTSTRAP_TIMEOUT).await?;
    let log = cache.join("debootstrap.log");
    std::fs::write(&log, [&out.stdout[..], &out.stderr[..]].concat())?;
    if !out.status.success() {
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log_text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "debootstrap failed ({}); whole log in {}:\n{}",
            out.status,
            log.display(),
            tail.join("\n")
        );
    }
    eprintln!("debootstrap took {:?}", started.elapsed());

    for dir in ["var/cache/apt", "var/lib/apt/lists", "dev"] {
        let dir = rootfs.join(dir);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    std::fs::create_dir_all(rootfs.join("var/cache/apt/archives/partial"))?;
    std::fs::create_dir_all(rootfs.join("var/lib/apt/lists/partial"))?;

    // Written beside the cache entry and renamed, so a concurrent or interrupted run never
    // sees half a tarball.
    let partial = work.path().join("rootfs.tar");
    let mut tar = tokio::process::Command::new("tar");
    tar.arg("--numeric-owner")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&partial)
        .arg(".");
    let out = run_with_timeout(&mut tar, Duration::from_secs(300)).await?;
    ensure!(
        out.status.success(),
        "tar of the root filesystem failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, tarball)
        .with_context(|| format!("rename to {}", tarball.display()))?;
    Ok(())
}

/// `docker build` of one target of docker/Dockerfile from `context`, on `BASE_IMAGE`, with no
/// network: everything the image needs is in the base and the context. BuildKit, because the
/// classic builder commits a container per instruction, a full root filesystem copy each on
/// the daemon's vfs storage (2-3 minutes against 20-40 s here).
async fn build_image(dockerd: &Dockerd, target: &str, tag: &str, context: &Path) -> Result<()> {
    let mut cmd = dockerd.command();
    cmd.env("DOCKER_BUILDKIT", "1")
        .arg("build")
        .arg("--progress=plain")
        .arg("--network=none")
        .arg(format!("--build-arg=BASE={BASE_IMAGE}"))
        .arg(format!("--target={target}"))
        .arg(format!("--tag={tag}"))
        .arg("--file")
        .arg(docker_dir().join("Dockerfile"))
        .arg(context);
    let started = Instant::now();
    let out = run_with_timeout(&mut cmd, BUILD_TIMEOUT).await?;
    ensure!(
        out.status.success(),
        "docker build --target {target} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("built {tag} in {:?}", started.elapsed());
    Ok(())
}

/// Containers of one test, removed with their anonymous volumes on drop (after printing their
/// logs if the test is failing), before the daemon stops.
struct Containers {
    client: PathBuf,
    socket: PathBuf,
    names: Vec<String>,
}

impl Containers {
    fn new(dockerd: &Dockerd) -> Containers {
        Containers {
            client: dockerd.client().to_owned(),
            socket: dockerd.socket().to_owned(),
            names: Vec::new(),
        }
    }

    /// `docker run -d --network host --health-interval=1s --name <name> <args>`: the
    /// interval is shortened so the image's HEALTHCHECK command reports within a second or two
    /// instead of after the image's 30 s.
    async fn run(&mut self, dockerd: &Dockerd, name: &str, args: &[&str]) -> Result<()> {
        self.names.push(name.to_owned());
        let mut all = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network=host",
            "--health-interval=1s",
        ];
        all.extend_from_slice(args);
        dockerd.docker(&all).await.map(drop)
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(&self.client)
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run docker {args:?}: {e}"))
    }

    fn logs(&self, name: &str) -> String {
        let out = self.docker(&["logs", "--tail=50", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        if std::thread::panicking() {
            for name in &self.names {
                eprintln!("---- docker logs {name} ----\n{}", self.logs(name));
            }
        }
        let mut args = vec!["rm", "--force", "--volumes"];
        args.extend(self.names.iter().map(String::as_str));
        let out = self.docker(&args);
        if !out.status.success() {
            eprintln!(
                "bay-tests: docker rm failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Waits until `docker inspect` reports the container healthy; fails at once if it stopped or
/// turned unhealthy, with its logs and health check output.
async fn wait_healthy(dockerd: &Dockerd, containers: &Containers, name: &str) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let state = dockerd
            .docker(&["inspect", "--format", "{{json .State}}", name])
            .await?;
        let state: serde_json::Value = serde_json::from_str(&state)?;
        let health = state["Health"]["Status"].as_str().unwrap_or("none");
        match (state["Status"].as_str(), health) {
            (_, "healthy") => return Ok(started.elapsed()),
            (Some("running"), "starting") if started.elapsed() < HEALTHY_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (status, _) => bail!(
                "container {name} is {status:?}, health {health} after {:?}; health log: {}\nlogs:\n{}",
                started.elapsed(),
                state["Health"]["Log"],
                containers.logs(name)
            ),
        }
    }
}

/// The real, effective, saved and filesystem uids of a container's main process, from the
/// host's /proc.
async fn container_uids(dockerd: &Dockerd, name: &str) -> Result<Vec<u32>> {
    let pid = dockerd
        .docker(&["inspect", "--format", "{{.State.Pid}}", name])
        .await?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .context("no Uid line")?;
    Ok(line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?)
}

async fn proxy_stats(url: &str) -> Result<serde_json::Value> {
    Ok(http_client()
        .get(format!("{url}/_bay/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn images_build_and_pull_through_their_containers() {
    let started = Instant::now();
    let tarball = cache_dir().join(BASE_TARBALL);
    // Decided before anything starts, so a skip costs nothing.
    let base_source = if tarball.is_file() {
        None
    } else {
        let Some(debootstrap) = find_program("debootstrap") else {
            skip(
                "image test",
                &format!(
                    "debootstrap is not installed (Debian package debootstrap), and {} is not \
                     cached yet",
                    tarball.display()
                ),
            );
            return;
        };
        let Some(source) = apt_source() else {
            skip(
                "image test",
                &format!(
                    "apt has no `deb` source for Debian {SUITE} main to debootstrap the base \
                     image from"
                ),
            );
            return;
        };
        Some((debootstrap, source))
    };
    if let Some(why) = Dockerd::missing() {
        skip("image test", &why);
        return;
    }
    let dockerd = Dockerd::start()
        .await
        .expect("Docker is installed: dockerd must start");
    eprintln!("dockerd {} up", dockerd.server_version());

    // The base, then both images.
    if let Some((debootstrap, source)) = &base_source {
        build_base_tarball(debootstrap, source, &tarball)
            .await
            .unwrap();
    } else {
        eprintln!("base root filesystem from the cache: {}", tarball.display());
    }
    dockerd
        .docker(&["import", tarball.to_str().unwrap(), BASE_IMAGE])
        .await
        .unwrap();
    let context = tempfile::Builder::new()
        .prefix("bay-test-image-context-")
        .tempdir()
        .unwrap();
    for binary in ["bay-tracker", "bay-proxy"] {
        std::fs::copy(bin_path(binary), context.path().join(binary)).unwrap();
    }
    std::fs::copy(
        docker_dir().join("healthcheck.sh"),
        context.path().join("healthcheck.sh"),
    )
    .unwrap();
    build_image(&dockerd, "bay-tracker", TRACKER_IMAGE, context.path())
        .await
        .unwrap();
    build_image(&dockerd, "bay-proxy", PROXY_IMAGE, context.path())
        .await
        .unwrap();

    // Upstream on the host, with the image to pull.
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let image = Image::generate(&[2 << 20, 1 << 20, 300_000], 47).unwrap();
    image.push(&registry, "test/img:1", None).await.unwrap();

    // The tracker container; its listen address comes from BAY_LISTEN, which the health check
    // reads too, the rest from flags after the image name.
    let mut containers = Containers::new(&dockerd);
    let pid = std::process::id();
    let tracker_name = format!("bay-test-tracker-{pid}");
    let tracker_ip = loopback_ip();
    let tracker_port = free_port(tracker_ip);
    let tracker_url = format!("http://{tracker_ip}:{tracker_port}");
    containers
        .run(
            &dockerd,
            &tracker_name,
            &[
                "--env",
                &format!("BAY_LISTEN={tracker_ip}:{tracker_port}"),
                "--env",
                "RUST_LOG=info,bay_tracker=debug",
                TRACKER_IMAGE,
                "--peer-ip",
                &tracker_ip.to_string(),
                "--peer-port",
                &free_port(tracker_ip).to_string(),
                "--upstream",
                &registry.url(),
            ],
        )
        .await
        .unwrap();

    let proxy_name = format!("bay-test-proxy-{pid}");
    let proxy_ip = loopback_ip();
    let proxy_authority = format!("{proxy_ip}:{}", free_port(proxy_ip));
    let proxy_url = format!("http://{proxy_authority}");
    containers
        .run(
            &dockerd,
            &proxy_name,
            &[
                "--env",
                &format!("BAY_LISTEN={proxy_authority}"),
                "--env",
                "RUST_LOG=info,bay_proxy=debug",
                PROXY_IMAGE,
                "--tracker",
                &tracker_url,
                "--upstream",
                &registry.url(),
                "--default-upstream",
                &registry.url(),
                "--peer-port",
                &free_port(Ipv4Addr::UNSPECIFIED).to_string(),
            ],
        )
        .await
        .unwrap();

    // Healthy by the images' own HEALTHCHECK, and reachable from the host.
    for name in [&tracker_name, &proxy_name] {
        let took = wait_healthy(&dockerd, &containers, name).await.unwrap();
        eprintln!("{name} healthy after {took:?}");
    }
    wait_http_ok(&format!("{tracker_url}/healthz"), Duration::from_secs(10))
        .await
        .unwrap();
    wait_http_ok(
        &format!("{proxy_url}/_bay/healthz"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // The tracker runs as `bay`, not root (and wrote its data dir as that user, below).
    let user = dockerd
        .docker(&["inspect", "--format", "{{.Config.User}}", &tracker_name])
        .await
        .unwrap();
    assert_eq!(user.trim(), "bay");
    let uids = container_uids(&dockerd, &tracker_name).await.unwrap();
    assert_eq!(
        uids, [BAY_UID; 4],
        "tracker process uids (real, effective, saved, fs)"
    );

    // A real client pulls through the proxy container: every blob verified.
    let pull_started = Instant::now();
    let out = tempfile::tempdir().unwrap();
    skopeo_pull(&proxy_authority, "test/img:1", out.path(), None)
        .await
        .unwrap();
    eprintln!(
        "skopeo pull through the proxy container took {:?}",
        pull_started.elapsed()
    );
    for blob in image.layers.iter().chain([&image.config]) {
        let path = out.path().join(blob.digest.trim_start_matches("sha256:"));
        assert_eq!(sha256_file(&path).unwrap(), blob.digest);
        assert_eq!(
            registry.blob_gets(&blob.digest),
            1,
            "{} must leave upstream exactly once (by the tracker container)",
            blob.digest
        );
    }

    // The proxy took them from the swarm, none from upstream.
    let want = image.layers.len() as u64 + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let stats = proxy_stats(&proxy_url).await.unwrap();
        if stats["blobs_held"].as_u64().unwrap_or(0) >= want || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats["blobs_held"], want, "{stats}");
    assert_eq!(stats["fallbacks"], 0, "{stats}");
    assert!(
        // Prefetched blobs finished before the client asked are cache hits.
        stats["swarm_downloads"].as_u64().unwrap_or(0) + stats["cache_hits"].as_u64().unwrap_or(0)
            >= image.layers.len() as u64,
        "{stats}"
    );
    eprintln!("proxy stats: {stats}; test took {:?}", started.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_sources_in_both_formats() {
        let one_line = "# comment\n\
            deb-src http://deb.debian.org/debian bookworm main\n\
            deb [arch=amd64 signed-by=/nonexistent.gpg] http://mirror.example/debian bookworm main contrib\n";
        let source = one_line_source(one_line).unwrap();
        assert_eq!(source.uri, "http://mirror.example/debian");
        assert!(
            source.keyring.is_none(),
            "missing keyring files are ignored"
        );
        assert!(one_line_source("deb http://deb.debian.org/debian trixie main\n").is_none());
        assert!(one_line_source("deb cdrom:[Debian]/ bookworm main\n").is_none());

        let deb822 = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n\
            Components: main\n\n\
            Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
            Components: main\nSigned-By: /nonexistent.gpg\n";
        let source = deb822_source(deb822).unwrap();
        assert_eq!(source.uri, "http://deb.debian.org/debian");
        let disabled =
            "Enabled: no\nTypes: deb\nURIs: http://x/debian\nSuites: bookworm\nComponents: main\n";
        assert!(deb822_source(disabled).is_none());
    }
}

//! The container images of `docker/`: both targets of `docker/Dockerfile` are built in a
//! private `dockerd` from the workspace's binaries, then a tracker and a proxy container run
//! with `--network host` on loopback addresses, and skopeo pulls an image through the proxy
//! container: every blob intact, each sent by the registry once, the proxy's from the swarm.
//! Both containers must report healthy through the images' own HEALTHCHECK, and the tracker
//! must run as a non-root user.
//!
//! The base image is made with debootstrap and cached (`fixtures/bay_images.rs`).
//!
//! Needs root and Debian's `docker.io`, and `debootstrap` while the cache is empty. Where
//! Docker or debootstrap is not installed, or apt has no bookworm source, the test prints
//! `SKIPPED: image test: <reason>` and returns (under `CI=true` it fails instead); where Docker
//! is installed but dockerd cannot start, it fails.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bay_tests::bay_images::{BaseSource, build_bay_images};
use bay_tests::{
    Dockerd, Image, Registry, RegistryOptions, free_port, http_client, loopback_ip, sha256_file,
    skip, skopeo_pull, wait_http_ok,
};

const TRACKER_IMAGE: &str = "bay-tracker:test";
const PROXY_IMAGE: &str = "bay-proxy:test";
/// The uid docker/Dockerfile gives the `bay` user.
const BAY_UID: u32 = 10001;
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

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
    // Decided before anything starts, so a skip costs nothing.
    let base = match BaseSource::find() {
        Ok(base) => base,
        Err(why) => {
            skip("image test", &why);
            return;
        }
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
    base.import(&dockerd).await.unwrap();
    build_bay_images(&dockerd, TRACKER_IMAGE, PROXY_IMAGE)
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
                "--exchange-port",
                "0",
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

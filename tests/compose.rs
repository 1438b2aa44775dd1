//! The compose files of `docker/`, run for real with Debian's `docker-compose`: a private
//! dockerd inside a network namespace of the test's own (so compose's bridges, iptables rules
//! and published ports stay there), bay's images built from this workspace, and the upstream
//! registry image built the same way from the host's Debian `docker-registry`.
//!
//! `compose.yaml`: an image pushed to the compose registry is pulled with
//! `docker pull p2p-registry:5000/...` through proxy 1, every layer intact and from the swarm.
//! `compose-ha.yaml`: the same, then the tracker that ranks first for the next image's first
//! layer is killed and that image is pulled through proxy 1, intact. Each stack is torn down
//! with its volumes.
//!
//! The p2p name needs the proxy on port 5000 of an address of its own, so a small override file
//! publishes proxy 1 (and in the HA file proxy 2) on 127.0.0.2:5000 (127.0.0.3:5000) inside the
//! namespace besides the ports the files publish; `p2p-registry` resolves there through a
//! temporary /etc/hosts line. Needs root, Debian's `docker.io` and `docker-compose`, and
//! `debootstrap` while the base image is not cached; where one is not installed the test skips
//! (under `CI=true` it fails).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bay_proxy::trackers::rendezvous;
use bay_tests::bay_images::{BaseSource, build_bay_images, build_registry_image, docker_dir};
use bay_tests::{
    Dockerd, HostsEntry, Image, Netns, find_program, run_with_timeout, sha256_file, skip,
};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const REPO: &str = "test/img";

/// Layer digests, in order, of the image a `docker save` archive holds.
async fn saved_layer_digests(archive: &Path, out: &Path) -> Result<Vec<String>> {
    let mut tar = tokio::process::Command::new("tar");
    tar.arg("-xf").arg(archive).arg("-C").arg(out);
    let result = run_with_timeout(&mut tar, Duration::from_secs(60)).await?;
    ensure!(result.status.success(), "tar -xf: {result:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json"))?)?;
    let layers = manifest[0]["Layers"]
        .as_array()
        .with_context(|| format!("no Layers in the saved manifest.json: {manifest}"))?;
    layers
        .iter()
        .map(|l| sha256_file(out.join(l.as_str().context("layer path")?)))
        .collect()
}

/// One compose project on the private daemon, taken down with its volumes when dropped.
struct Compose<'a> {
    dockerd: &'a Dockerd,
    program: PathBuf,
    project: String,
    files: Vec<PathBuf>,
}

impl<'a> Compose<'a> {
    fn new(dockerd: &'a Dockerd, program: &Path, project: &str, files: &[PathBuf]) -> Self {
        Compose {
            dockerd,
            program: program.to_owned(),
            project: project.to_owned(),
            files: files.to_vec(),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["--project-name".to_owned(), self.project.clone()];
        for f in &self.files {
            args.push("--file".into());
            args.push(f.display().to_string());
        }
        args
    }

    fn env(&self) -> [(&'static str, String); 2] {
        [
            (
                "DOCKER_HOST",
                format!("unix://{}", self.dockerd.socket().display()),
            ),
            ("COMPOSE_INTERACTIVE_NO_CLI", "1".into()),
        ]
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(self.args()).args(args).envs(self.env());
        let out = run_with_timeout(&mut cmd, Duration::from_secs(300)).await?;
        if !out.status.success() {
            bail!(
                "docker-compose {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn logs(&self) -> String {
        std::process::Command::new(&self.program)
            .args(self.args())
            .args(["logs", "--no-color", "--tail=150"])
            .envs(self.env())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Compose<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- docker-compose logs ({}) ----\n{}",
                self.project,
                self.logs()
            );
        }
        let status = std::process::Command::new(&self.program)
            .args(self.args())
            .args(["down", "--volumes", "--remove-orphans", "--timeout", "10"])
            .envs(self.env())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("bay-tests: docker-compose down of {} failed", self.project);
        }
    }
}

/// `GET url` from inside the namespace; the body, if it answered 2xx.
async fn get_in(netns: &Netns, url: &str) -> Result<String> {
    let mut cmd = netns.command("curl");
    cmd.args(["-sSf", "--noproxy", "*", "--max-time", "5", url]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).await?;
    ensure!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_ok_in(netns: &Netns, urls: &[&str]) -> Result<()> {
    let deadline = Instant::now() + UP_TIMEOUT;
    for url in urls {
        loop {
            match get_in(netns, url).await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => bail!("not up after {UP_TIMEOUT:?}: {e:#}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Ok(())
}

/// Pulls `reference` with the Docker client through the daemon, saves it, and checks its
/// layers are the image's.
async fn pull_and_check(dockerd: &Dockerd, reference: &str, image: &Image) -> Result<Duration> {
    let started = Instant::now();
    dockerd.docker(&["pull", reference]).await?;
    let took = started.elapsed();
    let work = tempfile::tempdir()?;
    let archive = work.path().join("image.tar");
    dockerd
        .docker(&["save", "-o", archive.to_str().context("path")?, reference])
        .await?;
    let extracted = work.path().join("x");
    std::fs::create_dir(&extracted)?;
    let got = saved_layer_digests(&archive, &extracted).await?;
    let want: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
    ensure!(got == want, "{reference}: layers {got:?}, pushed {want:?}");
    Ok(took)
}

/// Through a proxy's stats, every blob of the pull came from the swarm.
async fn assert_from_swarm(netns: &Netns, proxy: &str) -> Result<serde_json::Value> {
    let stats: serde_json::Value =
        serde_json::from_str(&get_in(netns, &format!("http://{proxy}/_bay/stats")).await?)?;
    ensure!(stats["fallbacks"] == 0, "fallbacks: {stats}");
    ensure!(
        stats["bytes_from_upstream"] == 0,
        "bytes from upstream: {stats}"
    );
    ensure!(
        stats["swarm_downloads"].as_u64().unwrap_or(0) + stats["cache_hits"].as_u64().unwrap_or(0)
            >= 3,
        "{stats}"
    );
    Ok(stats)
}

/// Publishes proxies on port 5000 of their own addresses, for `p2p-registry:5000` names.
fn override_file(dir: &Path, proxies: &[(&str, &str)]) -> PathBuf {
    let mut text = String::from("services:\n");
    for (service, ip) in proxies {
        text.push_str(&format!(
            "  {service}:\n    ports:\n      - \"{ip}:5000:80\"\n"
        ));
    }
    let path = dir.join("p2p-ports.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_files_run_and_pull_through_the_swarm() {
    let Some(compose) = find_program("/usr/bin/docker-compose", "docker-compose") else {
        skip(
            "compose test",
            "docker-compose is not installed (Debian package docker-compose)",
        );
        return;
    };
    if let Some(why) = Dockerd::missing() {
        skip("compose test", &why);
        return;
    }
    let base = match BaseSource::find() {
        Ok(base) => base,
        Err(why) => {
            skip("compose test", &why);
            return;
        }
    };
    let started = Instant::now();
    let pid = std::process::id();
    // Dropped last: the hosts line, then the namespace (after the daemon inside it).
    let _p2p = HostsEntry::add("127.0.0.2".parse().unwrap(), "p2p-registry").unwrap();
    let netns = Netns::create(&format!("bay-compose-{pid}")).unwrap();
    let dockerd = Dockerd::start_in(&netns)
        .await
        .expect("Docker is installed: dockerd must start");
    base.import(&dockerd).await.unwrap();
    build_bay_images(&dockerd, "bay-tracker:latest", "bay-proxy:latest")
        .await
        .unwrap();
    build_registry_image(&dockerd, "registry:2").await.unwrap();
    eprintln!("images built after {:?}", started.elapsed());
    let work = tempfile::tempdir().unwrap();
    let images: Vec<Image> = (0..3)
        .map(|i| Image::generate(&[1 << 20, 512 << 10, 256 << 10], 60 + i).unwrap())
        .collect();

    // One tracker, two proxies.
    {
        let files = [
            docker_dir().join("compose.yaml"),
            override_file(work.path(), &[("proxy-1", "127.0.0.2")]),
        ];
        let stack = Compose::new(&dockerd, &compose, &format!("bay-test-{pid}"), &files);
        stack.run(&["up", "--detach"]).await.unwrap();
        wait_ok_in(
            &netns,
            &[
                "http://127.0.0.1:5000/v2/",
                "http://127.0.0.2:5000/_bay/readyz",
                "http://127.0.0.1:5002/_bay/readyz",
            ],
        )
        .await
        .unwrap();
        images[0]
            .push_in(&netns, "127.0.0.1:5000", &format!("{REPO}:1"))
            .await
            .unwrap();
        let took = pull_and_check(&dockerd, &format!("p2p-registry:5000/{REPO}:1"), &images[0])
            .await
            .unwrap();
        let stats = assert_from_swarm(&netns, "127.0.0.2:5000").await.unwrap();
        eprintln!("compose.yaml: docker pull through proxy-1 in {took:?}; {stats}");
    }

    // Three trackers, three proxies; the tracker that owns the next image's first layer dies.
    {
        let files = [
            docker_dir().join("compose-ha.yaml"),
            override_file(work.path(), &[("proxy-1", "127.0.0.2")]),
        ];
        let stack = Compose::new(&dockerd, &compose, &format!("bay-test-ha-{pid}"), &files);
        stack.run(&["up", "--detach"]).await.unwrap();
        wait_ok_in(
            &netns,
            &[
                "http://127.0.0.1:5000/v2/",
                "http://127.0.0.2:5000/_bay/readyz",
                "http://127.0.0.1:5002/_bay/readyz",
                "http://127.0.0.1:5003/_bay/readyz",
            ],
        )
        .await
        .unwrap();
        for (i, image) in images[1..].iter().enumerate() {
            image
                .push_in(&netns, "127.0.0.1:5000", &format!("{REPO}:{}", i + 2))
                .await
                .unwrap();
        }
        pull_and_check(&dockerd, &format!("p2p-registry:5000/{REPO}:2"), &images[1])
            .await
            .unwrap();
        // The proxies rank the trackers by their URLs as configured (parsed, so with a '/').
        let urls: Vec<String> = (1..=3)
            .map(|n| format!("http://tracker-{n}:6880/"))
            .collect();
        let owner = rendezvous(&urls, &images[2].layers[0].digest)[0] + 1;
        stack
            .run(&["kill", &format!("tracker-{owner}")])
            .await
            .unwrap();
        let took = pull_and_check(&dockerd, &format!("p2p-registry:5000/{REPO}:3"), &images[2])
            .await
            .unwrap();
        let stats = assert_from_swarm(&netns, "127.0.0.2:5000").await.unwrap();
        eprintln!(
            "compose-ha.yaml: tracker-{owner} killed, next image pulled in {took:?}; {stats}"
        );
    }
    eprintln!("compose test took {:?}", started.elapsed());
}

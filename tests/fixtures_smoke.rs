//! Checks the fixtures themselves against the real tools: registry, skopeo push, access log.

use std::time::Duration;

use anyhow::{Result, ensure};
use bay_tests::{
    Image, Registry, RegistryOptions, aria2_download, aria2_seed, http_client, sha256_file,
};
use sha1::Sha1;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn registry_push_and_count_blob_gets() -> Result<()> {
    let registry = Registry::start(RegistryOptions::default()).await?;
    let image = Image::generate(&[MIB, 3 * MIB, MIB / 2], 1)?;
    image.push(&registry, "smoke/img:1", None).await?;

    let (fetched, untouched) = (&image.layers[1], &image.layers[2]);
    assert_eq!(
        registry.blob_gets(&fetched.digest),
        0,
        "skopeo only HEADs blobs"
    );

    let url = format!("{}/v2/smoke/img/blobs/{}", registry.url(), fetched.digest);
    let response = http_client().get(&url).send().await?.error_for_status()?;
    let body = response.bytes().await?;
    assert_eq!(body.len() as u64, fetched.size);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&body))),
        fetched.digest
    );
    assert_eq!(body, image.blob_bytes(&fetched.digest)?);

    assert_eq!(registry.blob_gets(&fetched.digest), 1);
    assert_eq!(registry.blob_gets(&untouched.digest), 0);
    let requests = registry.requests();
    ensure!(
        requests.contains(&(
            "GET".into(),
            format!("/v2/smoke/img/blobs/{}", fetched.digest),
            200
        )),
        "{requests:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_registry() -> Result<()> {
    let registry = Registry::start(RegistryOptions {
        htpasswd: Some(("alice".into(), "s3cret".into())),
    })
    .await?;
    let image = Image::generate(&[64 * 1024], 2)?;
    assert!(image.push(&registry, "private/img:1", None).await.is_err());
    image
        .push(&registry, "private/img:1", Some(("alice", "s3cret")))
        .await?;

    let response = http_client()
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    let challenge = response
        .headers()
        .get("www-authenticate")
        .expect("WWW-Authenticate")
        .to_str()?;
    assert!(challenge.starts_with("Basic "), "{challenge}");

    let manifest = http_client()
        .get(format!("{}/v2/private/img/manifests/1", registry.url()))
        .header("Accept", bay_tests::image::MANIFEST_MEDIA_TYPE)
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    assert_eq!(manifest, image.blob_bytes(&image.manifest.digest)?);
    Ok(())
}

/// aria2c leecher and seeder on loopback, with a minimal in-test tracker: checks the aria2
/// options the fixtures use before any bay binary is involved.
#[tokio::test(flavor = "multi_thread")]
async fn aria2_downloads_from_aria2_seed() -> Result<()> {
    let announce = mini_tracker::start().await?;
    let content = Image::generate(&[3 * MIB + 12_345], 4)?;
    let layer = &content.layers[0];
    let name = layer.digest.replace(':', "-");
    let torrent = single_file_torrent(&announce, &name, &content.blob_bytes(&layer.digest)?);

    let seed_dir = tempfile::tempdir()?;
    std::fs::copy(
        content.blob_path(&layer.digest),
        seed_dir.path().join(&name),
    )?;
    let _seeder = aria2_seed(&torrent, seed_dir.path())?;

    let out = tempfile::tempdir()?;
    let path = aria2_download(&torrent, &name, out.path(), Duration::from_secs(60)).await?;
    assert_eq!(sha256_file(&path)?, layer.digest);
    Ok(())
}

fn single_file_torrent(announce: &str, name: &str, data: &[u8]) -> Vec<u8> {
    const PIECE: usize = 256 * 1024;
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(format!("{}:", b.len()).as_bytes());
        out.extend_from_slice(b);
    }
    let pieces: Vec<u8> = data
        .chunks(PIECE)
        .flat_map(|c| Sha1::digest(c).to_vec())
        .collect();
    let mut t = b"d".to_vec();
    bytes(&mut t, b"announce");
    bytes(&mut t, announce.as_bytes());
    bytes(&mut t, b"info");
    t.extend_from_slice(format!("d6:lengthi{}e", data.len()).as_bytes());
    bytes(&mut t, b"name");
    bytes(&mut t, name.as_bytes());
    t.extend_from_slice(format!("12:piece lengthi{PIECE}e").as_bytes());
    bytes(&mut t, b"pieces");
    bytes(&mut t, &pieces);
    t.extend_from_slice(b"ee");
    t
}

/// Just enough of an HTTP tracker for two aria2c peers: remembers `ip`/`port` of every
/// announce and answers with the compact list of the others.
mod mini_tracker {
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use anyhow::Result;
    use bay_tests::loopback_ip;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    pub async fn start() -> Result<String> {
        let ip = loopback_ip();
        // Port 0: a port picked beforehand can be taken by a parallel test before the bind.
        let listener = TcpListener::bind((ip, 0)).await?;
        let announce = format!("http://{}/announce", listener.local_addr()?);
        let peers = Arc::new(Mutex::new(Vec::<(Ipv4Addr, u16)>::new()));
        // Ends with the test's runtime.
        tokio::spawn(async move {
            while let Ok((mut socket, from)) = listener.accept().await {
                let peers = peers.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request);
                    let query = request
                        .split_whitespace()
                        .nth(1)
                        .and_then(|target| target.split_once('?'))
                        .map_or("", |(_, q)| q);
                    let param = |key: &str| {
                        query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    };
                    let ip =
                        param("ip")
                            .and_then(|ip| ip.parse().ok())
                            .unwrap_or(match from.ip() {
                                std::net::IpAddr::V4(ip) => ip,
                                _ => Ipv4Addr::LOCALHOST,
                            });
                    let Some(port) = param("port").and_then(|p| p.parse::<u16>().ok()) else {
                        return;
                    };
                    let compact: Vec<u8> = {
                        let mut peers = peers.lock().unwrap();
                        if !peers.contains(&(ip, port)) {
                            peers.push((ip, port));
                        }
                        peers
                            .iter()
                            .filter(|&&peer| peer != (ip, port))
                            .flat_map(|(ip, port)| {
                                let mut b = ip.octets().to_vec();
                                b.extend_from_slice(&port.to_be_bytes());
                                b
                            })
                            .collect()
                    };
                    let mut body = format!("d8:intervali2e5:peers{}:", compact.len()).into_bytes();
                    body.extend_from_slice(&compact);
                    body.push(b'e');
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                });
            }
        });
        Ok(announce)
    }
}

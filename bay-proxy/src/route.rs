//! Which upstream a request is for, and whether it is a blob GET.
//!
//! The client addresses `p2p-<registry>[:port]` (an /etc/hosts name pointing at this proxy);
//! stripping `p2p-` names the upstream. containerd's mirror mode names it in the `ns` query
//! parameter instead. Anything else goes to `--default-upstream`. Only allowlisted registries
//! are served.

use bay_common::{Digest, Registry, RepositoryName};

use crate::config::Config;
use crate::error::ProxyError;

pub const HOST_PREFIX: &str = "p2p-";

/// The upstream for a request with this `Host` header and query string.
pub fn upstream_for(
    config: &Config,
    host: Option<&str>,
    query: Option<&str>,
) -> Result<Registry, ProxyError> {
    let host = host.unwrap_or("").trim();
    let ns = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    let wanted = match (host.get(..HOST_PREFIX.len()), ns) {
        (Some(p), _) if p.eq_ignore_ascii_case(HOST_PREFIX) => {
            host[HOST_PREFIX.len()..].to_ascii_lowercase()
        }
        (_, Some(ns)) => match ns.as_str() {
            // containerd names Docker Hub by its image-reference name.
            "docker.io" => "registry-1.docker.io".to_string(),
            other => other.to_ascii_lowercase(),
        },
        _ => {
            return config
                .default_upstream
                .clone()
                .ok_or_else(|| ProxyError::NoUpstream(host.chars().take(256).collect()));
        }
    };
    config
        .upstream(&wanted)
        .cloned()
        .ok_or_else(|| ProxyError::NotAllowed(wanted.chars().take(256).collect()))
}

/// `/v2/<name>/blobs/<digest>`: a blob the swarm can serve. Upload paths
/// (`/blobs/uploads/...`) and everything else are not.
pub fn blob_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    if name.is_empty() || digest.is_empty() || digest.contains('/') {
        return None;
    }
    Some((name, digest))
}

/// `/v2/<name>/manifests/<reference>`: a manifest GET, whose image manifest names the blobs
/// the client is about to ask for.
pub fn manifest_repository(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, reference) = rest.rsplit_once("/manifests/")?;
    if name.is_empty() || reference.is_empty() || reference.contains('/') {
        return None;
    }
    Some(name)
}

/// Validates the parts of a blob path.
pub fn parse_blob(name: &str, digest: &str) -> Result<(RepositoryName, Digest), ProxyError> {
    Ok((name.parse()?, digest.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config() -> Config {
        Config::parse_from([
            "bay-proxy",
            "--upstream",
            "http://127.0.0.2:5000",
            "--upstream",
            "registry-1.docker.io",
            "--upstream",
            "ghcr.io",
        ])
    }

    #[test]
    fn host_prefix_is_stripped() {
        let c = config();
        let r = upstream_for(&c, Some("p2p-127.0.0.2:5000"), None).unwrap();
        assert_eq!(r.base_url(), "http://127.0.0.2:5000");
        let r = upstream_for(&c, Some("P2P-GHCR.IO"), None).unwrap();
        assert_eq!(r.authority(), "ghcr.io");
    }

    #[test]
    fn not_allowlisted_is_named() {
        let c = config();
        match upstream_for(&c, Some("p2p-evil.example:5000"), None) {
            Err(ProxyError::NotAllowed(r)) => assert_eq!(r, "evil.example:5000"),
            other => panic!("{other:?}"),
        }
        // The port is part of the identity.
        assert!(upstream_for(&c, Some("p2p-127.0.0.2:5001"), None).is_err());
    }

    #[test]
    fn ns_and_default() {
        let mut c = config();
        let r = upstream_for(&c, Some("127.0.0.1:80"), Some("ns=docker.io")).unwrap();
        assert_eq!(r.authority(), "registry-1.docker.io");
        assert!(matches!(
            upstream_for(&c, Some("localhost"), None),
            Err(ProxyError::NoUpstream(_))
        ));
        c.default_upstream = Some("ghcr.io".parse().unwrap());
        assert_eq!(
            upstream_for(&c, Some("localhost"), None)
                .unwrap()
                .authority(),
            "ghcr.io"
        );
    }

    #[test]
    fn ns_as_containerd_sends_it() {
        // containerd 1.6 in mirror mode: Host is the mirror's plain address, the registry is
        // in `ns` with the colon percent-encoded, and `ns` wins over --default-upstream.
        let mut c = config();
        c.default_upstream = Some("ghcr.io".parse().unwrap());
        let r = upstream_for(&c, Some("127.0.0.3:5000"), Some("ns=127.0.0.2%3A5000")).unwrap();
        assert_eq!(r.base_url(), "http://127.0.0.2:5000");
        let r = upstream_for(&c, Some("127.0.0.3:5000"), Some("digest=x&ns=GHCR.IO")).unwrap();
        assert_eq!(r.authority(), "ghcr.io");
        match upstream_for(&c, Some("127.0.0.3:5000"), Some("ns=evil.example%3A5000")) {
            Err(ProxyError::NotAllowed(r)) => assert_eq!(r, "evil.example:5000"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn blob_paths() {
        let d = format!("sha256:{}", "a".repeat(64));
        let p = format!("/v2/library/alpine/blobs/{d}");
        assert_eq!(blob_path(&p), Some(("library/alpine", d.as_str())));
        assert_eq!(blob_path("/v2/a/blobs/uploads/"), None);
        assert_eq!(blob_path("/v2/a/blobs/uploads/123"), None);
        assert_eq!(blob_path("/v2/a/manifests/latest"), None);
        assert_eq!(blob_path("/v2/"), None);
        let p = format!("/v2/a/blobs/b/blobs/{d}");
        assert_eq!(blob_path(&p).unwrap().0, "a/blobs/b");
        assert!(parse_blob("a/../b", &d).is_err());
        assert!(parse_blob("a/b", "sha256:zz").is_err());
    }

    #[test]
    fn manifest_paths() {
        assert_eq!(
            manifest_repository("/v2/library/alpine/manifests/3.20"),
            Some("library/alpine")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            manifest_repository(&format!("/v2/a/manifests/{d}")),
            Some("a")
        );
        assert_eq!(manifest_repository("/v2/a/manifests/"), None);
        assert_eq!(manifest_repository("/v2/manifests/x"), None);
        assert_eq!(manifest_repository("/v2/a/manifests/x/y"), None);
        assert_eq!(manifest_repository(&format!("/v2/a/blobs/{d}")), None);
    }
}

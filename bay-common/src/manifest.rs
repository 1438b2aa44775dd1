//! Image references and manifests as preheating reads them, the tracker's preheat API types,
//! and docker-registry's notification envelope. Pure parsing, no I/O.
//!
//! Manifests are only read here, never re-serialized: their digest is over upstream's bytes.

use crate::quote::shown;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError, Verifier};
use crate::reference::{NameError, RepositoryName};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` of a manifest GET: every type we can follow, and no schema1, which names no
/// digests we could verify blobs against.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
                          application/vnd.docker.distribution.manifest.list.v2+json, \
                          application/vnd.oci.image.manifest.v1+json, \
                          application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest we read. Real ones are a few KiB; the cap keeps a hostile upstream from
/// making the tracker buffer without end.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// Media type of docker-registry's notification envelope.
pub const EVENTS_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// Longest tag the distribution spec allows.
const MAX_TAG_LEN: usize = 128;
/// Longest image reference we look at: a 300-byte registry, a 255-byte name and a digest.
const MAX_REFERENCE_LEN: usize = 1024;
/// How much of a rejected value an error message repeats.
const SHOWN_LEN: usize = 80;

/// Why a string is not an image reference we can preheat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid image reference {value:?}: {reason}")]
    Invalid { value: String, reason: &'static str },
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("{0}")]
    Digest(#[from] DigestError),
}

/// What follows the repository name: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ManifestRef {
    /// Matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`, so it is safe in a URL path.
    Tag(String),
    Digest(Digest),
}

impl ManifestRef {
    pub fn tag(s: &str) -> Result<ManifestRef, ReferenceError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TAG_LEN
            && s.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
            });
        if !ok {
            return Err(ReferenceError::Invalid {
                value: shown(s, SHOWN_LEN),
                reason: "tag must match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}",
            });
        }
        Ok(ManifestRef::Tag(s.to_owned()))
    }
}

impl fmt::Display for ManifestRef {
    /// The last path segment of the manifest URL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestRef::Tag(t) => f.write_str(t),
            ManifestRef::Digest(d) => d.fmt(f),
        }
    }
}

/// `registry/name:tag` or `registry/name@digest` (a missing tag means `latest`). The registry
/// is the first path component, written as in the tracker's `--upstream` allowlist
/// (`host[:port]`, no scheme); it is not resolved or defaulted, so `alpine` alone is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`, to be matched against the allowlist's authorities.
    pub registry: String,
    pub name: RepositoryName,
    pub reference: ManifestRef,
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<ImageRef, ReferenceError> {
        let invalid = |reason| ReferenceError::Invalid {
            value: shown(s, SHOWN_LEN),
            reason,
        };
        if s.len() > MAX_REFERENCE_LEN {
            return Err(invalid("longer than 1024 bytes"));
        }
        if s.contains("://") {
            return Err(invalid(
                "write the registry as host[:port], without a scheme",
            ));
        }
        let (registry, rest) = s
            .split_once('/')
            .filter(|(r, rest)| !r.is_empty() && !rest.is_empty())
            .ok_or_else(|| invalid("expected registry/name:tag or registry/name@digest"))?;
        // A digest wins over a tag given with it, as in docker.
        let (rest, digest) = match rest.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest.parse::<Digest>()?)),
            None => (rest, None),
        };
        // Names hold no ':', so the last one starts the tag.
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) => (name, Some(tag)),
            None => (rest, None),
        };
        let name: RepositoryName = name.parse()?;
        let tag = tag.map(ManifestRef::tag).transpose()?;
        let reference = match (digest, tag) {
            (Some(d), _) => ManifestRef::Digest(d),
            (None, Some(t)) => t,
            (None, None) => ManifestRef::Tag("latest".into()),
        };
        Ok(ImageRef {
            registry: registry.to_owned(),
            name,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            ManifestRef::Tag(_) => ':',
            ManifestRef::Digest(_) => '@',
        };
        write!(f, "{}/{}{sep}{}", self.registry, self.name, self.reference)
    }
}

/// Why manifest bytes cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is larger than {MAX_MANIFEST_SIZE} bytes")]
    TooLarge,
    #[error("manifest does not match its digest {expected}: upstream sent {got}")]
    DigestMismatch { expected: Digest, got: Digest },
    #[error("manifest is {got} bytes, its descriptor says {expected}")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("manifest has media type {body:?} but was served as {served:?}")]
    MediaTypeMismatch { served: String, body: String },
    #[error("unsupported manifest media type {0:?}")]
    Unsupported(String),
    #[error("invalid Docker-Content-Digest header: {0}")]
    BadDigestHeader(DigestError),
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

/// Checks manifest bytes against the digest they were asked for or announced with.
pub fn verify(bytes: &[u8], expected: &Digest) -> Result<(), ManifestError> {
    let mut v = Verifier::new(expected.algorithm());
    v.update(bytes);
    let got = v.finish();
    if &got != expected {
        return Err(ManifestError::DigestMismatch {
            expected: expected.clone(),
            got,
        });
    }
    Ok(())
}

/// The digest a `Docker-Content-Digest` header announces. `Ok(None)` when absent or naming an
/// algorithm we cannot compute: there is then nothing to check against, as with registries
/// that omit the header.
pub fn announced_digest(header: Option<&str>) -> Result<Option<Digest>, ManifestError> {
    match header.map(|h| h.trim().parse::<Digest>()) {
        None | Some(Err(DigestError::UnsupportedAlgorithm(_))) => Ok(None),
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(e)) => Err(ManifestError::BadDigestHeader(e)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// A content descriptor (OCI image-spec `descriptor.md`); only what preheating uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// An index entry naming a manifest or a nested index we can follow.
    pub fn is_manifest(&self) -> bool {
        matches!(
            self.media_type.as_str(),
            OCI_INDEX | DOCKER_MANIFEST_LIST | OCI_MANIFEST | DOCKER_MANIFEST
        )
    }

    /// Layers that live elsewhere (Windows foreign layers) are not the registry's to serve,
    /// and empty blobs are not distributed as torrents.
    fn is_distributable(&self) -> bool {
        self.size > 0
            && !self.media_type.contains("foreign")
            && !self.media_type.contains("nondistributable")
    }
}

/// A parsed manifest: an index (or Docker manifest list) of platform manifests, or a single
/// image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Index {
        media_type: &'static str,
        manifests: Vec<Descriptor>,
    },
    Image {
        media_type: &'static str,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// The fields of every supported manifest type; which are required depends on the type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

fn known(media_type: &str) -> Option<&'static str> {
    [
        OCI_INDEX,
        DOCKER_MANIFEST_LIST,
        OCI_MANIFEST,
        DOCKER_MANIFEST,
    ]
    .into_iter()
    .find(|k| *k == media_type)
}

impl Manifest {
    /// Parses manifest bytes served with `content_type`. The served type decides, as for
    /// registry clients; the body's `mediaType`, when present, must agree with it. Without a
    /// specific served type the body's `mediaType`, then its fields, decide (OCI documents
    /// may omit `mediaType`).
    pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge);
        }
        let raw: Raw =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if let Some(v) = raw.schema_version
            && v != 2
        {
            return Err(ManifestError::Unsupported(format!("schemaVersion {v}")));
        }
        let served = content_type
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|c| !c.is_empty());
        let generic = |c: &str| {
            matches!(
                c,
                "application/json" | "application/octet-stream" | "text/plain"
            )
        };
        let media_type = match (served.as_deref(), raw.media_type.as_deref()) {
            (Some(s), body) if !generic(s) => {
                let kind = known(s).ok_or_else(|| ManifestError::Unsupported(s.to_owned()))?;
                if let Some(b) = body
                    && b != kind
                {
                    return Err(ManifestError::MediaTypeMismatch {
                        served: s.to_owned(),
                        body: b.to_owned(),
                    });
                }
                kind
            }
            (_, Some(b)) => known(b).ok_or_else(|| ManifestError::Unsupported(b.to_owned()))?,
            (_, None) if raw.manifests.is_some() => OCI_INDEX,
            (_, None) if raw.config.is_some() => OCI_MANIFEST,
            (_, None) => {
                return Err(ManifestError::Invalid(
                    "neither an index nor an image manifest".into(),
                ));
            }
        };
        let missing = |field: &str| ManifestError::Invalid(format!("{media_type} without {field}"));
        match media_type {
            OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Manifest::Index {
                media_type,
                manifests: raw.manifests.ok_or_else(|| missing("manifests"))?,
            }),
            _ => Ok(Manifest::Image {
                media_type,
                config: raw.config.ok_or_else(|| missing("config"))?,
                layers: raw.layers.ok_or_else(|| missing("layers"))?,
            }),
        }
    }

    pub fn media_type(&self) -> &'static str {
        match self {
            Manifest::Index { media_type, .. } | Manifest::Image { media_type, .. } => media_type,
        }
    }

    /// The blobs an image manifest needs: config first, then the layers the registry serves.
    /// An index has none of its own.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        match self {
            Manifest::Index { .. } => Vec::new(),
            Manifest::Image { config, layers, .. } => std::iter::once(config)
                .chain(layers)
                .filter(|d| d.is_distributable())
                .collect(),
        }
    }

    /// The manifests an index names that we can follow; entries of other types (artifacts we
    /// know nothing about) are skipped.
    pub fn children(&self) -> Vec<&Descriptor> {
        match self {
            Manifest::Index { manifests, .. } => {
                manifests.iter().filter(|d| d.is_manifest()).collect()
            }
            Manifest::Image { .. } => Vec::new(),
        }
    }
}

/// `POST /v1/preheat` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatRequest {
    /// `registry/name:tag` or `registry/name@digest`.
    pub image: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreheatState {
    /// Reading the manifest and, for an index, every platform manifest.
    Resolving,
    /// Every blob is known; fetching and seeding them.
    Fetching,
    /// Every blob is held and seeded.
    Done,
    /// Finished with errors; `errors` says which.
    Failed,
}

impl PreheatState {
    pub fn finished(self) -> bool {
        matches!(self, PreheatState::Done | PreheatState::Failed)
    }
}

/// `GET /v1/preheat/<id>` answer (also the body of the `202` that started it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatStatus {
    pub id: String,
    pub image: String,
    /// Digest of the top manifest once read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    pub state: PreheatState,
    pub blobs_total: u64,
    pub blobs_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    #[serde(default)]
    pub errors: Vec<String>,
}

/// `POST /v1/notifications` answer: the preheats the envelope started or joined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationResult {
    pub preheats: Vec<PreheatStatus>,
}

/// docker-registry's notification envelope (distribution `notifications/event.go`); only the
/// fields preheating reads, all optional so one odd event does not spoil the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Event {
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub target: EventTarget,
    #[serde(default)]
    pub request: EventRequest,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventTarget {
    #[serde(default)]
    pub media_type: String,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub tag: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct EventRequest {
    #[serde(default)]
    pub host: String,
}

impl Event {
    /// The manifest a push event announces, as `registry/name@digest` with the registry taken
    /// from the target URL (else the request's Host); `None` for anything else (pulls, blob
    /// pushes, deletes).
    pub fn pushed_manifest(&self) -> Option<Result<ImageRef, ReferenceError>> {
        if self.action != "push" || known(&self.target.media_type).is_none() {
            return None;
        }
        // Taken as written (not through a URL parser, which drops default ports), so it
        // compares with the allowlist's authorities.
        let authority = self
            .target
            .url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
            .filter(|a| !a.is_empty() && !a.contains('@'))
            .unwrap_or(&self.request.host);
        Some(
            format!(
                "{authority}/{}@{}",
                self.target.repository, self.target.digest
            )
            .parse(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(b: &[u8]) -> Digest {
        Digest::sha256_of(b)
    }

    fn desc(media_type: &str, digest: &Digest, size: u64) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": digest, "size": size})
    }

    fn image_manifest(media_type: &str, config_type: &str, layer_type: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": desc(config_type, &d(b"config"), 6),
            "layers": [
                desc(layer_type, &d(b"layer0"), 100),
                desc(layer_type, &d(b"layer1"), 200),
            ],
        }))
        .unwrap()
    }

    #[test]
    fn parses_image_references() {
        let r: ImageRef = "127.0.0.2:5000/test/img:1".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.2:5000");
        assert_eq!(r.name.as_str(), "test/img");
        assert_eq!(r.reference, ManifestRef::Tag("1".into()));
        assert_eq!(r.to_string(), "127.0.0.2:5000/test/img:1");

        let digest = d(b"x");
        let r: ImageRef = format!("ghcr.io/o/i@{digest}").parse().unwrap();
        assert_eq!(r.reference, ManifestRef::Digest(digest.clone()));
        assert_eq!(r.to_string(), format!("ghcr.io/o/i@{digest}"));
        let r: ImageRef = format!("ghcr.io/o/i:v1@{digest}").parse().unwrap();
        assert_eq!(r.reference, ManifestRef::Digest(digest.clone()));

        let r: ImageRef = "registry-1.docker.io/library/alpine".parse().unwrap();
        assert_eq!(r.reference, ManifestRef::Tag("latest".into()));

        for bad in [
            "",
            "alpine",
            "/library/alpine",
            "ghcr.io/",
            "http://ghcr.io/o/i:1",
            "ghcr.io/O/i:1",
            "ghcr.io/o/../i:1",
            "ghcr.io/o/i:",
            "ghcr.io/o/i:.x",
            "ghcr.io/o/i:a/b",
            "ghcr.io/o/i@sha256:abc",
            "ghcr.io/o/i@",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} accepted");
        }
        assert!(
            format!("r/i:{}", "a".repeat(129))
                .parse::<ImageRef>()
                .is_err()
        );
        assert!(
            format!("r/i:{}", "a".repeat(128))
                .parse::<ImageRef>()
                .is_ok()
        );
        assert!(matches!(
            "r/i@sha256:1".parse::<ImageRef>(),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            "r/Bad:1".parse::<ImageRef>(),
            Err(ReferenceError::Name(_))
        ));
    }

    #[test]
    fn parses_oci_and_docker_image_manifests() {
        for (mt, config, layer) in [
            (
                OCI_MANIFEST,
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            (
                DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
        ] {
            let bytes = image_manifest(mt, config, layer);
            let m = Manifest::parse(Some(mt), &bytes).unwrap();
            assert_eq!(m.media_type(), mt);
            let blobs: Vec<_> = m.blobs().iter().map(|b| b.digest.clone()).collect();
            assert_eq!(blobs, vec![d(b"config"), d(b"layer0"), d(b"layer1")]);
            assert!(m.children().is_empty());
            // Parameters on the served type are ignored; a generic type defers to the body.
            assert_eq!(
                Manifest::parse(Some(&format!("{mt}; charset=utf-8")), &bytes).unwrap(),
                m
            );
            assert_eq!(
                Manifest::parse(Some("application/json"), &bytes).unwrap(),
                m
            );
            assert_eq!(Manifest::parse(None, &bytes).unwrap(), m);
        }
    }

    #[test]
    fn parses_oci_index_and_docker_manifest_list() {
        let amd = d(b"amd64");
        let arm = d(b"arm64");
        for mt in [OCI_INDEX, DOCKER_MANIFEST_LIST] {
            let child = if mt == OCI_INDEX {
                OCI_MANIFEST
            } else {
                DOCKER_MANIFEST
            };
            let mut a = desc(child, &amd, 500);
            a["platform"] = json!({"architecture": "amd64", "os": "linux"});
            let mut b = desc(child, &arm, 501);
            b["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
            let sig = desc("application/vnd.example.signature", &d(b"sig"), 10);
            let bytes = serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": mt, "manifests": [a, b, sig],
            }))
            .unwrap();
            let m = Manifest::parse(Some(mt), &bytes).unwrap();
            assert_eq!(m.media_type(), mt);
            assert!(m.blobs().is_empty());
            let children = m.children();
            assert_eq!(children.len(), 2, "the unknown entry is skipped");
            assert_eq!(children[0].digest, amd);
            assert_eq!(
                children[1].platform.as_ref().unwrap().to_string(),
                "linux/arm64/v8"
            );
        }
        // An OCI index without mediaType, served without a specific type.
        let bytes = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            Manifest::parse(None, bytes).unwrap(),
            Manifest::Index {
                media_type: OCI_INDEX,
                ..
            }
        ));
    }

    #[test]
    fn skips_foreign_and_empty_layers() {
        let bytes = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": desc("application/vnd.docker.container.image.v1+json", &d(b"c"), 1),
            "layers": [
                desc("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", &d(b"w"), 9),
                desc("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", &d(b"n"), 9),
                desc("application/vnd.docker.image.rootfs.diff.tar.gzip", &d(b""), 0),
                desc("application/vnd.docker.image.rootfs.diff.tar.gzip", &d(b"l"), 9),
            ],
        }))
        .unwrap();
        let m = Manifest::parse(Some(DOCKER_MANIFEST), &bytes).unwrap();
        let blobs: Vec<_> = m.blobs().iter().map(|b| b.digest.clone()).collect();
        assert_eq!(blobs, vec![d(b"c"), d(b"l")]);
    }

    #[test]
    fn refuses_garbage_and_mismatches() {
        let good = image_manifest(OCI_MANIFEST, "c", "l");
        for (ct, bytes) in [
            (Some(OCI_MANIFEST), b"".to_vec()),
            (Some(OCI_MANIFEST), b"not json".to_vec()),
            (Some(OCI_MANIFEST), b"[1,2]".to_vec()),
            (None, b"{}".to_vec()),
            (
                Some(OCI_MANIFEST),
                br#"{"schemaVersion":2,"layers":[]}"#.to_vec(),
            ),
            (Some(OCI_INDEX), br#"{"schemaVersion":2}"#.to_vec()),
            // Served as an index, but the body says image manifest.
            (Some(OCI_INDEX), good.clone()),
            (Some("application/vnd.example+json"), good.clone()),
            (
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                good.clone(),
            ),
            (
                Some(OCI_MANIFEST),
                br#"{"schemaVersion":2,"config":{"digest":"sha256:12","size":1},"layers":[]}"#
                    .to_vec(),
            ),
            (
                Some(OCI_MANIFEST),
                serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "config": {"digest": d(b"c"), "size": -1}, "layers": [],
                }))
                .unwrap(),
            ),
            (None, br#"{"schemaVersion":1,"fsLayers":[]}"#.to_vec()),
            (None, vec![b' '; MAX_MANIFEST_SIZE + 1]),
        ] {
            assert!(
                Manifest::parse(ct, &bytes).is_err(),
                "{ct:?} {:?} accepted",
                String::from_utf8_lossy(&bytes[..bytes.len().min(100)])
            );
        }
        assert!(matches!(
            Manifest::parse(Some(OCI_INDEX), &good),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
    }

    #[test]
    fn verifies_digests() {
        let bytes = image_manifest(OCI_MANIFEST, "c", "l");
        let right = d(&bytes);
        verify(&bytes, &right).unwrap();
        let err = verify(&bytes, &d(b"other")).unwrap_err();
        assert!(
            matches!(&err, ManifestError::DigestMismatch { got, .. } if *got == right),
            "{err}"
        );
        let sha512: Digest = {
            let mut v = Verifier::new(crate::Algorithm::Sha512);
            v.update(&bytes);
            v.finish()
        };
        verify(&bytes, &sha512).unwrap();

        assert_eq!(announced_digest(None).unwrap(), None);
        assert_eq!(
            announced_digest(Some(&right.to_string())).unwrap(),
            Some(right)
        );
        assert_eq!(announced_digest(Some("sha384:abcd")).unwrap(), None);
        assert!(announced_digest(Some("sha256:zz")).is_err());
    }

    #[test]
    fn reads_registry_notifications() {
        let digest = d(b"m");
        let body = json!({"events": [
            {
                "id": "1", "timestamp": "2026-01-01T00:00:00Z", "action": "push",
                "target": {
                    "mediaType": OCI_MANIFEST, "size": 100, "digest": digest, "length": 100,
                    "repository": "test/img", "tag": "1",
                    "url": format!("http://127.0.0.9:5000/v2/test/img/manifests/{digest}"),
                },
                "request": {"id": "r", "addr": "127.0.0.1:1", "host": "127.0.0.9:5000",
                            "method": "PUT", "useragent": "skopeo"},
                "actor": {}, "source": {"addr": "x:5000", "instanceID": "i"},
            },
            {"action": "push", "target": {"mediaType": "application/octet-stream",
                "digest": digest, "repository": "test/img"}},
            {"action": "pull", "target": {"mediaType": OCI_MANIFEST, "digest": digest,
                "repository": "test/img"}},
            {"action": "push", "target": {"mediaType": OCI_INDEX, "digest": digest,
                "repository": "test/img", "url": "/v2/test/img/manifests/x"},
                "request": {"host": "reg.example"}},
            {"action": "push", "target": {"mediaType": OCI_INDEX, "digest": "nope",
                "repository": "test/img"}},
        ]});
        let env: Envelope = serde_json::from_value(body).unwrap();
        let found: Vec<_> = env
            .events
            .iter()
            .filter_map(Event::pushed_manifest)
            .collect();
        assert_eq!(found.len(), 3);
        let first = found[0].as_ref().unwrap();
        assert_eq!(first.registry, "127.0.0.9:5000");
        assert_eq!(first.reference, ManifestRef::Digest(digest.clone()));
        // A relative URL falls back to the request's Host.
        assert_eq!(found[1].as_ref().unwrap().registry, "reg.example");
        assert!(found[2].is_err());
    }

    #[test]
    fn status_json_shape() {
        let s = PreheatStatus {
            id: "ab".into(),
            image: "r/i:1".into(),
            digest: None,
            state: PreheatState::Fetching,
            blobs_total: 3,
            blobs_done: 1,
            bytes_total: 30,
            bytes_done: 10,
            errors: vec![],
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "fetching");
        assert_eq!(v["blobs_total"], 3);
        assert!(v.get("digest").is_none());
        assert_eq!(serde_json::from_value::<PreheatStatus>(v).unwrap(), s);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,300}") {
            let _ = s.parse::<ImageRef>();
            let _ = Manifest::parse(None, s.as_bytes());
            let _ = Manifest::parse(Some(OCI_INDEX), s.as_bytes());
        }
    }
}

//! Preheating: fetch and seed every blob of an image before any machine pulls it, so the
//! first pull of a fresh release already swarms from a warm tracker.
//!
//! `POST /v1/preheat` reads the image's manifest upstream with the caller's credentials (its
//! refusal goes back to the caller as is), then a job follows an index to every platform
//! manifest, each verified against its digest, and fetches each config and layer blob once
//! through the same single-flight path proxies use, so a proxy asking for a blob meanwhile
//! shares that one upstream GET. `POST /v1/notifications` takes docker-registry's push
//! notifications and starts a job for each pushed manifest of an allowlisted registry.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bay_common::manifest::{
    self, Descriptor, Envelope, ImageRef, Manifest, ManifestError, ManifestRef, NotificationResult,
    PreheatRequest, PreheatState, PreheatStatus, ReferenceError,
};
use bay_common::upstream::{Credentials, UpstreamError};
use bay_common::{Digest, Registry, RepositoryName};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::error::TrackerError;
use crate::fetch::{Blobs, Source};

/// Jobs remembered for `GET /v1/preheat/<id>`; past it the oldest finished job is forgotten,
/// and with every one still running a new preheat is refused (429).
pub const MAX_JOBS: usize = 256;
/// Blob fetches one job runs at once: enough to keep a link busy, few enough that one big
/// image does not take every upstream slot from the proxies' requests.
pub const FETCHES_PER_JOB: usize = 4;
/// Platform manifests read per image, and blobs fetched per image: bounds on what a hostile
/// or broken index can make the tracker do.
const MAX_MANIFESTS: usize = 256;
const MAX_BLOBS: usize = 10_000;
/// Nesting of indexes followed (OCI allows an index of indexes).
const MAX_DEPTH: usize = 2;
/// Errors a job keeps for its status.
const MAX_ERRORS: usize = 64;
/// Whole-request limit for one manifest GET.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(60);

pub fn router<S: Clone + Send + Sync + 'static>(preheats: Arc<Preheats>) -> Router<S> {
    Router::new()
        .route("/v1/preheat", post(create).get(list))
        .route("/v1/preheat/{id}", get(status))
        .route("/v1/notifications", post(notifications))
        .with_state(preheats)
}

/// The preheat jobs of one tracker.
pub struct Preheats {
    config: Config,
    blobs: Arc<Blobs>,
    jobs: Mutex<Jobs>,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Blob fetches all preheats may run at once: half of `--upstream-concurrency`.
    slots: tokio::sync::Semaphore,
}

#[derive(Default)]
struct Jobs {
    by_id: HashMap<String, Arc<Job>>,
    /// Ids, oldest first.
    order: VecDeque<String>,
}

struct Job {
    id: String,
    image: String,
    /// Registry, repository, manifest and credentials: a second request for the same while
    /// this one runs joins it instead of starting another.
    key: String,
    progress: Mutex<Progress>,
}

struct Progress {
    state: PreheatState,
    digest: Option<Digest>,
    blobs_total: u64,
    blobs_done: u64,
    bytes_total: u64,
    bytes_done: u64,
    errors: Vec<String>,
}

/// Where a job reads manifests and blobs, and as whom.
#[derive(Clone)]
struct Target {
    registry: Registry,
    name: RepositoryName,
    creds: Credentials,
}

/// A manifest read and verified.
struct Fetched {
    digest: Digest,
    manifest: Manifest,
}

/// The top manifest of a job: already read (to answer the caller with upstream's refusal),
/// or still to read (notifications, whose sender cannot act on one).
enum Top {
    Read(Fetched),
    Pending(ManifestRef),
}

impl Preheats {
    pub fn new(config: Config, blobs: Arc<Blobs>) -> Self {
        let slots = match config.upstream_concurrency {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => (n / 2).max(1),
        };
        Self {
            slots: tokio::sync::Semaphore::new(slots),
            config,
            blobs,
            jobs: Mutex::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Stops every job and waits for them; blob flights they started finish on their own.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    pub fn status(&self, id: &str) -> Option<PreheatStatus> {
        let jobs = self.jobs.lock().expect("preheat jobs poisoned");
        jobs.by_id.get(id).map(|j| j.status())
    }

    /// Every remembered job, oldest first.
    pub fn list(&self) -> Vec<PreheatStatus> {
        let jobs = self.jobs.lock().expect("preheat jobs poisoned");
        jobs.order
            .iter()
            .map(|id| jobs.by_id[id].status())
            .collect()
    }

    /// The allowlisted upstream an image reference names.
    fn target(&self, image: &ImageRef, creds: Credentials) -> Result<Target, TrackerError> {
        let not_allowed = || TrackerError::NotAllowed(image.registry.chars().take(256).collect());
        // Normalised as the allowlist is (lowercase host), so `Registry.Example` matches.
        let (host, port) =
            bay_common::reference::parse_authority(&image.registry).map_err(|_| not_allowed())?;
        let authority = match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        let registry = self.config.upstream(&authority).ok_or_else(not_allowed)?;
        Ok(Target {
            registry: registry.clone(),
            name: image.name.clone(),
            creds,
        })
    }

    /// Registers a job (or finds the same one running) and starts it.
    fn start(
        self: &Arc<Self>,
        image: String,
        target: Target,
        top: Top,
    ) -> Result<PreheatStatus, TrackerError> {
        let manifest = match &top {
            Top::Read(f) => f.digest.to_string(),
            Top::Pending(r) => r.to_string(),
        };
        let key = format!(
            "{}\0{}\0{manifest}\0{}",
            target.registry.authority(),
            target.name,
            target.creds.cache_key()
        );
        let job = Arc::new(Job::new(image, key));
        {
            let mut jobs = self.jobs.lock().expect("preheat jobs poisoned");
            if let Some(running) = jobs.running(&job.key) {
                tracing::info!(id = %running.id, "joining the preheat already running");
                return Ok(running.status());
            }
            jobs.admit(job.clone(), MAX_JOBS)?;
        }
        if let Top::Read(f) = &top {
            job.update(|p| p.digest = Some(f.digest.clone()));
        }
        let status = job.status();
        // Its own root: the job outlives the request that started it.
        let span = tracing::info_span!(parent: None, "preheat", id = %job.id, image = %job.image);
        let (this, stop) = (self.clone(), self.stop.clone());
        self.tasks.spawn(
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {
                        job.error("tracker shutting down".into());
                        job.finish();
                    }
                    _ = this.run(&job, target, top) => {}
                }
            }
            .instrument(span),
        );
        Ok(status)
    }

    async fn run(&self, job: &Job, target: Target, top: Top) {
        let started = Instant::now();
        let top = match top {
            Top::Read(f) => f,
            Top::Pending(reference) => match self.fetch_manifest(&target, &reference, None).await {
                Ok(f) => {
                    job.update(|p| p.digest = Some(f.digest.clone()));
                    f
                }
                Err(e) => {
                    job.error(format!("manifest {reference}: {e}"));
                    job.finish();
                    return;
                }
            },
        };
        let blobs = self.collect_blobs(job, &target, top).await;
        let bytes_total = blobs.iter().map(|d| d.size).sum();
        job.update(|p| {
            p.state = PreheatState::Fetching;
            p.blobs_total = blobs.len() as u64;
            p.bytes_total = bytes_total;
        });
        tracing::info!(
            blobs = blobs.len(),
            bytes = bytes_total,
            "fetching the image's blobs"
        );
        let source = Source {
            registry: target.registry,
            name: target.name,
            creds: target.creds,
        };
        futures::stream::iter(blobs)
            .map(|d| {
                let source = source.clone();
                async move {
                    // Preheats together take at most half the upstream slots, so proxies'
                    // requests never queue behind a batch of preheats.
                    let _slot = self.slots.acquire().await.expect("never closed");
                    let result = self.blobs.torrent_for(source, &d.digest, None).await;
                    (d, result)
                }
            })
            .buffer_unordered(FETCHES_PER_JOB)
            .for_each(|(d, result)| async move {
                match result {
                    Ok(t) => job.update(|p| {
                        p.blobs_done += 1;
                        p.bytes_done += t.size();
                    }),
                    Err(e) => job.error(format!("blob {}: {e}", d.digest)),
                }
            })
            .await;
        job.finish();
        let s = job.status();
        tracing::info!(
            state = ?s.state,
            blobs_done = s.blobs_done,
            bytes_done = s.bytes_done,
            errors = s.errors.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "preheat finished"
        );
    }

    /// Follows the top manifest through (nested) indexes to every image manifest and returns
    /// their blobs, each once, config and layers in manifest order. Manifests that fail are
    /// recorded and skipped; the rest still get preheated.
    async fn collect_blobs(&self, job: &Job, target: &Target, top: Fetched) -> Vec<Descriptor> {
        let mut blobs = Vec::new();
        let mut seen_blobs = HashSet::new();
        let mut seen_manifests = HashSet::from([top.digest.clone()]);
        let mut level = vec![top];
        let mut truncated = false;
        for depth in 0..=MAX_DEPTH {
            let mut children = Vec::new();
            for fetched in &level {
                for b in fetched.manifest.blobs() {
                    if blobs.len() >= MAX_BLOBS {
                        job.error(format!("more than {MAX_BLOBS} blobs; the rest are skipped"));
                        return blobs;
                    }
                    if seen_blobs.insert(b.digest.clone()) {
                        blobs.push(b.clone());
                    }
                }
                for c in fetched.manifest.children() {
                    if depth == MAX_DEPTH {
                        job.error(format!("manifest {}: indexes nested too deep", c.digest));
                    } else if seen_manifests.len() >= MAX_MANIFESTS {
                        if !truncated {
                            job.error(format!(
                                "more than {MAX_MANIFESTS} manifests; the rest are skipped"
                            ));
                            truncated = true;
                        }
                    } else if seen_manifests.insert(c.digest.clone()) {
                        children.push(c.clone());
                    }
                }
            }
            if children.is_empty() {
                break;
            }
            level = futures::stream::iter(children)
                .map(|c| async move {
                    let reference = ManifestRef::Digest(c.digest.clone());
                    let result = self.fetch_manifest(target, &reference, Some(&c)).await;
                    (c, result)
                })
                .buffered(FETCHES_PER_JOB)
                .filter_map(|(c, result)| async move {
                    let platform = c
                        .platform
                        .as_ref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default();
                    match result {
                        Ok(f) => Some(f),
                        Err(e) => {
                            job.error(format!("manifest {}{platform}: {e}", c.digest));
                            None
                        }
                    }
                })
                .collect()
                .await;
        }
        blobs
    }

    /// GETs a manifest and checks it against the digest it was asked by, the digest upstream
    /// announced, and the size its descriptor gave, before parsing it.
    async fn fetch_manifest(
        &self,
        target: &Target,
        reference: &ManifestRef,
        descriptor: Option<&Descriptor>,
    ) -> Result<Fetched, TrackerError> {
        let fetch = async {
            let resp = self
                .blobs
                .upstream
                .get_manifest(&target.registry, &target.name, reference, &target.creds)
                .await?;
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let content_type = header("content-type");
            let announced = manifest::announced_digest(header("docker-content-digest").as_deref())?;
            let bytes = read_capped(resp, &target.registry).await?;
            if let ManifestRef::Digest(d) = reference {
                manifest::verify(&bytes, d)?;
            }
            if let Some(a) = &announced {
                manifest::verify(&bytes, a)?;
            }
            if let Some(d) = descriptor
                && d.size != bytes.len() as u64
            {
                return Err(ManifestError::SizeMismatch {
                    expected: d.size,
                    got: bytes.len() as u64,
                }
                .into());
            }
            let digest = match reference {
                ManifestRef::Digest(d) => d.clone(),
                ManifestRef::Tag(_) => announced.unwrap_or_else(|| Digest::sha256_of(&bytes)),
            };
            let manifest = Manifest::parse(content_type.as_deref(), &bytes)?;
            tracing::debug!(digest = %digest, media_type = manifest.media_type(), "read manifest");
            Ok(Fetched { digest, manifest })
        };
        tokio::time::timeout(MANIFEST_TIMEOUT, fetch)
            .await
            .unwrap_or_else(|_| {
                Err(TrackerError::Timeout(
                    bay_common::upstream::UpstreamClient::manifest_url(
                        &target.registry,
                        &target.name,
                        reference,
                    ),
                ))
            })
    }
}

/// The body of a manifest answer, refusing more than [`manifest::MAX_MANIFEST_SIZE`].
async fn read_capped(
    mut resp: reqwest::Response,
    registry: &Registry,
) -> Result<Vec<u8>, TrackerError> {
    let cap = manifest::MAX_MANIFEST_SIZE;
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ManifestError::TooLarge.into());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        TrackerError::Upstream(UpstreamError::Transport {
            url: registry.base_url(),
            source: e,
        })
    })? {
        if body.len() + chunk.len() > cap {
            return Err(ManifestError::TooLarge.into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl Jobs {
    /// The unfinished job with this key, if any.
    fn running(&self, key: &str) -> Option<&Arc<Job>> {
        self.by_id
            .values()
            .find(|j| j.key == key && !j.state().finished())
    }

    /// Remembers a new job, forgetting the oldest finished one to stay within `max`.
    fn admit(&mut self, job: Arc<Job>, max: usize) -> Result<(), TrackerError> {
        if self.by_id.len() >= max {
            let oldest = self
                .order
                .iter()
                .position(|id| self.by_id[id].state().finished())
                .ok_or(TrackerError::TooManyPreheats(max))?;
            let id = self.order.remove(oldest).expect("position is in range");
            self.by_id.remove(&id);
        }
        self.order.push_back(job.id.clone());
        self.by_id.insert(job.id.clone(), job);
        Ok(())
    }
}

impl Job {
    fn new(image: String, key: String) -> Self {
        Self {
            // Unguessable, so a status is found only by who started the job (or lists them).
            id: format!("{:032x}", rand::random::<u128>()),
            image,
            key,
            progress: Mutex::new(Progress {
                state: PreheatState::Resolving,
                digest: None,
                blobs_total: 0,
                blobs_done: 0,
                bytes_total: 0,
                bytes_done: 0,
                errors: Vec::new(),
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().expect("preheat progress poisoned"));
    }

    fn state(&self) -> PreheatState {
        self.progress
            .lock()
            .expect("preheat progress poisoned")
            .state
    }

    fn error(&self, e: String) {
        tracing::warn!("{e}");
        self.update(|p| match p.errors.len() {
            n if n < MAX_ERRORS => p.errors.push(e),
            MAX_ERRORS => p.errors.push("further errors omitted".into()),
            _ => {}
        });
    }

    fn finish(&self) {
        self.update(|p| {
            p.state = if p.errors.is_empty() {
                PreheatState::Done
            } else {
                PreheatState::Failed
            }
        });
    }

    fn status(&self) -> PreheatStatus {
        let p = self.progress.lock().expect("preheat progress poisoned");
        PreheatStatus {
            id: self.id.clone(),
            image: self.image.clone(),
            digest: p.digest.clone(),
            state: p.state,
            blobs_total: p.blobs_total,
            blobs_done: p.blobs_done,
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            errors: p.errors.clone(),
        }
    }
}

impl From<ReferenceError> for TrackerError {
    fn from(e: ReferenceError) -> Self {
        match e {
            ReferenceError::Name(e) => TrackerError::BadName(e),
            ReferenceError::Digest(e) => TrackerError::BadDigest(e),
            e @ ReferenceError::Invalid { .. } => TrackerError::BadReference(e.to_string()),
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn create(
    State(preheats): State<Arc<Preheats>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match create_inner(&preheats, &headers, &body).await {
        Ok(s) => {
            let location = format!("/v1/preheat/{}", s.id);
            let mut resp = json(StatusCode::ACCEPTED, &s);
            resp.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_str(&location).expect("hex id is a valid header"),
            );
            resp
        }
        Err(e) => e.into_response(),
    }
}

async fn create_inner(
    preheats: &Arc<Preheats>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<PreheatStatus, TrackerError> {
    let req: PreheatRequest = serde_json::from_slice(body).map_err(|e| {
        TrackerError::BadReference(format!(
            "expected a JSON body {{\"image\": \"registry/name:tag\"}}: {e}"
        ))
    })?;
    let image: ImageRef = req.image.parse()?;
    let span = tracing::info_span!("preheat", image = %image);
    async {
        let creds = Credentials::from_client(headers.get(header::AUTHORIZATION));
        let target = preheats.target(&image, creds)?;
        // Read here, not in the job, so the caller sees upstream's 401/403/404 itself.
        let top = preheats
            .fetch_manifest(&target, &image.reference, None)
            .await?;
        preheats.start(image.to_string(), target, Top::Read(top))
    }
    .instrument(span)
    .await
}

async fn status(State(preheats): State<Arc<Preheats>>, Path(id): Path<String>) -> Response {
    match preheats.status(&id) {
        Some(s) => json(StatusCode::OK, &s),
        None => TrackerError::UnknownPreheat(id.chars().take(64).collect()).into_response(),
    }
}

async fn list(State(preheats): State<Arc<Preheats>>) -> Response {
    json(StatusCode::OK, &preheats.list())
}

/// docker-registry's notification endpoint. Each manifest push of an allowlisted registry
/// starts a preheat, as whoever the registry's endpoint config sends in `Authorization`
/// (anonymous without). Events of other registries are ignored and logged; a full job table
/// answers 429, so the registry retries the batch later.
async fn notifications(
    State(preheats): State<Arc<Preheats>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let envelope: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return TrackerError::BadReference(format!(
                "expected a notification envelope ({}): {e}",
                manifest::EVENTS_MEDIA_TYPE
            ))
            .into_response();
        }
    };
    let creds = Credentials::from_client(headers.get(header::AUTHORIZATION));
    let mut result = NotificationResult::default();
    for event in &envelope.events {
        let image = match event.pushed_manifest() {
            None => continue,
            Some(Ok(image)) => image,
            Some(Err(e)) => {
                tracing::warn!("ignoring push notification: {e}");
                continue;
            }
        };
        let target = match preheats.target(&image, creds.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(image = %image, "ignoring push notification: {e}");
                continue;
            }
        };
        tracing::info!(image = %image, tag = %event.target.tag, "push notification");
        match preheats.start(image.to_string(), target, Top::Pending(image.reference)) {
            Ok(s) => result.preheats.push(s),
            Err(e) => return e.into_response(),
        }
    }
    json(StatusCode::OK, &result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_table_forgets_oldest_finished_and_refuses_when_all_run() {
        let mut jobs = Jobs::default();
        let mk = |key: &str| Arc::new(Job::new(format!("r/{key}:1"), key.into()));
        let (a, b, c) = (mk("a"), mk("b"), mk("c"));
        jobs.admit(a.clone(), 3).unwrap();
        jobs.admit(b.clone(), 3).unwrap();
        jobs.admit(c.clone(), 3).unwrap();
        assert_eq!(jobs.running("b").unwrap().id, b.id);
        assert!(matches!(
            jobs.admit(mk("d"), 3),
            Err(TrackerError::TooManyPreheats(3))
        ));
        b.finish();
        c.error("boom".into());
        c.finish();
        assert_eq!(c.state(), PreheatState::Failed);
        assert!(jobs.running("b").is_none(), "a finished job is not joined");
        let d = mk("d");
        jobs.admit(d.clone(), 3).unwrap();
        let ids: Vec<_> = jobs.order.iter().cloned().collect();
        assert_eq!(ids, vec![a.id.clone(), c.id.clone(), d.id.clone()]);
        assert!(!jobs.by_id.contains_key(&b.id));
        assert_eq!(b.status().state, PreheatState::Done);
    }

    #[test]
    fn errors_are_capped() {
        let job = Job::new("r/i:1".into(), "k".into());
        for i in 0..MAX_ERRORS + 10 {
            job.error(format!("e{i}"));
        }
        let s = job.status();
        assert_eq!(s.errors.len(), MAX_ERRORS + 1);
        assert_eq!(s.errors.last().unwrap(), "further errors omitted");
    }
}

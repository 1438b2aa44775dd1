//! Who may read which blob: upstream decides, we remember its yes for a short while.
//!
//! Blobs are content-addressed, so holding one says nothing about who may read it. Before
//! handing out a torrent the tracker asks upstream with a HEAD carrying the caller's own
//! credentials; positive answers are cached per (credentials, registry, repository, digest).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::upstream::{BlobHead, Credentials, UpstreamClient, UpstreamError};
use crate::{Digest, Registry, RepositoryName};

/// How long a yes from upstream is trusted. Registry tokens live about a minute, so a revoked
/// client keeps access to blobs it could already read for at most this long.
pub const ALLOW_TTL: Duration = Duration::from_secs(60);
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct AccessCache {
    allowed: Mutex<HashMap<String, (Instant, Option<u64>)>>,
}

impl AccessCache {
    /// Ok(size if upstream told it) when upstream lets `creds` read the blob; upstream's refusal
    /// otherwise.
    pub async fn check(
        &self,
        upstream: &UpstreamClient,
        registry: &Registry,
        name: &RepositoryName,
        digest: &Digest,
        creds: &Credentials,
    ) -> Result<Option<u64>, UpstreamError> {
        let key = format!(
            "{}\0{}\0{}\0{}",
            creds.cache_key(),
            registry.authority(),
            name,
            digest
        );
        let now = Instant::now();
        if let Some((exp, size)) = self.allowed.lock().expect("poisoned").get(&key)
            && *exp > now
        {
            return Ok(*size);
        }
        let BlobHead { size, .. } = upstream.head_blob(registry, name, digest, creds).await?;
        let mut map = self.allowed.lock().expect("poisoned");
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (exp, _)| *exp > now);
        }
        map.insert(key, (now + ALLOW_TTL, size));
        Ok(size)
    }
}

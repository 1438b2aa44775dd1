//! Who may read which blob: upstream decides, we remember its yes for a short while.
//!
//! Blobs are content-addressed, so holding one says nothing about who may read it. Before
//! handing out a torrent the tracker asks upstream with a HEAD carrying the caller's own
//! credentials; positive answers are cached per (credentials, registry, repository, digest).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::upstream::{BlobHead, Credentials, UpstreamClient, UpstreamError};
use crate::{Digest, Registry, RepositoryName};

/// How long a yes from upstream is trusted. Registry tokens live about a minute, so a revoked
/// client keeps access to blobs it could already read for at most this long.
pub const ALLOW_TTL: Duration = Duration::from_secs(60);
/// Answers remembered at most; past this the least recently used goes (each costs one HEAD
/// upstream if asked again).
const MAX_ENTRIES: usize = 100_000;

pub struct AccessCache {
    allowed: Mutex<LruCache<String, (Instant, Option<u64>)>>,
}

impl Default for AccessCache {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

impl AccessCache {
    fn with_capacity(entries: usize) -> Self {
        let cap = NonZeroUsize::new(entries.max(1)).expect("at least 1");
        Self {
            allowed: Mutex::new(LruCache::new(cap)),
        }
    }

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
        if let Some(size) = self.lookup(&key, Instant::now()) {
            return Ok(size);
        }
        let BlobHead { size, .. } = upstream.head_blob(registry, name, digest, creds).await?;
        self.remember(key, size, Instant::now());
        Ok(size)
    }

    /// The remembered answer for `key`, if it has not expired.
    fn lookup(&self, key: &str, now: Instant) -> Option<Option<u64>> {
        let mut map = self.allowed.lock().expect("poisoned");
        match map.get(key) {
            Some((exp, size)) if *exp > now => Some(*size),
            Some(_) => {
                map.pop(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: String, size: Option<u64>, now: Instant) {
        self.allowed
            .lock()
            .expect("poisoned")
            .put(key, (now + ALLOW_TTL, size));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.allowed.lock().expect("poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_expire() {
        let c = AccessCache::default();
        let t = Instant::now();
        c.remember("a".into(), Some(5), t);
        assert_eq!(c.lookup("a", t), Some(Some(5)));
        assert_eq!(c.lookup("a", t + ALLOW_TTL + Duration::from_secs(1)), None);
        assert_eq!(c.len(), 0, "an expired answer is dropped when found");
        assert_eq!(c.lookup("b", t), None);
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let c = AccessCache::with_capacity(1000);
        let t = Instant::now();
        for i in 0..10_000 {
            c.remember(format!("k{i}"), None, t);
            // One key asked for all along stays.
            assert_eq!(c.lookup("k0", t), Some(None), "after {i}");
        }
        assert_eq!(c.len(), 1000);
        assert_eq!(c.lookup("k9999", t), Some(None));
        assert_eq!(c.lookup("k5000", t), None, "least recently used went first");
    }
}

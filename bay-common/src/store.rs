//! The data dir: verified blobs in `blobs/`, partial downloads in `tmp/`, and which blobs to
//! evict when the cache is over its size.
//!
//! A blob appears in `blobs/` only by a rename after its digest matched, so anything there is
//! complete; `tmp/` is emptied at start because nothing in it was ever verified.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::Digest;
use crate::announce::InfoHash;
use crate::torrent::BlobTorrent;

pub struct Store {
    blob_dir: PathBuf,
    tmp_dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Index {
    blobs: HashMap<Digest, Entry>,
    by_info_hash: HashMap<InfoHash, Digest>,
    bytes: u64,
    /// Logical clock for least-recently-requested order.
    clock: u64,
}

struct Entry {
    torrent: Arc<BlobTorrent>,
    last_used: u64,
    /// The file as it was when its content was last verified.
    stamp: Option<FileStamp>,
}

/// What identifies a file's content without reading it: a rewrite changes the modification
/// time, a replacement the inode. A blob whose file still has the stamp it had when it was
/// verified is served without hashing it again; one whose stamp changed is re-hashed first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

impl Store {
    /// Opens (creating) the data dir and discards partial downloads left by an earlier run.
    pub fn open(root: &Path, capacity: u64) -> io::Result<Self> {
        let blob_dir = root.join("blobs");
        let tmp_dir = root.join("tmp");
        fs::create_dir_all(&blob_dir)?;
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir)?;
        }
        fs::create_dir_all(&tmp_dir)?;
        Ok(Self {
            blob_dir,
            tmp_dir,
            capacity,
            index: Mutex::new(Index::default()),
            evictions: AtomicU64::new(0),
        })
    }

    pub fn blob_dir(&self) -> &Path {
        &self.blob_dir
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir.join(digest.file_name())
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// A fresh path in `tmp/` for a download.
    pub fn temp_path(&self) -> PathBuf {
        self.tmp_dir
            .join(format!("{:016x}.part", rand::random::<u64>()))
    }

    /// Blobs an earlier run left in `blobs/`, oldest first, still to be verified. Files whose
    /// names are not digests are not ours to serve and are removed.
    pub fn leftovers(&self) -> io::Result<Vec<Digest>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.blob_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            match name.to_str().map(Digest::from_file_name) {
                Some(Ok(d)) if entry.file_type()?.is_file() => {
                    let mtime = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, d));
                }
                _ => {
                    tracing::warn!(path = %entry.path().display(), "removing stray file from the blob dir");
                    let _ =
                        fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
                }
            }
        }
        found.sort();
        Ok(found.into_iter().map(|(_, d)| d).collect())
    }

    /// The torrent of a held blob, marking it recently used.
    pub fn get(&self, digest: &Digest) -> Option<Arc<BlobTorrent>> {
        let mut ix = self.index.lock().expect("store index poisoned");
        ix.clock += 1;
        let now = ix.clock;
        let e = ix.blobs.get_mut(digest)?;
        e.last_used = now;
        Some(e.torrent.clone())
    }

    /// The torrent of a held blob by its info hash (not marking it used: peers reading
    /// pieces are not clients asking for the blob).
    pub fn by_info_hash(&self, info_hash: &InfoHash) -> Option<Arc<BlobTorrent>> {
        let ix = self.index.lock().expect("store index poisoned");
        let digest = ix.by_info_hash.get(info_hash)?;
        ix.blobs.get(digest).map(|e| e.torrent.clone())
    }

    pub fn holds(&self, info_hash: &InfoHash) -> bool {
        let ix = self.index.lock().expect("store index poisoned");
        ix.by_info_hash.contains_key(info_hash)
    }

    /// Records a verified, seeded blob, its file as it is now (see [`FileStamp`]), and returns
    /// the blobs to evict to get back under the capacity, least recently used first (never the
    /// one just added).
    pub fn insert(&self, torrent: Arc<BlobTorrent>) -> Vec<Arc<BlobTorrent>> {
        let stamp = self.stamp_now(torrent.digest());
        let mut ix = self.index.lock().expect("store index poisoned");
        ix.clock += 1;
        let now = ix.clock;
        let digest = torrent.digest().clone();
        ix.by_info_hash.insert(torrent.info_hash(), digest.clone());
        let size = torrent.size();
        if ix
            .blobs
            .insert(
                digest.clone(),
                Entry {
                    torrent,
                    last_used: now,
                    stamp,
                },
            )
            .is_none()
        {
            ix.bytes += size;
        }
        let mut victims = Vec::new();
        while ix.bytes > self.capacity {
            let Some(oldest) = ix
                .blobs
                .iter()
                .filter(|(d, _)| **d != digest)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(d, _)| d.clone())
            else {
                break;
            };
            if let Some(e) = ix.blobs.remove(&oldest) {
                ix.bytes -= e.torrent.size();
                ix.by_info_hash.remove(&e.torrent.info_hash());
                victims.push(e.torrent);
            }
        }
        self.evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        victims
    }

    fn stamp_now(&self, digest: &Digest) -> Option<FileStamp> {
        fs::metadata(self.blob_path(digest))
            .ok()
            .map(|m| FileStamp::of(&m))
    }

    /// Notes a held blob's file as it is now, just after its content was verified again.
    pub fn restamp(&self, digest: &Digest) {
        let stamp = self.stamp_now(digest);
        if let Some(e) = self
            .index
            .lock()
            .expect("store index poisoned")
            .blobs
            .get_mut(digest)
        {
            e.stamp = stamp;
        }
    }

    /// Whether the held blob's file, described by `meta`, is as it was when last verified.
    pub fn unchanged_since_verified(&self, digest: &Digest, meta: &fs::Metadata) -> bool {
        let ix = self.index.lock().expect("store index poisoned");
        ix.blobs
            .get(digest)
            .and_then(|e| e.stamp.as_ref())
            .is_some_and(|s| *s == FileStamp::of(meta))
    }

    /// Forgets a held blob (its file was found damaged); returns its torrent if it was held.
    pub fn remove(&self, digest: &Digest) -> Option<Arc<BlobTorrent>> {
        self.remove_if(digest, |_| true)
    }

    /// Forgets `torrent` if it is the very copy held, not one fetched again since: a reader
    /// of the old file that finds it damaged must not drop the new one. True if it was.
    pub fn remove_copy(&self, torrent: &Arc<BlobTorrent>) -> bool {
        self.remove_if(torrent.digest(), |held| Arc::ptr_eq(held, torrent))
            .is_some()
    }

    fn remove_if(
        &self,
        digest: &Digest,
        pred: impl FnOnce(&Arc<BlobTorrent>) -> bool,
    ) -> Option<Arc<BlobTorrent>> {
        let mut ix = self.index.lock().expect("store index poisoned");
        if !pred(&ix.blobs.get(digest)?.torrent) {
            return None;
        }
        let e = ix.blobs.remove(digest)?;
        ix.bytes -= e.torrent.size();
        ix.by_info_hash.remove(&e.torrent.info_hash());
        Some(e.torrent)
    }

    /// (blobs, bytes) held.
    pub fn usage(&self) -> (u64, u64) {
        let ix = self.index.lock().expect("store index poisoned");
        (ix.blobs.len() as u64, ix.bytes)
    }

    /// Empties `tmp/` at shutdown, once nothing writes there any more, so no partial
    /// download outlives the process (blobs in `blobs/` are hard links and stay).
    pub fn clear_tmp(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.tmp_dir)? {
            let path = entry?.path();
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Blobs evicted to stay under the capacity since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{path} is empty")]
    Empty { path: String },
    #[error("{path} hashes to {got}, not {want}")]
    Mismatch {
        path: String,
        want: Digest,
        got: Digest,
    },
}

/// Checks a file has `digest` (sha256/sha512 only, for files whose pieces were already checked
/// against their torrent).
pub async fn verify_digest(path: &Path, digest: &Digest) -> Result<(), VerifyError> {
    hash_file(path, digest, None).await
}

/// Hashes a file completely: checks it has `digest` and builds its torrent in the same pass.
pub async fn verify_file(path: &Path, digest: &Digest) -> Result<BlobTorrent, VerifyError> {
    let size = tokio::fs::metadata(path).await?.len();
    let mut builder = crate::torrent::TorrentBuilder::new(digest.clone(), size).map_err(|_| {
        VerifyError::Empty {
            path: path.display().to_string(),
        }
    })?;
    hash_file(path, digest, Some(&mut builder)).await?;
    builder
        .finish()
        .map_err(|e| VerifyError::Io(io::Error::other(e.to_string())))
}

/// One read of a file: its digest checked, and its pieces fed to `builder` if given.
async fn hash_file(
    path: &Path,
    digest: &Digest,
    mut builder: Option<&mut crate::torrent::TorrentBuilder>,
) -> Result<(), VerifyError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut verifier = digest.verifier();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        verifier.update(&buf[..n]);
        if let Some(b) = builder.as_deref_mut() {
            b.update(&buf[..n]);
        }
    }
    let got = verifier.finish();
    if &got != digest {
        return Err(VerifyError::Mismatch {
            path: path.display().to_string(),
            want: digest.clone(),
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn torrent(n: usize) -> Arc<BlobTorrent> {
        let data = vec![n as u8; 1000 + n];
        Arc::new(BlobTorrent::from_bytes(Digest::sha256_of(&data), &data).unwrap())
    }

    #[test]
    fn evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 2500).unwrap();
        let (a, b, c) = (torrent(0), torrent(1), torrent(2));
        assert!(store.insert(a.clone()).is_empty());
        assert!(store.insert(b.clone()).is_empty());
        assert!(store.get(a.digest()).is_some()); // a is now newer than b
        let victims = store.insert(c.clone());
        assert_eq!(victims, vec![b.clone()]);
        assert!(store.get(b.digest()).is_none());
        assert!(store.holds(&a.info_hash()) && !store.holds(&b.info_hash()));
        assert_eq!(store.usage(), (2, 1000 + 1002));
        assert_eq!(store.evictions(), 1);
        assert_eq!(store.remove(a.digest()), Some(a.clone()));
        assert_eq!(store.remove(a.digest()), None);
        assert!(store.get(a.digest()).is_none() && !store.holds(&a.info_hash()));
        assert_eq!(store.usage(), (1, 1002));
    }

    #[test]
    fn only_the_held_copy_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let old = torrent(3);
        store.insert(old.clone());
        assert!(store.remove_copy(&old));
        assert!(!store.remove_copy(&old), "removed twice");
        // Fetched again: the same blob, another copy. A reader of the old one leaves it be.
        let new = torrent(3);
        store.insert(new.clone());
        assert!(!store.remove_copy(&old));
        assert!(store.get(new.digest()).is_some() && store.holds(&new.info_hash()));
        assert_eq!(store.usage(), (1, 1003));
        assert!(store.remove_copy(&new));
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn a_changed_file_is_no_longer_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let t = torrent(4);
        let path = store.blob_path(t.digest());
        fs::write(&path, vec![4u8; 1004]).unwrap();
        store.insert(t.clone());
        let meta = || fs::metadata(&path).unwrap();
        assert!(store.unchanged_since_verified(t.digest(), &meta()));
        // Rewritten in place (same length, later mtime): changed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, vec![5u8; 1004]).unwrap();
        assert!(!store.unchanged_since_verified(t.digest(), &meta()));
        // Verified again: trusted again.
        store.restamp(t.digest());
        assert!(store.unchanged_since_verified(t.digest(), &meta()));
        // Replaced by another file: changed.
        let other = dir.path().join("other");
        fs::write(&other, vec![5u8; 1004]).unwrap();
        fs::rename(&other, &path).unwrap();
        assert!(!store.unchanged_since_verified(t.digest(), &meta()));
        // Not held: never verified.
        store.remove(t.digest());
        assert!(!store.unchanged_since_verified(t.digest(), &meta()));
    }

    #[test]
    fn oversized_blob_is_kept_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10).unwrap();
        let a = torrent(0);
        assert!(store.insert(a.clone()).is_empty());
        assert_eq!(store.insert(torrent(1)), vec![a]);
    }

    #[tokio::test]
    async fn verify_file_checks_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        fs::write(&p, vec![5u8; 300_000]).unwrap();
        let d = Digest::sha256_of(&[5u8; 300_000]);
        let t = verify_file(&p, &d).await.unwrap();
        assert_eq!(t.size(), 300_000);
        let other = Digest::sha256_of(b"other");
        assert!(matches!(
            verify_file(&p, &other).await,
            Err(VerifyError::Mismatch { .. })
        ));
        assert!(verify_digest(&p, &d).await.is_ok());
        assert!(matches!(
            verify_digest(&p, &other).await,
            Err(VerifyError::Mismatch { .. })
        ));
    }

    #[test]
    fn open_discards_partials_and_strays() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp/x.part"), b"partial").unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let d = Digest::sha256_of(b"x");
        fs::write(store.blob_path(&d), b"x").unwrap();
        fs::write(store.blob_dir().join("not-a-digest"), b"?").unwrap();
        assert_eq!(store.leftovers().unwrap(), vec![d]);
        assert!(!store.blob_dir().join("not-a-digest").exists());
    }
}

//! Buffers for reuse: memory a process already has costs no page faults. On a VM that hands
//! freed memory back to its host (free page reporting, as on the machines bay is benchmarked
//! on) a fresh page costs far more than the copy into it: 2-3 CPU-s per GiB against 0.3.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Free buffers, by capacity (a power of two), up to a limit in bytes.
pub struct Pool {
    free: Mutex<HashMap<usize, Vec<Vec<u8>>>>,
    free_bytes: AtomicUsize,
    limit: usize,
}

/// A buffer of `len` bytes that goes back to its pool when dropped (as the owner of [`Bytes`]
/// made by [`Pooled::into_bytes`], when the last of them is dropped). Its contents are
/// whatever the last user left: fill it before reading it.
pub struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<Pool>,
}

impl Pooled {
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsMut<[u8]> for Pooled {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool.put(buf);
    }
}

impl Pool {
    /// A pool that keeps at most `limit` bytes of free buffers.
    pub fn new(limit: usize) -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::default(),
            free_bytes: AtomicUsize::new(0),
            limit,
        })
    }

    /// A buffer of `len` bytes: a free one of the right capacity, or a new one.
    pub fn take(self: &Arc<Self>, len: usize) -> Pooled {
        let cap = len.next_power_of_two();
        let reused = self
            .free
            .lock()
            .expect("pool poisoned")
            .get_mut(&cap)
            .and_then(Vec::pop);
        let buf = match reused {
            Some(b) => {
                self.free_bytes.fetch_sub(cap, Ordering::Relaxed);
                b
            }
            None => vec![0u8; cap],
        };
        Pooled {
            buf,
            len,
            pool: self.clone(),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        let cap = buf.len();
        if cap == 0 || self.free_bytes.load(Ordering::Relaxed) + cap > self.limit {
            return;
        }
        self.free_bytes.fetch_add(cap, Ordering::Relaxed);
        self.free
            .lock()
            .expect("pool poisoned")
            .entry(cap)
            .or_default()
            .push(buf);
    }

    /// Bytes of free buffers held.
    pub fn free_bytes(&self) -> usize {
        self.free_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_up_to_the_limit() {
        let pool = Pool::new(3 << 20);
        let mut a = pool.take(1000);
        assert_eq!(a.as_mut().len(), 1000);
        a.as_mut()[999] = 7;
        let bytes = a.into_bytes();
        assert_eq!(bytes.len(), 1000);
        let clone = bytes.slice(999..);
        drop(bytes);
        assert_eq!(pool.free_bytes(), 0, "a slice still holds it");
        drop(clone);
        assert_eq!(pool.free_bytes(), 1024);
        // Reused (its old contents are still there), not allocated again.
        let b = pool.take(600);
        assert_eq!(b.as_ref().len(), 600);
        assert_eq!(pool.free_bytes(), 0);
        drop(b);
        assert_eq!(pool.free_bytes(), 1024);
        // Past the limit a buffer is freed instead.
        let big: Vec<Pooled> = (0..4).map(|_| pool.take(1 << 20)).collect();
        drop(big);
        assert_eq!(pool.free_bytes(), 1024 + (2 << 20));
    }
}

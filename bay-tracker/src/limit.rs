//! Byte-rate and concurrency limits: on what the tracker takes from upstream (how many blob
//! fetches run at once and how many bytes per second they share, so a cold pull of a big image
//! by a whole fleet cannot fill the site's internet link; proxies wait for their torrent
//! meanwhile, they do not go upstream themselves), and on the pieces it serves proxies over
//! HTTP (`--upload-limit`, as for its BitTorrent seed).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Credit a quiet link may build up, as time at the full rate: enough to smooth over chunk
/// sizes, too little to matter to the link.
const BURST: Duration = Duration::from_millis(100);

pub struct UpstreamLimits {
    slots: Option<Semaphore>,
    rate: Rate,
}

/// A byte rate shared by everyone who takes from it; unlimited when built from None or 0.
pub struct Rate {
    bytes_per_sec: Option<f64>,
    /// When the bytes taken so far have been paid for at the rate.
    paid_until: Mutex<Instant>,
}

impl Rate {
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.filter(|r| *r > 0).map(|r| r as f64),
            paid_until: Mutex::new(Instant::now()),
        }
    }

    pub fn limited(&self) -> bool {
        self.bytes_per_sec.is_some()
    }

    /// Accounts for `bytes` just moved, sleeping as long as the rate requires.
    pub async fn take(&self, bytes: usize) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let wake = {
            let mut paid = self.paid_until.lock().expect("rate lock poisoned");
            let now = Instant::now();
            let start = (*paid).max(now.checked_sub(BURST).unwrap_or(now));
            *paid = start + Duration::from_secs_f64(bytes as f64 / rate);
            paid.checked_sub(BURST)
        };
        if let Some(wake) = wake {
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl UpstreamLimits {
    /// `concurrency` 0 and `bytes_per_sec` None or 0 mean unlimited.
    pub fn new(concurrency: usize, bytes_per_sec: Option<u64>) -> Self {
        Self {
            slots: (concurrency > 0).then(|| Semaphore::new(concurrency)),
            rate: Rate::new(bytes_per_sec),
        }
    }

    /// Waits for a fetch slot; the fetch holds it until the permit drops. `queued` runs
    /// only if the fetch has to wait, so a gauge of waiting fetches misses none.
    pub async fn slot(&self, queued: impl FnOnce()) -> Option<SemaphorePermit<'_>> {
        let slots = self.slots.as_ref()?;
        if let Ok(permit) = slots.try_acquire() {
            return Some(permit);
        }
        queued();
        Some(slots.acquire().await.expect("never closed"))
    }

    /// Accounts for `bytes` just received, sleeping as long as the rate requires.
    pub async fn take(&self, bytes: usize) {
        self.rate.take(bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MIB: usize = 1 << 20;

    async fn take_all(l: &UpstreamLimits, total: usize) {
        for _ in 0..total / (64 * 1024) {
            l.take(64 * 1024).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_is_shared_by_concurrent_fetches() {
        let l = Arc::new(UpstreamLimits::new(0, Some(MIB as u64)));
        let t0 = Instant::now();
        take_all(&l, 4 * MIB).await;
        let one = t0.elapsed();
        assert!(
            one >= Duration::from_millis(3800) && one <= Duration::from_secs(4),
            "{one:?}"
        );
        // Two fetches of 2 MiB at once still take the time of 4 MiB at the rate.
        let t0 = Instant::now();
        let a = tokio::spawn({
            let l = l.clone();
            async move { take_all(&l, 2 * MIB).await }
        });
        take_all(&l, 2 * MIB).await;
        a.await.unwrap();
        let both = t0.elapsed();
        assert!(
            both >= Duration::from_millis(3800) && both <= Duration::from_millis(4200),
            "{both:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_not_banked_beyond_the_burst() {
        let l = UpstreamLimits::new(0, Some(MIB as u64));
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        take_all(&l, 2 * MIB).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(1800),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_and_slots() {
        let l = UpstreamLimits::new(0, None);
        let t0 = Instant::now();
        take_all(&l, 64 * MIB).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(l.slot(|| panic!("unlimited never queues")).await.is_none());

        let l = UpstreamLimits::new(2, Some(0));
        let a = l.slot(|| panic!("a slot is free")).await.unwrap();
        let _b = l.slot(|| panic!("a slot is free")).await.unwrap();
        let mut queued = false;
        let third = tokio::time::timeout(Duration::from_secs(1), l.slot(|| queued = true)).await;
        assert!(
            third.is_err() && queued,
            "a third fetch must wait, and say so"
        );
        drop(a);
        assert!(l.slot(|| panic!("a slot is free")).await.is_some());
    }
}

//! A single-threaded tokio runtime on a thread of its own, for the librqbit session.
//!
//! librqbit 9.1 picks how it does disk I/O from the runtime it was started on: on a
//! multi-threaded runtime every 16 KiB chunk read and write goes through `block_in_place`,
//! which hands the worker to another thread each time (futex wake-ups, thread switches); on a
//! current-thread runtime it simply calls them, and page-cache I/O is quick. Running the session
//! here while HTTP stays on the main runtime cut the proxies' CPU per GiB by about a fifth in
//! `bench/swarm.sh` (`bench/RESULTS.md`). Everything that makes librqbit spawn tasks (creating
//! the session, adding, streaming, deleting torrents) must run here, through [`Dedicated::run`].

use std::future::Future;
use std::sync::Mutex;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Dedicated {
    name: String,
    handle: Handle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

/// The runtime ended (shut down, or a task panicked) before the work did.
#[derive(Debug, thiserror::Error)]
#[error("runtime {name:?}: {why}")]
pub struct Gone {
    name: String,
    why: String,
}

impl Dedicated {
    /// Starts the runtime on a thread named `name`; it runs until [`Dedicated::shutdown`] or
    /// until this value is dropped.
    pub fn start(name: &str) -> std::io::Result<Dedicated> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // Spawned tasks run while this waits; dropping `rt` afterwards cancels the rest.
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Dedicated {
            name: name.to_owned(),
            handle,
            stop: Mutex::new(Some(stop)),
        })
    }

    /// Runs `work` on this runtime and waits for its result from any runtime.
    pub async fn run<F>(&self, work: F) -> Result<F::Output, Gone>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(work).await.map_err(|e| Gone {
            name: self.name.clone(),
            why: e.to_string(),
        })
    }

    /// Starts `work` on this runtime without waiting for it.
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(work)
    }

    /// Stops the runtime: tasks still running on it are dropped.
    pub fn shutdown(&self) {
        if let Some(stop) = self.stop.lock().expect("poisoned").take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs blocking work (a file read, a hash) where the task is: on a multi-threaded runtime the
/// worker hands its other tasks to another thread meanwhile (`block_in_place`), and what it read
/// is then written to a socket by the same thread, from its cache. Handing each 1 MiB block to a
/// blocking-pool thread and back cost the tracker 0.61 CPU-s per GiB served against 0.53 this
/// way (`bench/fastlink`, eight pairs). A current-thread runtime (tests driving the code
/// in-process) cannot, and uses the blocking pool.
pub async fn in_place<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    use tokio::runtime::RuntimeFlavor;
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(work)
    } else {
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_runs_on_a_current_thread_runtime_of_its_own() {
        let rt = Dedicated::start("bay-test-rt").unwrap();
        let (flavor, thread) = rt
            .run(async {
                (
                    Handle::current().runtime_flavor(),
                    std::thread::current().name().map(str::to_owned),
                )
            })
            .await
            .unwrap();
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
        assert_eq!(thread.as_deref(), Some("bay-test-rt"));
        // Tasks spawned by the work land there too.
        let inner = rt
            .run(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_owned) }).await
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inner.as_deref(), Some("bay-test-rt"));

        // Once the runtime is gone, work fails rather than hanging.
        rt.shutdown();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rt.run(async { 1 }).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "runtime still running"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

//! Drain as a primitive. Every connection task is spawned through a
//! [`Shutdown`], which tracks it. Stopping is two steps: `stop` (listeners
//! stop accepting at once, live connections go on) and, after the drain
//! deadline, `hard` (every live connection is closed).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    hard: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves when listeners must stop accepting.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Waits for the next tick of `interval`; `false` once stopping, so a
    /// periodic task is `while shutdown.tick(&mut interval).await { … }`.
    pub async fn tick(&self, interval: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            _ = interval.tick() => true,
            _ = self.stop.cancelled() => false,
        }
    }

    /// Cancelled when live connections must close now.
    pub fn hard(&self) -> &CancellationToken {
        &self.hard
    }

    /// Spawns a tracked task: drain waits for it.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Stops accepting, waits up to `deadline` for live tasks, then closes
    /// the rest and waits for them to finish closing. Returns how many tasks
    /// were still running at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.hard.cancel();
        // Cancelled tasks close their sockets promptly; bound it anyway.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        left
    }
}

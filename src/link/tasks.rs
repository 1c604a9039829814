//! The runtime each link client runs on, and the scope that owns its tasks.
//!
//! `whatsapp-rust` spawns its background work (the run loop, the ordered
//! event mailbox, keep-alives, the QR rotation, the pair-success timer, the
//! device store's saver …) through the [`Runtime`] it was built with, and
//! several of those tasks hold the `Client` itself. Some outlive a
//! `disconnect()`: the QR rotation sleeps through its six refs (about
//! 160 s) and is only stopped by a successful pairing. While any of them
//! runs, the client — its SQLite pool (three open files), buffers and
//! caches — stays alive.
//!
//! So every client gets its own [`ClientRuntime`], and the session keeps the
//! matching [`TaskScope`]. Closing the scope ends every task the client
//! spawned at its next poll, which drops the last references to the client
//! and closes its device store. The scope also counts its live tasks, so a
//! shutdown can wait until everything is really gone and tests can prove it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use wacore::runtime::{AbortHandle, Runtime};

/// What a [`ClientRuntime`] and its [`TaskScope`] share.
#[derive(Debug, Default)]
struct Shared {
    /// Cancelled when the scope closes; every task selects on it.
    closed: CancellationToken,
    /// Tasks spawned and not yet finished or cancelled.
    live: AtomicUsize,
}

/// A [`Runtime`] on tokio whose tasks all end when its [`TaskScope`] closes.
#[derive(Debug)]
pub struct ClientRuntime {
    shared: Arc<Shared>,
}

/// The owner's side of a [`ClientRuntime`]: closes it and counts its tasks.
#[derive(Debug, Clone)]
pub struct TaskScope {
    shared: Arc<Shared>,
}

impl ClientRuntime {
    /// A fresh runtime and the scope that owns its tasks.
    pub fn new() -> (Self, TaskScope) {
        let shared = Arc::new(Shared::default());
        (
            Self {
                shared: Arc::clone(&shared),
            },
            TaskScope { shared },
        )
    }

    fn spawn_scoped(
        &self,
        future: Pin<Box<dyn Future<Output = ()> + Send + 'static>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.shared.closed.is_cancelled() {
            // Nothing may start once the owner has let go.
            return None;
        }
        let live = LiveTask::enter(&self.shared);
        let closed = self.shared.closed.clone();
        Some(tokio::spawn(async move {
            let _live = live;
            tokio::select! {
                biased;
                () = closed.cancelled() => {}
                () = future => {}
            }
        }))
    }
}

/// Counts one live task for as long as it exists (finished, cancelled or
/// aborted alike).
struct LiveTask(Arc<Shared>);

impl LiveTask {
    fn enter(shared: &Arc<Shared>) -> Self {
        shared.live.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(shared))
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl Runtime for ClientRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send + 'static>>) -> AbortHandle {
        match self.spawn_scoped(future) {
            Some(handle) => AbortHandle::new(move || handle.abort()),
            None => AbortHandle::new(|| {}),
        }
    }

    fn spawn_detached(&self, future: Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
        let _ = self.spawn_scoped(future);
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }

    fn spawn_blocking(
        &self,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // Blocking work (SQLite, PBKDF2) cannot be interrupted; it is short
        // and holds no reference the scope has to wait for afterwards.
        Box::pin(async {
            let _ = tokio::task::spawn_blocking(f).await;
        })
    }

    fn yield_now(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        // Multi-threaded runtime: other tasks run on other threads.
        None
    }
}

impl TaskScope {
    /// Ends every task of the runtime at its next poll; later spawns are
    /// dropped unstarted. Idempotent.
    pub fn close(&self) {
        self.shared.closed.cancel();
    }

    /// Tasks of the runtime that have not ended yet.
    pub fn live_tasks(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn closing_the_scope_ends_tasks_that_would_run_forever() {
        // Arrange
        let (runtime, scope) = ClientRuntime::new();
        let held = Arc::new(());
        let in_task = Arc::clone(&held);
        runtime.spawn_detached(Box::pin(async move {
            let _keep = in_task;
            std::future::pending::<()>().await;
        }));
        settle().await;
        assert_eq!(scope.live_tasks(), 1);

        // Act
        scope.close();
        settle().await;

        // Assert
        assert_eq!(scope.live_tasks(), 0);
        assert_eq!(Arc::strong_count(&held), 1, "the task dropped what it held");
    }

    #[tokio::test]
    async fn a_closed_scope_starts_nothing() {
        // Arrange
        let (runtime, scope) = ClientRuntime::new();
        scope.close();
        let held = Arc::new(());
        let in_task = Arc::clone(&held);

        // Act
        runtime
            .spawn(Box::pin(async move {
                let _keep = in_task;
            }))
            .detach();

        // Assert
        assert_eq!(scope.live_tasks(), 0);
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[tokio::test]
    async fn finished_and_aborted_tasks_are_no_longer_counted() {
        // Arrange
        let (runtime, scope) = ClientRuntime::new();
        runtime.spawn_detached(Box::pin(async {}));
        let forever = runtime.spawn(Box::pin(std::future::pending::<()>()));
        settle().await;
        assert_eq!(scope.live_tasks(), 1, "only the pending task is live");

        // Act
        forever.abort();
        settle().await;

        // Assert
        assert_eq!(scope.live_tasks(), 0);
    }
}

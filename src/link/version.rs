//! WhatsApp Web's version, which every link client announces at login.
//! Left to itself, each client fetches `web.whatsapp.com/sw.js` for it
//! before it connects: one extra HTTPS round trip per session. Here the
//! version is fetched once per process, shared by every client, and fetched
//! again once a day (as the library does for a stored device).
//!
//! When a fetch fails, the last known version is used; with none known, a
//! client is built without a pin and fetches for itself (the library's own
//! behaviour), and the next fetch here waits [`RETRY_AFTER_FAILURE`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;
use wacore::net::HttpClient;

/// A fetched version is used for this long; the library refetches a stored
/// device's version after the same time.
pub const VERSION_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// After a failed fetch, the next waits this long: a WhatsApp Web outage
/// must not add a failing request to every session.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// A Web client version: `(primary, secondary, tertiary)`.
pub type WebVersion = (u32, u32, u32);

/// Where the current version comes from.
#[async_trait]
pub trait VersionSource: Send + Sync + 'static {
    /// The version WhatsApp Web runs now.
    async fn fetch(&self) -> anyhow::Result<WebVersion>;
}

/// WhatsApp's service worker script, read the way the library reads it.
pub struct ServiceWorker(pub Arc<dyn HttpClient>);

#[async_trait]
impl VersionSource for ServiceWorker {
    async fn fetch(&self) -> anyhow::Result<WebVersion> {
        whatsapp_rust::version::fetch_latest_app_version(&self.0).await
    }
}

#[derive(Default)]
struct Known {
    version: Option<(WebVersion, Instant)>,
    failed_at: Option<Instant>,
}

/// The version shared by every client of the process.
pub struct SharedVersion {
    source: Box<dyn VersionSource>,
    /// An async lock: sessions starting together wait for one fetch.
    known: Mutex<Known>,
}

impl std::fmt::Debug for SharedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedVersion").finish_non_exhaustive()
    }
}

impl SharedVersion {
    /// Versions from `source`.
    pub fn new(source: impl VersionSource) -> Self {
        Self {
            source: Box::new(source),
            known: Mutex::default(),
        }
    }

    /// The version to pin a new client to; `None`: let it fetch its own.
    pub async fn current(&self) -> Option<WebVersion> {
        let mut known = self.known.lock().await;
        if let Some((version, at)) = known.version
            && at.elapsed() < VERSION_MAX_AGE
        {
            return Some(version);
        }
        if known
            .failed_at
            .is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE)
        {
            return known.version.map(|(version, _)| version);
        }
        match self.source.fetch().await {
            Ok(version) => {
                tracing::info!(
                    version = %format!("{}.{}.{}", version.0, version.1, version.2),
                    "WhatsApp Web version fetched"
                );
                known.version = Some((version, Instant::now()));
                known.failed_at = None;
                Some(version)
            }
            Err(error) => {
                tracing::warn!(error = %error, "fetching WhatsApp Web's version failed");
                known.failed_at = Some(Instant::now());
                known.version.map(|(version, _)| version)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Answers `(2, 3000, n)` for the `n`th fetch, or fails while `down`.
    #[derive(Clone, Default)]
    struct Counting {
        fetches: Arc<AtomicU32>,
        down: Arc<std::sync::atomic::AtomicBool>,
    }

    #[async_trait]
    impl VersionSource for Counting {
        async fn fetch(&self) -> anyhow::Result<WebVersion> {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            if self.down.load(Ordering::SeqCst) {
                anyhow::bail!("sw.js unreachable");
            }
            Ok((2, 3000, n))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_starting_together_share_one_fetch() {
        let source = Counting::default();
        let shared = SharedVersion::new(source.clone());

        let versions = futures::future::join_all((0..10).map(|_| shared.current())).await;

        assert!(versions.iter().all(|v| *v == Some((2, 3000, 1))));
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_version_is_fetched_again_after_a_day() {
        let source = Counting::default();
        let shared = SharedVersion::new(source.clone());
        shared.current().await;

        tokio::time::advance(VERSION_MAX_AGE).await;
        let refreshed = shared.current().await;

        assert_eq!(refreshed, Some((2, 3000, 2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_last_version_and_waits_before_trying_again() {
        let source = Counting::default();
        let shared = SharedVersion::new(source.clone());
        shared.current().await;
        tokio::time::advance(VERSION_MAX_AGE).await;
        source.down.store(true, Ordering::SeqCst);

        let during_outage = shared.current().await;
        let right_after = shared.current().await;

        assert_eq!(during_outage, Some((2, 3000, 1)), "the stale version");
        assert_eq!(right_after, Some((2, 3000, 1)));
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2, "no retry yet");
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_known_a_failure_leaves_clients_to_fetch_their_own() {
        let source = Counting::default();
        source.down.store(true, Ordering::SeqCst);
        let shared = SharedVersion::new(source.clone());

        let first = shared.current().await;
        let second = shared.current().await;
        tokio::time::advance(RETRY_AFTER_FAILURE).await;
        source.down.store(false, Ordering::SeqCst);
        let recovered = shared.current().await;

        assert_eq!(first, None);
        assert_eq!(second, None);
        assert_eq!(recovered, Some((2, 3000, 2)));
    }
}

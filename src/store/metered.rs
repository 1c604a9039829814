//! [`Metered`]: any [`PairingStore`], timed and counted for the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    Counted, HandOver, HeldLease, LeaseStep, PairingStore, StoreError, Subscription, Written,
};
use crate::metrics::{Metrics, StoreOutcome};

/// Wraps a store so every command's latency, and every failure, reaches
/// [`Metrics`]. A command dropped before the store answered (a caller-side
/// timeout, a cancelled request, shutdown) is counted apart as abandoned,
/// so cancelled requests do not look like store faults.
pub struct Metered {
    inner: Arc<dyn PairingStore>,
    metrics: Arc<Metrics>,
}

impl Metered {
    /// `inner`, reporting to `metrics`.
    pub fn new(inner: Arc<dyn PairingStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

/// Records one command when it finishes, or as abandoned if it is dropped
/// first.
struct Timing<'a> {
    metrics: &'a Metrics,
    op: &'static str,
    started: Instant,
    finished: bool,
}

impl<'a> Timing<'a> {
    fn start(metrics: &'a Metrics, op: &'static str) -> Self {
        Self {
            metrics,
            op,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish<T>(mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.finished = true;
        let outcome = match result {
            Ok(_) => StoreOutcome::Ok,
            Err(_) => StoreOutcome::Failed,
        };
        self.metrics
            .store_command(self.op, self.started.elapsed(), outcome);
        result
    }
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .store_command(self.op, self.started.elapsed(), StoreOutcome::Abandoned);
        }
    }
}

#[async_trait::async_trait]
impl PairingStore for Metered {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let timing = Timing::start(&self.metrics, "set");
        timing.finish(self.inner.set(key, value, ttl).await)
    }

    async fn set_state(
        &self,
        key: &str,
        value: &str,
        seq: u64,
        ttl: Duration,
        lease: Option<HeldLease<'_>>,
    ) -> Result<Written, StoreError> {
        // Counted as `set`: it is the state write, one command.
        let timing = Timing::start(&self.metrics, "set");
        timing.finish(self.inner.set_state(key, value, seq, ttl, lease).await)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let timing = Timing::start(&self.metrics, "get");
        timing.finish(self.inner.get(key).await)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let timing = Timing::start(&self.metrics, "delete");
        timing.finish(self.inner.delete(key).await)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let timing = Timing::start(&self.metrics, "ping");
        timing.finish(self.inner.ping().await)
    }

    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError> {
        let timing = Timing::start(&self.metrics, "count");
        timing.finish(self.inner.count(key, window).await)
    }

    async fn lease(
        &self,
        key: &str,
        step: LeaseStep<'_>,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let timing = Timing::start(&self.metrics, "lease");
        timing.finish(self.inner.lease(key, step, ttl).await)
    }

    async fn hand_over(&self, handover: HandOver<'_>) -> Result<Written, StoreError> {
        let timing = Timing::start(&self.metrics, "hand_over");
        timing.finish(self.inner.hand_over(handover).await)
    }

    async fn handed_over(&self, index: &str) -> Result<Vec<String>, StoreError> {
        let timing = Timing::start(&self.metrics, "handed_over");
        timing.finish(self.inner.handed_over(index).await)
    }

    async fn unlist(&self, index: &str, phone: &str) -> Result<(), StoreError> {
        let timing = Timing::start(&self.metrics, "unlist");
        timing.finish(self.inner.unlist(index, phone).await)
    }

    async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        let timing = Timing::start(&self.metrics, "publish");
        timing.finish(self.inner.publish(channel, message).await)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError> {
        let timing = Timing::start(&self.metrics, "subscribe");
        timing.finish(self.inner.subscribe(channel).await)
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// A store that never answers.
    struct Silent;

    #[async_trait::async_trait]
    impl PairingStore for Silent {
        async fn set(&self, _: &str, _: &str, _: Duration) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn set_state(
            &self,
            _: &str,
            _: &str,
            _: u64,
            _: Duration,
            _: Option<HeldLease<'_>>,
        ) -> Result<Written, StoreError> {
            std::future::pending().await
        }
        async fn get(&self, _: &str) -> Result<Option<String>, StoreError> {
            std::future::pending().await
        }
        async fn delete(&self, _: &str) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn count(&self, _: &str, _: Duration) -> Result<Counted, StoreError> {
            std::future::pending().await
        }
        async fn lease(
            &self,
            _: &str,
            _: LeaseStep<'_>,
            _: Duration,
        ) -> Result<Option<u64>, StoreError> {
            std::future::pending().await
        }
        async fn hand_over(&self, _: HandOver<'_>) -> Result<Written, StoreError> {
            std::future::pending().await
        }
        async fn handed_over(&self, _: &str) -> Result<Vec<String>, StoreError> {
            std::future::pending().await
        }
        async fn unlist(&self, _: &str, _: &str) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn publish(&self, _: &str, _: &str) -> Result<u64, StoreError> {
            std::future::pending().await
        }
        async fn subscribe(&self, _: &str) -> Result<Subscription, StoreError> {
            std::future::pending().await
        }
        fn kind(&self) -> &'static str {
            "silent"
        }
    }

    #[tokio::test]
    async fn answered_commands_are_timed_without_errors() {
        // Arrange
        let metrics = Arc::new(Metrics::new());
        let store = Metered::new(Arc::new(MemoryStore::new()), Arc::clone(&metrics));

        // Act
        store.set("k", "v", Duration::from_secs(5)).await.unwrap();
        let read = store.get("k").await.unwrap();
        let text = metrics.render(0, 0);

        // Assert
        assert_eq!(read.as_deref(), Some("v"));
        assert!(
            text.contains(r#"wa_pair_store_seconds_count{op="set"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wa_pair_store_seconds_count{op="get"} 1"#),
            "{text}"
        );
        assert!(!text.contains("wa_pair_store_errors_total{"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_abandoned_by_a_caller_timeout_counts_as_abandoned_not_failed() {
        // Arrange
        let metrics = Arc::new(Metrics::new());
        let store = Metered::new(Arc::new(Silent), Arc::clone(&metrics));

        // Act
        let answer = tokio::time::timeout(Duration::from_secs(1), store.get("k")).await;
        let text = metrics.render(0, 0);

        // Assert
        assert!(answer.is_err());
        assert!(
            text.contains(r#"wa_pair_store_abandoned_total{op="get"} 1"#),
            "{text}"
        );
        assert!(!text.contains("wa_pair_store_errors_total{"), "{text}");
    }
}

//! [`MemoryStore`]: the in-process store, for development, tests and
//! single-instance runs.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Counted, HANDED_OVER_LISTED, HandOver, HeldLease, LEASE_EPOCH_TTL_MS, LeaseStep, PairingStore,
    SUBSCRIPTION_BUFFER, StoreError, Subscription, Written, handed_over_floor_ms, lease_epoch_key,
    lease_value, stored_seq, ttl_seconds,
};

/// Number of stored entries below which [`MemoryStore`] never prunes.
///
/// Pruning scans the whole map, so it only runs when the map has doubled
/// since the last prune (or reached this floor); that keeps writes amortised
/// O(1) while bounding memory to about twice the live entries.
pub const MEMORY_PRUNE_MIN_ENTRIES: usize = 1024;

/// In-process [`PairingStore`] for development, tests and single-instance runs.
///
/// Expiry uses [`tokio::time::Instant`], so tests running with paused time
/// can move past a TTL with `tokio::time::advance` (tokio `test-util`).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    entries: HashMap<String, MemoryEntry>,
    /// Entry count at which the next write prunes expired entries.
    prune_at: usize,
    /// Indexes of handed-over sessions: phone → deadline (milliseconds since
    /// 1970), by index key. Pruned when listed.
    indexes: HashMap<String, HashMap<String, u64>>,
    /// Subscribers by channel; closed ones are dropped at the next publish.
    subscribers: HashMap<String, Vec<mpsc::Sender<String>>>,
}

#[derive(Debug)]
struct MemoryEntry {
    value: String,
    /// `None` when `now + ttl` is beyond what an `Instant` can represent.
    expires_at: Option<Instant>,
}

impl MemoryEntry {
    fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

impl MemoryInner {
    /// What a state write numbered `seq` under `key`, fenced by `lease`,
    /// must stop at (renewing the lease when it holds): `None` to write.
    fn refusal(
        &mut self,
        key: &str,
        seq: u64,
        lease: Option<HeldLease<'_>>,
        now: Instant,
    ) -> Option<Written> {
        if let Some(lease) = lease {
            let value = lease.value();
            let Some(held) = self
                .entries
                .get_mut(lease.key)
                .filter(|entry| !entry.is_expired(now) && entry.value == value)
            else {
                return Some(Written::LeaseLost);
            };
            held.expires_at = now.checked_add(lease.ttl);
        }
        self.entries
            .get(key)
            .filter(|entry| !entry.is_expired(now))
            .and_then(|entry| stored_seq(&entry.value))
            .filter(|current| *current > seq)
            .map(|current| Written::Stale { current })
    }

    fn prune_if_due(&mut self, now: Instant) {
        if self.entries.len() < self.prune_at {
            return;
        }
        self.entries.retain(|_, entry| !entry.is_expired(now));
        self.prune_at = self
            .entries
            .len()
            .saturating_mul(2)
            .max(MEMORY_PRUNE_MIN_ENTRIES);
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remaining time to live of `key`; `None` when it is missing or expired.
    ///
    /// For tests and debugging. An entry whose expiry lies beyond what the
    /// clock can represent reports `Duration::MAX`.
    pub fn ttl_of(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let inner = self.lock();
        let entry = inner.entries.get(key)?;
        if entry.is_expired(now) {
            return None;
        }
        Some(
            entry
                .expires_at
                .map_or(Duration::MAX, |at| at.saturating_duration_since(now)),
        )
    }

    /// Number of entries held in memory, including expired ones not yet pruned.
    ///
    /// For tests and metrics: shows that pruning keeps memory bounded.
    pub fn stored_entries(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        // No critical section can panic half-way, so a poisoned map is still
        // consistent; recovering avoids turning one panic into many.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl PairingStore for MemoryStore {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let expires_at = now.checked_add(Duration::from_secs(ttl_seconds(ttl)));
        let mut inner = self.lock();
        inner.prune_if_due(now);
        inner.entries.insert(
            key.to_owned(),
            MemoryEntry {
                value: value.to_owned(),
                expires_at,
            },
        );
        Ok(())
    }

    async fn set_state(
        &self,
        key: &str,
        value: &str,
        seq: u64,
        ttl: Duration,
        lease: Option<HeldLease<'_>>,
    ) -> Result<Written, StoreError> {
        let now = Instant::now();
        if let Some(refused) = self.lock().refusal(key, seq, lease, now) {
            return Ok(refused);
        }
        // Nothing awaits between the check and the write, and sessions of
        // one phone in one process write one after another.
        self.set(key, value, ttl).await?;
        Ok(Written::Stored)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let expired = match inner.entries.get(key) {
            None => return Ok(None),
            Some(entry) if !entry.is_expired(now) => return Ok(Some(entry.value.clone())),
            Some(_) => true,
        };
        if expired {
            inner.entries.remove(key);
        }
        Ok(None)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.lock().entries.remove(key);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn lease(
        &self,
        key: &str,
        step: LeaseStep<'_>,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune_if_due(now);
        let current = inner
            .entries
            .get(key)
            .filter(|entry| !entry.is_expired(now))
            .map(|entry| entry.value.clone());
        let holding =
            |holder: &str, epoch: u64| current.as_deref() == Some(&lease_value(holder, epoch));
        let expires_at = now.checked_add(ttl);
        let epoch = match step {
            LeaseStep::Take { holder } => {
                if let Some(current) = current {
                    let Some(epoch) = current
                        .strip_prefix(holder)
                        .and_then(|rest| rest.strip_prefix('|'))
                        .and_then(|epoch| epoch.parse::<u64>().ok())
                    else {
                        return Ok(None);
                    };
                    epoch
                } else {
                    let counter = lease_epoch_key(key);
                    let epoch = inner
                        .entries
                        .get(&counter)
                        .filter(|entry| !entry.is_expired(now))
                        .and_then(|entry| entry.value.parse::<u64>().ok())
                        .unwrap_or(0)
                        + 1;
                    inner.entries.insert(
                        counter,
                        MemoryEntry {
                            value: epoch.to_string(),
                            expires_at: now.checked_add(Duration::from_millis(LEASE_EPOCH_TTL_MS)),
                        },
                    );
                    epoch
                }
            }
            LeaseStep::Renew { holder, epoch } | LeaseStep::Release { holder, epoch } => {
                if !holding(holder, epoch) {
                    return Ok(None);
                }
                epoch
            }
        };
        match step {
            LeaseStep::Release { .. } => {
                inner.entries.remove(key);
            }
            LeaseStep::Take { holder } | LeaseStep::Renew { holder, .. } => {
                inner.entries.insert(
                    key.to_owned(),
                    MemoryEntry {
                        value: lease_value(holder, epoch),
                        expires_at,
                    },
                );
            }
        }
        Ok(Some(epoch))
    }

    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune_if_due(now);
        let live = inner
            .entries
            .get(key)
            .filter(|entry| !entry.is_expired(now))
            .map(|entry| (entry.value.parse::<u64>().unwrap_or(0), entry.expires_at));
        let (count, expires_at) = match live {
            Some((count, expires_at)) => (count.saturating_add(1), expires_at),
            None => (1, now.checked_add(Duration::from_secs(ttl_seconds(window)))),
        };
        inner.entries.insert(
            key.to_owned(),
            MemoryEntry {
                value: count.to_string(),
                expires_at,
            },
        );
        Ok(Counted {
            count,
            window_left: expires_at.map_or(Duration::MAX, |at| at.saturating_duration_since(now)),
        })
    }

    async fn hand_over(&self, handover: HandOver<'_>) -> Result<Written, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(refused) = inner.refusal(handover.key, handover.seq, handover.lease, now) {
            return Ok(refused);
        }
        inner.entries.insert(
            handover.key.to_owned(),
            MemoryEntry {
                value: handover.value.to_owned(),
                expires_at: now.checked_add(Duration::from_secs(ttl_seconds(handover.ttl))),
            },
        );
        inner
            .indexes
            .entry(handover.index.to_owned())
            .or_default()
            .insert(handover.phone.to_owned(), handover.deadline_ms);
        if let Some(lease) = handover.lease {
            inner.entries.remove(lease.key);
        }
        Ok(Written::Stored)
    }

    async fn handed_over(&self, index: &str) -> Result<Vec<String>, StoreError> {
        let floor = handed_over_floor_ms();
        let mut inner = self.lock();
        let Some(listed) = inner.indexes.get_mut(index) else {
            return Ok(Vec::new());
        };
        listed.retain(|_, deadline| *deadline >= floor);
        let mut phones: Vec<(u64, String)> = listed
            .iter()
            .map(|(phone, deadline)| (*deadline, phone.clone()))
            .collect();
        phones.sort_unstable();
        Ok(phones
            .into_iter()
            .take(HANDED_OVER_LISTED)
            .map(|(_, phone)| phone)
            .collect())
    }

    async fn unlist(&self, index: &str, phone: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(listed) = inner.indexes.get_mut(index) {
            listed.remove(phone);
            if listed.is_empty() {
                inner.indexes.remove(index);
            }
        }
        Ok(())
    }

    async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let Some(subscribers) = inner.subscribers.get_mut(channel) else {
            return Ok(0);
        };
        // As Redis: a subscriber that cannot keep up loses its
        // subscription, not the publisher its time.
        subscribers.retain(|subscriber| subscriber.try_send(message.to_owned()).is_ok());
        let received = subscribers.len() as u64;
        if subscribers.is_empty() {
            inner.subscribers.remove(channel);
        }
        Ok(received)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError> {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let mut inner = self.lock();
        let subscribers = inner.subscribers.entry(channel.to_owned()).or_default();
        subscribers.retain(|subscriber| !subscriber.is_closed());
        subscribers.push(sender);
        Ok(receiver)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "wa:pair:628123456789";
    const VALUE: &str = r#"{"status":"pending"}"#;
    const TEN_MINUTES: Duration = Duration::from_secs(600);

    // MemoryStore

    #[tokio::test]
    async fn a_stored_value_can_be_read_back() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");
        let read = store.get(KEY).await.expect("get");

        // Assert
        assert_eq!(read.as_deref(), Some(VALUE));
    }

    #[tokio::test]
    async fn a_missing_key_reads_as_none() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        let read = store.get(KEY).await.expect("get");

        // Assert
        assert_eq!(read, None);
    }

    #[tokio::test]
    async fn a_deleted_key_reads_as_none() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");

        // Act
        store.delete(KEY).await.expect("delete");

        // Assert
        assert_eq!(store.get(KEY).await.expect("get"), None);
        assert_eq!(store.ttl_of(KEY), None);
    }

    #[tokio::test]
    async fn deleting_a_missing_key_is_not_an_error() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        let outcome = store.delete(KEY).await;

        // Assert
        assert!(outcome.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_is_readable_until_its_ttl_has_passed_and_gone_after() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");

        // Act
        tokio::time::advance(Duration::from_secs(599)).await;
        let just_before = store.get(KEY).await.expect("get");
        tokio::time::advance(Duration::from_secs(1)).await;
        let at_expiry = store.get(KEY).await.expect("get");

        // Assert
        assert_eq!(just_before.as_deref(), Some(VALUE));
        assert_eq!(at_expiry, None);
        assert_eq!(store.ttl_of(KEY), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_of_reports_the_remaining_time_to_live() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");

        // Act
        tokio::time::advance(Duration::from_secs(100)).await;
        let remaining = store.ttl_of(KEY);

        // Assert
        assert_eq!(remaining, Some(Duration::from_secs(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn overwriting_a_key_replaces_the_value_and_resets_the_ttl() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, "first", TEN_MINUTES).await.expect("set");
        tokio::time::advance(Duration::from_secs(500)).await;

        // Act
        store.set(KEY, "second", TEN_MINUTES).await.expect("set");
        tokio::time::advance(Duration::from_secs(500)).await;

        // Assert
        assert_eq!(
            store.get(KEY).await.expect("get").as_deref(),
            Some("second")
        );
        assert_eq!(store.ttl_of(KEY), Some(Duration::from_secs(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_or_fractional_ttl_rounds_up_to_whole_seconds() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        store.set("zero", VALUE, Duration::ZERO).await.expect("set");
        store
            .set("fraction", VALUE, Duration::from_millis(1_500))
            .await
            .expect("set");

        // Assert
        assert_eq!(store.ttl_of("zero"), Some(Duration::from_secs(1)));
        assert_eq!(store.ttl_of("fraction"), Some(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurdly_long_ttl_never_expires_instead_of_overflowing() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        store.set(KEY, VALUE, Duration::MAX).await.expect("set");
        tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;

        // Assert
        assert_eq!(store.get(KEY).await.expect("get").as_deref(), Some(VALUE));
        assert_eq!(store.ttl_of(KEY), Some(Duration::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_pruned_so_memory_stays_bounded() {
        // Arrange
        let store = MemoryStore::new();
        let rounds = 20;
        let per_round = MEMORY_PRUNE_MIN_ENTRIES;
        let mut peak = 0;

        // Act
        for round in 0..rounds {
            for n in 0..per_round {
                let key = format!("wa:pair:{round}:{n}");
                store
                    .set(&key, VALUE, Duration::from_secs(1))
                    .await
                    .expect("set");
                peak = peak.max(store.stored_entries());
            }
            tokio::time::advance(Duration::from_secs(2)).await;
        }

        // Assert
        assert!(
            peak <= 2 * MEMORY_PRUNE_MIN_ENTRIES + 1,
            "peak of {peak} entries after {} writes",
            rounds * per_round
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_never_drops_live_entries() {
        // Arrange
        let store = MemoryStore::new();
        let live = MEMORY_PRUNE_MIN_ENTRIES * 3;
        for n in 0..live {
            store
                .set(&format!("live:{n}"), VALUE, TEN_MINUTES)
                .await
                .expect("set");
        }

        // Act
        for n in 0..MEMORY_PRUNE_MIN_ENTRIES * 4 {
            store
                .set(&format!("short:{n}"), VALUE, Duration::from_secs(1))
                .await
                .expect("set");
            tokio::time::advance(Duration::from_millis(10)).await;
        }

        // Assert
        for n in 0..live {
            let read = store.get(&format!("live:{n}")).await.expect("get");
            assert_eq!(read.as_deref(), Some(VALUE), "live:{n} was dropped");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_grow_within_a_fixed_window_and_start_over_after_it() {
        // Arrange
        let store = MemoryStore::new();
        let window = Duration::from_secs(3600);

        // Act
        let first = store.count("budget", window).await.unwrap();
        tokio::time::advance(Duration::from_secs(600)).await;
        let second = store.count("budget", window).await.unwrap();
        tokio::time::advance(Duration::from_secs(3000)).await;
        let after = store.count("budget", window).await.unwrap();

        // Assert
        assert_eq!(first.count, 1);
        assert_eq!(first.window_left, window);
        assert_eq!(second.count, 2);
        assert_eq!(
            second.window_left,
            Duration::from_secs(3000),
            "not extended"
        );
        assert_eq!(after.count, 1, "a new window");
    }

    #[tokio::test]
    async fn memory_store_pings_and_names_itself() {
        // Arrange
        let store = MemoryStore::default();

        // Act
        let pinged = store.ping().await;

        // Assert
        assert!(pinged.is_ok());
        assert_eq!(store.kind(), "memory");
    }

    #[tokio::test]
    async fn a_state_numbered_below_the_stored_one_is_refused_and_the_same_one_rewritten() {
        // Arrange
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(600);
        store
            .set_state("k", r#"{"seq":20,"status":"linked"}"#, 20, ttl, None)
            .await
            .unwrap();

        // Act
        let late = store
            .set_state("k", r#"{"seq":10,"status":"pending"}"#, 10, ttl, None)
            .await
            .unwrap();
        let again = store
            .set_state("k", r#"{"seq":20,"status":"linked"}"#, 20, ttl, None)
            .await
            .unwrap();
        let newer = store
            .set_state("k", r#"{"seq":30,"status":"pending"}"#, 30, ttl, None)
            .await
            .unwrap();

        // Assert
        assert_eq!(late, Written::Stale { current: 20 });
        assert_eq!(again, Written::Stored);
        assert_eq!(newer, Written::Stored);
        assert_eq!(
            store.get("k").await.unwrap().as_deref(),
            Some(r#"{"seq":30,"status":"pending"}"#)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_goes_to_one_holder_at_a_time_and_each_take_over_numbers_above() {
        // Arrange
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(30);

        // Act
        let first = store
            .lease("l", LeaseStep::Take { holder: "a" }, ttl)
            .await
            .unwrap();
        let other = store
            .lease("l", LeaseStep::Take { holder: "b" }, ttl)
            .await
            .unwrap();
        tokio::time::advance(ttl).await;
        let after_expiry = store
            .lease("l", LeaseStep::Take { holder: "b" }, ttl)
            .await
            .unwrap();
        let stale = store
            .lease(
                "l",
                LeaseStep::Renew {
                    holder: "a",
                    epoch: 1,
                },
                ttl,
            )
            .await
            .unwrap();

        // Assert
        assert_eq!(first, Some(1));
        assert_eq!(other, None);
        assert_eq!(after_expiry, Some(2));
        assert_eq!(stale, None);
    }
}

//! The store writer: every state change goes to the store (bounded in
//! time), a failed write is healed later, and the code budget is counted.
//! The session keeps its latest state in memory, so a store outage loses
//! nothing.

use std::time::Duration;

use tokio::time::Instant;

use super::Session;
use super::lease::LEASE_TTL;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::session::schedule::CODE_BUDGET_WINDOW;
use crate::session::state::{PairState, StoredState};
use crate::store::{HeldLease, Written};

/// Longest a state write may hold up the session (and so the HTTP answer).
/// The Upstash client retries internally; past this we move on and heal later.
///
/// Longer than one Upstash request (5 s) so a slow but working store still
/// gets its write in; a dead one fails fast anyway.
pub const STORE_WRITE_BUDGET: Duration = Duration::from_secs(6);
/// Backoff between attempts to heal the store after a failed write.
pub const STORE_HEAL_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
/// Attempts to heal the store once a session has ended, before giving up.
pub const FINAL_HEAL_ATTEMPTS: u32 = 3;

impl Session {
    /// Takes one code from the phone's budget; `Some(wait)` when none is
    /// left. A store that does not answer does not hold codes back (a store
    /// outage must not stop pairing); that is logged.
    // `&mut self`: a session is `Send` but not `Sync` (its request in
    // flight is not), so no `&self` may be held across an await.
    pub(super) async fn take_code_from_budget(&mut self) -> Option<Duration> {
        let key = self.settings.budget_key(&self.phone);
        let counted = tokio::time::timeout(
            STORE_WRITE_BUDGET,
            self.store.count(&key, CODE_BUDGET_WINDOW),
        )
        .await;
        let error = match counted {
            Ok(Ok(counted)) if counted.count > u64::from(self.settings.codes_per_hour) => {
                return Some(counted.window_left.max(Duration::from_secs(1)));
            }
            Ok(Ok(_)) => return None,
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(
            phone = %self.phone,
            error,
            event = "code_budget_unchecked",
            "code budget could not be counted; issuing anyway"
        );
        None
    }

    /// Counts something in the metrics, when this session is metered.
    pub(super) fn count(&self, record: impl FnOnce(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            record(metrics);
        }
    }

    /// Numbers `state` above the last one, stores it (bounded in time),
    /// then publishes it.
    pub(super) async fn commit(&mut self, mut state: PairState) {
        state.seq = next_seq(self.state.seq);
        self.state = state;
        self.write_store().await;
        if self.taken_over {
            // Not ours to show: the other process's state is the phone's.
            return;
        }
        self.published.send_replace(self.state.clone());
    }

    /// `state` as the store keeps it (with the owner tag); `None`, logged,
    /// if it does not serialize.
    pub(super) fn stored_json(&self, state: &PairState) -> Option<String> {
        let stored = StoredState {
            state,
            owner: self.owner_tag.as_deref(),
        };
        serde_json::to_string(&stored)
            .inspect_err(|e| {
                tracing::error!(phone = %self.phone, error = %e, "state does not serialize");
            })
            .ok()
    }

    /// The lease this session holds, as a write checks and renews it.
    pub(super) fn held_lease(&self) -> Option<HeldLease<'_>> {
        self.lease.as_ref().map(|lease| HeldLease {
            key: &lease.key,
            holder: &lease.holder,
            epoch: lease.epoch,
            ttl: LEASE_TTL,
        })
    }

    pub(super) async fn write_store(&mut self) {
        if self.taken_over {
            return;
        }
        let Some(json) = self.stored_json(&self.state) else {
            return;
        };
        // A passkey link waits on the person, with nothing scheduled that
        // would write again: its state stays until the session's deadline.
        let wait = if self.passkey_link {
            Some(self.deadline.saturating_duration_since(Instant::now()))
        } else {
            self.next_request
                .map(|at| at.saturating_duration_since(Instant::now()))
        };
        let ttl = self.settings.store_ttl(self.state.status, wait);
        let lease = self.held_lease();
        let sent = Instant::now();
        let result = tokio::time::timeout(
            STORE_WRITE_BUDGET,
            self.store
                .set_state(&self.key, &json, self.state.seq, ttl, lease),
        )
        .await;
        if let Ok(Ok(Written::Stored | Written::Stale { .. })) = result {
            // The write renewed the lease too.
            self.lease_renewed(sent);
        }
        match result {
            Ok(Ok(Written::LeaseLost)) => {
                self.lease_lost();
            }
            Ok(Ok(Written::Stale { current })) => {
                // Someone wrote a newer state of this phone (another
                // process): ours must not replace it, and retrying cannot
                // change that.
                tracing::warn!(
                    phone = %self.phone,
                    seq = self.state.seq,
                    stored_seq = current,
                    event = "stale_state_refused",
                    "the store holds a newer state of this phone; this one is not written"
                );
                self.store_failures = 0;
                self.store_heal_at = None;
            }
            Ok(Ok(Written::Stored)) => {
                if self.store_failures > 0 {
                    tracing::info!(phone = %self.phone, "store healed");
                }
                self.store_failures = 0;
                self.store_heal_at = None;
            }
            Ok(Err(e)) => self.store_failed(&e.to_string()),
            Err(_) => self.store_failed("timed out"),
        }
    }

    pub(super) fn store_failed(&mut self, error: &str) {
        let delay = STORE_HEAL_BACKOFF.ceiling(self.store_failures);
        self.store_failures += 1;
        self.store_heal_at = Some(Instant::now() + delay);
        tracing::warn!(
            phone = %self.phone,
            store = self.store.kind(),
            error,
            retry_in_secs = delay.as_secs(),
            "store write failed; keeping the state in memory and retrying"
        );
    }
}

/// The number of a state that follows one numbered `previous`: the time in
/// microseconds since 1970, so a later session (or process) numbers above
/// an earlier one, and at least `previous + 1`, so one session's states are
/// always in order even if the clock steps back.
pub(super) fn next_seq(previous: u64) -> u64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
    u64::try_from(now)
        .unwrap_or(0)
        .max(previous.saturating_add(1))
}

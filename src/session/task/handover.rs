//! Handing a session over when the process stops, and resuming one another
//! process handed over. A deploy stops the old process while people are
//! still typing its codes: instead of ending their sessions
//! `failed`/`interrupted`, the old process stores each one as `starting`
//! (`reason: handed_over`, its deadline and attempt count kept), lists it
//! in the store's index of handed-over sessions and gives its lease up, in
//! one store command. The next process resumes it from there: a new
//! connection, a new code, the same session.

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{Session, StepOutcome, writer::STORE_WRITE_BUDGET, writer::next_seq};
use crate::session::state::{PairState, Reason, Status};
use crate::store::{HandOver, Written};

/// The message of a handed-over state.
const HANDED_OVER_MESSAGE: &str = "the service is restarting; a new code follows in a few seconds";

impl Session {
    /// The same session, handing itself over (instead of ending
    /// `failed`/`interrupted`) when the service stops: for processes that
    /// share their store with the next one.
    #[must_use]
    pub fn handing_over(mut self) -> Self {
        self.hand_over = true;
        self
    }

    /// The same session, resuming `stored`: the state another process
    /// handed over (or left behind). Its attempt count, deadline and
    /// numbering go on; its code and QR code (the other process's
    /// connection) do not. A deadline already passed ends it `expired` at
    /// its first step.
    #[must_use]
    pub fn resuming(mut self, stored: &PairState) -> Self {
        let now = OffsetDateTime::now_utc();
        if let Some(deadline) = stored.deadline {
            let left = (deadline - now).try_into().unwrap_or_default();
            self.deadline = Instant::now() + left;
        }
        self.state = PairState {
            reason: Some(Reason::HandedOver),
            message: Some(HANDED_OVER_MESSAGE.into()),
            deadline: stored.deadline.or(self.state.deadline),
            ..stored.without_code(Status::Starting).without_qr()
        };
        self.published.send_replace(self.state.clone());
        self
    }

    /// Whether the store holds this phone's state numbered `seq`.
    // `&mut self`: a session is not `Sync` (see `writer.rs`).
    async fn stored_is(&mut self, seq: u64) -> bool {
        let read = tokio::time::timeout(STORE_WRITE_BUDGET, self.store.get(&self.key)).await;
        let Ok(Ok(Some(json))) = read else {
            return false;
        };
        serde_json::from_str::<PairState>(&json).is_ok_and(|stored| stored.seq == seq)
    }

    /// The service stops: stores this session as handed over, lists it for
    /// the next process and gives the lease up (one command). A store that
    /// does not take it ends the session `failed`/`interrupted` as before.
    pub(super) async fn hand_over_now(&mut self) -> StepOutcome {
        let mut state = PairState {
            reason: Some(Reason::HandedOver),
            message: Some(HANDED_OVER_MESSAGE.into()),
            ..self.state.without_code(Status::Starting).without_qr()
        };
        state.seq = next_seq(self.state.seq);
        let Some(json) = self.stored_json(&state) else {
            return self.interrupted().await;
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        let deadline_ms = state.deadline.map_or(0, |deadline| {
            u64::try_from(deadline.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
        });
        let index = self.settings.handed_over_key();
        let lease = self.held_lease();
        let handover = HandOver {
            key: &self.key,
            value: &json,
            seq: state.seq,
            ttl: self.settings.store_ttl(Status::Starting, Some(left)),
            lease,
            index: &index,
            phone: self.phone.as_str(),
            deadline_ms,
        };
        let mut written =
            tokio::time::timeout(STORE_WRITE_BUDGET, self.store.hand_over(handover)).await;
        if matches!(written, Ok(Ok(Written::LeaseLost))) && self.stored_is(state.seq).await {
            // A retry of a hand-over whose first answer was lost: the first
            // wrote it and gave the lease up.
            written = Ok(Ok(Written::Stored));
        }
        match written {
            Ok(Ok(Written::Stored)) => {
                // The write gave the lease up.
                self.lease = None;
                self.store_heal_at = None;
                self.state = state;
                self.published.send_replace(self.state.clone());
                tracing::info!(
                    phone = %self.phone,
                    attempt = self.state.attempt,
                    event = "handed_over",
                    "service stopping: session handed over to the next process"
                );
                StepOutcome::HandedOver
            }
            Ok(Ok(Written::LeaseLost)) => self.lease_lost(),
            Ok(Ok(Written::Stale { .. })) => {
                // Another process wrote a newer state: it runs the phone.
                StepOutcome::HandedOver
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    phone = %self.phone,
                    "session could not be handed over (store); ending it as interrupted"
                );
                self.interrupted().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Handing over and resuming one session, under paused time, with the
    //! scripted linker and the in-memory store.

    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::tests::{Fixture, fixture};
    use super::*;
    use crate::session::testing::settings;
    use crate::store::{LeaseStep, PairingStore};

    const KEY: &str = "wa:pair:628123456789";
    const LEASE: &str = "wa:pair:lease:628123456789";
    const INDEX: &str = "wa:pair:handed_over";

    /// A session that holds the phone's lease, hands over on stop and shows
    /// its first code.
    async fn pending_and_handing_over() -> Fixture {
        let f = fixture(settings());
        let epoch = f
            .store
            .lease(
                LEASE,
                LeaseStep::Take { holder: "old" },
                super::super::LEASE_TTL,
            )
            .await
            .unwrap()
            .unwrap();
        let mut f = Fixture {
            session: f
                .session
                .leased(LEASE.into(), "old".into(), epoch)
                .handing_over(),
            ..f
        };
        f.session.step().await;
        f
    }

    async fn stored(f: &Fixture) -> PairState {
        let json = f.store.inner.get(KEY).await.unwrap().expect("stored");
        serde_json::from_str(&json).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_hands_a_pending_session_over_keeping_its_attempt_and_deadline() {
        // Arrange
        let mut f = pending_and_handing_over().await;
        let before = f.states.borrow().clone();
        assert_eq!(before.status, Status::Pending);

        // Act
        f.stop.send_replace(true);
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::HandedOver);
        let state = stored(&f).await;
        assert_eq!(state.status, Status::Starting);
        assert_eq!(state.reason, Some(Reason::HandedOver));
        assert!(
            state.code.is_none() && state.qr.is_none(),
            "its connection is gone"
        );
        assert_eq!(state.attempt, before.attempt);
        assert_eq!(state.deadline, before.deadline);
        assert!(state.seq > before.seq);
        assert_eq!(*f.states.borrow(), state, "published as stored");
        assert_eq!(
            f.store.inner.get(LEASE).await.unwrap(),
            None,
            "lease given up"
        );
        assert_eq!(
            f.store.inner.handed_over(INDEX).await.unwrap(),
            vec!["628123456789".to_owned()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_without_hand_over_still_ends_the_session_interrupted_and_lists_nothing() {
        // Arrange
        let mut f = fixture(settings());
        f.session.step().await;

        // Act
        f.stop.send_replace(true);
        f.session.step().await;

        // Assert
        assert_eq!(stored(&f).await.reason, Some(Reason::Interrupted));
        assert!(f.store.inner.handed_over(INDEX).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_lost_its_lease_hands_nothing_over() {
        // Arrange: another process took the phone over.
        let mut f = pending_and_handing_over().await;
        f.store.inner.delete(LEASE).await.unwrap();
        f.store
            .lease(
                LEASE,
                LeaseStep::Take { holder: "new" },
                super::super::LEASE_TTL,
            )
            .await
            .unwrap();
        let shown = stored(&f).await;

        // Act
        f.stop.send_replace(true);
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::LeaseLost);
        assert_eq!(stored(&f).await, shown, "nothing written");
        assert!(f.store.inner.handed_over(INDEX).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_session_goes_on_with_the_next_attempt_before_the_same_deadline() {
        // Arrange: the old process handed its session over.
        let mut old = pending_and_handing_over().await;
        old.stop.send_replace(true);
        old.session.step().await;
        let handed = stored(&old).await;
        tokio::time::advance(Duration::from_secs(30)).await;

        // Act: a new process resumes it from the store.
        let new = fixture(settings());
        let store: Arc<dyn PairingStore> = old.store.clone();
        let (session, _commands, states) = Session::new(
            handed.phone.clone(),
            Arc::new(settings()),
            Arc::new(crate::session::testing::ScriptedLinker(Arc::clone(
                &new.script,
            ))),
            store,
            new.stop.subscribe(),
        );
        let mut session = session.resuming(&handed);
        let resumed_at_start = states.borrow().clone();
        let outcome = session.step().await;

        // Assert
        assert_eq!(resumed_at_start.reason, Some(Reason::HandedOver));
        assert_eq!(resumed_at_start.deadline, handed.deadline);
        assert_eq!(
            outcome,
            StepOutcome::CodeIssued {
                attempt: handed.attempt + 1
            }
        );
        let state = states.borrow().clone();
        assert_eq!(state.status, Status::Pending);
        assert_eq!(state.reason, None);
        assert_eq!(
            state.deadline, handed.deadline,
            "the deadline does not move"
        );
        assert!(state.seq > handed.seq);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_session_past_its_deadline_ends_expired_without_asking_whatsapp() {
        // Arrange
        let mut old = pending_and_handing_over().await;
        old.stop.send_replace(true);
        old.session.step().await;
        let mut handed = stored(&old).await;
        handed.deadline = Some(OffsetDateTime::now_utc() - time::Duration::seconds(1));
        let new = fixture(settings());

        // Act
        let mut session = new.session.resuming(&handed);
        let outcome = session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::Ended(Status::Expired));
        assert_eq!(
            new.script.opens.load(Ordering::SeqCst),
            0,
            "no connection for a session whose time is up"
        );
    }
}

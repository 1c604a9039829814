//! The session's lease: when several processes share the store, one
//! process runs a phone's session. The registry takes the lease before it
//! starts a session; the session renews it while it runs, gives it up when
//! it ends, and stops (without writing) if it ever finds it lost, so two
//! processes never both talk to WhatsApp for one phone for longer than a
//! renewal.

use std::time::Duration;

use tokio::time::Instant;

use super::{Session, StepOutcome, writer::STORE_WRITE_BUDGET};
use crate::store::LeaseStep;

/// How long a lease lasts without renewal: a process that dies without
/// giving it up holds the phone this long (a process that stops gives it
/// up). Renewals run beside whatever the session waits on.
pub const LEASE_TTL: Duration = Duration::from_secs(75);
/// How long after its last renewal a running session renews its lease:
/// two renewals fit in a TTL, so one lost or slow renewal does not lose
/// the lease. Every state write renews it too, and a connection rotates
/// its QR code every 20 s after the first 60 s, so a session needs about
/// one renewal of its own per connection: each is an Upstash command.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(30);
/// After a renewal the store did not answer, how soon to try again.
const LEASE_RETRY: Duration = Duration::from_secs(2);
/// A session whose renewals keep failing stops this long before its lease
/// could have expired (a retry plus a renewal's wait), so it never talks to
/// WhatsApp past the lease.
const LEASE_SAFETY: Duration =
    Duration::from_secs(LEASE_RETRY.as_secs() + STORE_WRITE_BUDGET.as_secs());

/// A lease this session holds.
pub(super) struct Lease {
    /// The lease's store key.
    pub key: String,
    /// This process.
    pub holder: String,
    /// The epoch it was taken at.
    pub epoch: u64,
    /// When to renew it next.
    pub renew_at: Instant,
    /// When it was last taken or renewed.
    pub renewed_at: Instant,
}

/// A lease a session started without (the store did not answer when it
/// started) and keeps trying to take: until it has it, another process may
/// take the phone over, and then this session must stop.
pub(super) struct MissingLease {
    /// The lease's store key.
    pub key: String,
    /// This process.
    pub holder: String,
    /// When to try again.
    pub retry_at: Instant,
}

impl Session {
    /// The same session, started without the lease `key` (the store did not
    /// answer): it takes it as soon as the store answers, and stops if
    /// another process has it by then.
    #[must_use]
    pub fn leasing_later(mut self, key: String, holder: String) -> Self {
        self.missing_lease = Some(MissingLease {
            key,
            holder,
            retry_at: Instant::now() + LEASE_RETRY,
        });
        self
    }

    /// Tries to take the lease this session started without: `Some(LeaseLost)`
    /// when another process has the phone now.
    pub(super) async fn take_missing_lease(&mut self) -> Option<StepOutcome> {
        let missing = self.missing_lease.as_ref()?;
        let step = LeaseStep::Take {
            holder: &missing.holder,
        };
        let sent = Instant::now();
        let taken = tokio::time::timeout(
            STORE_WRITE_BUDGET,
            self.store.lease(&missing.key, step, LEASE_TTL),
        )
        .await;
        match taken {
            Ok(Ok(Some(epoch))) => {
                let missing = self.missing_lease.take()?;
                self.lease = Some(Lease {
                    key: missing.key,
                    holder: missing.holder,
                    epoch,
                    renew_at: sent + LEASE_RENEW_EVERY,
                    renewed_at: sent,
                });
                None
            }
            Ok(Ok(None)) => {
                self.missing_lease = None;
                Some(self.lease_lost())
            }
            Ok(Err(_)) | Err(_) => {
                if let Some(missing) = self.missing_lease.as_mut() {
                    missing.retry_at = Instant::now() + LEASE_RETRY;
                }
                None
            }
        }
    }

    /// The same session, holding the lease `key` that `holder` took at
    /// `epoch`.
    #[must_use]
    pub fn leased(mut self, key: String, holder: String, epoch: u64) -> Self {
        let now = Instant::now();
        self.lease = Some(Lease {
            key,
            holder,
            epoch,
            renew_at: now + LEASE_RENEW_EVERY,
            renewed_at: now,
        });
        self
    }

    /// Renews the lease; `Some(LeaseLost)` when another process has it now
    /// (or the store stayed silent for a whole TTL, after which another
    /// process may have taken it).
    pub(super) async fn renew_lease(&mut self) -> Option<StepOutcome> {
        let lease = self.lease.as_ref()?;
        let step = LeaseStep::Renew {
            holder: &lease.holder,
            epoch: lease.epoch,
        };
        // The store counts the TTL from when it ran the renewal: at the
        // latest, from now.
        let sent = Instant::now();
        let renewed = tokio::time::timeout(
            STORE_WRITE_BUDGET,
            self.store.lease(&lease.key, step, LEASE_TTL),
        )
        .await;
        let now = Instant::now();
        let lease = self.lease.as_mut()?;
        match renewed {
            Ok(Ok(Some(_))) => {
                self.lease_renewed(sent);
                None
            }
            Ok(Ok(None)) => Some(self.lease_lost()),
            Ok(Err(_)) | Err(_)
                if now.duration_since(lease.renewed_at) >= LEASE_TTL - LEASE_SAFETY =>
            {
                Some(self.lease_lost())
            }
            Ok(Err(_)) | Err(_) => {
                lease.renew_at = now + LEASE_RETRY;
                None
            }
        }
    }

    /// The lease was renewed (by a renewal, or a state write) by a command
    /// sent at `sent`.
    pub(super) fn lease_renewed(&mut self, sent: Instant) {
        if let Some(lease) = self.lease.as_mut() {
            lease.renewed_at = sent;
            lease.renew_at = sent + LEASE_RENEW_EVERY;
        }
    }

    /// Another process runs this phone now: this session stops at once,
    /// writing nothing more.
    pub(super) fn lease_lost(&mut self) -> StepOutcome {
        self.lease = None;
        self.taken_over = true;
        // Nor is a failed write healed: the store is the other's now.
        self.store_heal_at = None;
        tracing::warn!(
            phone = %self.phone,
            event = "lease_lost",
            "another process took over this phone's session; stopping here"
        );
        StepOutcome::LeaseLost
    }

    /// Gives the lease up, once the session's last state is written.
    pub(super) async fn release_lease(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let step = LeaseStep::Release {
            holder: &lease.holder,
            epoch: lease.epoch,
        };
        // Best effort: a lease not given up expires after its TTL.
        let _ = tokio::time::timeout(
            STORE_WRITE_BUDGET,
            self.store.lease(&lease.key, step, LEASE_TTL),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    //! The lease of one session, under paused time, with the scripted
    //! linker and the in-memory store.

    use std::sync::atomic::Ordering;

    use super::super::tests::{Fixture, fixture};
    use super::*;
    use crate::link::{LinkEvent, QrCode};
    use crate::session::state::Status;
    use crate::session::testing::settings;
    use crate::store::PairingStore;

    const LEASE: &str = "wa:pair:lease:628123456789";

    /// Steps `f`'s session for `wait`, in which nothing visible may happen,
    /// then has another process try to take the lease: what it got.
    async fn quiet_then_taken_elsewhere(f: &mut Fixture, wait: Duration) -> Option<u64> {
        let quiet = tokio::time::timeout(wait, f.session.step()).await;
        assert!(quiet.is_err(), "nothing visible happened");
        f.store
            .lease(LEASE, LeaseStep::Take { holder: "there" }, LEASE_TTL)
            .await
            .unwrap()
    }

    /// A session that took the phone's lease (as `here`) and shows a code.
    async fn leased() -> (Fixture, u64) {
        let f = fixture(settings());
        let epoch = f
            .store
            .lease(LEASE, LeaseStep::Take { holder: "here" }, LEASE_TTL)
            .await
            .unwrap()
            .unwrap();
        let mut f = Fixture {
            session: f.session.leased(LEASE.into(), "here".into(), epoch),
            ..f
        };
        f.session.step().await;
        (f, epoch)
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_lease_another_process_took_stops_without_writing() {
        // Arrange: this process holds the lease, the session shows a code.
        let (mut f, epoch) = leased().await;
        let shown = f.states.borrow().clone();

        // Act: another process takes over, then a QR rotates here.
        f.store
            .lease(
                LEASE,
                LeaseStep::Release {
                    holder: "here",
                    epoch,
                },
                LEASE_TTL,
            )
            .await
            .unwrap();
        f.store
            .lease(LEASE, LeaseStep::Take { holder: "there" }, LEASE_TTL)
            .await
            .unwrap();
        f.script.emit(LinkEvent::QrRotated(QrCode::new(
            "2@r,a,b,c",
            Duration::from_secs(20),
        )));
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(shown.status, Status::Pending);
        assert_eq!(outcome, StepOutcome::LeaseLost);
        let stored: crate::session::PairState =
            serde_json::from_str(&f.store.get("wa:pair:628123456789").await.unwrap().unwrap())
                .unwrap();
        assert_eq!(stored.seq, shown.seq, "nothing written after the loss");
        assert_eq!(
            f.states.borrow().seq,
            shown.seq,
            "nor shown to this process's readers"
        );
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_session_keeps_its_lease_by_renewing_it() {
        // Arrange
        let (mut f, _) = leased().await;

        // Act: two TTLs with nothing to write (the code's refresh comes
        // after 165 s).
        let other = quiet_then_taken_elsewhere(&mut f, LEASE_TTL * 2).await;

        // Assert
        assert_eq!(other, None, "the lease is still this session's");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_gives_its_lease_up_when_it_ends() {
        // Arrange
        let (f, _) = leased().await;
        let (reply, answer) = tokio::sync::oneshot::channel();
        f.commands
            .send(crate::session::Command::Cancel(reply))
            .await
            .unwrap();

        // Act
        f.session.run().await;

        // Assert
        assert_eq!(answer.await.unwrap().unwrap().status, Status::Cancelled);
        assert_eq!(f.store.get(LEASE).await.unwrap(), None, "given up");
    }

    /// A session started while the store did not answer the lease: it runs
    /// without one and shows a code.
    async fn started_without_lease() -> Fixture {
        let f = fixture(settings());
        let mut f = Fixture {
            session: f.session.leasing_later(LEASE.into(), "here".into()),
            ..f
        };
        f.session.step().await;
        f
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_started_without_its_lease_takes_it_once_the_store_answers() {
        // Arrange
        let mut f = started_without_lease().await;

        // Act: nothing visible happens; meanwhile it takes the lease.
        let other = quiet_then_taken_elsewhere(&mut f, LEASE_RETRY * 3).await;

        // Assert
        assert_eq!(other, None, "the lease is this session's now");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_started_without_its_lease_stops_when_another_process_has_the_phone() {
        // Arrange: another process took the phone over meanwhile.
        let mut f = started_without_lease().await;
        f.store
            .lease(LEASE, LeaseStep::Take { holder: "there" }, LEASE_TTL)
            .await
            .unwrap();
        let shown = f.states.borrow().clone();

        // Act
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::LeaseLost);
        assert_eq!(*f.states.borrow(), shown, "nothing more shown");
    }
}

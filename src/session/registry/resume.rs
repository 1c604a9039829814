//! Resuming sessions another process handed over (a deploy) or left
//! behind (a crash, once its lease expired): the index of handed-over
//! sessions, looked at when a process starts and for a while after, and
//! the adoption of a stored session that any read, start or command of this
//! process comes across.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Leased, MAX_OPEN_SESSIONS, STORE_READ_TIMEOUT, Sessions, give_lease_up, lock};
use crate::phone::PhoneNumber;
use crate::session::access::Owner;
use crate::session::state::ReadState;

/// What [`Sessions::adopt`] did with a session left in the store.
pub(super) enum Adoption {
    /// Resumed here, or found running here.
    Here,
    /// Another process runs it.
    Elsewhere,
    /// Not resumed (an older build's state, the store did not answer, this
    /// process is stopping or full, or it ended meanwhile).
    Not,
}

/// A lease [`Sessions::adopt`] took: given up when dropped, unless kept
/// (a resumed session holds it) or a session of this process runs the
/// phone and has not ended (the lease is that session's then).
struct TakenLease<'a> {
    sessions: &'a Sessions,
    phone: &'a PhoneNumber,
    epoch: u64,
    kept: bool,
}

impl TakenLease<'_> {
    /// A resumed session holds the lease now.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for TakenLease<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let held_here = lock(&self.sessions.registry)
            .live
            .get(self.phone)
            .is_some_and(|live| !live.state.borrow().status.is_terminal());
        if held_here {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(&self.sessions.store);
        let key = self.sessions.settings.lease_key(self.phone);
        let holder = self.sessions.holder.clone();
        let epoch = self.epoch;
        // Best effort, beside whatever dropped this: an unreleased lease
        // expires after its TTL anyway.
        runtime.spawn(async move { give_lease_up(store.as_ref(), &key, &holder, epoch).await });
    }
}

/// What one [`Sessions::resume_handed_over`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Phones listed in the index.
    pub listed: usize,
    /// Sessions this process resumed.
    pub resumed: usize,
}

/// How often a process that has just started looks for sessions handed
/// over: one store command per look. The old process of a deploy hands its
/// sessions over when it gets its SIGTERM, after the new one is up, so a
/// look at startup alone would miss them.
pub const RESUME_LOOK_EVERY: Duration = Duration::from_secs(5);
/// How long after its start a process keeps looking: long enough for a
/// deploy's old process to stop (Railway stops it once the new one is
/// healthy, after its overlap and draining times), short enough that a
/// quiet service spends 60 commands per start on it. Later, a read of a
/// handed-over session resumes it.
pub const RESUME_LOOKS_FOR: Duration = Duration::from_secs(300);

impl Sessions {
    /// Resumes `phone`'s session from its stored state `read` (not final):
    /// handed over by a process that stopped, or left by one that died and
    /// whose lease has expired. Takes the lease first, so of several
    /// processes that see it at once one resumes it. `Here`: the session
    /// runs in this process now (resumed, or started meanwhile); look it up
    /// in the registry, with the caller's rights.
    pub(super) async fn adopt(&self, phone: &PhoneNumber, read: &ReadState) -> Adoption {
        // A state without a deadline was written by an older build, which
        // cannot hand over; nor does a stopping process take sessions on.
        if read.state.deadline.is_none() || *self.stopping.borrow() {
            return match self.leased_elsewhere(phone).await {
                true => Adoption::Elsewhere,
                false => Adoption::Not,
            };
        }
        let epoch = match self.take_lease(phone).await {
            Leased::Here(epoch) => epoch,
            Leased::Elsewhere => return Adoption::Elsewhere,
            Leased::Unknown => return Adoption::Not,
        };
        // Given up again unless a session ends up holding it, however this
        // returns (the request that asked may also be dropped mid-way).
        let taken = TakenLease {
            sessions: self,
            phone,
            epoch,
            kept: false,
        };
        // Read again with the lease held: another process may have
        // resumed and ended it meanwhile.
        let current = match self.stored(phone).await {
            Ok(Some(current))
                if !current.state.status.is_terminal() && current.state.deadline.is_some() =>
            {
                current
            }
            _ => return Adoption::Not,
        };
        {
            let mut registry = lock(&self.registry);
            if registry.live.contains_key(phone) {
                // Started here meanwhile: that session holds the lease.
                return Adoption::Here;
            }
            if *self.stopping.borrow() || registry.live.len() >= MAX_OPEN_SESSIONS {
                return Adoption::Not;
            }
            let owner = current
                .owner
                .as_deref()
                .map_or_else(Owner::anonymous, Owner::tagged);
            self.spawn(
                &mut registry,
                phone,
                owner,
                Some(epoch),
                Some(&current.state),
            );
        }
        taken.keep();
        if !self.unlist(phone.as_str()).await {
            // The next look at the index finds it running: harmless.
            tracing::warn!(phone = %phone, "resumed session not taken off the index");
        }
        Adoption::Here
    }

    /// Takes `phone` off the index of handed-over sessions (bounded in
    /// time); whether the store did.
    async fn unlist(&self, phone: &str) -> bool {
        let index = self.settings.handed_over_key();
        matches!(
            tokio::time::timeout(STORE_READ_TIMEOUT, self.store.unlist(&index, phone)).await,
            Ok(Ok(()))
        )
    }

    /// One look at the index of sessions handed over by processes that
    /// stopped: resumes each one nobody runs. A process runs this as it
    /// starts, and for a while after (see `resume_handed_over_for`).
    pub async fn resume_handed_over(&self) -> Resumed {
        let index = self.settings.handed_over_key();
        let listed =
            match tokio::time::timeout(STORE_READ_TIMEOUT, self.store.handed_over(&index)).await {
                Ok(Ok(listed)) => listed,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "handed-over sessions not listed");
                    return Resumed::default();
                }
                Err(_) => {
                    tracing::warn!("handed-over sessions not listed in time");
                    return Resumed::default();
                }
            };
        let mut resumed = Resumed {
            listed: listed.len(),
            ..Resumed::default()
        };
        for listed in listed {
            if *self.stopping.borrow() {
                break;
            }
            let Ok(phone) = PhoneNumber::parse(&listed) else {
                self.unlist(&listed).await;
                continue;
            };
            if lock(&self.registry).live.contains_key(&phone) {
                continue;
            }
            let read = match self.stored(&phone).await {
                Ok(Some(read)) if !read.state.status.is_terminal() => read,
                // Ended meanwhile, or gone: nothing left to resume.
                Ok(_) => {
                    self.unlist(phone.as_str()).await;
                    continue;
                }
                Err(_) => continue,
            };
            match self.adopt(&phone, &read).await {
                Adoption::Here => resumed.resumed += 1,
                // Another process resumed it and did not unlist it.
                Adoption::Elsewhere => {
                    self.unlist(phone.as_str()).await;
                }
                Adoption::Not => {}
            }
        }
        if resumed.resumed > 0 {
            tracing::info!(
                resumed = resumed.resumed,
                listed = resumed.listed,
                event = "sessions_resumed",
                "resumed sessions handed over by a process that stopped"
            );
        }
        resumed
    }

    /// Looks at the index of handed-over sessions now, then every
    /// [`RESUME_LOOK_EVERY`] for [`RESUME_LOOKS_FOR`] after the start, until
    /// `stop` turns `true`: the old process of a deploy stops after the new
    /// one is up, and hands its sessions over then.
    pub async fn resume_handed_over_for(&self, mut stop: watch::Receiver<bool>) {
        let until = tokio::time::Instant::now() + RESUME_LOOKS_FOR;
        loop {
            self.resume_handed_over().await;
            let next = tokio::time::Instant::now() + RESUME_LOOK_EVERY;
            if next > until {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two processes' registries on one store, under paused time, with
    //! scripted linkers: one stops and hands over, the other resumes.

    use std::sync::Arc;

    use super::*;
    use crate::session::SessionError;
    use crate::session::access::Actor;
    use crate::session::state::{PairState, Reason, Status};
    use crate::session::testing::{Script, ScriptedLinker, settings};
    use crate::store::{LeaseStep, MemoryStore, PairingStore};

    const PHONE: &str = "628123456789";

    /// A process of the service on `store`, handing over when it stops.
    fn process(store: &Arc<MemoryStore>) -> (Sessions, Arc<Script>) {
        let script = Arc::new(Script::default());
        let sessions = Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(Arc::clone(&script))),
            Arc::clone(store) as Arc<dyn PairingStore>,
        )
        .handing_over_on_stop();
        (sessions, script)
    }

    fn anyone() -> Actor {
        Actor::trusted(Owner::server("key-1"))
    }

    fn phone() -> PhoneNumber {
        PhoneNumber::parse(PHONE).unwrap()
    }

    /// `PHONE`'s lease taken by `holder` (a process we see only through it).
    async fn held_by(store: &MemoryStore, holder: &str) {
        store
            .lease(
                &format!("wa:pair:lease:{PHONE}"),
                LeaseStep::Take { holder },
                crate::session::task::LEASE_TTL,
            )
            .await
            .unwrap();
    }

    /// Whether the index of handed-over sessions lists nothing.
    async fn index_is_empty(store: &MemoryStore) -> bool {
        store
            .handed_over("wa:pair:handed_over")
            .await
            .unwrap()
            .is_empty()
    }

    async fn stored(store: &MemoryStore) -> PairState {
        let json = store
            .get(&format!("wa:pair:{PHONE}"))
            .await
            .unwrap()
            .unwrap();
        serde_json::from_str(&json).unwrap()
    }

    /// A process that ran `PHONE`'s session to its first code, then
    /// stopped: the session it handed over.
    async fn handed_over_by_a_stopped_process(store: &Arc<MemoryStore>) -> PairState {
        let (old, _) = process(store);
        let (_, mut states) = old.start_or_join(&phone(), &anyone(), false).await.unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        old.shutdown(Duration::from_secs(5)).await;
        stored(store).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_process_hands_over_and_the_next_resumes_with_a_new_code() {
        // Arrange
        let store = Arc::new(MemoryStore::new());
        let handed = handed_over_by_a_stopped_process(&store).await;
        let (new, script) = process(&store);

        // Act
        let resumed = new.resume_handed_over().await;
        let mut states = new.watch(&phone(), &anyone()).await.unwrap();

        // Assert
        assert_eq!(handed.status, Status::Starting);
        assert_eq!(handed.reason, Some(Reason::HandedOver));
        assert_eq!(
            resumed,
            Resumed {
                listed: 1,
                resumed: 1
            }
        );
        let super::super::StateFeed::Live(ref mut states) = states else {
            panic!("the session runs here now");
        };
        let pending = states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap()
            .clone();
        assert_eq!(pending.attempt, handed.attempt + 1, "the attempts go on");
        assert_eq!(pending.deadline, handed.deadline);
        assert_eq!(script.opens.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(index_is_empty(&store).await, "taken off the index");
        assert_eq!(new.resume_handed_over().await, Resumed::default());
        new.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_on_another_process_resumes_a_handed_over_session() {
        // Arrange
        let store = Arc::new(MemoryStore::new());
        let handed = handed_over_by_a_stopped_process(&store).await;
        let (new, _) = process(&store);

        // Act
        let read = new.get(&phone(), &anyone()).await.unwrap().unwrap();

        // Assert
        assert_eq!(read.status, Status::Starting, "{read:?}");
        assert_eq!(read.reason, Some(Reason::HandedOver));
        assert_eq!(new.counts().live, 1, "the session runs here now");
        let refreshed = new.refresh(&phone(), &anyone()).await.unwrap();
        assert_eq!(refreshed.status, Status::Pending);
        assert_eq!(refreshed.attempt, handed.attempt + 1);
        new.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_left_by_a_dead_process_is_resumed_only_once_its_lease_expired() {
        // Arrange: a process ran the session to a code, then died holding
        // the lease (no hand-over: its state still says pending).
        let store = Arc::new(MemoryStore::new());
        let left = PairState {
            status: Status::Pending,
            code: Some("ABCD1234".into()),
            attempt: 1,
            seq: 1,
            deadline: Some(time::OffsetDateTime::now_utc() + Duration::from_secs(300)),
            ..PairState::starting(phone())
        };
        store
            .set(
                &format!("wa:pair:{PHONE}"),
                &serde_json::to_string(&left).unwrap(),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        held_by(&store, "dead").await;
        let (other, script) = process(&store);

        // Act
        let while_leased = other.get(&phone(), &anyone()).await.unwrap().unwrap();
        tokio::time::advance(crate::session::task::LEASE_TTL).await;
        let after_expiry = other.get(&phone(), &anyone()).await.unwrap().unwrap();

        // Assert
        assert_eq!(while_leased, left, "the owner's state, as stored");
        assert_eq!(script.opens.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(after_expiry.status, Status::Starting);
        assert_eq!(after_expiry.reason, Some(Reason::HandedOver));
        assert_eq!(after_expiry.attempt, 1, "the same session");
        assert!(
            after_expiry.code.is_none(),
            "the dead process's code is gone"
        );
        assert_eq!(other.counts().live, 1, "taken over");
        other.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn two_processes_that_see_a_handed_over_session_at_once_resume_it_once() {
        // Arrange
        let store = Arc::new(MemoryStore::new());
        handed_over_by_a_stopped_process(&store).await;
        let (first, _) = process(&store);
        let (second, _) = process(&store);

        // Act
        let (a, b) = tokio::join!(first.resume_handed_over(), second.resume_handed_over());

        // Assert
        assert_eq!(a.resumed + b.resumed, 1);
        assert_eq!(first.counts().live + second.counts().live, 1);
        first.shutdown(Duration::from_secs(5)).await;
        second.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_process_holding_no_lease_does_not_resume_a_session_another_holds() {
        // Arrange: handed over, then resumed by a process we only see
        // through its lease.
        let store = Arc::new(MemoryStore::new());
        handed_over_by_a_stopped_process(&store).await;
        held_by(&store, "another").await;
        let (new, script) = process(&store);

        // Act
        let resumed = new.resume_handed_over().await;

        // Assert
        assert_eq!(resumed.resumed, 0);
        assert_eq!(script.opens.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(
            index_is_empty(&store).await,
            "the other process runs it: off the index"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_resumed_session_counts_towards_their_limit_and_stays_theirs() {
        // Arrange: Alice (limit 1) paired on a process that stopped.
        let store = Arc::new(MemoryStore::new());
        let alice = Actor::restricted(Owner::user("alice"), 1);
        let bob = Actor::restricted(Owner::user("bob"), 1);
        let (old, _) = process(&store);
        let (_, mut states) = old.start_or_join(&phone(), &alice, false).await.unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        old.shutdown(Duration::from_secs(5)).await;
        let (new, _) = process(&store);
        new.resume_handed_over().await;

        // Act
        let hers = new.get(&phone(), &alice).await;
        let his = new.get(&phone(), &bob).await;
        let another = PhoneNumber::parse("628123456780").unwrap();
        let second = new.start_or_join(&another, &alice, false).await;

        // Assert
        assert!(matches!(hers, Ok(Some(_))), "{hers:?}");
        assert_eq!(his, Err(SessionError::Forbidden));
        assert_eq!(
            second.map(|(joined, _)| joined),
            Err(SessionError::TooManySessions { limit: 1 })
        );
        new.shutdown(Duration::from_secs(5)).await;
    }
}

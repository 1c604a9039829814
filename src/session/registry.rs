//! All sessions of the process, one per phone (single-flight): start or
//! join, commands, shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::SessionError;
use super::state::{PairState, Reason, Status};
use super::task::{Command, Reply, Session, SessionSettings, ended};
use crate::link::Linker;
use crate::phone::PhoneNumber;
use crate::store::PairingStore;

/// How long a refresh or cancel waits for the session to answer. A refresh
/// still in progress then answers with the current state (`starting`).
pub const COMMAND_REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Most sessions open at once. Each holds a WhatsApp connection (about
/// 0.7 MiB, see the pairing benchmark); the cap keeps a flood of numbers
/// (the API has no authentication) from exhausting memory or getting the
/// server's address throttled by WhatsApp.
pub const MAX_OPEN_SESSIONS: usize = 1000;

/// Whether a caller started a session or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// A new session was started.
    Created,
    /// An existing session (pending, starting or linked) was joined.
    Existing,
}

struct Entry {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<PairState>,
    task: Option<JoinHandle<()>>,
}

/// All sessions of the process, one per phone (single-flight).
pub struct Sessions {
    settings: Arc<SessionSettings>,
    linker: Arc<dyn Linker>,
    store: Arc<dyn PairingStore>,
    entries: std::sync::Mutex<HashMap<PhoneNumber, Entry>>,
    stopping: watch::Sender<bool>,
}

impl Sessions {
    /// An empty registry.
    pub fn new(
        settings: SessionSettings,
        linker: Arc<dyn Linker>,
        store: Arc<dyn PairingStore>,
    ) -> Self {
        Self {
            settings: Arc::new(settings),
            linker,
            store,
            entries: std::sync::Mutex::new(HashMap::new()),
            stopping: watch::Sender::new(false),
        }
    }

    /// The store sessions write to.
    pub fn store(&self) -> &Arc<dyn PairingStore> {
        &self.store
    }

    /// The session tunables.
    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<PhoneNumber, Entry>> {
        // The map stays consistent even if a holder panicked: every
        // mutation is a single insert or remove.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins `phone`'s live (or linked) session, or starts a new one.
    /// Concurrent callers for one phone get one session.
    pub fn start_or_join(
        &self,
        phone: &PhoneNumber,
    ) -> Result<(Joined, watch::Receiver<PairState>), SessionError> {
        let mut entries = self.entries();
        self.forget_old_outcomes(&mut entries);
        if let Some(entry) = entries.get(phone) {
            let state = entry.state.borrow().clone();
            let running = !entry.commands.is_closed();
            if state.status == Status::Linked
                || (!state.status.is_terminal() && running)
                || self.holds_failure(&state)
            {
                return Ok((Joined::Existing, entry.state.clone()));
            }
            if !state.status.is_terminal() {
                // Its task is gone without a final state (it panicked):
                // replace it rather than serve its frozen state forever.
                tracing::error!(phone = %phone, "session task died; starting a new one");
            } else if entry.task.as_ref().is_some_and(|t| !t.is_finished()) {
                // Still releasing its link client (and maybe healing the
                // store): two clients on one device store would collide.
                return Err(SessionError::Busy);
            }
        }
        if *self.stopping.borrow() {
            return Err(SessionError::ShuttingDown);
        }
        let open = entries
            .values()
            .filter(|e| !e.state.borrow().status.is_terminal())
            .count();
        if open >= MAX_OPEN_SESSIONS {
            tracing::warn!(open, "session limit reached; refusing a new session");
            return Err(SessionError::AtCapacity);
        }
        let (session, commands, state) = Session::new(
            phone.clone(),
            Arc::clone(&self.settings),
            Arc::clone(&self.linker),
            Arc::clone(&self.store),
            self.stopping.subscribe(),
        );
        tracing::info!(phone = %phone, event = "session_started", "pairing session started");
        let task = tokio::spawn(session.run());
        entries.insert(
            phone.clone(),
            Entry {
                commands,
                state: state.clone(),
                task: Some(task),
            },
        );
        Ok((Joined::Created, state))
    }

    /// Whether a failed session's outcome should be served again instead of
    /// asking WhatsApp once more: a refusal retrying cannot fix (403, 452)
    /// for as long as the outcome is kept, and giving up for one backoff cap.
    fn holds_failure(&self, state: &PairState) -> bool {
        if state.status != Status::Failed {
            return false;
        }
        let age = OffsetDateTime::now_utc() - state.updated_at;
        match state.reason {
            Some(Reason::WhatsappRefused) => true,
            Some(Reason::GaveUp) => age < self.settings.backoff.cap,
            _ => false,
        }
    }

    /// Drops sessions that ended longer than `PAIR_OUTCOME_TTL_SECS` ago, so
    /// memory follows the live sessions and a number can be linked again
    /// once its outcome has aged out (the store forgets it at the same time).
    fn forget_old_outcomes(&self, entries: &mut HashMap<PhoneNumber, Entry>) {
        let now = OffsetDateTime::now_utc();
        let ttl = self.settings.outcome_ttl;
        entries.retain(|_, entry| {
            let state = entry.state.borrow();
            let ended_long_ago = state.status.is_terminal() && now - state.updated_at >= ttl;
            !ended_long_ago
        });
    }

    /// The current state of `phone`'s session, if this process has one.
    pub fn get(&self, phone: &PhoneNumber) -> Option<PairState> {
        self.entries()
            .get(phone)
            .map(|entry| entry.state.borrow().clone())
    }

    /// A new code now for `phone`'s session.
    pub async fn refresh(&self, phone: &PhoneNumber) -> Result<PairState, SessionError> {
        self.command(phone, Command::Refresh).await
    }

    /// Cancels `phone`'s pending session.
    pub async fn cancel(&self, phone: &PhoneNumber) -> Result<PairState, SessionError> {
        self.command(phone, Command::Cancel).await
    }

    async fn command(
        &self,
        phone: &PhoneNumber,
        make: impl FnOnce(Reply) -> Command,
    ) -> Result<PairState, SessionError> {
        let (commands, states) = {
            let entries = self.entries();
            let entry = entries.get(phone).ok_or(SessionError::NotFound)?;
            let status = entry.state.borrow().status;
            if status.is_terminal() {
                return Err(ended(status));
            }
            (entry.commands.clone(), entry.state.clone())
        };
        let (reply, answer) = oneshot::channel();
        let command = make(reply);
        let is_refresh = matches!(command, Command::Refresh(_));
        commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::Busy,
            mpsc::error::TrySendError::Closed(_) => SessionError::ShuttingDown,
        })?;
        match tokio::time::timeout(COMMAND_REPLY_TIMEOUT, answer).await {
            Ok(answer) => {
                // The task answers every command it takes; a dropped reply
                // means it ended in between.
                answer.unwrap_or(Err(SessionError::ShuttingDown))
            }
            // A refresh still in progress: say where things stand.
            Err(_) if is_refresh => Ok(states.borrow().clone()),
            Err(_) => Err(SessionError::Busy),
        }
    }

    /// Stops every session: open ones end as `failed`/`interrupted`. Waits
    /// at most `grace` for them to write their final state and close.
    pub async fn shutdown(&self, grace: Duration) {
        // Under the lock, so no session can start after the flag is seen.
        let tasks: Vec<JoinHandle<()>> = {
            let mut entries = self.entries();
            self.stopping.send_replace(true);
            entries
                .values_mut()
                .filter_map(|entry| entry.task.take())
                .collect()
        };
        let count = tasks.len();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                sessions = count,
                "sessions did not all stop within {grace:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::link::{LinkError, LinkEvent, LinkedAccount};
    use crate::session::testing::{Script, ScriptedLinker, settings};
    use crate::store::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn registry_runs_one_session_per_phone_however_many_join() {
        let script = Arc::new(Script::default());
        let sessions = Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(Arc::clone(&script))),
            Arc::new(MemoryStore::new()),
        );
        let phone = PhoneNumber::parse("628123456789").unwrap();

        let joins: Vec<Joined> = (0..50)
            .map(|_| sessions.start_or_join(&phone).unwrap().0)
            .collect();
        let (_, mut states) = sessions.start_or_join(&phone).unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();

        assert_eq!(joins.iter().filter(|j| **j == Joined::Created).count(), 1);
        assert_eq!(script.opens.load(Ordering::SeqCst), 1);
        assert_eq!(script.requests.load(Ordering::SeqCst), 1);
        sessions.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            sessions.get(&phone).unwrap().reason,
            Some(Reason::Interrupted)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn registry_refuses_new_phones_beyond_the_cap_but_still_joins_open_ones() {
        let sessions = Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(Arc::new(Script::default()))),
            Arc::new(MemoryStore::new()),
        );
        let phones: Vec<PhoneNumber> = (0..=MAX_OPEN_SESSIONS)
            .map(|n| PhoneNumber::parse(&format!("62812{n:08}")).unwrap())
            .collect();

        for phone in &phones[..MAX_OPEN_SESSIONS] {
            sessions.start_or_join(phone).unwrap();
        }
        let refused = sessions.start_or_join(&phones[MAX_OPEN_SESSIONS]);
        let joined = sessions.start_or_join(&phones[0]);

        assert_eq!(refused.err(), Some(SessionError::AtCapacity));
        assert_eq!(joined.unwrap().0, Joined::Existing);
        sessions.shutdown(Duration::from_secs(5)).await;
    }

    fn registry(script: &Arc<Script>) -> (Sessions, PhoneNumber) {
        let sessions = Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(Arc::clone(script))),
            Arc::new(MemoryStore::new()),
        );
        (sessions, PhoneNumber::parse("628123456789").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_task_died_is_replaced_not_served_forever() {
        let script = Arc::new(Script::default());
        script.panic_on_open.store(true, Ordering::SeqCst);
        let (sessions, phone) = registry(&script);
        let (_, states) = sessions.start_or_join(&phone).unwrap();
        while states.has_changed().is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        script.panic_on_open.store(false, Ordering::SeqCst);

        let (joined, mut states) = sessions.start_or_join(&phone).unwrap();

        assert_eq!(joined, Joined::Created);
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        sessions.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_session_waits_until_the_cancelled_one_has_let_go_of_the_device() {
        let script = Arc::new(Script::default());
        *script.slow_shutdown.lock().unwrap() = Duration::from_secs(10);
        let (sessions, phone) = registry(&script);
        let (_, mut states) = sessions.start_or_join(&phone).unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        sessions.cancel(&phone).await.unwrap();

        let while_closing = sessions.start_or_join(&phone).map(|(j, _)| j);
        tokio::time::sleep(Duration::from_secs(11)).await;
        let after = sessions.start_or_join(&phone).map(|(j, _)| j);

        assert_eq!(while_closing, Err(SessionError::Busy));
        assert_eq!(after, Ok(Joined::Created));
        sessions.shutdown(Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_retrying_cannot_fix_is_served_again_without_asking_whatsapp() {
        let script = Arc::new(Script::default());
        script.push(Err(LinkError::Refused {
            status: 452,
            text: "feature-not-available".into(),
            backoff: None,
        }));
        let (sessions, phone) = registry(&script);
        let (_, mut states) = sessions.start_or_join(&phone).unwrap();
        states
            .wait_for(|s| s.status == Status::Failed)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;

        let (joined, states) = sessions.start_or_join(&phone).unwrap();

        assert_eq!(joined, Joined::Existing);
        assert_eq!(states.borrow().whatsapp_status, Some(452));
        assert_eq!(script.requests.load(Ordering::SeqCst), 1);
    }

    async fn linked_registry(outcome_ttl: Duration) -> (Sessions, PhoneNumber) {
        let script = Arc::new(Script::default());
        let sessions = Sessions::new(
            SessionSettings {
                outcome_ttl,
                ..settings()
            },
            Arc::new(ScriptedLinker(Arc::clone(&script))),
            Arc::new(MemoryStore::new()),
        );
        let phone = PhoneNumber::parse("628123456789").unwrap();
        let (_, mut states) = sessions.start_or_join(&phone).unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628123456789:1@s.whatsapp.net".into(),
            lid: None,
            platform: None,
        }));
        states
            .wait_for(|s| s.status == Status::Linked)
            .await
            .unwrap();
        (sessions, phone)
    }

    #[tokio::test]
    async fn a_linked_phone_is_joined_not_relinked_while_its_outcome_is_fresh() {
        let (sessions, phone) = linked_registry(Duration::from_secs(86_400)).await;

        let (joined, states) = sessions.start_or_join(&phone).unwrap();

        assert_eq!(joined, Joined::Existing);
        assert_eq!(states.borrow().status, Status::Linked);
    }

    #[tokio::test]
    async fn an_aged_out_outcome_is_forgotten_and_the_phone_can_link_again() {
        let (sessions, phone) = linked_registry(Duration::ZERO).await;

        let (joined, _) = sessions.start_or_join(&phone).unwrap();

        assert_eq!(joined, Joined::Created);
        sessions.shutdown(Duration::from_secs(5)).await;
    }
}

//! Commands across processes: a refresh, cancel or passkey step that
//! reaches a process which does not run the phone's session is relayed to
//! the one that does, through the store's pub/sub, and answered with that
//! process's result.
//!
//! Every process subscribes to one channel of its own,
//! `<prefix>process:<holder>` (the holder its leases carry). A process that
//! gets a command for a phone another process holds reads the phone's lease
//! (`holder|epoch`), publishes the command there with its own channel to
//! reply to, and waits for the answer. Messages carry states (as the store
//! holds them) and passkey assertions (which pass through and are never
//! stored); nothing of them is logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::commands::{Route, Wanted};
use super::{COMMAND_REPLY_TIMEOUT, STORE_READ_TIMEOUT, Sessions};
use crate::phone::PhoneNumber;
use crate::retry::Backoff;
use crate::session::SessionError;
use crate::session::access::{Actor, Owner};
use crate::session::state::{PairState, Status};
use crate::session::task::ended;

/// How much longer than the owner's own wait for its session a relaying
/// process waits for the owner's answer: the two messages' trip.
pub const RELAY_REPLY_MARGIN: Duration = Duration::from_secs(2);
/// Backoff between attempts to subscribe again after the subscription
/// broke or could not be made: commands relayed meanwhile are answered
/// `busy` by the process that relays them, which is told nobody listens.
pub const RELAY_RESUBSCRIBE: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// A subscription that lasted this long was sound: when it ends (the store
/// renews them), the next one is made at once and earlier failures are
/// forgiven.
const RELAY_SUBSCRIPTION_SOUND: Duration = Duration::from_secs(10);

/// Relayed commands a process carries out at once; more are answered
/// `busy` at once: each can wait on WhatsApp for 20 s.
pub const RELAY_MAX_IN_FLIGHT: usize = 64;

/// Who a relayed command acts as in the process that runs the session:
/// the caller's tag when it may touch only its own sessions (checked again
/// against the session there, which may have changed since the relaying
/// process looked), else anyone.
fn relayed(caller: Option<&str>) -> Actor {
    match caller {
        Some(tag) => Actor::restricted(Owner::tagged(tag), usize::MAX),
        None => Actor::trusted(Owner::server("relay")),
    }
}

/// What this process waits for from others.
pub(super) struct Relay {
    /// Answers awaited, by message id.
    waiting: std::sync::Mutex<HashMap<String, oneshot::Sender<Result<PairState, SessionError>>>>,
    /// Turns `true` once this process listens on its channel.
    listening: watch::Sender<bool>,
    /// Bounds the relayed commands carried out at once.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Default for Relay {
    fn default() -> Self {
        Self {
            waiting: std::sync::Mutex::default(),
            listening: watch::Sender::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(RELAY_MAX_IN_FLIGHT)),
        }
    }
}

impl Relay {
    fn waiting(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Result<PairState, SessionError>>>>
    {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An answer awaited under an id: forgotten when dropped (answered, timed
/// out, or the caller gone), so the map holds only calls in progress.
struct Awaited<'a> {
    relay: &'a Relay,
    id: String,
}

impl Drop for Awaited<'_> {
    fn drop(&mut self) {
        self.relay.waiting().remove(&self.id);
    }
}

/// One message between processes.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    /// Pairs an answer with its command.
    id: String,
    body: Body,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Body {
    /// Carry `wanted` out in `phone`'s session and answer on `reply_to`.
    /// `caller`: the tag of a caller that may touch only its own sessions.
    Request {
        reply_to: String,
        phone: String,
        caller: Option<String>,
        wanted: Wanted,
    },
    /// The answer to a request.
    Answer { answer: Answer },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    State(Box<PairState>),
    Error(Refusal),
}

/// A [`SessionError`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
enum Refusal {
    NotFound,
    AlreadyLinked,
    Ended { status: Status },
    ShuttingDown,
    Busy,
    AtCapacity,
    Forbidden,
    TooManySessions { limit: usize },
    StoreUnavailable,
    CodeBudget { retry_after_ms: u64 },
    PasskeyOutOfOrder,
    PasskeyRefused,
}

/// What a relayed `PasskeyOutOfOrder` says (its own text stays with the
/// process that ran the session).
const PASSKEY_OUT_OF_ORDER: &str = "this passkey step does not fit where the session is";

impl From<&SessionError> for Refusal {
    fn from(error: &SessionError) -> Self {
        match error {
            SessionError::NotFound => Self::NotFound,
            SessionError::AlreadyLinked => Self::AlreadyLinked,
            SessionError::Ended(status) => {
                match [
                    Status::Failed,
                    Status::Expired,
                    Status::Cancelled,
                    Status::Linked,
                ]
                .into_iter()
                .find(|s| s.as_str() == *status)
                {
                    Some(status) => Self::Ended { status },
                    None => Self::Busy,
                }
            }
            SessionError::ShuttingDown => Self::ShuttingDown,
            SessionError::Busy => Self::Busy,
            SessionError::AtCapacity => Self::AtCapacity,
            SessionError::Forbidden => Self::Forbidden,
            SessionError::TooManySessions { limit } => Self::TooManySessions { limit: *limit },
            SessionError::StoreUnavailable => Self::StoreUnavailable,
            SessionError::CodeBudget { retry_after } => Self::CodeBudget {
                retry_after_ms: u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            },
            SessionError::PasskeyOutOfOrder(_) => Self::PasskeyOutOfOrder,
            SessionError::PasskeyRefused => Self::PasskeyRefused,
        }
    }
}

impl From<Refusal> for SessionError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotFound => Self::NotFound,
            Refusal::AlreadyLinked => Self::AlreadyLinked,
            Refusal::Ended { status } => ended(status),
            Refusal::ShuttingDown => Self::ShuttingDown,
            Refusal::Busy => Self::Busy,
            Refusal::AtCapacity => Self::AtCapacity,
            Refusal::Forbidden => Self::Forbidden,
            Refusal::TooManySessions { limit } => Self::TooManySessions { limit },
            Refusal::StoreUnavailable => Self::StoreUnavailable,
            Refusal::CodeBudget { retry_after_ms } => Self::CodeBudget {
                retry_after: Duration::from_millis(retry_after_ms),
            },
            Refusal::PasskeyOutOfOrder => Self::PasskeyOutOfOrder(PASSKEY_OUT_OF_ORDER),
            Refusal::PasskeyRefused => Self::PasskeyRefused,
        }
    }
}

impl Sessions {
    /// The channel `holder`'s process listens on.
    fn channel_of(&self, holder: &str) -> String {
        format!("{}process:{holder}", self.settings.key_prefix)
    }

    /// Resolves once this process listens for relayed commands (tests wait
    /// for it before relaying).
    pub async fn until_relaying(&self) {
        let mut listening = self.relay.listening.subscribe();
        let _ = listening.wait_for(|listening| *listening).await;
    }

    /// Listens on this process's channel until `stop` turns `true`: carries
    /// out the commands other processes relay here and hands their answers
    /// to the callers waiting for them. Subscribes again when the
    /// subscription breaks (or is renewed by the store).
    pub async fn relay_commands(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let channel = self.channel_of(&self.holder);
        let mut failures = 0;
        loop {
            let subscribed = tokio::select! {
                subscribed = self.store.subscribe(&channel) => subscribed,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let mut messages = match subscribed {
                Ok(messages) => messages,
                Err(e) => {
                    let wait = RELAY_RESUBSCRIBE.ceiling(failures);
                    failures += 1;
                    tracing::warn!(
                        error = %e,
                        retry_in_secs = wait.as_secs(),
                        "not listening for commands relayed from other processes"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                }
            };
            self.relay.listening.send_replace(true);
            let since = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    message = messages.recv() => match message {
                        Some(message) => self.on_message(&message),
                        None => break,
                    },
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
            self.relay.listening.send_replace(false);
            if since.elapsed() >= RELAY_SUBSCRIPTION_SOUND {
                failures = 0;
                continue;
            }
            // Ended as soon as it began: subscribing again at once would
            // spend commands in a loop.
            let wait = RELAY_RESUBSCRIBE.ceiling(failures);
            failures += 1;
            tracing::warn!(
                retry_in_secs = wait.as_secs(),
                "the subscription for relayed commands ended at once"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One message on this process's channel.
    fn on_message(self: &Arc<Self>, text: &str) {
        let Ok(message) = serde_json::from_str::<Message>(text) else {
            tracing::warn!("a relayed message does not parse; ignored");
            return;
        };
        match message.body {
            Body::Answer { answer } => {
                let Some(caller) = self.relay.waiting().remove(&message.id) else {
                    // Its caller gave up waiting.
                    return;
                };
                let _ = caller.send(match answer {
                    Answer::State(state) => Ok(*state),
                    Answer::Error(refusal) => Err(refusal.into()),
                });
            }
            Body::Request {
                reply_to,
                phone,
                caller,
                wanted,
            } => {
                let sessions = Arc::clone(self);
                let permit = Arc::clone(&self.relay.in_flight).try_acquire_owned();
                // Beside the listener: a refresh can wait on WhatsApp.
                tokio::spawn(async move {
                    let Ok(_permit) = permit else {
                        sessions
                            .answer(message.id, &reply_to, Err(SessionError::Busy))
                            .await;
                        return;
                    };
                    let actor = relayed(caller.as_deref());
                    let result = match PhoneNumber::parse(&phone) {
                        Ok(phone) => {
                            sessions
                                .command(&phone, &actor, wanted, Route::HereOnly)
                                .await
                        }
                        Err(_) => Err(SessionError::NotFound),
                    };
                    sessions.answer(message.id, &reply_to, result).await;
                });
            }
        }
    }

    /// Publishes the answer `result` to request `id` on `reply_to`.
    async fn answer(&self, id: String, reply_to: &str, result: Result<PairState, SessionError>) {
        let answer = match &result {
            Ok(state) => Answer::State(Box::new(state.clone())),
            Err(error) => Answer::Error(error.into()),
        };
        let message = Message {
            id,
            body: Body::Answer { answer },
        };
        let Ok(json) = serde_json::to_string(&message) else {
            return;
        };
        let _ = tokio::time::timeout(STORE_READ_TIMEOUT, self.store.publish(reply_to, &json)).await;
    }

    /// Relays `wanted` to the process that holds `phone`'s lease and returns
    /// its answer. `busy` when no process holds it any more (the session
    /// just ended or is being handed over: ask again) or its holder does not
    /// listen.
    pub(super) async fn forward(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        wanted: Wanted,
    ) -> Result<PairState, SessionError> {
        // Counted from here, so the store calls on the way fit in too.
        let answer_by = tokio::time::Instant::now() + COMMAND_REPLY_TIMEOUT + RELAY_REPLY_MARGIN;
        let may_answer_late = wanted.may_answer_late();
        let key = self.settings.lease_key(phone);
        let lease = match tokio::time::timeout(STORE_READ_TIMEOUT, self.store.get(&key)).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(_)) | Err(_) => return Err(SessionError::StoreUnavailable),
        };
        let Some(holder) = lease
            .as_deref()
            .and_then(|lease| lease.rsplit_once('|'))
            .map(|(holder, _)| holder.to_owned())
            .filter(|holder| *holder != self.holder)
        else {
            return Err(SessionError::Busy);
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (answer_tx, answer) = oneshot::channel();
        self.relay.waiting().insert(id.clone(), answer_tx);
        let _awaited = Awaited {
            relay: &self.relay,
            id: id.clone(),
        };
        let message = Message {
            id,
            body: Body::Request {
                reply_to: self.channel_of(&self.holder),
                phone: phone.as_str().to_owned(),
                caller: (!actor.sees_all).then(|| actor.owner.tag()),
                wanted,
            },
        };
        let json = serde_json::to_string(&message).map_err(|_| SessionError::Busy)?;
        let published = tokio::time::timeout(
            STORE_READ_TIMEOUT,
            self.store.publish(&self.channel_of(&holder), &json),
        )
        .await;
        match published {
            Ok(Ok(0)) => {
                tracing::warn!(phone = %phone, "the process running this session does not listen; command not relayed");
                return Err(SessionError::Busy);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Err(SessionError::StoreUnavailable),
        }
        match tokio::time::timeout_at(answer_by, answer).await {
            // The owner is stopping (and handing its sessions over); this
            // process is not: the caller asks again in a moment.
            Ok(Ok(Err(SessionError::ShuttingDown))) => Err(SessionError::Busy),
            Ok(Ok(answer)) => answer,
            // Still asking WhatsApp over there: where things stand.
            _ if may_answer_late => match self.stored(phone).await {
                Ok(Some(read)) => Ok(read.state),
                _ => Err(SessionError::Busy),
            },
            _ => Err(SessionError::Busy),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two processes' registries on one store, with scripted linkers: a
    //! command sent to the one that does not run the session.

    use std::sync::Arc;

    use super::*;
    use crate::session::testing::{Script, ScriptedLinker, settings};
    use crate::store::{MemoryStore, PairingStore};

    const PHONE: &str = "628123456789";

    /// A process of the service on `store`, listening for relayed commands.
    async fn process(store: &Arc<MemoryStore>) -> (Arc<Sessions>, watch::Sender<bool>) {
        let sessions = Arc::new(Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(Arc::new(Script::default()))),
            Arc::clone(store) as Arc<dyn PairingStore>,
        ));
        let stop = watch::Sender::new(false);
        tokio::spawn(Arc::clone(&sessions).relay_commands(stop.subscribe()));
        sessions.until_relaying().await;
        (sessions, stop)
    }

    fn anyone() -> Actor {
        Actor::trusted(Owner::server("key-1"))
    }

    fn phone() -> PhoneNumber {
        PhoneNumber::parse(PHONE).unwrap()
    }

    /// `owner` runs the phone's session, showing its first code.
    async fn running_on(owner: &Sessions) -> PairState {
        let (_, mut states) = owner
            .start_or_join(&phone(), &anyone(), false)
            .await
            .unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap()
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_sent_to_another_process_reaches_the_owner_and_answers_its_new_code() {
        // Arrange
        let store = Arc::new(MemoryStore::new());
        let (owner, _stop_owner) = process(&store).await;
        let (other, _stop_other) = process(&store).await;
        let first = running_on(&owner).await;
        // A refresh right after a code answers that code.
        tokio::time::advance(crate::session::MANUAL_REFRESH_DEBOUNCE * 2).await;

        // Act
        let refreshed = other.refresh(&phone(), &anyone()).await.unwrap();

        // Assert
        assert_eq!(refreshed.status, Status::Pending);
        assert_eq!(refreshed.attempt, first.attempt + 1);
        assert_ne!(refreshed.code, first.code);
        assert_eq!(
            owner.get(&phone(), &anyone()).await.unwrap(),
            Some(refreshed)
        );
        assert_eq!(other.counts().live, 0, "the other process runs nothing");
        owner.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_sent_to_another_process_ends_the_owners_session() {
        // Arrange
        let store = Arc::new(MemoryStore::new());
        let (owner, _stop_owner) = process(&store).await;
        let (other, _stop_other) = process(&store).await;
        running_on(&owner).await;

        // Act
        let cancelled = other.cancel(&phone(), &anyone()).await.unwrap();
        let again = other.cancel(&phone(), &anyone()).await;

        // Assert
        assert_eq!(cancelled.status, Status::Cancelled);
        assert_eq!(again, Err(ended(Status::Cancelled)), "read from the store");
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_refusal_travels_back_as_the_same_error() {
        // Arrange: the session waits for no passkey.
        let store = Arc::new(MemoryStore::new());
        let (owner, _stop_owner) = process(&store).await;
        let (other, _stop_other) = process(&store).await;
        running_on(&owner).await;

        // Act
        let confirmed = other.confirm_passkey(&phone(), &anyone()).await;

        // Assert
        assert!(
            matches!(confirmed, Err(SessionError::PasskeyOutOfOrder(_))),
            "{confirmed:?}"
        );
        owner.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_for_an_owner_that_does_not_listen_is_answered_busy() {
        // Arrange: the owner's listener has stopped.
        let store = Arc::new(MemoryStore::new());
        let (owner, stop_owner) = process(&store).await;
        let (other, _stop_other) = process(&store).await;
        running_on(&owner).await;
        stop_owner.send_replace(true);
        tokio::task::yield_now().await;

        // Act
        let refreshed = other.refresh(&phone(), &anyone()).await;

        // Assert
        assert_eq!(refreshed, Err(SessionError::Busy));
        owner.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_relayed_command_is_checked_against_the_session_where_it_runs() {
        // Arrange: Alice's session runs on the owner.
        let store = Arc::new(MemoryStore::new());
        let (owner, _stop_owner) = process(&store).await;
        let (other, _stop_other) = process(&store).await;
        let alice = Actor::restricted(Owner::user("alice"), 5);
        let bob = Actor::restricted(Owner::user("bob"), 5);
        let (_, mut states) = owner.start_or_join(&phone(), &alice, false).await.unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();

        // Act
        let bobs = other.cancel(&phone(), &bob).await;
        let alices = other.cancel(&phone(), &alice).await;

        // Assert
        assert_eq!(bobs, Err(SessionError::Forbidden));
        assert_eq!(alices.map(|s| s.status), Ok(Status::Cancelled));
    }

    #[test]
    fn every_session_error_crosses_the_wire_as_itself() {
        let errors = [
            SessionError::NotFound,
            SessionError::AlreadyLinked,
            ended(Status::Expired),
            SessionError::ShuttingDown,
            SessionError::Busy,
            SessionError::AtCapacity,
            SessionError::Forbidden,
            SessionError::TooManySessions { limit: 3 },
            SessionError::StoreUnavailable,
            SessionError::CodeBudget {
                retry_after: Duration::from_millis(1500),
            },
            SessionError::PasskeyOutOfOrder(PASSKEY_OUT_OF_ORDER),
            SessionError::PasskeyRefused,
        ];
        for error in errors {
            let json = serde_json::to_string(&Refusal::from(&error)).unwrap();
            let back: Refusal = serde_json::from_str(&json).unwrap();
            assert_eq!(SessionError::from(back), error, "{json}");
        }
    }
}

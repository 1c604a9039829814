//! Commands to a session (refresh, cancel, the passkey steps): to its task
//! when it runs here, to the process that runs it otherwise (through the
//! store's pub/sub, see `relay.rs`), or answered with its stored outcome.

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{COMMAND_REPLY_TIMEOUT, Sessions, StateFeed, lock};
use crate::link::passkey::PasskeyAssertion;
use crate::phone::PhoneNumber;
use crate::session::SessionError;
use crate::session::access::Actor;
use crate::session::state::PairState;
use crate::session::task::{Command, Reply, ended, outcome_error};

/// A command as a caller asks for it, before it has somewhere to send the
/// answer: what can travel to another process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub(super) enum Wanted {
    /// A new code now.
    Refresh,
    /// End the session.
    Cancel,
    /// Answer WhatsApp's passkey request.
    Passkey {
        /// The host app's assertion.
        assertion: PasskeyAssertion,
    },
    /// Confirm the passkey link's verification code.
    ConfirmPasskey,
}

impl Wanted {
    /// The command for the session's task, answering on `reply`.
    fn into_command(self, reply: Reply) -> Command {
        match self {
            Self::Refresh => Command::Refresh(reply),
            Self::Cancel => Command::Cancel(reply),
            Self::Passkey { assertion } => Command::Passkey(assertion, reply),
            Self::ConfirmPasskey => Command::ConfirmPasskey(reply),
        }
    }

    /// Whether a caller still waiting for WhatsApp after the reply timeout
    /// is answered with where things stand (rather than `busy`).
    pub(super) fn may_answer_late(&self) -> bool {
        !matches!(self, Self::Cancel)
    }
}

/// Where a command may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Here, or in the process that runs the session.
    AnyProcess,
    /// Here only: a command another process relayed (relaying it on could
    /// send it round in circles).
    HereOnly,
}

impl Sessions {
    /// A new code now for `phone`'s session.
    pub async fn refresh(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<PairState, SessionError> {
        self.command(phone, actor, Wanted::Refresh, Route::AnyProcess)
            .await
    }

    /// Cancels `phone`'s pending session.
    pub async fn cancel(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<PairState, SessionError> {
        self.command(phone, actor, Wanted::Cancel, Route::AnyProcess)
            .await
    }

    /// Answers WhatsApp's passkey request in `phone`'s session with
    /// `assertion`; returns the state once WhatsApp took it.
    pub async fn send_passkey(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        assertion: PasskeyAssertion,
    ) -> Result<PairState, SessionError> {
        self.command(
            phone,
            actor,
            Wanted::Passkey { assertion },
            Route::AnyProcess,
        )
        .await
    }

    /// Confirms the verification code of `phone`'s passkey link.
    pub async fn confirm_passkey(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<PairState, SessionError> {
        self.command(phone, actor, Wanted::ConfirmPasskey, Route::AnyProcess)
            .await
    }

    /// Carries `wanted` out in `phone`'s session: here if it runs here,
    /// else (with [`Route::AnyProcess`]) in the process that runs it.
    pub(super) async fn command(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        wanted: Wanted,
        route: Route,
    ) -> Result<PairState, SessionError> {
        let find = || {
            let registry = lock(&self.registry);
            registry.live.get(phone).map(|live| {
                (
                    actor.may_touch(&live.owner),
                    live.state.borrow().status,
                    live.commands.clone(),
                    live.state.clone(),
                )
            })
        };
        let found = match find() {
            Some(found) => found,
            // Not running here: ended, run elsewhere, or left to resume
            // (then it runs here now).
            None => match self.stored_feed(phone, actor).await? {
                Some(StateFeed::Live(_)) => find().ok_or(SessionError::NotFound)?,
                Some(StateFeed::Stored(outcome)) if outcome.status.is_terminal() => {
                    return Err(ended(outcome.status));
                }
                // Not final, not resumed: another process runs it.
                Some(StateFeed::Stored(state)) if !state.status.is_terminal() => {
                    return match route {
                        Route::AnyProcess => self.forward(phone, actor, wanted).await,
                        // Relayed here, but it moved on to a third process:
                        // the caller asks again.
                        Route::HereOnly => Err(SessionError::Busy),
                    };
                }
                _ => return Err(SessionError::NotFound),
            },
        };
        let (allowed, status, commands, states) = found;
        if !allowed {
            return Err(SessionError::Forbidden);
        }
        if status.is_terminal() {
            return Err(ended(status));
        }
        let (reply, answer) = oneshot::channel();
        let slow_is_fine = wanted.may_answer_late();
        let command = wanted.into_command(reply);
        commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::Busy,
            // The session ended between the look-up and the send.
            mpsc::error::TrySendError::Closed(_) => self.ended_meanwhile(&states),
        })?;
        match tokio::time::timeout(COMMAND_REPLY_TIMEOUT, answer).await {
            Ok(Ok(answer)) => answer,
            // The task answers every command it takes, and the ones still
            // queued when it ends; a dropped reply means it unwound.
            Ok(Err(_)) => Err(self.ended_meanwhile(&states)),
            // WhatsApp is still being asked: say where things stand.
            Err(_) if slow_is_fine => Ok(states.borrow().clone()),
            Err(_) => Err(SessionError::Busy),
        }
    }

    /// What a command that found its session gone is told: the session's
    /// real outcome, `shutting_down` only when the service is stopping.
    fn ended_meanwhile(&self, states: &watch::Receiver<PairState>) -> SessionError {
        let last = states.borrow();
        if last.status.is_terminal() {
            outcome_error(&last)
        } else if *self.stopping.borrow() {
            SessionError::ShuttingDown
        } else {
            // The task unwound without a final state (a bug, logged there).
            SessionError::Busy
        }
    }
}

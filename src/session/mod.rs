//! Pairing sessions: one task per phone that owns the link session, the
//! refresh timer, the retry backoff and the state machine.
//!
//! ```text
//! starting -> pending(code) -> linked
//! pending  -> pending            (refresh: a new code, before the old one dies)
//! pending  -> starting           (WhatsApp invalidated the code; a new one follows)
//! starting -> starting           (a request failed; retry after backoff)
//! starting|pending -> failed     (refused for good, gave up, logged out, interrupted)
//! starting|pending -> expired    (PAIR_SESSION_MAX_SECS without a link)
//! starting|pending -> cancelled  (DELETE)
//! starting|pending -> action_required  (WhatsApp asks for the passkey; see
//!                                       `task/passkey.rs` for that path)
//! starting|pending|action_required -> starting(handed_over)
//!                                (the process stopped; the next one resumes it)
//! ```
//!
//! A code is replaced at `min(PAIR_REFRESH_SECS, WhatsApp's validity - 15 s)`
//! after it was issued, so the store never shows a code WhatsApp no longer
//! accepts; the only overlap is the moment of the swap itself (the library
//! withdraws the old code just before it asks for the new one, typically
//! tens of milliseconds).
//!
//! Every change is written to the store first (bounded in time: a slow or
//! dead store never holds a code back) and then published on a `watch`
//! channel that the HTTP handlers read. The session keeps its latest state in
//! memory, so a store outage loses nothing: a failed write is retried and the
//! next write heals the store.
//!
//! [`Session::step`] does exactly one thing (one timer, one link event or
//! one command) and says what it did; [`Session::run`] is the loop. Tests
//! drive single steps, and the loop under paused tokio time.
//!
//! The folder, by concern:
//! - [`state`]: what a session looks like from outside ([`PairState`], the
//!   JSON that is stored and returned).
//! - [`schedule`]: when a code is replaced and how long a state is stored,
//!   as pure functions ([`SessionSettings`]).
//! - [`task`]: one session's task ([`Session`]), with ONE `select!` in
//!   [`Session::step`]; its files: `transitions.rs` (what each outcome does
//!   to the state), `writer.rs` (the store writes and the code budget),
//!   `passkey.rs` (the passkey path), `lease.rs` (the phone's lease,
//!   when processes share the store) and `handover.rs` (handing over on
//!   shutdown, resuming what another process handed over).
//! - [`registry`]: all sessions of the process ([`Sessions`]): start or join,
//!   commands, shutdown; `registry/resume.rs` finds sessions handed over
//!   (or left behind) and resumes them.
//! - [`access`]: who started a session ([`Owner`]) and who may touch it
//!   ([`Actor`]).

use std::time::Duration;

mod access;
mod registry;
mod schedule;
mod state;
mod task;
#[cfg(test)]
mod testing;

pub use access::{Actor, Owner};
pub use registry::{
    COMMAND_REPLY_TIMEOUT, Joined, MAX_OPEN_SESSIONS, PREVIOUS_SESSION_WAIT, RELAY_REPLY_MARGIN,
    RELAY_RESUBSCRIBE, RESUME_LOOK_EVERY, RESUME_LOOKS_FOR, RegistryCounts, Resumed,
    STORE_READ_TIMEOUT, Sessions, StateFeed,
};
pub use schedule::{
    CODE_BUDGET_WINDOW, MANUAL_REFRESH_DEBOUNCE, MIN_EVENT_REFRESH_GAP, MIN_REFRESH_INTERVAL,
    REFRESH_MARGIN, SessionSettings, WAIT_TTL_MARGIN,
};
pub use state::{PairState, Reason, Status};
pub use task::{
    Command, FINAL_HEAL_ATTEMPTS, LEASE_RENEW_EVERY, LEASE_TTL, Reply, STORE_HEAL_BACKOFF,
    STORE_WRITE_BUDGET, Session, StepOutcome,
};

/// Why a command to a session could not be carried out.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// No session for that phone.
    #[error("no pairing session for this phone")]
    NotFound,
    /// The phone is linked; there is nothing to refresh or cancel.
    #[error("this phone is already linked")]
    AlreadyLinked,
    /// The session ended (failed, expired or cancelled).
    #[error("this pairing session has ended ({0})")]
    Ended(&'static str),
    /// The service is shutting down.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The session is busy; try again.
    #[error("the pairing session is busy")]
    Busy,
    /// [`MAX_OPEN_SESSIONS`] sessions are open.
    #[error("too many pairing sessions are open")]
    AtCapacity,
    /// The session was started by someone else.
    #[error("this pairing session belongs to another caller")]
    Forbidden,
    /// The caller has as many sessions open as it may.
    #[error("the caller has {limit} pairing sessions open already")]
    TooManySessions {
        /// The caller's limit.
        limit: usize,
    },
    /// The store did not answer a read this needed.
    #[error("the state store is not reachable")]
    StoreUnavailable,
    /// The phone had all the codes it may have this hour.
    #[error("this phone's code budget is spent")]
    CodeBudget {
        /// Until a code may be issued again.
        retry_after: Duration,
    },
    /// A passkey step that does not fit where the session is (the text
    /// says which).
    #[error("{0}")]
    PasskeyOutOfOrder(&'static str),
    /// WhatsApp did not accept the passkey assertion.
    #[error("WhatsApp did not accept the passkey assertion")]
    PasskeyRefused,
}

//! One phone's session task: the state machine, the code schedule, the retry
//! backoff and the store writes. [`Session::step`] does one thing;
//! [`Session::run`] loops over steps.
//!
//! This file is the loop: what a session holds and the one `select!` that
//! waits on everything (link events, commands, the stop signal, the request
//! in flight, the timers). [`transitions`] is what each outcome does to the
//! state; [`writer`] stores it.

mod handover;
mod lease;
mod passkey;
mod transitions;
mod writer;

pub use lease::{LEASE_RENEW_EVERY, LEASE_TTL};
pub(super) use transitions::{ended, outcome_error};
pub use writer::{FINAL_HEAL_ATTEMPTS, STORE_HEAL_BACKOFF, STORE_WRITE_BUDGET};

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use self::transitions::ends_the_session;
use super::SessionError;
use super::schedule::{MANUAL_REFRESH_DEBOUNCE, SessionSettings};
use super::state::{PairState, Reason, Status};
use crate::link::passkey::PasskeyAssertion;
use crate::link::{IssuedCode, LinkError, LinkEvent, Linker, OpenedLink};
use crate::metrics::{CodeTrigger, Metrics};
use crate::phone::PhoneNumber;
use crate::store::PairingStore;
use crate::webhook::Webhooks;

/// Commands waiting for a session task; callers beyond this get a 503.
const COMMAND_QUEUE: usize = 16;

/// Where a session sends its answer to a command.
pub type Reply = oneshot::Sender<Result<PairState, SessionError>>;

/// A request to a session task.
#[derive(Debug)]
pub enum Command {
    /// Issue a new code now.
    Refresh(Reply),
    /// Cancel the session.
    Cancel(Reply),
    /// Answer WhatsApp's passkey request with this assertion.
    Passkey(PasskeyAssertion, Reply),
    /// Confirm the passkey link's verification code.
    ConfirmPasskey(Reply),
}

impl Command {
    /// Where the command's answer goes.
    pub fn into_reply(self) -> Reply {
        match self {
            Self::Refresh(reply)
            | Self::Cancel(reply)
            | Self::Passkey(_, reply)
            | Self::ConfirmPasskey(reply) => reply,
        }
    }
}

/// What one [`Session::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// A code was issued (`attempt` = codes issued so far).
    CodeIssued {
        /// Codes issued by this session, this one included.
        attempt: u32,
    },
    /// A request failed; the next one runs after `after`.
    Retrying {
        /// Delay before the next attempt.
        after: Duration,
    },
    /// The code shown was invalidated; a new one is scheduled.
    Invalidated,
    /// The connection shows a new QR code.
    QrShown,
    /// WhatsApp offers no codes to this account (452): the session goes on
    /// with QR codes only.
    CodeUnavailable,
    /// The phone's code budget is spent; the next attempt is after `after`.
    BudgetSpent {
        /// Until the budget's window closes (or the live code dies).
        after: Duration,
    },
    /// A passkey link moved on to this stage (`passkey_required`,
    /// `passkey_accepted`, `passkey_confirmation`, `passkey_confirmed`).
    Passkey(Reason),
    /// WhatsApp did not accept a passkey assertion; it still asks for one.
    PasskeyRefused,
    /// Another process took over the phone's lease: this session stopped
    /// without writing anything more.
    LeaseLost,
    /// The service stopped and the session was handed over to the next
    /// process (stored as `starting`/`handed_over`, lease given up).
    HandedOver,
    /// Nothing visible changed (an informational event, a store heal).
    Idle,
    /// The session ended with this status.
    Ended(Status),
}

impl StepOutcome {
    /// Whether the session is over.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Ended(_) | Self::LeaseLost | Self::HandedOver)
    }
}

/// What a session is waiting on WhatsApp for. Held by the session and
/// polled in [`Session::step`]'s one `select!`, beside the link events, the
/// commands, the stop signal and the timers, so none of them waits behind
/// it.
struct InFlight {
    asking: Asking,
    /// Refreshes that arrived meanwhile: they get this request's outcome.
    waiting: Vec<Reply>,
    /// The link client's event stream closed during the request; the
    /// request itself will say what went wrong.
    events_closed: bool,
}

enum Asking {
    /// Opening the link client (connecting to WhatsApp).
    Open(BoxFuture<'static, Result<OpenedLink, LinkError>>),
    /// A code request on the open link client.
    Code(BoxFuture<'static, Result<IssuedCode, LinkError>>),
    /// A new connection for QR codes only (WhatsApp offers this account no
    /// codes).
    Connect(BoxFuture<'static, Result<(), LinkError>>),
    /// A passkey assertion sent to WhatsApp.
    Passkey(BoxFuture<'static, Result<(), LinkError>>),
    /// The passkey link's verification code confirmed to WhatsApp.
    ConfirmPasskey(BoxFuture<'static, Result<(), LinkError>>),
}

/// What an [`InFlight`] request came back with.
enum Answer {
    Opened(Result<OpenedLink, LinkError>),
    Code(Result<IssuedCode, LinkError>),
    Connected(Result<(), LinkError>),
    PasskeySent(Result<(), LinkError>),
    PasskeyConfirmed(Result<(), LinkError>),
}

/// One phone's pairing session. Owned by its task; see the module docs.
pub struct Session {
    phone: PhoneNumber,
    key: String,
    settings: Arc<SessionSettings>,
    linker: Arc<dyn Linker>,
    store: Arc<dyn PairingStore>,
    link: Option<OpenedLink>,
    /// What WhatsApp is being asked now, if anything.
    in_flight: Option<InFlight>,
    state: PairState,
    published: watch::Sender<PairState>,
    commands: mpsc::Receiver<Command>,
    /// Turns `true` when the service stops; ends the session as
    /// `failed`/`interrupted`, even in the middle of a code request.
    stopping: watch::Receiver<bool>,
    deadline: Instant,
    next_request: Option<Instant>,
    /// When the live code was issued.
    last_issued: Option<Instant>,
    /// When WhatsApp stops accepting the live code.
    code_dies_at: Option<Instant>,
    failures: u32,
    /// Jitter source for the retry backoff.
    rng: StdRng,
    store_heal_at: Option<Instant>,
    store_failures: u32,
    /// [`Owner::tag`](super::Owner::tag) of who started the session, stored
    /// with every state.
    owner_tag: Option<String>,
    /// Where codes, refusals and the ending are counted, when metered.
    metrics: Option<Arc<Metrics>>,
    /// WhatsApp refused codes for this account (452): the session keeps a
    /// connection up for its QR codes and asks for no more codes.
    qr_only: bool,
    /// The device linked to another account than this phone's: the link
    /// client is to log it out and delete it, not keep it.
    discard_device: bool,
    /// Where the outcome is announced, when a webhook is configured.
    webhooks: Option<Webhooks>,
    /// WhatsApp asked for the account's passkey: no code or QR code can
    /// link it any more (see `passkey.rs`).
    passkey_link: bool,
    /// The phone's lease, when this process took one (see `lease.rs`).
    lease: Option<lease::Lease>,
    /// The lease this session started without and still tries to take.
    missing_lease: Option<lease::MissingLease>,
    /// Another process took the phone's lease: this session has stopped.
    taken_over: bool,
    /// When the service stops, hand the session over to the next process
    /// instead of ending it (see `handover.rs`).
    hand_over: bool,
}

impl Session {
    /// A session that will request its first code on its first step; it
    /// ends as `failed`/`interrupted` once `stopping` turns `true`.
    /// Returns it with the sender for commands and the receiver of states.
    pub fn new(
        phone: PhoneNumber,
        settings: Arc<SessionSettings>,
        linker: Arc<dyn Linker>,
        store: Arc<dyn PairingStore>,
        stopping: watch::Receiver<bool>,
    ) -> (Self, mpsc::Sender<Command>, watch::Receiver<PairState>) {
        let state = PairState {
            deadline: Some(OffsetDateTime::now_utc() + settings.session_max),
            ..PairState::starting(phone.clone())
        };
        let (published, state_rx) = watch::channel(state.clone());
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let now = Instant::now();
        let session = Self {
            key: settings.key(&phone),
            deadline: now + settings.session_max,
            phone,
            settings,
            linker,
            store,
            link: None,
            in_flight: None,
            state,
            published,
            commands,
            stopping,
            next_request: Some(now),
            last_issued: None,
            code_dies_at: None,
            failures: 0,
            rng: StdRng::from_os_rng(),
            store_heal_at: None,
            store_failures: 0,
            owner_tag: None,
            metrics: None,
            qr_only: false,
            discard_device: false,
            webhooks: None,
            passkey_link: false,
            lease: None,
            missing_lease: None,
            taken_over: false,
            hand_over: false,
        };
        (session, commands_tx, state_rx)
    }

    /// The same session, recording `tag` as its owner in the store.
    #[must_use]
    pub fn owned_by(mut self, tag: String) -> Self {
        self.owner_tag = Some(tag);
        self
    }

    /// The same session, counting its codes, refusals and ending in
    /// `metrics`.
    #[must_use]
    pub fn metered(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The same session, announcing its outcome to `webhooks`.
    #[must_use]
    pub fn announcing_to(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// Runs steps until the session ends, then releases the link client.
    pub async fn run(mut self) {
        // The first state is stored too: a reader sees `starting`, not nothing.
        self.state.seq = writer::next_seq(self.state.seq);
        self.write_store().await;
        let last = loop {
            let outcome = self.step().await;
            if outcome.is_terminal() {
                break outcome;
            }
        };
        // Queued, never awaited: the receiver cannot hold the session up.
        // A session taken over or handed over has no outcome to announce.
        if let Some(webhooks) = self
            .webhooks
            .as_ref()
            .filter(|_| matches!(last, StepOutcome::Ended(_)))
        {
            webhooks.notify(&self.state);
        }
        self.refuse_late_commands();
        // Given up before the link client is released (which can take
        // seconds a shutdown may not have), unless a write still waits to
        // heal the store: those writes need the lease.
        if self.store_heal_at.is_none() {
            self.release_lease().await;
        }
        self.close().await;
        if self.store_heal_at.is_none() {
            self.release_lease().await;
        }
        // Else the last state never reached the store: the lease is left to
        // expire rather than given up at once, so another process does not
        // take the stale state stored before it for a session to resume.
    }

    /// Answers the commands still queued with the session's outcome and
    /// takes no more: releasing the link client can take a moment, and a
    /// caller should learn the outcome, not wait for it.
    fn refuse_late_commands(&mut self) {
        self.commands.close();
        let answer = if self.state.status.is_terminal() {
            outcome_error(&self.state)
        } else if self.state.reason == Some(Reason::HandedOver) {
            // The next process has it: the caller asks again there.
            SessionError::ShuttingDown
        } else {
            // Taken over: the other process has the session now.
            SessionError::Busy
        };
        while let Ok(command) = self.commands.try_recv() {
            let _ = command.into_reply().send(Err(answer.clone()));
        }
    }

    /// Releases the link client and makes a last effort to heal the store.
    pub async fn close(&mut self) {
        // One immediate retry first: releasing the link can take seconds,
        // and a shutdown may not leave time for more.
        if self.store_heal_at.is_some() {
            self.write_store().await;
        }
        self.in_flight = None;
        if let Some(link) = self.link.take() {
            if self.discard_device {
                link.handle.discard().await;
            } else {
                link.handle.shutdown().await;
            }
        }
        for attempt in 0..FINAL_HEAL_ATTEMPTS {
            if self.store_heal_at.is_none() {
                break;
            }
            tokio::time::sleep(STORE_HEAL_BACKOFF.ceiling(attempt)).await;
            self.write_store().await;
        }
    }

    /// Waits for the next thing to happen and handles it: everything the
    /// session waits on is polled here, in one `select!`. Starting a request
    /// to WhatsApp, a refresh joining one, or an event superseded by one
    /// changes nothing visible, so the step goes on waiting; it returns
    /// once something did change.
    pub async fn step(&mut self) -> StepOutcome {
        loop {
            if self.taken_over {
                return StepOutcome::LeaseLost;
            }
            if self.state.status.is_terminal() {
                return StepOutcome::Ended(self.state.status);
            }
            let asking = self.in_flight.is_some();
            let events_closed = self.in_flight.as_ref().is_some_and(|f| f.events_closed);
            let wake = [self.next_request, self.store_heal_at, Some(self.deadline)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(self.deadline);
            let renew_at = self
                .lease
                .as_ref()
                .map(|lease| lease.renew_at)
                .or(self.missing_lease.as_ref().map(|missing| missing.retry_at));
            let outcome = tokio::select! {
                // Link events first: a link that already happened must win
                // over a cancel or a stop queued behind it.
                biased;
                event = next_link_event(&mut self.link), if !events_closed => {
                    self.on_event_in_step(event).await
                }
                () = stop_requested(&mut self.stopping) => Some(self.stop_now().await),
                command = self.commands.recv() => match command {
                    Some(Command::Refresh(reply)) => self.refresh(reply).await,
                    Some(Command::Cancel(reply)) => {
                        let waiting = self.drop_in_flight();
                        Some(self.cancel(reply, waiting).await)
                    }
                    Some(Command::Passkey(assertion, reply)) => self.send_passkey(assertion, reply),
                    Some(Command::ConfirmPasskey(reply)) => self.confirm_passkey(reply),
                    // Every sender gone means the registry is gone: treat it
                    // as a shutdown rather than run unobserved.
                    None => Some(self.stop_now().await),
                },
                answer = answer_of(&mut self.in_flight) => self.answered(answer).await,
                // While WhatsApp is being asked, the request's own bounds
                // (connect, code) come first; timers wait for its answer.
                _ = tokio::time::sleep_until(wake), if !asking => self.timer_fired().await,
                // The lease is renewed whatever the session waits on.
                _ = tokio::time::sleep_until(renew_at.unwrap_or(wake)), if renew_at.is_some() => {
                    match self.lease.is_some() {
                        true => self.renew_lease().await,
                        false => self.take_missing_lease().await,
                    }
                }
            };
            if self.taken_over {
                // A write found the lease lost: whatever this step did is
                // not ours to report.
                return StepOutcome::LeaseLost;
            }
            if let Some(outcome) = outcome {
                return outcome;
            }
        }
    }

    /// A link event; `None` when it changed nothing visible.
    async fn on_event_in_step(&mut self, event: Option<LinkEvent>) -> Option<StepOutcome> {
        let passkey_link = self.passkey_link;
        if let Some(in_flight) = self.in_flight.as_mut() {
            match &event {
                Some(event) if ends_the_session(event) => {}
                // Once only the passkey links, an event either means
                // nothing (a QR rotation) or moves the exchange on (the
                // verification code; once the library sends it, it is done
                // with the assertion in flight) or breaks it off (a drop):
                // the latter two replace the request.
                Some(event) if passkey_link && passkey::is_noise(event) => return None,
                _ if passkey_link => {}
                // No code can link the account any more: a code request
                // in flight is of no use.
                Some(LinkEvent::PasskeyRequested(_) | LinkEvent::PasskeyFailed { .. }) => {}
                // The QR of a connection being made, or spent meanwhile:
                // the state the request commits carries it.
                Some(LinkEvent::QrRotated(qr)) => {
                    self.state = self.with_qr(qr);
                    return None;
                }
                Some(LinkEvent::QrExhausted { .. }) => {
                    self.state = self.state.without_qr();
                    return None;
                }
                // Superseded by the code being asked for.
                Some(_) => return None,
                None => {
                    in_flight.events_closed = true;
                    return None;
                }
            }
        }
        // A link (or a failure) that ends the session wins over the
        // request in flight: the request is dropped.
        let sent_passkey = matches!(
            self.in_flight,
            Some(InFlight {
                asking: Asking::Passkey(_),
                ..
            })
        );
        let waiting = self.drop_in_flight();
        let outcome = self.on_link_event(event).await;
        if sent_passkey && outcome == StepOutcome::Passkey(Reason::PasskeyRequired) {
            // WhatsApp asked again, with new options, instead of answering
            // the assertion: it has to be made again.
            for reply in waiting {
                let _ = reply.send(Err(SessionError::PasskeyRefused));
            }
        } else {
            self.answer(waiting, &outcome);
        }
        Some(outcome)
    }

    /// A manual refresh: joins the request in flight, or is answered at
    /// once, or starts a request.
    async fn refresh(&mut self, reply: Reply) -> Option<StepOutcome> {
        if self.passkey_link {
            // No code to refresh: only the passkey links this account.
            let _ = reply.send(Ok(self.state.clone()));
            return Some(StepOutcome::Idle);
        }
        if let Some(in_flight) = self.in_flight.as_mut() {
            in_flight.waiting.push(reply);
            return None;
        }
        if let Some(retry_after) = self.budget_wait() {
            let _ = reply.send(Err(SessionError::CodeBudget { retry_after }));
            return Some(StepOutcome::Idle);
        }
        if let Some(current) = self.refresh_not_needed() {
            let _ = reply.send(Ok(current));
            return Some(StepOutcome::Idle);
        }
        self.start_request(vec![reply]).await
    }

    /// The schedule's timer: the session's deadline, a scheduled code, or a
    /// store heal.
    async fn timer_fired(&mut self) -> Option<StepOutcome> {
        let now = Instant::now();
        if now >= self.deadline {
            return Some(
                self.finish(
                    Status::Expired,
                    Reason::MaxLifetime,
                    Some("no link within the session's lifetime; request a new code".into()),
                )
                .await,
            );
        }
        if self.next_request.is_some_and(|at| at <= now) {
            if self.state.status == Status::Pending && self.state.reason.is_none() {
                // The code lived to its scheduled refresh: the connection
                // is sound, so earlier failures (and drops) are forgiven.
                self.failures = 0;
            }
            return self.start_request(Vec::new()).await;
        }
        self.write_store().await;
        Some(StepOutcome::Idle)
    }

    /// The service is stopping: the request in flight is dropped, and the
    /// session ends `failed`/`interrupted`.
    async fn stop_now(&mut self) -> StepOutcome {
        let waiting = self.drop_in_flight();
        let outcome = if self.hand_over {
            self.hand_over_now().await
        } else {
            self.interrupted().await
        };
        self.answer(waiting, &outcome);
        outcome
    }

    /// Ends the request in flight, if any (dropping it cancels it), and
    /// returns the refreshes that waited for it.
    fn drop_in_flight(&mut self) -> Vec<Reply> {
        self.in_flight.take().map(|f| f.waiting).unwrap_or_default()
    }

    /// Starts asking WhatsApp for a code for the refreshes in `waiting`:
    /// opening the link client first if needed. `Some` when it could not be
    /// asked (the code budget is spent).
    async fn start_request(&mut self, waiting: Vec<Reply>) -> Option<StepOutcome> {
        self.next_request = None;
        let Some(link) = self.link.as_ref() else {
            let linker = Arc::clone(&self.linker);
            let phone = self.phone.clone();
            self.in_flight = Some(InFlight {
                asking: Asking::Open(Box::pin(async move { linker.open(&phone).await })),
                waiting,
                events_closed: false,
            });
            return None;
        };
        let handle = Arc::clone(&link.handle);
        if self.qr_only {
            self.in_flight = Some(InFlight {
                asking: Asking::Connect(Box::pin(async move { handle.connect().await })),
                waiting,
                events_closed: false,
            });
            return None;
        }
        // Counted once connected, right before WhatsApp is asked: a
        // connection that never came up notified nobody.
        if let Some(wait) = self.take_code_from_budget().await {
            let outcome = self.budget_spent(wait).await;
            self.answer(waiting, &outcome);
            return Some(outcome);
        }
        self.in_flight = Some(InFlight {
            asking: Asking::Code(Box::pin(async move { handle.request_code().await })),
            waiting,
            events_closed: false,
        });
        None
    }

    /// WhatsApp answered the request in flight.
    async fn answered(&mut self, answer: Answer) -> Option<StepOutcome> {
        let waiting = self.drop_in_flight();
        let outcome = match answer {
            Answer::Opened(Ok(link)) => {
                self.link = Some(link);
                return self.start_request(waiting).await;
            }
            Answer::Opened(Err(error)) => self.request_failed(error).await,
            // Its QR codes arrive as link events.
            Answer::Connected(Ok(())) => {
                self.answer(waiting, &StepOutcome::Idle);
                // Shown while connecting, kept in memory till now.
                self.state.qr.as_ref()?;
                self.commit(self.state.clone()).await;
                return Some(StepOutcome::QrShown);
            }
            Answer::Connected(Err(error)) => self.request_failed(error).await,
            Answer::PasskeySent(result) => self.passkey_sent(result).await,
            Answer::PasskeyConfirmed(result) => self.passkey_confirmed(result).await,
            Answer::Code(result) => {
                let trigger = match (waiting.is_empty(), self.state.attempt) {
                    (false, _) => CodeTrigger::Manual,
                    (true, 0) => CodeTrigger::First,
                    (true, _) => CodeTrigger::Auto,
                };
                match result {
                    Ok(issued) => self.code_issued(issued, trigger).await,
                    Err(error) => self.request_failed(error).await,
                }
            }
        };
        self.answer(waiting, &outcome);
        Some(outcome)
    }

    /// The current state when a manual refresh should not reach WhatsApp:
    /// while waiting out WhatsApp's own backoff, or right after a new code.
    fn refresh_not_needed(&self) -> Option<PairState> {
        let now = Instant::now();
        let backing_off = self.state.status == Status::Starting
            && self.state.whatsapp_status.is_some()
            && self.next_request.is_some_and(|at| at > now);
        let just_issued = self.state.status == Status::Pending
            && self
                .last_issued
                .is_some_and(|at| now.duration_since(at) < MANUAL_REFRESH_DEBOUNCE);
        // No code to refresh where WhatsApp offers none: the QR is there.
        (backing_off || just_issued || self.qr_only).then(|| self.state.clone())
    }

    /// How long until a code may be issued again, while the phone's budget
    /// is spent.
    fn budget_wait(&self) -> Option<Duration> {
        if self.state.reason != Some(Reason::CodeBudget) {
            return None;
        }
        let left = self.state.retry_at? - OffsetDateTime::now_utc();
        (left > time::Duration::ZERO).then(|| left.unsigned_abs().max(Duration::from_secs(1)))
    }
}

/// Resolves once `stopping` is `true`; never if its sender is gone without
/// saying so.
async fn stop_requested(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The answer to the request in flight; never, while there is none.
async fn answer_of(in_flight: &mut Option<InFlight>) -> Answer {
    match in_flight {
        Some(InFlight {
            asking: Asking::Open(open),
            ..
        }) => Answer::Opened(open.await),
        Some(InFlight {
            asking: Asking::Code(code),
            ..
        }) => Answer::Code(code.await),
        Some(InFlight {
            asking: Asking::Connect(connect),
            ..
        }) => Answer::Connected(connect.await),
        Some(InFlight {
            asking: Asking::Passkey(sent),
            ..
        }) => Answer::PasskeySent(sent.await),
        Some(InFlight {
            asking: Asking::ConfirmPasskey(confirmed),
            ..
        }) => Answer::PasskeyConfirmed(confirmed.await),
        None => std::future::pending().await,
    }
}

async fn next_link_event(link: &mut Option<OpenedLink>) -> Option<LinkEvent> {
    match link {
        Some(link) => link.events.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! One step at a time, and the loop, under paused tokio time, with a
    //! scripted linker and the in-memory store.

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::link::{Invalidation, LinkedAccount, QrCode};
    use crate::retry::Backoff;
    use crate::session::schedule::{
        CODE_BUDGET_WINDOW, MIN_EVENT_REFRESH_GAP, REFRESH_MARGIN, WAIT_TTL_MARGIN,
    };
    use crate::session::testing::{FlakyStore, Script, ScriptedLinker, VALIDITY, settings};

    pub(super) struct Fixture {
        pub(super) session: Session,
        pub(super) commands: mpsc::Sender<Command>,
        pub(super) stop: watch::Sender<bool>,
        pub(super) states: watch::Receiver<PairState>,
        pub(super) script: Arc<Script>,
        pub(super) store: Arc<FlakyStore>,
    }

    pub(super) fn fixture(settings: SessionSettings) -> Fixture {
        let script = Arc::new(Script::default());
        let store = Arc::new(FlakyStore::default());
        let stop = watch::Sender::new(false);
        let (session, commands, states) = Session::new(
            PhoneNumber::parse("628123456789").unwrap(),
            Arc::new(settings),
            Arc::new(ScriptedLinker(Arc::clone(&script))),
            Arc::clone(&store) as Arc<dyn PairingStore>,
            stop.subscribe(),
        );
        Fixture {
            session,
            commands,
            stop,
            states,
            script,
            store,
        }
    }

    async fn stored(store: &FlakyStore) -> Option<PairState> {
        let json = store.inner.get("wa:pair:628123456789").await.unwrap()?;
        Some(serde_json::from_str(&json).unwrap())
    }

    /// Drops the link client's event stream, as a connection that went away.
    fn drop_connection(script: &Script) {
        script.events.lock().unwrap().take();
    }

    /// Three times: a step (a code), then `drop` the connection and step
    /// again; with `PAIR_MAX_ATTEMPTS` 3. Returns the six outcomes.
    async fn code_then_drop_three_times(drop: impl Fn(&Script)) -> (Fixture, Vec<StepOutcome>) {
        let mut f = fixture(SessionSettings {
            max_attempts: 3,
            ..settings()
        });
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            outcomes.push(f.session.step().await);
            drop(&f.script);
            outcomes.push(f.session.step().await);
        }
        (f, outcomes)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_reported_dropped_after_every_code_backs_off_and_gives_up() {
        // Arrange, Act: the real client keeps its event stream across
        // drops and says `CodeInvalidated(Disconnected)` instead.
        let (f, outcomes) = code_then_drop_three_times(|script| {
            script.emit(LinkEvent::CodeInvalidated(Invalidation::Disconnected));
        })
        .await;

        // Assert
        for (i, codes) in [(0, 1), (2, 2), (4, 3)] {
            assert_eq!(outcomes[i], StepOutcome::CodeIssued { attempt: codes });
        }
        for i in [1, 3] {
            assert!(
                matches!(outcomes[i], StepOutcome::Retrying { .. }),
                "a drop is a failure that backs off, not an invalidation: {:?}",
                outcomes[i]
            );
        }
        assert_eq!(outcomes[5], StepOutcome::Ended(Status::Failed));
        assert_eq!(f.states.borrow().reason, Some(Reason::GaveUp));
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_keeps_the_live_code_until_it_dies_then_waits_for_the_window() {
        let mut f = fixture(SessionSettings {
            codes_per_hour: 1,
            ..settings()
        });
        f.session.step().await;
        let issued = Instant::now();

        let at_refresh = f.session.step().await;
        let kept = f.states.borrow().clone();
        let at_expiry = f.session.step().await;
        let waiting = f.states.borrow().clone();

        assert_eq!(
            at_refresh,
            StepOutcome::BudgetSpent {
                after: REFRESH_MARGIN
            }
        );
        assert_eq!(kept.status, Status::Pending);
        assert_eq!(kept.code.as_deref(), Some("CODE0001"), "still typeable");
        assert_eq!(kept.reason, Some(Reason::CodeBudget));
        assert_eq!(issued.elapsed(), VALIDITY);
        assert_eq!(
            at_expiry,
            StepOutcome::BudgetSpent {
                after: CODE_BUDGET_WINDOW - VALIDITY
            }
        );
        assert_eq!(waiting.status, Status::Starting);
        assert_eq!(waiting.code, None);
        assert_eq!(waiting.reason, Some(Reason::CodeBudget));
        assert!(waiting.retry_at.is_some());
        assert_eq!(
            f.script.requests.load(Ordering::SeqCst),
            1,
            "WhatsApp asked once"
        );
        assert_eq!(
            f.script.shutdowns.load(Ordering::SeqCst),
            1,
            "link released"
        );
        assert_eq!(stored(&f.store).await, Some(waiting));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_while_the_budget_is_spent_is_refused_without_asking_whatsapp() {
        let mut f = fixture(SessionSettings {
            codes_per_hour: 1,
            ..settings()
        });
        f.session.step().await;
        f.session.step().await;
        let (reply, answer) = oneshot::channel();
        f.commands.send(Command::Refresh(reply)).await.unwrap();

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::Idle);
        let refused = answer.await.unwrap();
        assert!(
            matches!(refused, Err(SessionError::CodeBudget { retry_after }) if retry_after > Duration::from_secs(3000)),
            "{refused:?}"
        );
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_drops_after_every_code_backs_off_and_gives_up() {
        let (f, outcomes) = code_then_drop_three_times(drop_connection).await;

        assert!(matches!(
            outcomes[0],
            StepOutcome::CodeIssued { attempt: 1 }
        ));
        assert!(matches!(outcomes[1], StepOutcome::Retrying { .. }));
        assert!(matches!(
            outcomes[2],
            StepOutcome::CodeIssued { attempt: 2 }
        ));
        assert!(matches!(outcomes[3], StepOutcome::Retrying { .. }));
        assert!(matches!(
            outcomes[4],
            StepOutcome::CodeIssued { attempt: 3 }
        ));
        assert_eq!(outcomes[5], StepOutcome::Ended(Status::Failed));
        assert_eq!(f.states.borrow().reason, Some(Reason::GaveUp));
    }

    #[tokio::test(start_paused = true)]
    async fn a_code_that_lives_to_its_refresh_forgives_earlier_drops() {
        let mut f = fixture(SessionSettings {
            max_attempts: 2,
            ..settings()
        });
        f.session.step().await;
        drop_connection(&f.script);
        f.session.step().await;
        f.session.step().await;

        let refreshed = f.session.step().await;
        drop_connection(&f.script);
        let after_drop = f.session.step().await;

        assert!(matches!(refreshed, StepOutcome::CodeIssued { attempt: 3 }));
        assert!(
            matches!(after_drop, StepOutcome::Retrying { .. }),
            "one drop after a sound refresh is not the second failure: {after_drop:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_during_a_code_request_wins_over_a_cancel_that_follows_it() {
        let mut f = fixture(settings());
        f.session.step().await;
        tokio::time::advance(MANUAL_REFRESH_DEBOUNCE * 2).await;
        f.script.hang.store(true, Ordering::SeqCst);
        let (refresh, _) = oneshot::channel();
        f.commands.send(Command::Refresh(refresh)).await.unwrap();
        let script = Arc::clone(&f.script);
        let commands = f.commands.clone();

        let (outcome, ()) = tokio::join!(f.session.step(), async move {
            // The refresh is in flight (WhatsApp silent) when the phone links,
            // and a DELETE comes right after.
            tokio::time::sleep(Duration::from_millis(50)).await;
            script.emit(LinkEvent::Linked(LinkedAccount {
                jid: "628123456789:1@s.whatsapp.net".into(),
                lid: None,
                platform: None,
            }));
            let (cancel, _) = oneshot::channel();
            commands.send(Command::Cancel(cancel)).await.unwrap();
        });

        assert_eq!(outcome, StepOutcome::Ended(Status::Linked));
        assert_eq!(f.states.borrow().status, Status::Linked);
    }

    #[tokio::test(start_paused = true)]
    async fn first_step_issues_a_code_stores_it_with_the_code_ttl_and_publishes_it() {
        let mut f = fixture(settings());

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::CodeIssued { attempt: 1 });
        let state = f.states.borrow().clone();
        assert_eq!(state.status, Status::Pending);
        assert_eq!(state.code.as_deref(), Some("CODE0001"));
        assert_eq!(state.code_display.as_deref(), Some("CODE-0001"));
        assert_eq!(stored(&f.store).await, Some(state));
        assert_eq!(
            f.store.inner.ttl_of("wa:pair:628123456789"),
            Some(Duration::from_secs(600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn codes_are_replaced_every_eight_minutes_when_whatsapp_allows_longer() {
        let mut f = fixture(settings());
        *f.script.valid_for.lock().unwrap() = Some(Duration::from_secs(900));
        f.session.step().await;
        let issued = Instant::now();

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::CodeIssued { attempt: 2 });
        assert_eq!(issued.elapsed(), Duration::from_secs(480));
        assert_eq!(f.states.borrow().code.as_deref(), Some("CODE0002"));
    }

    #[tokio::test(start_paused = true)]
    async fn codes_are_replaced_before_whatsapps_180_second_validity_ends() {
        let mut f = fixture(settings());
        f.session.step().await;
        let issued = Instant::now();

        f.session.step().await;

        assert_eq!(issued.elapsed(), VALIDITY - REFRESH_MARGIN);
        let state = f.states.borrow().clone();
        assert!(state.refresh_at.unwrap() < state.expires_at.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidated_code_leaves_the_store_at_once_and_is_replaced() {
        let mut f = fixture(settings());
        f.session.step().await;
        tokio::time::advance(Duration::from_secs(60)).await;
        let invalidated = Instant::now();

        f.script
            .emit(LinkEvent::CodeInvalidated(Invalidation::RefreshRequested));
        let first = f.session.step().await;
        let stored_meanwhile = stored(&f.store).await.unwrap();
        let second = f.session.step().await;

        assert_eq!(first, StepOutcome::Invalidated);
        assert_eq!(stored_meanwhile.status, Status::Starting);
        assert!(stored_meanwhile.code.is_none(), "no dead code in the store");
        assert_eq!(second, StepOutcome::CodeIssued { attempt: 2 });
        assert_eq!(invalidated.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidations_right_after_a_code_wait_the_minimum_gap() {
        let mut f = fixture(settings());
        f.session.step().await;
        let issued = Instant::now();

        f.script
            .emit(LinkEvent::CodeInvalidated(Invalidation::RefreshRequested));
        f.session.step().await;
        f.session.step().await;

        assert_eq!(issued.elapsed(), MIN_EVENT_REFRESH_GAP);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_up_to_the_cap() {
        let mut f = fixture(SessionSettings {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            max_attempts: 100,
            ..settings()
        });
        for _ in 0..6 {
            f.script.push(Err(LinkError::Timeout("test")));
        }
        f.session.rng = StdRng::seed_from_u64(7);
        let mut same_dice = StdRng::seed_from_u64(7);
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));

        let mut delays = Vec::new();
        for _ in 0..6 {
            match f.session.step().await {
                StepOutcome::Retrying { after } => delays.push(after),
                other => panic!("expected a retry, got {other:?}"),
            }
        }
        let outcome = f.session.step().await;

        // The n-th retry draws from [0, min(cap, base * 2^n)]: 1, 2, 4, 8, 8, 8 s.
        let expected: Vec<Duration> = (0..6)
            .map(|n| backoff.delay_honouring(n, None, &mut same_dice))
            .collect();
        assert_eq!(delays, expected);
        let ceilings = [1, 2, 4, 8, 8, 8].map(Duration::from_secs);
        for (n, (delay, ceiling)) in delays.iter().zip(ceilings).enumerate() {
            assert!(*delay <= ceiling, "retry {n}: {delay:?} > {ceiling:?}");
            assert_eq!(backoff.ceiling(n as u32), ceiling);
        }
        assert_eq!(outcome, StepOutcome::CodeIssued { attempt: 1 });
        let state = f.states.borrow().clone();
        assert_eq!(state.status, Status::Pending);
        assert!(state.retry_at.is_none(), "retry details are cleared");
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_attempt_waits_as_long_as_the_backoff_said() {
        let mut f = fixture(settings());
        f.script.push(Err(LinkError::Timeout("test")));

        let StepOutcome::Retrying { after } = f.session.step().await else {
            panic!("expected a retry");
        };
        let failed = Instant::now();
        f.session.step().await;

        // Tokio's timer wheel has millisecond resolution.
        let waited = failed.elapsed();
        assert!(
            waited >= after && waited - after < Duration::from_millis(1),
            "waited {waited:?}, backoff said {after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_longer_than_the_code_ttl_keeps_the_stored_state_until_after_it() {
        let mut f = fixture(settings());
        f.script.push(Err(LinkError::Refused {
            status: 429,
            text: "rate-overlimit".into(),
            backoff: Some(Duration::from_secs(3600)),
        }));

        f.session.step().await;

        assert_eq!(
            f.store.inner.ttl_of("wa:pair:628123456789"),
            Some(Duration::from_secs(3600) + WAIT_TTL_MARGIN),
            "a 600 s TTL would drop the key 50 minutes before the retry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn whatsapps_own_backoff_is_honoured_even_above_the_cap() {
        let mut f = fixture(settings());
        f.script.push(Err(LinkError::Refused {
            status: 429,
            text: "rate-overlimit".into(),
            backoff: Some(Duration::from_secs(90)),
        }));

        let outcome = f.session.step().await;

        assert_eq!(
            outcome,
            StepOutcome::Retrying {
                after: Duration::from_secs(90)
            }
        );
        let state = f.states.borrow().clone();
        assert_eq!(state.status, Status::Starting);
        assert_eq!(state.whatsapp_status, Some(429));
        assert!(state.code.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_gives_up_after_max_attempts_consecutive_failures() {
        let mut f = fixture(SessionSettings {
            max_attempts: 3,
            ..settings()
        });
        for _ in 0..3 {
            f.script.push(Err(LinkError::Disconnected));
        }

        let outcomes = [
            f.session.step().await,
            f.session.step().await,
            f.session.step().await,
        ];

        assert!(matches!(outcomes[0], StepOutcome::Retrying { .. }));
        assert!(matches!(outcomes[1], StepOutcome::Retrying { .. }));
        assert_eq!(outcomes[2], StepOutcome::Ended(Status::Failed));
        assert_eq!(f.states.borrow().reason, Some(Reason::GaveUp));
    }

    #[tokio::test(start_paused = true)]
    async fn a_storage_failure_is_ours_retried_and_never_filed_as_a_whatsapp_refusal() {
        let mut f = fixture(settings());
        f.script
            .push(Err(LinkError::Storage("migration error".into())));

        let failed = f.session.step().await;
        let retried = f.session.step().await;

        assert!(matches!(failed, StepOutcome::Retrying { .. }), "{failed:?}");
        assert_eq!(retried, StepOutcome::CodeIssued { attempt: 1 });
        let state = f.states.borrow().clone();
        assert_eq!(state.status, Status::Pending);
        assert_eq!(state.reason, None);
        assert_eq!(state.whatsapp_status, None);
    }

    fn qr(n: u32, valid_secs: u64) -> QrCode {
        QrCode::new(
            format!("2@ref{n},noise,identity,adv"),
            Duration::from_secs(valid_secs),
        )
    }

    fn feature_not_available() -> LinkError {
        LinkError::Refused {
            status: 452,
            text: "feature-not-available".into(),
            backoff: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn feature_not_available_keeps_the_session_pending_on_its_qr_code_alone() {
        // Arrange
        let mut f = fixture(settings());
        f.script.push(Err(feature_not_available()));

        // Act
        let refused = f.session.step().await;
        f.script.emit(LinkEvent::QrRotated(qr(1, 60)));
        let shown = f.session.step().await;

        // Assert
        assert_eq!(refused, StepOutcome::CodeUnavailable);
        assert_eq!(shown, StepOutcome::QrShown);
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.status, Status::Pending);
        assert_eq!(state.reason, Some(Reason::CodeUnavailable));
        assert_eq!(state.whatsapp_status, Some(452));
        assert!(state.code.is_none());
        assert_eq!(state.qr.as_deref(), Some("2@ref1,noise,identity,adv"));
        assert!(state.message.unwrap().contains("QR"));
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(
            f.script.requests.load(Ordering::SeqCst),
            1,
            "no more codes are asked for"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_qr_only_session_reconnects_when_its_qr_codes_run_out() {
        // Arrange: QR-only, showing a QR.
        let mut f = fixture(settings());
        f.script.push(Err(feature_not_available()));
        f.session.step().await;
        f.script.emit(LinkEvent::QrRotated(qr(1, 60)));
        f.session.step().await;

        // Act: the refs ran out and the library closed the connection; the
        // new connection shows its first QR a moment later.
        f.script.emit(LinkEvent::QrExhausted {
            connection_closed: true,
        });
        let stopped = f.session.step().await;
        let script = Arc::clone(&f.script);
        let (shown, ()) = tokio::join!(f.session.step(), async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            script.emit(LinkEvent::QrRotated(qr(2, 60)));
        });

        // Assert
        assert_eq!(stopped, StepOutcome::Idle);
        assert_eq!(f.script.connects.load(Ordering::SeqCst), 1);
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1, "no code asked");
        assert_eq!(shown, StepOutcome::QrShown);
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.status, Status::Pending);
        assert_eq!(state.qr.as_deref(), Some("2@ref2,noise,identity,adv"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_qr_only_connection_that_stops_for_another_reason_backs_off() {
        // Arrange: QR-only, showing a QR.
        let mut f = fixture(settings());
        f.script.push(Err(feature_not_available()));
        f.session.step().await;
        f.script.emit(LinkEvent::QrRotated(qr(1, 60)));
        f.session.step().await;

        // Act: the connection is replaced or refused (not the QR running out).
        f.script
            .emit(LinkEvent::CodeInvalidated(Invalidation::ClientStopped));
        let outcome = f.session.step().await;

        // Assert
        assert!(
            matches!(outcome, StepOutcome::Retrying { .. }),
            "{outcome:?}"
        );
        assert_eq!(f.session.failures, 1, "counted toward PAIR_MAX_ATTEMPTS");
        assert!(f.session.state.qr.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_qr_rotation_is_stored_beside_the_live_code() {
        // Arrange
        let mut f = fixture(settings());
        f.session.step().await;

        // Act
        f.script.emit(LinkEvent::QrRotated(qr(2, 20)));
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::QrShown);
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.code.as_deref(), Some("CODE0001"), "the code stays");
        assert_eq!(state.qr.as_deref(), Some("2@ref2,noise,identity,adv"));
        let expires = state.qr_expires_at.unwrap() - state.updated_at;
        assert_eq!(expires, time::Duration::seconds(20));
    }

    #[tokio::test(start_paused = true)]
    async fn spent_qr_codes_bring_the_code_replacement_forward() {
        // Arrange: a code, then the connection's QR refs run out 160 s in,
        // before the code's scheduled refresh at 165 s.
        let mut f = fixture(settings());
        f.session.step().await;
        f.script.emit(LinkEvent::QrRotated(qr(1, 60)));
        f.session.step().await;
        tokio::time::advance(Duration::from_secs(160)).await;

        // Act
        f.script.emit(LinkEvent::QrExhausted {
            connection_closed: false,
        });
        let exhausted = f.session.step().await;
        let replaced = f.session.step().await;

        // Assert
        assert_eq!(exhausted, StepOutcome::Idle);
        assert_eq!(replaced, StepOutcome::CodeIssued { attempt: 2 });
        assert_eq!(
            Instant::now().duration_since(f.session.last_issued.unwrap()),
            Duration::ZERO
        );
        assert!(f.session.state.code.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_session_keeps_no_qr_code() {
        // Arrange
        let mut f = fixture(settings());
        f.session.step().await;
        f.script.emit(LinkEvent::QrRotated(qr(1, 60)));
        f.session.step().await;

        // Act
        let (cancel, _) = oneshot::channel();
        f.commands.send(Command::Cancel(cancel)).await.unwrap();
        f.session.step().await;

        // Assert
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.status, Status::Cancelled);
        assert!(state.qr.is_none() && state.qr_expires_at.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_linked_to_another_account_is_discarded_and_the_session_fails() {
        // Arrange
        let mut f = fixture(settings());
        f.session.step().await;

        // Act: someone else's phone scanned the QR.
        f.script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628111111111:1@s.whatsapp.net".into(),
            lid: None,
            platform: None,
        }));
        let outcome = f.session.step().await;
        f.session.close().await;

        // Assert
        assert_eq!(outcome, StepOutcome::Ended(Status::Failed));
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.reason, Some(Reason::WrongAccount));
        assert!(state.jid.is_none(), "the stranger's device is not reported");
        assert_eq!(f.script.discards.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_expires_an_unlinked_session_at_its_max_lifetime() {
        let f = fixture(settings());
        *f.script.valid_for.lock().unwrap() = Some(Duration::from_secs(900));
        let started = Instant::now();

        f.session.run().await;

        assert_eq!(started.elapsed(), Duration::from_secs(1800));
        // Codes at 0, 480, 960 and 1440 s.
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 4);
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.status, Status::Expired);
        assert_eq!(state.reason, Some(Reason::MaxLifetime));
        assert!(state.code.is_none());
        assert_eq!(
            f.store.inner.ttl_of("wa:pair:628123456789"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(f.script.shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_ends_the_session_as_linked_with_the_outcome_ttl() {
        let mut f = fixture(settings());
        f.session.step().await;

        f.script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628123456789:1@s.whatsapp.net".into(),
            lid: None,
            platform: Some("android".into()),
        }));
        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::Ended(Status::Linked));
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.status, Status::Linked);
        assert_eq!(state.jid.as_deref(), Some("628123456789:1@s.whatsapp.net"));
        assert_eq!(state.attempt, 1);
        assert!(state.code.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_outage_keeps_the_code_and_the_next_write_heals_the_store() {
        let mut f = fixture(settings());
        f.store.down.store(true, Ordering::SeqCst);

        let outcome = f.session.step().await;
        let published = f.states.borrow().clone();
        f.store.down.store(false, Ordering::SeqCst);
        let heal = f.session.step().await;

        assert_eq!(outcome, StepOutcome::CodeIssued { attempt: 1 });
        assert_eq!(published.code.as_deref(), Some("CODE0001"));
        assert_eq!(heal, StepOutcome::Idle);
        assert_eq!(stored(&f.store).await, Some(published));
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_command_issues_a_new_code_now() {
        let mut f = fixture(settings());
        f.session.step().await;
        tokio::time::advance(MANUAL_REFRESH_DEBOUNCE).await;
        let (reply, answer) = oneshot::channel();
        f.commands.send(Command::Refresh(reply)).await.unwrap();

        f.session.step().await;

        let state = answer.await.unwrap().unwrap();
        assert_eq!(state.attempt, 2);
        assert_eq!(state.code.as_deref(), Some("CODE0002"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_right_after_a_new_code_returns_that_code() {
        let mut f = fixture(settings());
        f.session.step().await;
        let (reply, answer) = oneshot::channel();
        f.commands.send(Command::Refresh(reply)).await.unwrap();

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::Idle);
        assert_eq!(
            answer.await.unwrap().unwrap().code.as_deref(),
            Some("CODE0001")
        );
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_while_waiting_out_whatsapps_backoff_does_not_ask_again() {
        let mut f = fixture(settings());
        f.script.push(Err(LinkError::Refused {
            status: 429,
            text: "rate-overlimit".into(),
            backoff: Some(Duration::from_secs(90)),
        }));
        f.session.step().await;
        let (reply, answer) = oneshot::channel();
        f.commands.send(Command::Refresh(reply)).await.unwrap();

        f.session.step().await;

        let state = answer.await.unwrap().unwrap();
        assert_eq!(state.status, Status::Starting);
        assert_eq!(state.whatsapp_status, Some(429));
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_interrupts_an_unanswered_code_request_and_joined_refreshes_learn_it() {
        let mut f = fixture(settings());
        f.script.hang.store(true, Ordering::SeqCst);
        let (refresh, refreshed) = oneshot::channel();
        let (cancel, cancelled) = oneshot::channel();

        let (outcome, ()) = tokio::join!(f.session.step(), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            f.commands.send(Command::Refresh(refresh)).await.unwrap();
            f.commands.send(Command::Cancel(cancel)).await.unwrap();
        });

        assert_eq!(outcome, StepOutcome::Ended(Status::Cancelled));
        assert_eq!(cancelled.await.unwrap().unwrap().status, Status::Cancelled);
        assert_eq!(
            refreshed.await.unwrap(),
            Err(SessionError::Ended("cancelled"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_already_reported_wins_over_a_queued_cancel() {
        let mut f = fixture(settings());
        f.session.step().await;
        let (cancel, _cancelled) = oneshot::channel();
        f.commands.send(Command::Cancel(cancel)).await.unwrap();
        f.script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628123456789:1@s.whatsapp.net".into(),
            lid: None,
            platform: None,
        }));

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::Ended(Status::Linked));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_command_ends_the_session_as_cancelled() {
        let mut f = fixture(settings());
        f.session.step().await;
        let (reply, answer) = oneshot::channel();
        f.commands.send(Command::Cancel(reply)).await.unwrap();

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::Ended(Status::Cancelled));
        assert_eq!(answer.await.unwrap().unwrap().status, Status::Cancelled);
        assert_eq!(stored(&f.store).await.unwrap().status, Status::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_pending_session_as_failed_interrupted() {
        let mut f = fixture(settings());
        f.session.step().await;
        f.stop.send_replace(true);

        let outcome = f.session.step().await;

        assert_eq!(outcome, StepOutcome::Ended(Status::Failed));
        let state = stored(&f.store).await.unwrap();
        assert_eq!(state.reason, Some(Reason::Interrupted));
        assert!(state.code.is_none(), "an interrupted code is dead");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_does_not_wait_for_an_unanswered_code_request() {
        let mut f = fixture(settings());
        f.script.hang.store(true, Ordering::SeqCst);
        let started = Instant::now();

        let (outcome, ()) = tokio::join!(f.session.step(), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            f.stop.send_replace(true);
        });

        assert_eq!(outcome, StepOutcome::Ended(Status::Failed));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(f.states.borrow().reason, Some(Reason::Interrupted));
    }
}

//! What each outcome does to a session: a code issued, a request failed,
//! an event from the link client, the code budget spent, the session
//! ended. Each commits one new state (one store write) and says what
//! happened as a [`StepOutcome`].

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{Reply, Session, StepOutcome};
use crate::link::{Invalidation, IssuedCode, LinkError, LinkEvent, LinkedAccount, QrCode};
use crate::metrics::CodeTrigger;
use crate::session::SessionError;
use crate::session::schedule::replacement_wait;
use crate::session::state::{PairState, Reason, Status};

impl Session {
    pub(super) async fn cancel(&mut self, reply: Reply, waiting: Vec<Reply>) -> StepOutcome {
        let outcome = self
            .finish(Status::Cancelled, Reason::Cancelled, None)
            .await;
        let _ = reply.send(if self.taken_over {
            Err(SessionError::Busy)
        } else {
            Ok(self.state.clone())
        });
        self.answer(waiting, &outcome);
        outcome
    }

    /// Answers refreshes that waited for `outcome`.
    pub(super) fn answer(&self, waiting: Vec<Reply>, outcome: &StepOutcome) {
        for reply in waiting {
            if self.taken_over {
                // Another process runs the phone now.
                let _ = reply.send(Err(SessionError::Busy));
                continue;
            }
            let answer = match outcome {
                StepOutcome::Ended(_) => Err(outcome_error(&self.state)),
                StepOutcome::BudgetSpent { .. } => Err(SessionError::CodeBudget {
                    retry_after: self.budget_wait().unwrap_or(Duration::from_secs(1)),
                }),
                StepOutcome::PasskeyRefused => Err(SessionError::PasskeyRefused),
                StepOutcome::HandedOver => Err(SessionError::ShuttingDown),
                _ => Ok(self.state.clone()),
            };
            let _ = reply.send(answer);
        }
    }

    /// The phone had all its codes for this window: no new code until
    /// `wait` has passed. A live code stays up until it dies (the phone can
    /// still type it); then the link client is released, since nothing can
    /// be asked of WhatsApp until the window closes.
    pub(super) async fn budget_spent(&mut self, wait: Duration) -> StepOutcome {
        let now = OffsetDateTime::now_utc();
        let retry_at = now + wait;
        let message = format!(
            "this number has had its {} codes for this hour, the most WhatsApp is asked for; \
             a new code comes after {}",
            self.settings.codes_per_hour,
            retry_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
        let code_left = self
            .code_dies_at
            .filter(|_| self.state.status == Status::Pending)
            .map(|dies| dies.saturating_duration_since(Instant::now()))
            .filter(|left| !left.is_zero());
        let (state, after) = match code_left {
            Some(left) => (
                PairState {
                    reason: Some(Reason::CodeBudget),
                    message: Some(message),
                    retry_at: Some(retry_at),
                    refresh_at: None,
                    updated_at: now,
                    ..self.state.clone()
                },
                left.min(wait),
            ),
            None => {
                if let Some(link) = self.link.take() {
                    link.handle.shutdown().await;
                }
                (
                    PairState {
                        reason: Some(Reason::CodeBudget),
                        message: Some(message),
                        retry_at: Some(retry_at),
                        ..self.state.without_code(Status::Starting).without_qr()
                    },
                    wait,
                )
            }
        };
        self.next_request = Some(Instant::now() + after);
        self.commit(state).await;
        tracing::warn!(
            phone = %self.phone,
            codes_per_hour = self.settings.codes_per_hour,
            retry_in_secs = wait.as_secs(),
            event = "code_budget_spent",
            "code budget of this number spent; no new code until its window closes"
        );
        StepOutcome::BudgetSpent { after }
    }

    pub(super) async fn code_issued(
        &mut self,
        issued: IssuedCode,
        trigger: CodeTrigger,
    ) -> StepOutcome {
        self.count(|metrics| metrics.code_issued(trigger));
        let refresh_in = self.settings.refresh_in(issued.valid_for);
        self.next_request = Some(Instant::now() + refresh_in);
        self.last_issued = Some(Instant::now());
        self.code_dies_at = Some(Instant::now() + issued.valid_for);
        let now = OffsetDateTime::now_utc();
        let attempt = self.state.attempt + 1;
        let state = PairState {
            status: Status::Pending,
            code: Some(issued.code.expose().to_owned()),
            code_display: Some(issued.code.display_form()),
            issued_at: Some(now),
            expires_at: Some(now + issued.valid_for),
            refresh_at: Some(now + refresh_in),
            attempt,
            ..self.state.without_code(Status::Pending)
        };
        self.commit(state).await;
        tracing::info!(
            phone = %self.phone,
            attempt,
            valid_secs = issued.valid_for.as_secs(),
            refresh_in_secs = refresh_in.as_secs(),
            event = if attempt == 1 { "code_issued" } else { "code_refreshed" },
            "pairing code {}",
            if attempt == 1 { "issued" } else { "refreshed" }
        );
        StepOutcome::CodeIssued { attempt }
    }

    pub(super) async fn request_failed(&mut self, error: LinkError) -> StepOutcome {
        if let Some(status) = error.status() {
            self.count(|metrics| metrics.whatsapp_refused(status));
        }
        if let LinkError::Storage(cause) = &error {
            // Ours, not WhatsApp's: retried like any transient failure.
            tracing::error!(
                phone = %self.phone,
                cause = %cause,
                event = "storage_failed",
                "device storage failed; retrying"
            );
        }
        if error.status() == Some(452) && self.link.is_some() {
            return self.code_unavailable().await;
        }
        if !error.is_retryable() {
            tracing::warn!(phone = %self.phone, error = %error, "code request refused for good");
            let failed = PairState {
                whatsapp_status: error.status(),
                ..self.state.clone()
            };
            // One state change, one store write: carry the status into it.
            self.state = failed;
            return self
                .finish(
                    Status::Failed,
                    Reason::WhatsappRefused,
                    Some(refusal_message(&error)),
                )
                .await;
        }
        self.failures += 1;
        if self.failures >= self.settings.max_attempts {
            tracing::warn!(phone = %self.phone, attempts = self.failures, error = %error, "giving up");
            return self
                .finish(
                    Status::Failed,
                    Reason::GaveUp,
                    Some(format!(
                        "gave up after {} failed attempts: {}",
                        self.failures,
                        refusal_message(&error)
                    )),
                )
                .await;
        }
        let delay = self.settings.backoff.delay_honouring(
            self.failures - 1,
            error.backoff(),
            &mut self.rng,
        );
        self.next_request = Some(Instant::now() + delay);
        let now = OffsetDateTime::now_utc();
        let mut state = PairState {
            retry_at: Some(now + delay),
            message: Some(format!(
                "{}; retrying in {} s",
                refusal_message(&error),
                delay.as_secs().max(1)
            )),
            whatsapp_status: error.status(),
            ..self.state.without_code(Status::Starting)
        };
        if matches!(error, LinkError::Disconnected) {
            // The QR went with the connection.
            state = state.without_qr();
        }
        self.commit(state).await;
        tracing::warn!(
            phone = %self.phone,
            failures = self.failures,
            error = %error,
            retry_in_ms = delay.as_millis() as u64,
            event = "code_request_failed",
            "code request failed; retrying"
        );
        StepOutcome::Retrying { after: delay }
    }

    pub(super) async fn on_link_event(&mut self, event: Option<LinkEvent>) -> StepOutcome {
        if self.passkey_link
            && let Some(outcome) = self.during_passkey_link(event.as_ref()).await
        {
            return outcome;
        }
        let Some(event) = event else {
            // The link client went away without telling us why: release
            // what is left of it and start over with a fresh one, after a
            // backoff like any failure. A connection that keeps dropping
            // right after each code must not make WhatsApp notify the phone
            // every few seconds.
            if let Some(link) = self.link.take() {
                link.handle.shutdown().await;
            }
            return self.request_failed(LinkError::Disconnected).await;
        };
        match event {
            LinkEvent::CodeIssued(_) => StepOutcome::Idle,
            LinkEvent::QrRotated(qr) => {
                if self.qr_only {
                    // A connection that shows a QR is sound: earlier drops
                    // are forgiven, as a code that lives to its refresh is.
                    self.failures = 0;
                }
                let state = self.with_qr(&qr);
                self.commit(state).await;
                StepOutcome::QrShown
            }
            LinkEvent::QrExhausted {
                connection_closed: false,
            } => self.qr_exhausted(),
            LinkEvent::QrExhausted {
                connection_closed: true,
            } if self.qr_only => {
                // The connection used up its QR codes and closed, as the
                // library does when no code is outstanding: the next one
                // brings new ones. The stored QR has expired by now, and
                // its successor replaces it in a second.
                self.next_request = Some(Instant::now());
                self.state = self.state.without_qr();
                StepOutcome::Idle
            }
            LinkEvent::QrExhausted {
                connection_closed: true,
            } => self.code_invalidated(Invalidation::ClientStopped).await,
            LinkEvent::CodeInvalidated(why) => self.code_invalidated(why).await,
            LinkEvent::Refused { status, backoff } => {
                self.request_failed(LinkError::Refused {
                    status,
                    text: "refused after the phone answered".into(),
                    backoff,
                })
                .await
            }
            LinkEvent::Linked(account) => self.linked(account).await,
            LinkEvent::LinkedButNotSaved => {
                self.finish(
                    Status::Failed,
                    Reason::Storage,
                    Some(
                        "the phone linked, but this server could not save the session; remove \
                         the device in WhatsApp > Linked devices and pair again"
                            .into(),
                    ),
                )
                .await
            }
            LinkEvent::Failed { reason } => {
                self.finish(Status::Failed, Reason::LoggedOut, Some(reason))
                    .await
            }
            LinkEvent::PasskeyRequested(options) => self.passkey_requested(options).await,
            LinkEvent::PasskeyVerification(code) => self.passkey_verification(code).await,
            LinkEvent::PasskeyFailed { reason } => {
                // Also before any request reached us (WhatsApp's options
                // could not be read): codes cannot link this account.
                tracing::warn!(phone = %self.phone, reason, "the passkey exchange broke off");
                self.passkey_failed("WhatsApp's passkey check did not complete")
                    .await
            }
        }
    }

    /// What the link client's events mean once only the passkey links:
    /// `Some` for the events that mean something else than usual.
    async fn during_passkey_link(&mut self, event: Option<&LinkEvent>) -> Option<StepOutcome> {
        let why = match event {
            // QR codes and codes can no longer link this account.
            Some(event) if super::passkey::is_noise(event) => return Some(StepOutcome::Idle),
            // The passkey's own steps, the link and real failures: as usual.
            Some(
                LinkEvent::PasskeyRequested(_)
                | LinkEvent::PasskeyVerification(_)
                | LinkEvent::PasskeyFailed { .. }
                | LinkEvent::Linked(_)
                | LinkEvent::LinkedButNotSaved
                | LinkEvent::Failed { .. },
            ) => return None,
            Some(LinkEvent::Refused { .. }) => "WhatsApp refused the link",
            Some(LinkEvent::CodeInvalidated(Invalidation::PairingRejected)) => {
                "the phone's answer could not be verified"
            }
            Some(
                LinkEvent::QrExhausted { .. }
                | LinkEvent::CodeInvalidated(_)
                | LinkEvent::QrRotated(_)
                | LinkEvent::CodeIssued(_),
            )
            | None => "the connection to WhatsApp dropped during the passkey link",
        };
        Some(self.passkey_failed(why).await)
    }

    /// This session's state showing `qr`; a QR-only session shows it as
    /// `pending` (its code is unavailable, its QR is what there is).
    pub(super) fn with_qr(&self, qr: &QrCode) -> PairState {
        if self.passkey_link {
            // No QR code links an account that asked for its passkey.
            return self.state.clone();
        }
        let now = OffsetDateTime::now_utc();
        let state = PairState {
            qr: Some(qr.expose().to_owned()),
            qr_expires_at: Some(now + qr.time_left()),
            updated_at: now,
            ..self.state.clone()
        };
        if self.qr_only && state.status == Status::Starting {
            return code_unavailable_state(&state);
        }
        state
    }

    /// The connection's QR codes are used up while a code keeps it up: the
    /// code is replaced now (not at its scheduled refresh, seconds later)
    /// on a new connection, which brings new QR codes with it.
    fn qr_exhausted(&mut self) -> StepOutcome {
        if self.state.status == Status::Pending && !self.qr_only {
            let since_issued = self.last_issued.map(|at| at.elapsed());
            let replace_at = Instant::now() + replacement_wait(since_issued);
            self.next_request = Some(
                self.next_request
                    .map_or(replace_at, |at| at.min(replace_at)),
            );
        }
        StepOutcome::Idle
    }

    /// WhatsApp refused codes for this account (452): the session stays
    /// `pending` on its connection's QR codes, and asks for no more codes.
    async fn code_unavailable(&mut self) -> StepOutcome {
        self.qr_only = true;
        self.next_request = None;
        self.failures = 0;
        let state = code_unavailable_state(&self.state.without_code(Status::Pending));
        self.commit(state).await;
        tracing::warn!(
            phone = %self.phone,
            event = "code_unavailable",
            "WhatsApp offers no pairing code for this number; showing the QR code only"
        );
        StepOutcome::CodeUnavailable
    }

    /// The code (or, QR-only, the connection) shown is dead.
    async fn code_invalidated(&mut self, why: Invalidation) -> StepOutcome {
        if self.qr_only && self.state.status == Status::Pending {
            // Not the QR codes running out (handled above): a connection
            // that fails is retried after a backoff and counted, or a
            // refused connection would be made again every second.
            self.state = self.state.without_qr();
            return self.request_failed(LinkError::Disconnected).await;
        }
        if self.state.status != Status::Pending {
            return StepOutcome::Idle;
        }
        if why == Invalidation::Disconnected {
            // The real client reports a dropped connection this
            // way (its event stream lives on for the next request),
            // so this is the flapping connection's path: it backs
            // off and counts toward `PAIR_MAX_ATTEMPTS` like any
            // failure, instead of a fresh code (a notification on
            // the phone) every few seconds.
            tracing::info!(
                phone = %self.phone,
                reason = ?why,
                event = "code_invalidated",
                "the connection carrying the pairing dropped; retrying after a backoff"
            );
            self.last_issued = None;
            return self.request_failed(LinkError::Disconnected).await;
        }
        tracing::info!(
            phone = %self.phone,
            reason = ?why,
            event = "code_invalidated",
            "WhatsApp invalidated the shown pairing; replacing it"
        );
        // The dead code leaves the store before its replacement is
        // requested; the replacement comes as soon as allowed.
        let since_issued = self.last_issued.take().map(|at| at.elapsed());
        self.next_request = Some(Instant::now() + replacement_wait(since_issued));
        let state = self.state.without_code(Status::Starting);
        self.commit(state).await;
        StepOutcome::Invalidated
    }

    pub(super) async fn interrupted(&mut self) -> StepOutcome {
        self.finish(
            Status::Failed,
            Reason::Interrupted,
            Some("the service stopped before the phone linked; request a new code".into()),
        )
        .await
    }

    pub(super) async fn linked(&mut self, account: LinkedAccount) -> StepOutcome {
        if !self.phone.owns_device(&account.jid) {
            // Someone else's phone scanned the QR: their device must not
            // stay linked here under this number.
            self.discard_device = true;
            tracing::warn!(
                phone = %self.phone,
                event = "wrong_account",
                "the QR code was scanned by another WhatsApp account; logging its device out"
            );
            return self
                .finish(
                    Status::Failed,
                    Reason::WrongAccount,
                    Some(
                        "the QR code was scanned by a different WhatsApp account than this \
                         number's; that device was removed from this server (and logged out \
                         where WhatsApp allowed). Scan it with the phone of this number"
                            .into(),
                    ),
                )
                .await;
        }
        self.next_request = None;
        let state = PairState {
            jid: Some(account.jid.clone()),
            ..self.state.without_code(Status::Linked)
        };
        self.commit(state).await;
        self.count(|metrics| metrics.session_ended(Status::Linked, None));
        tracing::info!(
            phone = %self.phone,
            attempt = self.state.attempt,
            platform = account.platform.as_deref().unwrap_or("unknown"),
            event = "linked",
            "phone linked"
        );
        StepOutcome::Ended(Status::Linked)
    }

    pub(super) async fn finish(
        &mut self,
        status: Status,
        reason: Reason,
        message: Option<String>,
    ) -> StepOutcome {
        self.next_request = None;
        let state = PairState {
            reason: Some(reason),
            message,
            whatsapp_status: self.state.whatsapp_status,
            ..self.state.without_code(status)
        };
        self.commit(state).await;
        self.count(|metrics| metrics.session_ended(status, Some(reason)));
        tracing::info!(
            phone = %self.phone,
            status = status.as_str(),
            reason = reason.as_str(),
            event = status.as_str(),
            "pairing session ended"
        );
        StepOutcome::Ended(status)
    }
}

/// Whether `event` ends the session (so it must not wait behind a request).
pub(super) fn ends_the_session(event: &LinkEvent) -> bool {
    matches!(
        event,
        LinkEvent::Linked(_) | LinkEvent::LinkedButNotSaved | LinkEvent::Failed { .. }
    )
}

/// What a command to an ended session is told: `shutting_down` when the
/// service stopped it, else the session's outcome.
pub(in crate::session) fn outcome_error(state: &PairState) -> SessionError {
    if state.reason == Some(Reason::Interrupted) {
        SessionError::ShuttingDown
    } else {
        ended(state.status)
    }
}

pub(in crate::session) fn ended(status: Status) -> SessionError {
    match status {
        Status::Linked => SessionError::AlreadyLinked,
        other => SessionError::Ended(other.as_str()),
    }
}

/// `state` as a QR-only session shows it.
fn code_unavailable_state(state: &PairState) -> PairState {
    PairState {
        status: Status::Pending,
        reason: Some(Reason::CodeUnavailable),
        message: Some(
            "phone-number linking is not available for this account; scan the QR code instead \
             (WhatsApp > Linked devices > Link a device)"
                .into(),
        ),
        retry_at: None,
        whatsapp_status: Some(452),
        ..state.clone()
    }
}

/// A message about `error` that is safe to store and show.
fn refusal_message(error: &LinkError) -> String {
    match error {
        LinkError::Refused { status: 429, .. } | LinkError::Refused { status: 400, .. } => {
            "WhatsApp is limiting pairing codes for this number".into()
        }
        LinkError::Refused { status: 452, .. } => {
            "phone-number linking is not available for this account; link with a QR code".into()
        }
        LinkError::Refused { status: 403, .. } => "WhatsApp refused to link this number".into(),
        LinkError::Refused { status, .. } => format!("WhatsApp refused the request ({status})"),
        LinkError::Timeout(_) => "WhatsApp did not answer in time".into(),
        LinkError::Disconnected => "the connection to WhatsApp dropped".into(),
        LinkError::Storage(_) => "the session could not be stored on this server".into(),
        LinkError::Closed => "the link session closed".into(),
        LinkError::Client(_) => "the WhatsApp client failed".into(),
        LinkError::Passkey(_) => "WhatsApp refused a step of the passkey link".into(),
    }
}

//! A session whose account links only with its passkey: WhatsApp asks for
//! an assertion, the caller answers (`POST /pair/{phone}/passkey`), both
//! screens show a verification code, the caller confirms it
//! (`POST /pair/{phone}/passkey/confirm`), the phone links.
//!
//! ```text
//! starting|pending -> action_required(passkey_required)      WhatsApp asks
//! action_required(passkey_required) -> pending(passkey_accepted)   assertion accepted
//! pending(passkey_accepted) -> action_required(passkey_confirmation)  code shown
//! action_required(passkey_confirmation) -> pending(passkey_confirmed)  confirmed
//! pending(passkey_confirmed) -> linked
//! any of them -> failed(passkey_failed)   the exchange broke off
//! ```
//!
//! Once WhatsApp asks for the passkey no code or QR code can link the
//! account, so the session asks for no more codes and shows no QR code. The
//! exchange lives on the connection it started on: if that drops, the
//! session fails.

use std::sync::Arc;

use super::{Asking, InFlight, Reply, Session, StepOutcome};
use crate::link::passkey::{PasskeyAssertion, PasskeyOptions, VerificationCode};
use crate::link::{Invalidation, LinkError, LinkEvent, LinkHandle};
use crate::session::SessionError;
use crate::session::state::{PairState, Reason, Status};

/// Whether `event` means nothing once only the passkey links the account:
/// QR codes and codes, which can no longer link it.
pub(super) fn is_noise(event: &LinkEvent) -> bool {
    matches!(
        event,
        LinkEvent::QrRotated(_)
            | LinkEvent::QrExhausted {
                connection_closed: false,
            }
            | LinkEvent::CodeIssued(_)
            | LinkEvent::CodeInvalidated(Invalidation::RefreshRequested)
    )
}

impl Session {
    /// WhatsApp asks for the account's passkey.
    pub(super) async fn passkey_requested(&mut self, options: PasskeyOptions) -> StepOutcome {
        self.passkey_link = true;
        self.next_request = None;
        self.failures = 0;
        let state = PairState {
            reason: Some(Reason::PasskeyRequired),
            message: Some(
                "WhatsApp asks for this account's passkey before it links a new device: sign in \
                 with the passkey (on a device or app that can answer for web.whatsapp.com) and \
                 send the result to POST /pair/{phone}/passkey. A pairing code or QR code cannot \
                 link this account"
                    .into(),
            ),
            passkey_options: Some(options.as_json().clone()),
            ..self.state.without_code(Status::ActionRequired).without_qr()
        };
        self.commit(state).await;
        tracing::info!(
            phone = %self.phone,
            event = "passkey_requested",
            "WhatsApp asks for the account's passkey"
        );
        StepOutcome::Passkey(Reason::PasskeyRequired)
    }

    /// A caller's assertion: sent to WhatsApp, unless the session is not
    /// waiting for one.
    pub(super) fn send_passkey(
        &mut self,
        assertion: PasskeyAssertion,
        reply: Reply,
    ) -> Option<StepOutcome> {
        self.passkey_step(
            Reason::PasskeyRequired,
            "this session is not waiting for a passkey",
            reply,
            |handle| {
                Asking::Passkey(Box::pin(
                    async move { handle.send_passkey(assertion).await },
                ))
            },
        )
    }

    /// The caller confirms the verification code matched.
    pub(super) fn confirm_passkey(&mut self, reply: Reply) -> Option<StepOutcome> {
        self.passkey_step(
            Reason::PasskeyConfirmation,
            "this session shows no verification code to confirm",
            reply,
            |handle| {
                Asking::ConfirmPasskey(Box::pin(async move { handle.confirm_passkey().await }))
            },
        )
    }

    /// Puts the step `ask` makes in flight for `reply`, if the session is
    /// at `stage` (else `out_of_order` is the answer) with its link client
    /// and nothing else in flight (else `busy`).
    fn passkey_step(
        &mut self,
        stage: Reason,
        out_of_order: &'static str,
        reply: Reply,
        ask: impl FnOnce(Arc<dyn LinkHandle>) -> Asking,
    ) -> Option<StepOutcome> {
        if self.state.reason != Some(stage) {
            let _ = reply.send(Err(SessionError::PasskeyOutOfOrder(out_of_order)));
            return Some(StepOutcome::Idle);
        }
        let (Some(handle), None) = (
            self.link.as_ref().map(|link| Arc::clone(&link.handle)),
            self.in_flight.as_ref(),
        ) else {
            let _ = reply.send(Err(SessionError::Busy));
            return Some(StepOutcome::Idle);
        };
        self.in_flight = Some(InFlight {
            asking: ask(handle),
            waiting: vec![reply],
            events_closed: false,
        });
        None
    }

    /// WhatsApp answered the assertion.
    pub(super) async fn passkey_sent(&mut self, result: Result<(), LinkError>) -> StepOutcome {
        match result {
            // The verification code may have come first; then it stands.
            Ok(()) if self.state.reason == Some(Reason::PasskeyRequired) => {
                let state = PairState {
                    status: Status::Pending,
                    reason: Some(Reason::PasskeyAccepted),
                    message: Some(
                        "passkey accepted; the phone and this page will show the same \
                         verification code"
                            .into(),
                    ),
                    passkey_options: None,
                    ..self.state.clone()
                };
                self.commit(state).await;
                tracing::info!(
                    phone = %self.phone,
                    event = "passkey_accepted",
                    "WhatsApp accepted the passkey"
                );
                StepOutcome::Passkey(Reason::PasskeyAccepted)
            }
            Ok(()) => StepOutcome::Idle,
            Err(LinkError::Disconnected | LinkError::Closed) => {
                self.passkey_failed("the connection to WhatsApp dropped during the passkey link")
                    .await
            }
            // Whether WhatsApp took it is unknown: answering again could
            // open a second exchange beside a live one.
            Err(LinkError::Timeout(_)) => {
                self.passkey_failed("WhatsApp did not answer the passkey in time")
                    .await
            }
            Err(error) => {
                // The caller may try again: WhatsApp keeps asking.
                tracing::warn!(
                    phone = %self.phone,
                    error = %error,
                    event = "passkey_refused",
                    "WhatsApp did not accept the passkey"
                );
                StepOutcome::PasskeyRefused
            }
        }
    }

    /// WhatsApp and the phone derived the verification code.
    pub(super) async fn passkey_verification(&mut self, code: VerificationCode) -> StepOutcome {
        if !self.passkey_link {
            return StepOutcome::Idle;
        }
        let state = PairState {
            status: Status::ActionRequired,
            reason: Some(Reason::PasskeyConfirmation),
            message: Some(
                "check that the phone shows the same verification code, then confirm it (POST \
                 /pair/{phone}/passkey/confirm)"
                    .into(),
            ),
            passkey_options: None,
            verification_code: Some(code.expose().to_owned()),
            updated_at: time::OffsetDateTime::now_utc(),
            ..self.state.clone()
        };
        self.commit(state).await;
        tracing::info!(
            phone = %self.phone,
            event = "passkey_verification_shown",
            "passkey verification code shown"
        );
        StepOutcome::Passkey(Reason::PasskeyConfirmation)
    }

    /// WhatsApp answered the confirmation.
    pub(super) async fn passkey_confirmed(&mut self, result: Result<(), LinkError>) -> StepOutcome {
        if let Err(error) = result {
            // The library lets go of the exchange whatever the answer.
            tracing::warn!(phone = %self.phone, error = %error, "passkey confirmation failed");
            return self
                .passkey_failed("WhatsApp did not accept the confirmation")
                .await;
        }
        let state = PairState {
            status: Status::Pending,
            reason: Some(Reason::PasskeyConfirmed),
            message: Some("confirmed; the phone is finishing the link".into()),
            verification_code: None,
            updated_at: time::OffsetDateTime::now_utc(),
            ..self.state.clone()
        };
        self.commit(state).await;
        tracing::info!(
            phone = %self.phone,
            event = "passkey_confirmed",
            "passkey verification confirmed"
        );
        StepOutcome::Passkey(Reason::PasskeyConfirmed)
    }

    /// The exchange broke off: it cannot be resumed on another connection.
    pub(super) async fn passkey_failed(&mut self, why: &str) -> StepOutcome {
        tracing::warn!(
            phone = %self.phone,
            why,
            event = "passkey_failed",
            "passkey link failed"
        );
        self.finish(
            Status::Failed,
            Reason::PasskeyFailed,
            Some(format!("{why}; request a new pairing to try again")),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    //! The passkey path of one session, step by step under paused time,
    //! with the scripted linker.

    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::super::tests::{Fixture, fixture};
    use super::*;
    use crate::link::{Invalidation, LinkEvent, LinkedAccount, QrCode};
    use crate::session::task::Command;
    use crate::session::testing::settings;

    fn options() -> PasskeyOptions {
        PasskeyOptions::parse(r#"{"challenge":"Y2hhbGxlbmdl","rpId":"web.whatsapp.com"}"#).unwrap()
    }

    fn assertion() -> PasskeyAssertion {
        PasskeyAssertion {
            credential_id: vec![1; 16],
            client_data_json: br#"{"type":"webauthn.get"}"#.to_vec(),
            authenticator_data: vec![2; 37],
            signature: vec![3; 70],
            user_handle: None,
        }
    }

    /// A session showing a code and a QR code, then asked for the passkey.
    async fn asked() -> Fixture {
        let mut f = fixture(settings());
        f.session.step().await;
        f.script.emit(LinkEvent::QrRotated(QrCode::new(
            "2@ref,a,b,c",
            Duration::from_secs(60),
        )));
        f.session.step().await;
        f.script.emit(LinkEvent::PasskeyRequested(options()));
        assert_eq!(
            f.session.step().await,
            StepOutcome::Passkey(Reason::PasskeyRequired)
        );
        f
    }

    /// Steps until the session waits on a request that never answers (the
    /// script hangs): the request is in flight.
    async fn taken_in_flight(f: &mut Fixture) {
        let step = tokio::time::timeout(Duration::from_secs(1), f.session.step()).await;
        assert!(step.is_err(), "a request hangs in flight: {step:?}");
    }

    /// Sends `command` and steps until the session answers it.
    async fn command(f: &mut Fixture, command: impl FnOnce(Reply) -> Command) -> StepOutcome {
        let (reply, _answer) = oneshot::channel();
        f.commands.send(command(reply)).await.unwrap();
        f.session.step().await
    }

    #[tokio::test(start_paused = true)]
    async fn a_passkey_request_replaces_the_code_and_qr_and_no_code_is_asked_for_again() {
        // Arrange, Act
        let mut f = asked().await;
        f.script.emit(LinkEvent::QrRotated(QrCode::new(
            "2@ref2,a,b,c",
            Duration::from_secs(20),
        )));
        let rotated = f.session.step().await;
        let quiet = tokio::time::timeout(Duration::from_secs(900), f.session.step()).await;

        // Assert
        let state = f.states.borrow().clone();
        assert_eq!(state.status, Status::ActionRequired);
        assert_eq!(state.reason, Some(Reason::PasskeyRequired));
        assert_eq!(state.code, None);
        assert_eq!(state.qr, None, "no QR code links this account");
        assert_eq!(
            state.passkey_options.as_ref().unwrap()["rpId"],
            "web.whatsapp.com"
        );
        assert_eq!(rotated, StepOutcome::Idle);
        assert!(quiet.is_err(), "nothing scheduled: no code refresh");
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_accepted_passkey_then_the_confirmed_code_lead_to_the_link() {
        // Arrange
        let mut f = asked().await;

        // Act
        let sent = command(&mut f, |reply| Command::Passkey(assertion(), reply)).await;
        let accepted = f.states.borrow().clone();
        f.script
            .emit(LinkEvent::PasskeyVerification(VerificationCode::new(
                "ABCD-EFGH",
            )));
        let shown = f.session.step().await;
        let showing = f.states.borrow().clone();
        let confirmed = command(&mut f, Command::ConfirmPasskey).await;
        let after_confirm = f.states.borrow().clone();
        f.script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628123456789:1@s.whatsapp.net".into(),
            lid: None,
            platform: None,
        }));
        let linked = f.session.step().await;

        // Assert
        assert_eq!(sent, StepOutcome::Passkey(Reason::PasskeyAccepted));
        assert_eq!(accepted.status, Status::Pending);
        assert_eq!(accepted.passkey_options, None);
        assert_eq!(shown, StepOutcome::Passkey(Reason::PasskeyConfirmation));
        assert_eq!(showing.status, Status::ActionRequired);
        assert_eq!(showing.verification_code.as_deref(), Some("ABCD-EFGH"));
        assert_eq!(confirmed, StepOutcome::Passkey(Reason::PasskeyConfirmed));
        assert_eq!(after_confirm.verification_code, None);
        assert_eq!(linked, StepOutcome::Ended(Status::Linked));
        assert_eq!(f.script.passkeys_sent.load(Ordering::SeqCst), 1);
        assert_eq!(f.script.confirmations.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_assertion_tells_the_caller_and_the_session_still_asks() {
        // Arrange
        let mut f = asked().await;
        f.script
            .passkey_answers
            .lock()
            .unwrap()
            .push_back(Err(LinkError::Passkey("401 not-authorized".into())));
        let (reply, answer) = oneshot::channel();

        // Act
        f.commands
            .send(Command::Passkey(assertion(), reply))
            .await
            .unwrap();
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::PasskeyRefused);
        assert_eq!(answer.await.unwrap(), Err(SessionError::PasskeyRefused));
        assert_eq!(f.states.borrow().reason, Some(Reason::PasskeyRequired));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_connection_during_a_passkey_link_fails_the_session() {
        // Arrange
        let mut f = asked().await;

        // Act
        f.script
            .emit(LinkEvent::CodeInvalidated(Invalidation::Disconnected));
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::Ended(Status::Failed));
        assert_eq!(f.states.borrow().reason, Some(Reason::PasskeyFailed));
        assert_eq!(
            f.script.requests.load(Ordering::SeqCst),
            1,
            "no code asked for after the drop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_or_an_early_confirmation_during_a_passkey_link_asks_whatsapp_nothing() {
        // Arrange
        let mut f = asked().await;
        let (refresh, refreshed) = oneshot::channel();
        let (confirm, confirmed) = oneshot::channel();

        // Act
        f.commands.send(Command::Refresh(refresh)).await.unwrap();
        f.session.step().await;
        f.commands
            .send(Command::ConfirmPasskey(confirm))
            .await
            .unwrap();
        f.session.step().await;

        // Assert
        let refreshed = refreshed.await.unwrap().unwrap();
        assert_eq!(refreshed.reason, Some(Reason::PasskeyRequired));
        assert!(matches!(
            confirmed.await.unwrap(),
            Err(SessionError::PasskeyOutOfOrder(_))
        ));
        assert_eq!(f.script.requests.load(Ordering::SeqCst), 1);
        assert_eq!(f.script.confirmations.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drop_while_the_assertion_is_unanswered_fails_the_session_and_tells_the_caller() {
        // Arrange
        let mut f = asked().await;
        f.script.hang.store(true, Ordering::SeqCst);
        let (reply, answer) = oneshot::channel();
        f.commands
            .send(Command::Passkey(assertion(), reply))
            .await
            .unwrap();
        taken_in_flight(&mut f).await;
        f.script
            .emit(LinkEvent::CodeInvalidated(Invalidation::Disconnected));

        // Act
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::Ended(Status::Failed));
        assert_eq!(f.states.borrow().reason, Some(Reason::PasskeyFailed));
        assert!(matches!(answer.await.unwrap(), Err(SessionError::Ended(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_verification_code_arriving_before_the_assertions_answer_answers_the_caller() {
        // Arrange
        let mut f = asked().await;
        f.script.hang.store(true, Ordering::SeqCst);
        let (reply, answer) = oneshot::channel();
        let (refresh, refreshed) = oneshot::channel();
        f.commands
            .send(Command::Passkey(assertion(), reply))
            .await
            .unwrap();
        taken_in_flight(&mut f).await;

        // Act
        f.commands.send(Command::Refresh(refresh)).await.unwrap();
        let refresh_outcome = f.session.step().await;
        f.script
            .emit(LinkEvent::PasskeyVerification(VerificationCode::new(
                "ABCD-EFGH",
            )));
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(
            refresh_outcome,
            StepOutcome::Idle,
            "a refresh waits on nothing"
        );
        assert_eq!(
            refreshed.await.unwrap().unwrap().reason,
            Some(Reason::PasskeyRequired)
        );
        assert_eq!(outcome, StepOutcome::Passkey(Reason::PasskeyConfirmation));
        let answered = answer.await.unwrap().unwrap();
        assert_eq!(answered.verification_code.as_deref(), Some("ABCD-EFGH"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passkey_failure_before_any_request_ends_the_session_instead_of_leaving_it_codeless()
    {
        // Arrange: a code request in flight when the library says its
        // passkey step failed (WhatsApp's options could not be read).
        let mut f = fixture(settings());
        f.script.hang.store(true, Ordering::SeqCst);
        taken_in_flight(&mut f).await;
        f.script.emit(LinkEvent::PasskeyFailed {
            reason: "no usable options".into(),
        });

        // Act
        let outcome = f.session.step().await;

        // Assert
        assert_eq!(outcome, StepOutcome::Ended(Status::Failed));
        assert_eq!(f.states.borrow().reason, Some(Reason::PasskeyFailed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passkey_state_is_stored_until_the_sessions_deadline() {
        // Arrange, Act
        let f = asked().await;

        // Assert: nothing rewrites it while the person acts.
        let ttl = f.store.inner.ttl_of("wa:pair:628123456789").unwrap();
        assert!(
            ttl >= settings().session_max - Duration::from_secs(5),
            "{ttl:?}"
        );
    }
}

//! What a session looks like from outside: its [`Status`], the [`Reason`] it
//! ended and the [`PairState`] that is stored and returned by the API.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::phone::PhoneNumber;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// No code yet (connecting, or retrying after a failure).
    Starting,
    /// Waiting for the phone: a live code is shown, or (where WhatsApp
    /// offers no codes, `reason: code_unavailable`) a QR code only, or
    /// (`reason: passkey_accepted` / `passkey_confirmed`) a passkey link is
    /// under way.
    Pending,
    /// Waiting for the person (or the host app): WhatsApp asks for the
    /// account's passkey (`reason: passkey_required`, with
    /// `passkey_options`), or for the verification code to be confirmed
    /// (`reason: passkey_confirmation`, with `verification_code`).
    ActionRequired,
    /// The phone linked. Final.
    Linked,
    /// Refused for good, gave up, logged out or interrupted. Final.
    Failed,
    /// Not linked within the session's maximum lifetime. Final.
    Expired,
    /// Cancelled through the API. Final.
    Cancelled,
}

impl Status {
    /// Whether the session has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Starting | Self::Pending | Self::ActionRequired)
    }

    /// The snake-case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Pending => "pending",
            Self::ActionRequired => "action_required",
            Self::Linked => "linked",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Why a session ended (or why it is waiting), as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The service shut down while the session was open.
    Interrupted,
    /// Too many consecutive failures.
    GaveUp,
    /// WhatsApp refused in a way retrying cannot fix (403, 452).
    WhatsappRefused,
    /// The link client reported the device logged out or unusable.
    LoggedOut,
    /// The QR was scanned by another WhatsApp account than the session's
    /// number; that device was logged out and removed. Final.
    WrongAccount,
    /// WhatsApp offers no pairing codes to this account (452): the session
    /// stays `pending` with a QR code only.
    CodeUnavailable,
    /// The session reached its maximum lifetime.
    MaxLifetime,
    /// Cancelled through the API.
    Cancelled,
    /// Device storage failed.
    Storage,
    /// The phone had `PAIR_CODES_PER_HOUR` codes this hour; no new one
    /// until `retry_at` (the session waits, it has not ended).
    CodeBudget,
    /// WhatsApp links this account only with its passkey: answer with an
    /// assertion (`POST /pair/{phone}/passkey`).
    PasskeyRequired,
    /// WhatsApp accepted the passkey; the verification code follows.
    PasskeyAccepted,
    /// The phone shows `verification_code`: confirm it matches
    /// (`POST /pair/{phone}/passkey/confirm`).
    PasskeyConfirmation,
    /// The verification code was confirmed; the phone finishes the link.
    PasskeyConfirmed,
    /// The passkey link broke off. Final.
    PasskeyFailed,
    /// The process that ran the session stopped (a deploy) and handed it
    /// over: another process resumes it with a new connection and a new
    /// code, without anyone asking (`status: starting`).
    HandedOver,
}

impl Reason {
    /// The snake-case name used in JSON, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interrupted => "interrupted",
            Self::GaveUp => "gave_up",
            Self::WhatsappRefused => "whatsapp_refused",
            Self::LoggedOut => "logged_out",
            Self::WrongAccount => "wrong_account",
            Self::CodeUnavailable => "code_unavailable",
            Self::MaxLifetime => "max_lifetime",
            Self::Cancelled => "cancelled",
            Self::Storage => "storage",
            Self::CodeBudget => "code_budget",
            Self::PasskeyRequired => "passkey_required",
            Self::PasskeyAccepted => "passkey_accepted",
            Self::PasskeyConfirmation => "passkey_confirmation",
            Self::PasskeyConfirmed => "passkey_confirmed",
            Self::PasskeyFailed => "passkey_failed",
            Self::HandedOver => "handed_over",
        }
    }
}

/// The state of one phone's pairing, exactly as stored under
/// `wa:pair:{phone}` and returned by the API.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairState {
    /// The phone number, digits only.
    #[schema(value_type = String, example = "628123456789")]
    pub phone: PhoneNumber,
    /// Where the session is.
    pub status: Status,
    /// The live code (`ABCD1234`), while pending.
    pub code: Option<String>,
    /// The live code as people type it (`ABCD-1234`).
    pub code_display: Option<String>,
    /// When the live code was issued.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub issued_at: Option<OffsetDateTime>,
    /// When WhatsApp stops accepting the live code.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub expires_at: Option<OffsetDateTime>,
    /// When the service replaces the live code.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub refresh_at: Option<OffsetDateTime>,
    /// The QR code the phone can scan instead of typing the code: the string
    /// to encode (`ref,noise,identity,adv_secret,...`), as WhatsApp Web
    /// draws it; `null` while no connection shows one.
    #[serde(default)]
    pub qr: Option<String>,
    /// When that QR code stops being scannable (WhatsApp rotates it: 60 s
    /// for a connection's first, 20 s for each next one).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub qr_expires_at: Option<OffsetDateTime>,
    /// How many codes this session has issued.
    pub attempt: u32,
    /// When this state was produced.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Orders this phone's states: each state stored is numbered above the
    /// one before it (microseconds since 1970 when it was produced, at least
    /// one more than its session's previous), and the store refuses a state
    /// numbered below the one it holds, so a write that arrives late never
    /// replaces a newer state.
    #[serde(default)]
    pub seq: u64,
    /// When the session ends `expired` if the phone has not linked (its
    /// maximum lifetime, counted from its start); a session handed over to
    /// another process keeps it.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        with = "time::serde::rfc3339::option"
    )]
    pub deadline: Option<OffsetDateTime>,
    /// Why the session ended (or is waiting).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<Reason>,
    /// Human-readable detail for `reason`, safe to show.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// When the next attempt runs, while retrying.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        with = "time::serde::rfc3339::option"
    )]
    pub retry_at: Option<OffsetDateTime>,
    /// WhatsApp's status code for the last refusal, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub whatsapp_status: Option<u16>,
    /// The linked device's JID.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub jid: Option<String>,
    /// While `reason` is `passkey_required`: WhatsApp's WebAuthn request
    /// options (`challenge`, `rpId`, `allowCredentials`, ...) for the
    /// authenticator that holds the account's passkey.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = Option<Object>)]
    pub passkey_options: Option<serde_json::Value>,
    /// While `reason` is `passkey_confirmation`: the code the phone shows
    /// too (`ABCD-EFGH`), for the person to compare.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub verification_code: Option<String>,
}

/// A state as the store holds it: the state, plus a one-way tag of who
/// started the session, so any process can tell whether a signed-in user
/// may see an ended session. The tag is a hash, never the user's id, and is
/// never part of an API answer.
#[derive(Serialize)]
pub struct StoredState<'a> {
    /// The state, its fields at the top level.
    #[serde(flatten)]
    pub state: &'a PairState,
    /// [`Owner::tag`](super::Owner::tag) of who started the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<&'a str>,
}

/// A [`StoredState`] read back.
#[derive(Deserialize)]
pub struct ReadState {
    /// The state.
    #[serde(flatten)]
    pub state: PairState,
    /// Who started the session, when the writer recorded it.
    #[serde(default)]
    pub owner: Option<String>,
}

impl fmt::Debug for PairState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the code: Debug output ends up in logs.
        f.debug_struct("PairState")
            .field("phone", &self.phone)
            .field("status", &self.status)
            .field("code", &self.code.as_ref().map(|_| "[redacted]"))
            .field("qr", &self.qr.as_ref().map(|_| "[redacted]"))
            .field(
                "verification_code",
                &self.verification_code.as_ref().map(|_| "[redacted]"),
            )
            .field("attempt", &self.attempt)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl PairState {
    /// The state of a session that has just started.
    pub fn starting(phone: PhoneNumber) -> Self {
        Self {
            phone,
            status: Status::Starting,
            code: None,
            code_display: None,
            issued_at: None,
            expires_at: None,
            refresh_at: None,
            qr: None,
            qr_expires_at: None,
            attempt: 0,
            updated_at: OffsetDateTime::now_utc(),
            seq: 0,
            deadline: None,
            reason: None,
            message: None,
            retry_at: None,
            whatsapp_status: None,
            jid: None,
            passkey_options: None,
            verification_code: None,
        }
    }

    /// This state as a process that does not run the session sees it: the
    /// process that ran it is gone (a restart or crash), and so are its code
    /// and its connection to WhatsApp.
    pub fn orphaned(&self) -> Self {
        if self.status.is_terminal() {
            return self.clone();
        }
        Self {
            reason: Some(Reason::Interrupted),
            message: Some(
                "the service restarted before the phone linked; request a new code".into(),
            ),
            ..self.without_code(Status::Failed)
        }
    }

    /// The same state without a QR code (its connection is gone).
    pub(super) fn without_qr(&self) -> Self {
        Self {
            qr: None,
            qr_expires_at: None,
            ..self.clone()
        }
    }

    /// The same session without a live code (and without stale details).
    /// Its QR code stays while the session goes on (it belongs to the
    /// connection, not to the code); an ended session has none.
    pub(super) fn without_code(&self, status: Status) -> Self {
        let ended = status.is_terminal();
        Self {
            status,
            qr: self.qr.clone().filter(|_| !ended),
            qr_expires_at: self.qr_expires_at.filter(|_| !ended),
            code: None,
            code_display: None,
            issued_at: None,
            expires_at: None,
            refresh_at: None,
            updated_at: OffsetDateTime::now_utc(),
            reason: None,
            message: None,
            retry_at: None,
            whatsapp_status: None,
            passkey_options: None,
            verification_code: None,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_a_state_never_shows_the_code() {
        let mut state = PairState::starting(PhoneNumber::parse("628123456789").unwrap());
        state.code = Some("SECRET12".into());

        let printed = format!("{state:?}");

        assert!(!printed.contains("SECRET12"), "{printed}");
        assert!(!printed.contains("628123456789"), "{printed}");
    }

    #[test]
    fn stored_json_matches_the_documented_contract() {
        let mut state = PairState::starting(PhoneNumber::parse("628123456789").unwrap());
        state.status = Status::Pending;
        state.code = Some("ABCD1234".into());
        state.code_display = Some("ABCD-1234".into());
        state.issued_at = Some(OffsetDateTime::UNIX_EPOCH);
        state.attempt = 1;

        let json: serde_json::Value = serde_json::to_value(&state).unwrap();

        assert_eq!(json["phone"], "628123456789");
        assert_eq!(json["status"], "pending");
        assert_eq!(json["code"], "ABCD1234");
        assert_eq!(json["code_display"], "ABCD-1234");
        assert_eq!(json["issued_at"], "1970-01-01T00:00:00Z");
        assert_eq!(json["attempt"], 1);
        for key in ["expires_at", "refresh_at", "updated_at"] {
            assert!(json.get(key).is_some(), "{key} present");
        }
        let back: PairState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
    }
}

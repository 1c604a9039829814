//! Talking to WhatsApp: one *link client* per phone number asks the
//! multi-device protocol for 8-character pairing codes and reports what
//! happens to them.
//!
//! [`Linker`] and [`LinkHandle`] are the seam the rest of the service is
//! written against, so the session logic can be tested with a scripted fake;
//! [`whatsapp::WhatsAppLinker`] is the one real implementation, over the
//! `whatsapp-rust` client.
//!
//! A session's life, seen from here:
//! 1. [`Linker::open`] connects a link client for the phone. Every
//!    connection brings QR codes ([`LinkEvent::QrRotated`]) that the phone
//!    can scan instead of typing a code.
//! 2. [`LinkHandle::request_code`] asks WhatsApp for a code (again whenever
//!    the caller wants a fresh one; the previous one dies). Where WhatsApp
//!    offers no codes, [`LinkHandle::connect`] keeps a connection up for its
//!    QR codes alone.
//! 3. [`LinkEvent`]s arrive on [`OpenedLink::events`]: a QR rotated, the
//!    code was invalidated, WhatsApp refused, the phone linked, the session
//!    failed.
//!    For an account with a passkey, WhatsApp asks for it
//!    ([`LinkEvent::PasskeyRequested`]); [`LinkHandle::send_passkey`]
//!    answers, a verification code follows
//!    ([`LinkEvent::PasskeyVerification`]) and
//!    [`LinkHandle::confirm_passkey`] finishes the link (see [`passkey`]).
//! 4. [`LinkHandle::shutdown`] ends it; nothing keeps running afterwards.

pub mod backups;
pub mod http_client;
pub mod passkey;
pub mod tasks;
pub mod version;
pub mod whatsapp;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;

use crate::phone::PhoneNumber;
use passkey::{PasskeyAssertion, PasskeyOptions, VerificationCode};

/// An 8-character pairing code, e.g. `ABCD1234`.
///
/// `Debug` and `Display` are redacted so that a stray `{:?}` in a log line
/// cannot leak a code; use [`PairingCode::expose`] where the code really has
/// to be shown (the HTTP answer and the store).
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode(String);

impl PairingCode {
    /// Wraps a code as the link client returned it.
    pub fn new(code: impl Into<String>) -> Self {
        Self(code.into())
    }

    /// The code itself, `ABCD1234`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The code as people type it from a screen: `ABCD-1234`.
    pub fn display_form(&self) -> String {
        match self.0.char_indices().nth(4) {
            Some((mid, _)) => format!("{}-{}", &self.0[..mid], &self.0[mid..]),
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairingCode([redacted])")
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for PairingCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// What a companion's QR code encodes (`ref,noise,identity,adv_secret,...`,
/// the string WhatsApp Web draws), with how long the phone may scan it.
///
/// Whoever scans it links their account to this server's device, so it is
/// as sensitive as a code: `Debug` is redacted; [`QrCode::expose`] gives the
/// string for the API, the store and the rendered picture.
#[derive(Clone, PartialEq, Eq)]
pub struct QrCode {
    payload: String,
    /// Until when the phone may scan it (WhatsApp rotates refs: 60 s for
    /// the first of a connection, 20 s for each next one). A deadline, not
    /// a duration: a QR read from a mailbox later has that much less left.
    scannable_until: tokio::time::Instant,
}

impl QrCode {
    /// Wraps a QR string as the link client produced it, scannable for
    /// `valid_for` from now.
    pub fn new(payload: impl Into<String>, valid_for: Duration) -> Self {
        Self {
            payload: payload.into(),
            scannable_until: tokio::time::Instant::now() + valid_for,
        }
    }

    /// The string to encode in the QR picture.
    pub fn expose(&self) -> &str {
        &self.payload
    }

    /// How long from now it can still be scanned (zero once it cannot).
    pub fn time_left(&self) -> Duration {
        self.scannable_until
            .saturating_duration_since(tokio::time::Instant::now())
    }
}

impl fmt::Debug for QrCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QrCode")
            .field("payload", &"[redacted]")
            .field("time_left", &self.time_left())
            .finish()
    }
}

/// A code WhatsApp accepted, with how long it stays valid from now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCode {
    /// The code to show.
    pub code: PairingCode,
    /// Remaining validity as WhatsApp states it (about 180 s at issue).
    pub valid_for: Duration,
}

/// Why the code currently shown can no longer be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invalidation {
    /// WhatsApp asked for a new code (`refresh_code`), or the phone read the
    /// code but the link did not complete within a minute.
    RefreshRequested,
    /// The connection carrying the code dropped; the code died with it.
    Disconnected,
    /// The link client stopped by itself (no code outstanding, QR refs used up).
    ClientStopped,
    /// The phone sent a `pair-success` the client could not verify.
    PairingRejected,
}

/// Where the linked companion device lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkedAccount {
    /// The companion's device JID, e.g. `628123456789:3@s.whatsapp.net`.
    pub jid: String,
    /// The account's LID JID, when WhatsApp sent one.
    pub lid: Option<String>,
    /// The primary's platform, as WhatsApp reports it (e.g. `android`).
    pub platform: Option<String>,
}

/// Something that happened to a link client after it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A code was issued (informational: [`LinkHandle::request_code`]
    /// already returns it to its caller).
    CodeIssued(IssuedCode),
    /// The code currently shown is dead; request a new one.
    CodeInvalidated(Invalidation),
    /// The connection shows a new QR code (a new connection's first, or the
    /// next ref); the one before it can no longer be scanned.
    QrRotated(QrCode),
    /// The connection's QR refs are used up: no QR can be scanned until a
    /// new connection. It stays up for the code outstanding on it, or (none
    /// outstanding) the library closed it.
    QrExhausted {
        /// The library closed the connection (no code was outstanding).
        connection_closed: bool,
    },
    /// The phone completed the link and the session is persisted.
    Linked(LinkedAccount),
    /// WhatsApp refused the link after the phone answered (e.g. the key
    /// bundle was rejected); the code is dead.
    Refused {
        /// WhatsApp's status code (400, 403, 429, 452, 500, …).
        status: u16,
        /// How long WhatsApp asked us to wait, if it said.
        backoff: Option<Duration>,
    },
    /// The phone linked, but the device could not be saved on this server:
    /// the link is useless here and the device should be removed from the
    /// phone.
    LinkedButNotSaved,
    /// The session cannot continue (logged out, banned, client outdated, …).
    Failed {
        /// Human-readable reason, safe to log and show.
        reason: String,
    },
    /// WhatsApp links this account only with its passkey: it asks for a
    /// WebAuthn assertion made with these options. No code or QR links it.
    PasskeyRequested(PasskeyOptions),
    /// WhatsApp accepted the passkey; the phone and the companion now show
    /// this code, which the person compares before
    /// [`LinkHandle::confirm_passkey`].
    PasskeyVerification(VerificationCode),
    /// The passkey link broke off after the assertion (the phone's answer
    /// was malformed, a step was refused).
    PasskeyFailed {
        /// What went wrong, for the log.
        reason: String,
    },
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// WhatsApp answered the request with an error.
    #[error("WhatsApp refused the request: {status} {text}")]
    Refused {
        /// WhatsApp's status code (400, 403, 429, 452, 500, …).
        status: u16,
        /// WhatsApp's error text, e.g. `rate-overlimit`.
        text: String,
        /// How long WhatsApp asked us to wait, if it said.
        backoff: Option<Duration>,
    },
    /// No answer in time (connection not up, or the request unanswered).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The connection dropped while the request was in flight.
    #[error("connection to WhatsApp lost")]
    Disconnected,
    /// The device store could not be opened or written.
    #[error("session storage failed: {0}")]
    Storage(String),
    /// The session was shut down.
    #[error("link client is closed")]
    Closed,
    /// WhatsApp (or the client library) refused a step of a passkey link.
    #[error("passkey step refused: {0}")]
    Passkey(String),
    /// Anything else from the client library.
    #[error("link client failed: {0}")]
    Client(String),
}

impl LinkError {
    /// WhatsApp's status code, when this is a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The delay WhatsApp asked for, when it sent one.
    pub fn backoff(&self) -> Option<Duration> {
        match self {
            Self::Refused { backoff, .. } => *backoff,
            _ => None,
        }
    }

    /// Whether trying again later can succeed.
    ///
    /// WhatsApp uses 400 for throttling as well as bad input, so 400 counts
    /// as retryable; 403 (forbidden) and 452 (feature not available for the
    /// account) do not, and neither does a closed session. Storage failures
    /// are ours (a full disk, a store still held): retrying can fix them.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { status, .. } => !matches!(status, 403 | 452),
            Self::Timeout(_) | Self::Disconnected | Self::Client(_) | Self::Storage(_) => true,
            Self::Closed | Self::Passkey(_) => false,
        }
    }
}

/// A phone's link client, opened: the handle to act on it and its event
/// stream. (A *session* is the pairing the service runs; this is the
/// WhatsApp side of one.)
pub struct OpenedLink {
    /// Operations on the session; shared, so a request can be in flight
    /// while its owner goes on listening to events and commands.
    pub handle: Arc<dyn LinkHandle>,
    /// Everything that happens to the session, in order.
    pub events: mpsc::UnboundedReceiver<LinkEvent>,
}

impl fmt::Debug for OpenedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedLink").finish_non_exhaustive()
    }
}

/// Operations on one opened link client.
#[async_trait]
pub trait LinkHandle: Send + Sync {
    /// Asks WhatsApp for a code, replacing (and killing) any code issued
    /// before on this session. Reconnects first when the client has stopped.
    async fn request_code(&self) -> Result<IssuedCode, LinkError>;

    /// Makes sure a connection is up (a new one when the last stopped), for
    /// its QR codes alone: no code is asked for.
    async fn connect(&self) -> Result<(), LinkError>;

    /// Ends the session: the connection closes, background tasks stop, any
    /// outstanding code dies. Idempotent.
    async fn shutdown(&self);

    /// Ends the session and undoes a link that must not stay: the linked
    /// device logs itself out of WhatsApp (once it has logged in) and its
    /// files are deleted. For a device linked to another account than the
    /// session's phone.
    async fn discard(&self);

    /// Answers WhatsApp's passkey request ([`LinkEvent::PasskeyRequested`])
    /// with `assertion`. `Ok` once WhatsApp accepted it; the verification
    /// code follows as [`LinkEvent::PasskeyVerification`].
    async fn send_passkey(&self, assertion: PasskeyAssertion) -> Result<(), LinkError>;

    /// Confirms that the verification code matched: the link completes
    /// ([`LinkEvent::Linked`]).
    async fn confirm_passkey(&self) -> Result<(), LinkError>;
}

/// Opens link clients. Object-safe so the service holds `Arc<dyn Linker>`.
#[async_trait]
pub trait Linker: Send + Sync + 'static {
    /// Connects a link client for `phone`, ready for [`LinkHandle::request_code`].
    async fn open(&self, phone: &PhoneNumber) -> Result<OpenedLink, LinkError>;

    /// Whether a device linked for `phone` is kept here (a new link would
    /// replace it). Unlinked devices' files are deleted when their session
    /// ends, so a device file means a link, or a crash mid-pairing.
    async fn has_linked_device(&self, phone: &PhoneNumber) -> bool;

    /// The store of `phone`'s linked device as saved (a SQLite database
    /// file), once its link client has closed; `None` when none is kept
    /// here.
    async fn linked_device(&self, phone: &PhoneNumber) -> Result<Option<Vec<u8>>, LinkError>;

    /// How many connected clients are ready for new sessions (the warm
    /// pool); 0 when the linker keeps none.
    fn warm_clients(&self) -> usize {
        0
    }

    /// Keeps whatever the linker prepares ahead of requests (the warm pool)
    /// until `stop` turns true, then releases it. Returns at once when
    /// there is nothing to keep.
    async fn keep_warm(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let _ = stop;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_code_never_prints_itself() {
        let code = PairingCode::new("ABCD1234");

        let printed = format!("{code} {code:?}");

        assert!(!printed.contains("ABCD"), "{printed}");
    }

    #[test]
    fn pairing_code_display_form_splits_in_the_middle() {
        assert_eq!(PairingCode::new("ABCD1234").display_form(), "ABCD-1234");
    }

    #[test]
    fn pairing_code_serializes_as_the_plain_code() {
        let json = serde_json::to_string(&PairingCode::new("ABCD1234")).unwrap();

        assert_eq!(json, "\"ABCD1234\"");
    }

    #[test]
    fn link_error_retryability_follows_whatsapp_semantics() {
        let refused = |status| LinkError::Refused {
            status,
            text: String::new(),
            backoff: None,
        };

        assert!(refused(429).is_retryable());
        assert!(refused(400).is_retryable(), "400 doubles as throttling");
        assert!(!refused(452).is_retryable());
        assert!(!refused(403).is_retryable());
        assert!(!LinkError::Closed.is_retryable());
        assert!(
            LinkError::Storage("disk full".into()).is_retryable(),
            "ours, not WhatsApp's"
        );
    }
}

//! A loopback stand-in for WhatsApp's multi-device server, plus a scripted
//! phone, so the real `whatsapp-rust` link client can be exercised with no
//! internet and no handset.
//!
//! - [`wire`]: WebSocket + Noise XX responder + sealed binary nodes.
//! - [`primary`]: the phone's cryptography for "Link with phone number".
//! - [`FakeWhatsApp`]: the server itself and the control surface tests (and
//!   the sandbox HTTP routes) use: see what a client asked for, type a code on
//!   the fake phone, inject faults.
//!
//! What the server scripts, in protocol order:
//! 1. A registering client gets `<pair-device>` with six QR refs, each
//!    scannable during its turn on the client's screen (60 s, then 20 s).
//! 2. `link_code_companion_reg` stage `companion_hello` is recorded (jid, push
//!    flag, platform id and display) and answered with a pairing ref, unless
//!    a queued [`Fault`] says otherwise.
//!    The hello must name the companion's Noise static key
//!    (`companion_server_auth_key_pub`, the key of the connection it came
//!    on) and carry `link_code_pairing_nonce`; the key is what the device
//!    will have to log in with.
//! 3. [`FakeWhatsApp::enter_code`] plays the person typing the code: a
//!    `primary_hello` notification goes out, the `companion_finish` bundle is
//!    opened (only the right code opens it; a finish without the pairing's
//!    ref or its bundle gets an error IQ), a `pair-success` whose ADV HMAC
//!    and account signature verify is sent, the companion's device signature
//!    is checked under the phone's own identity key, then stream error 515
//!    asks the client to log in again.
//!
//!    Or [`FakeWhatsApp::scan_qr`] plays a person scanning the QR: a live
//!    ref on the connection whose Noise key the QR names, and the ADV secret
//!    from the QR, then the same `pair-success`, for the account that
//!    scanned.
//!
//!    For an account with a passkey ([`FakeWhatsApp::require_passkey`]),
//!    the `companion_hello` is answered and then the companion is asked for
//!    the passkey instead: see [`passkey`] for the exchange, which ends in
//!    the same `pair-success`. Such an account's phone cannot link by code
//!    or QR.
//! 4. A login gets `<success>` only from a device that completed
//!    `pair-device-sign`, with the device number it was given and the Noise
//!    key it registered; anything else gets `<failure reason="401">` and
//!    the connection is closed, as WhatsApp does for a device it does not
//!    know. `encrypt` / `count` is answered with the number of pre-keys the
//!    device uploaded; `remove-companion-device` (a logout) removes the
//!    logged-in device; any other IQ gets an empty result.
//!
//! Only a client built with `danger-skip-cert-chain-verify` accepts this
//! server's certificate chain: it can never stand in for WhatsApp to a
//! release build.

pub mod passkey;
pub mod primary;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::RngExt as _;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use wacore::libsignal::protocol::KeyPair;
use wacore_binary::builder::NodeBuilder;
use wacore_binary::{Jid, Node, NodeContent};

use primary::{PrimaryHello, StageTwoError};
use wire::{ClientHello, SecureConn, ServerIdentity};

/// The server's JID, as the real one sends it.
const SERVER_JID: &str = "s.whatsapp.net";
/// QR refs per `<pair-device>`: WhatsApp hands out six.
const QR_REFS: usize = 6;
/// How long the client shows the first ref (whatsapp-rust and WA Web: 60 s).
const FIRST_REF_TURN: Duration = Duration::from_secs(60);
/// How long it shows each later ref (20 s).
const NEXT_REF_TURN: Duration = Duration::from_secs(20);
/// How long the fake phone waits for the companion's `companion_finish`, and
/// for its `pair-device-sign`. Stage two does one PBKDF2 on the companion,
/// so this is generous for a debug build on a loaded machine.
pub const STAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A scripted misbehaviour, consumed by the next matching `companion_hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// Answer `429 rate-overlimit` with a `backoff` of this many seconds.
    RateOverlimit {
        /// The `backoff` attribute, in seconds.
        backoff_secs: u32,
    },
    /// Answer with WhatsApp's error `code` (400, 403, 452, 500) and the text
    /// WhatsApp pairs with it.
    Refuse {
        /// The `code` attribute.
        code: u16,
    },
    /// Close the connection instead of answering.
    DropConnection,
    /// Never answer (the client's IQ times out).
    NeverAnswer,
}

/// What the fake recorded about one phone number.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PhoneRecord {
    /// The `jid` attribute of the last `companion_hello`.
    pub jid: String,
    /// `should_show_push_notification` of the last `companion_hello`.
    pub show_push_notification: bool,
    /// `companion_platform_id` of the last `companion_hello`.
    pub platform_id: String,
    /// `companion_platform_display`, e.g. "Chrome (Linux)".
    pub platform_display: String,
    /// How many `companion_hello` requests arrived (answered or not).
    pub code_requests: u32,
    /// How many of those were refused or dropped by a [`Fault`].
    pub faults_applied: u32,
    /// `companion_hello` requests refused as malformed (no Noise key, a
    /// key that is not the connection's, no pairing nonce).
    pub malformed_hellos: u32,
    /// `companion_finish` requests refused (no matching ref, no bundle).
    pub refused_finishes: u32,
    /// Codes typed on the phone that did not open the companion's bundle.
    pub wrong_codes: u32,
    /// Set once `pair-success` was acknowledged by the companion.
    pub linked: Option<LinkedDevice>,
    /// The linked device came back and logged in after stream error 515.
    pub logged_in: bool,
    /// Successful logins of this phone's devices.
    pub logins: u32,
    /// Logins refused with 401: a device number or Noise key this phone
    /// never linked.
    pub refused_logins: u32,
    /// Pre-keys the logged-in device uploaded (`encrypt` / `set`).
    pub prekeys_uploaded: u32,
    /// QR codes this phone scanned that named a live ref.
    pub qr_scans: u32,
    /// QR codes this phone scanned that WhatsApp would not know: an expired
    /// or unknown ref, or another connection's Noise key.
    pub unknown_qrs: u32,
    /// This account's devices removed by their own `remove-companion-device`
    /// (a logout).
    pub devices_removed: u32,
    /// Companions asked for this account's passkey.
    pub passkey_requests: u32,
    /// Passkey assertions that verified (a `passkey_prologue` accepted).
    pub passkey_assertions: u32,
    /// Passkey exchanges refused: an assertion that did not verify, a
    /// nonce that broke its commitment, a sealed request that did not open.
    pub passkey_refusals: u32,
    /// The verification code the phone shows during a passkey link
    /// (`ABCDEFGH`), for the person to compare with the companion's.
    pub verification_code: Option<String>,
}

/// The companion device the fake phone linked.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LinkedDevice {
    /// Device JID, `<phone>:<device>@s.whatsapp.net`.
    pub jid: String,
    /// The account's LID, `<lid>:<device>@lid`.
    pub lid: String,
    /// How the phone linked it.
    pub via: LinkedVia,
    /// The code that was typed, when it was linked by code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// How the fake phone linked a device.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LinkedVia {
    /// The person typed the companion's pairing code.
    Code,
    /// The person scanned the companion's QR code.
    Qr,
    /// The companion answered with the account's passkey.
    Passkey,
}

/// Why typing a code or scanning a QR on the fake phone linked nothing.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkAttemptError {
    /// No companion has asked for a code for this number yet.
    #[error("no pairing code was requested for this phone")]
    NoCodeRequested,
    /// The companion that asked is no longer connected.
    #[error("the companion that asked for the code is not connected")]
    CompanionGone,
    /// Not 8 characters of the Crockford alphabet WhatsApp uses.
    #[error("a pairing code is 8 characters from 123456789ABCDEFGHJKLMNPQRSTVWXYZ")]
    MalformedCode,
    /// The code does not match the one the companion displays.
    #[error("wrong code: it does not match the code the companion displays")]
    WrongCode,
    /// The companion never answered (code expired or superseded).
    #[error("the companion did not answer within {0:?}")]
    CompanionSilent(Duration),
    /// The companion refused `pair-success`.
    #[error("the companion refused the link: {0}")]
    Refused(String),
    /// Not a companion's QR string (`ref,noise,identity,adv_secret,...`).
    #[error("not a WhatsApp Web QR code")]
    MalformedQr,
    /// The QR's ref is not one WhatsApp handed out and still shows, or not
    /// to the connection whose Noise key the QR names.
    #[error("this QR code is not (or no longer) valid")]
    UnknownQr,
    /// Anything else that went wrong in the protocol.
    #[error("protocol failure: {0}")]
    Protocol(String),
    /// The account links new devices only with its passkey: the companion
    /// is asked for it, and a code or QR from the phone links nothing.
    #[error("this account links devices with its passkey only")]
    PasskeyRequired,
}

/// A running fake server on a loopback port.
pub struct FakeWhatsApp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

struct Shared {
    identity: ServerIdentity,
    state: Mutex<State>,
    changed: Notify,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    phones: HashMap<String, Phone>,
    faults: VecDeque<(Option<String>, Fault)>,
    connections: HashMap<u64, Connection>,
    /// Client connections accepted since the fake started.
    accepted: u64,
    /// IQs the fake sent and awaits an answer for, by id.
    pending_iqs: HashMap<String, oneshot::Sender<Node>>,
}

struct Connection {
    commands: mpsc::UnboundedSender<Command>,
    /// The client's Noise static public key, from the handshake.
    noise_key: [u8; 32],
    /// The phone a logged-in device on this connection belongs to.
    phone: Option<String>,
    /// The QR refs handed to this (registering) connection.
    qr_refs: Vec<IssuedRef>,
    /// The passkey exchange this connection was asked for.
    passkey: Option<passkey::Exchange>,
}

/// A QR ref in `<pair-device>`, and until when a phone may scan it: the
/// client shows the first for 60 s and each next one for 20 s, and WhatsApp
/// forgets a ref whose turn is over.
struct IssuedRef {
    value: String,
    scannable_until: tokio::time::Instant,
}

enum Command {
    Send(Node),
    Close,
}

struct Phone {
    record: PhoneRecord,
    /// The connection whose `companion_hello` is outstanding.
    connection: Option<u64>,
    pairing: Option<Pairing>,
    /// The account's identity key (the phone's "primary identity").
    identity: KeyPair,
    /// The account's LID user part, stable per phone.
    lid_user: String,
    devices_linked: u32,
    /// Devices that completed `pair-device-sign`: device number -> the Noise
    /// key registered in their `companion_hello`.
    devices: HashMap<u32, [u8; 32]>,
    finish_waiter: Option<oneshot::Sender<Finish>>,
    /// The account's passkey: new devices must present it.
    passkey: Option<passkey::PasskeyCredential>,
    /// The phone's password manager, holding that passkey, when the fake
    /// made it ([`FakeWhatsApp::create_passkey`]).
    authenticator: Option<passkey::SoftwareAuthenticator>,
}

#[derive(Clone)]
struct Pairing {
    pairing_ref: Vec<u8>,
    wrapped_companion_ephemeral: Vec<u8>,
    /// `companion_server_auth_key_pub`: the Noise key the device will log
    /// in with once linked.
    noise_key: [u8; 32],
}

/// What [`Shared::complete_link`] needs, however the phone learned it.
struct Completion<'a> {
    /// The account the new device belongs to (the phone that typed or scanned).
    account: &'a str,
    connection: &'a mpsc::UnboundedSender<Command>,
    /// That account's identity key.
    identity: &'a KeyPair,
    companion_identity: [u8; 32],
    adv_secret: [u8; 32],
    /// The Noise key the device will log in with.
    noise_key: [u8; 32],
    /// How the phone learned the companion.
    via: LinkedVia,
    /// The code typed, when it was linked by code.
    code: Option<String>,
}

/// The fields of a companion's QR string the phone uses.
struct ScannedQr {
    pairing_ref: String,
    noise_key: [u8; 32],
    identity_key: [u8; 32],
    adv_secret: [u8; 32],
}

impl ScannedQr {
    /// `ref,base64(noise),base64(identity),base64(adv_secret)[,client type]`,
    /// as whatsapp-rust and WA Web encode it.
    fn parse(qr: &str) -> Option<Self> {
        use base64::Engine as _;
        let key = |field: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(field)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        };
        let mut fields = qr.trim().split(',');
        let pairing_ref = fields.next().filter(|r| !r.is_empty())?.to_owned();
        Some(Self {
            pairing_ref,
            noise_key: key(fields.next()?)?,
            identity_key: key(fields.next()?)?,
            adv_secret: key(fields.next()?)?,
        })
    }
}

struct Finish {
    wrapped_bundle: Vec<u8>,
    companion_identity: [u8; 32],
}

impl Phone {
    fn new() -> Self {
        let mut rng = rand::rng();
        Self {
            record: PhoneRecord::default(),
            connection: None,
            pairing: None,
            identity: KeyPair::generate(&mut rng),
            lid_user: format!(
                "{}",
                rng.random_range(100_000_000_000_000u64..999_999_999_999_999)
            ),
            devices_linked: 0,
            devices: HashMap::new(),
            finish_waiter: None,
            passkey: None,
            authenticator: None,
        }
    }
}

impl FakeWhatsApp {
    /// Binds a random port on 127.0.0.1 and starts serving.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            identity: ServerIdentity::generate(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&accept_shared);
                tokio::spawn(async move {
                    if let Err(e) = serve(shared, stream).await {
                        tracing::debug!(error = %e, "fake whatsapp connection ended");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            accept_task,
        })
    }

    /// The WebSocket URL to point a client at (`WA_WS_URL`).
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    /// The socket address the fake listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a fault for the next `companion_hello` from `phone` (or from
    /// anyone, with `None`).
    pub fn push_fault(&self, phone: Option<&str>, fault: Fault) {
        self.shared
            .lock()
            .faults
            .push_back((phone.map(str::to_owned), fault));
    }

    /// What the fake knows about `phone` (digits only).
    pub fn record(&self, phone: &str) -> Option<PhoneRecord> {
        self.shared
            .lock()
            .phones
            .get(phone)
            .map(|p| p.record.clone())
    }

    /// Number of client connections currently open.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().connections.len()
    }

    /// Waits until `phone`'s record satisfies `check`, or `timeout` passes.
    pub async fn wait_for(
        &self,
        phone: &str,
        timeout: Duration,
        check: impl Fn(&PhoneRecord) -> bool,
    ) -> Option<PhoneRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if let Some(record) = self.record(phone).filter(|r| check(r)) {
                return Some(record);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.record(phone).filter(|r| check(r));
            }
        }
    }

    /// Number of client connections accepted since the fake started.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.lock().accepted
    }

    /// Waits until no client connection is open, or `timeout` passes.
    pub async fn wait_for_no_connections(&self, timeout: Duration) -> bool {
        self.wait_for_open_connections(0, timeout).await
    }

    /// Waits until exactly `count` client connections are open, or
    /// `timeout` passes.
    pub async fn wait_for_open_connections(&self, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if self.open_connections() == count {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open_connections() == count;
            }
        }
    }

    /// Registers `credential` as `phone`'s passkey: from now on a companion
    /// asking for this account's code is asked for the passkey instead, and
    /// the phone links nothing by code or QR.
    pub fn require_passkey(&self, phone: &str, credential: passkey::PasskeyCredential) {
        self.shared.update(phone, |p| p.passkey = Some(credential));
    }

    /// Gives `phone`'s account a new passkey, kept in its phone's password
    /// manager (as [`FakeWhatsApp::require_passkey`] with a key the fake
    /// makes), so [`FakeWhatsApp::answer_passkey`] can answer for it.
    pub fn create_passkey(&self, phone: &str) {
        let authenticator = passkey::SoftwareAuthenticator::generate();
        self.shared.update(phone, |p| {
            p.passkey = Some(authenticator.credential());
            p.authenticator = Some(authenticator);
        });
    }

    /// Plays the person approving a passkey prompt on `phone`: the
    /// assertion (an `AuthenticationResponseJSON`, made on
    /// [`passkey::ORIGIN`]) for the passkey request WhatsApp sent a
    /// companion of this account. `None` when no companion was asked, or
    /// the account's passkey was not made by [`FakeWhatsApp::create_passkey`].
    pub fn answer_passkey(&self, phone: &str) -> Option<serde_json::Value> {
        let state = self.shared.lock();
        let options = state
            .connections
            .values()
            .filter_map(|c| c.passkey.as_ref())
            .find(|exchange| exchange.account == phone)?
            .request_options();
        let authenticator = state.phones.get(phone)?.authenticator.as_ref()?;
        Some(authenticator.assert(&options, passkey::ORIGIN))
    }

    /// Plays the person typing `code` into WhatsApp on the phone `phone`.
    /// Returns the linked device once the companion signed it.
    pub async fn enter_code(
        &self,
        phone: &str,
        code: &str,
    ) -> Result<LinkedDevice, LinkAttemptError> {
        let code = code.trim().to_ascii_uppercase();
        if !wacore::pair_code::PairCodeUtils::validate_code(&code) {
            return Err(LinkAttemptError::MalformedCode);
        }
        let (pairing, connection, identity) = {
            let state = self.shared.lock();
            let entry = state
                .phones
                .get(phone)
                .ok_or(LinkAttemptError::NoCodeRequested)?;
            if entry.passkey.is_some() {
                return Err(LinkAttemptError::PasskeyRequired);
            }
            let pairing = entry
                .pairing
                .clone()
                .ok_or(LinkAttemptError::NoCodeRequested)?;
            let connection = entry
                .connection
                .and_then(|id| state.connections.get(&id).map(|c| c.commands.clone()))
                .ok_or(LinkAttemptError::CompanionGone)?;
            (pairing, connection, entry.identity.clone())
        };

        // Two PBKDF2 derivations: keep them off the async workers.
        let wrapped = pairing.wrapped_companion_ephemeral.clone();
        let typed = code.clone();
        let hello = tokio::task::spawn_blocking(move || PrimaryHello::new(&typed, &wrapped))
            .await
            .map_err(|e| LinkAttemptError::Protocol(e.to_string()))?
            .map_err(|e| LinkAttemptError::Protocol(e.to_string()))?;

        let (finish_tx, finish_rx) = oneshot::channel();
        if let Some(entry) = self.shared.lock().phones.get_mut(phone) {
            entry.finish_waiter = Some(finish_tx);
        }
        let notification = self.shared.link_code_notification(
            NodeBuilder::new("link_code_companion_reg")
                .attr("stage", "primary_hello")
                .children([
                    NodeBuilder::new("link_code_pairing_wrapped_primary_ephemeral_pub")
                        .bytes(hello.wrapped_primary_ephemeral.to_vec())
                        .build(),
                    NodeBuilder::new("primary_identity_pub")
                        .bytes(wire::public_bytes(&identity).to_vec())
                        .build(),
                    NodeBuilder::new("link_code_pairing_ref")
                        .bytes(pairing.pairing_ref.clone())
                        .build(),
                ])
                .build(),
        );
        connection
            .send(Command::Send(notification))
            .map_err(|_| LinkAttemptError::CompanionGone)?;

        let finish = companion_answer(finish_rx, &connection).await?;

        let adv_secret = match hello.open_bundle(
            &identity,
            &finish.wrapped_bundle,
            &finish.companion_identity,
        ) {
            Ok(secret) => secret,
            Err(StageTwoError::WrongCode) => {
                self.shared.update(phone, |p| p.record.wrong_codes += 1);
                return Err(LinkAttemptError::WrongCode);
            }
            Err(e) => return Err(LinkAttemptError::Protocol(e.to_string())),
        };

        let linked = self
            .shared
            .complete_link(Completion {
                account: phone,
                connection: &connection,
                identity: &identity,
                companion_identity: finish.companion_identity,
                adv_secret,
                noise_key: pairing.noise_key,
                via: LinkedVia::Code,
                code: Some(code),
            })
            .await?;
        self.shared.update(phone, |p| p.pairing = None);
        Ok(linked)
    }

    /// Plays a person on the phone `as_phone` scanning `qr` (the string a
    /// companion encodes in its QR code: `ref,noise,identity,adv_secret,...`)
    /// in WhatsApp > Linked devices > Link a device. The ref must be one the
    /// fake handed to a connection that is still open, still in its turn on
    /// screen, and the Noise key must be that connection's. Returns the
    /// linked device once the companion signed it.
    pub async fn scan_qr(
        &self,
        as_phone: &str,
        qr: &str,
    ) -> Result<LinkedDevice, LinkAttemptError> {
        let scanned = ScannedQr::parse(qr).ok_or(LinkAttemptError::MalformedQr)?;
        let connection = {
            let state = self.shared.lock();
            let now = tokio::time::Instant::now();
            state
                .connections
                .values()
                .find(|c| {
                    c.noise_key == scanned.noise_key
                        && c.qr_refs
                            .iter()
                            .any(|r| r.value == scanned.pairing_ref && r.scannable_until > now)
                })
                .map(|c| c.commands.clone())
        };
        let Some(connection) = connection else {
            self.shared.update(as_phone, |p| p.record.unknown_qrs += 1);
            return Err(LinkAttemptError::UnknownQr);
        };
        let identity = {
            let mut state = self.shared.lock();
            let phone = state
                .phones
                .entry(as_phone.to_owned())
                .or_insert_with(Phone::new);
            if phone.passkey.is_some() {
                return Err(LinkAttemptError::PasskeyRequired);
            }
            phone.identity.clone()
        };
        self.shared.update(as_phone, |p| p.record.qr_scans += 1);
        self.shared
            .complete_link(Completion {
                account: as_phone,
                connection: &connection,
                identity: &identity,
                companion_identity: scanned.identity_key,
                adv_secret: scanned.adv_secret,
                noise_key: scanned.noise_key,
                via: LinkedVia::Qr,
                code: None,
            })
            .await
    }

    /// Closes the connection of the companion that asked for `phone`'s code.
    /// Returns whether there was one.
    pub fn drop_connection(&self, phone: &str) -> bool {
        let state = self.shared.lock();
        let Some(id) = state.phones.get(phone).and_then(|p| p.connection) else {
            return false;
        };
        state
            .connections
            .get(&id)
            .is_some_and(|c| c.commands.send(Command::Close).is_ok())
    }

    /// Sends `refresh_code` for `phone`'s outstanding code, as WhatsApp does
    /// when it wants the companion to show a new one. Returns whether a code
    /// was outstanding on a live connection.
    pub fn request_code_refresh(&self, phone: &str) -> bool {
        let state = self.shared.lock();
        let Some(entry) = state.phones.get(phone) else {
            return false;
        };
        let (Some(pairing), Some(id)) = (&entry.pairing, entry.connection) else {
            return false;
        };
        let Some(connection) = state.connections.get(&id) else {
            return false;
        };
        let node = self.shared.link_code_notification(
            NodeBuilder::new("link_code_companion_reg")
                .attr("stage", "refresh_code")
                .children([NodeBuilder::new("link_code_pairing_ref")
                    .bytes(pairing.pairing_ref.clone())
                    .build()])
                .build(),
        );
        connection.commands.send(Command::Send(node)).is_ok()
    }

    /// Stops accepting and closes every open connection.
    pub fn shutdown(&self) {
        self.accept_task.abort();
        for connection in self.shared.lock().connections.values() {
            let _ = connection.commands.send(Command::Close);
        }
    }
}

impl Drop for FakeWhatsApp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    /// The phone's side once it knows the companion and the ADV secret:
    /// `pair-success` for a new device of `account`, the companion's
    /// `pair-device-sign` checked under the phone's own identity key, then
    /// stream error 515 so the new device logs in.
    async fn complete_link(&self, link: Completion<'_>) -> Result<LinkedDevice, LinkAttemptError> {
        let Completion {
            account,
            connection,
            identity,
            companion_identity,
            adv_secret,
            noise_key,
            via,
            code,
        } = link;
        let (device_number, device_jid, lid) = {
            let mut state = self.lock();
            let entry = state
                .phones
                .entry(account.to_owned())
                .or_insert_with(Phone::new);
            entry.devices_linked += 1;
            let number = entry.devices_linked;
            (
                number,
                format!("{account}:{number}@s.whatsapp.net"),
                device_lid(&entry.lid_user, number),
            )
        };
        let device_identity =
            primary::signed_device_identity(identity, &companion_identity, &adv_secret, 1);
        let iq_id = self.next_stanza_id();
        let (answer_tx, answer_rx) = oneshot::channel();
        self.lock().pending_iqs.insert(iq_id.clone(), answer_tx);
        let mut device = NodeBuilder::new("device");
        if let (Ok(jid), Ok(lid)) = (device_jid.parse::<Jid>(), lid.parse::<Jid>()) {
            device = device.attr("jid", jid).attr("lid", lid);
        }
        let pair_success = NodeBuilder::new("iq")
            .attrs([
                ("from", SERVER_JID.to_string()),
                ("type", "set".to_string()),
                ("id", iq_id.clone()),
                ("xmlns", "md".to_string()),
            ])
            .children([NodeBuilder::new("pair-success")
                .children([
                    NodeBuilder::new("device-identity")
                        .bytes(device_identity)
                        .build(),
                    device.build(),
                    NodeBuilder::new("platform").attr("name", "android").build(),
                ])
                .build()])
            .build();
        connection
            .send(Command::Send(pair_success))
            .map_err(|_| LinkAttemptError::CompanionGone)?;

        let answer = companion_answer(answer_rx, connection)
            .await
            .inspect_err(|_| {
                self.lock().pending_iqs.remove(&iq_id);
            })?;
        if attr(&answer, "type").as_deref() == Some("error") {
            let detail = answer
                .get_optional_child_by_tag(&["error"])
                .map(|e| {
                    format!(
                        "{} {}",
                        attr(e, "code").unwrap_or_default(),
                        attr(e, "text").unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "error".into());
            return Err(LinkAttemptError::Refused(detail));
        }
        let signed = answer
            .get_optional_child_by_tag(&["pair-device-sign", "device-identity"])
            .and_then(content_bytes)
            .ok_or_else(|| {
                LinkAttemptError::Protocol("pair-device-sign without identity".into())
            })?;
        primary::verify_device_signature(
            &signed,
            &companion_identity,
            &wire::public_bytes(identity),
        )
        .map_err(LinkAttemptError::Protocol)?;

        let linked = LinkedDevice {
            jid: device_jid,
            lid,
            via,
            code,
        };
        self.update(account, |p| {
            p.record.linked = Some(linked.clone());
            p.devices.insert(device_number, noise_key);
        });
        // WhatsApp closes the stream after pairing so the new device logs in.
        let _ = connection.send(Command::Send(
            NodeBuilder::new("stream:error").attr("code", "515").build(),
        ));
        let _ = connection.send(Command::Close);
        Ok(linked)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-written
        // in a way that matters to a test double; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A server notification of `kind` carrying `child`.
    fn notification(&self, kind: &str, child: Node) -> Node {
        NodeBuilder::new("notification")
            .attrs([
                ("from", SERVER_JID.to_string()),
                ("type", kind.to_string()),
                ("id", self.next_stanza_id()),
                ("t", primary::now_secs().to_string()),
            ])
            .children([child])
            .build()
    }

    /// A `link_code_companion_reg` notification from the server carrying `stage`.
    fn link_code_notification(&self, stage: Node) -> Node {
        self.notification("link_code_companion_reg", stage)
    }

    fn next_stanza_id(&self) -> String {
        format!("fake.{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn update(&self, phone: &str, change: impl FnOnce(&mut Phone)) {
        {
            let mut state = self.lock();
            let entry = state
                .phones
                .entry(phone.to_owned())
                .or_insert_with(Phone::new);
            change(entry);
        }
        self.changed.notify_waiters();
    }
}

/// Serves one client connection from upgrade to close.
async fn serve(shared: Arc<Shared>, stream: TcpStream) -> Result<(), wire::WireError> {
    let (_request, ws) = tokio_websockets::ServerBuilder::new()
        .accept(stream)
        .await
        .map_err(|e| wire::WireError::Closed(e.to_string()))?;
    let (mut conn, hello) = SecureConn::handshake(ws, &shared.identity).await?;

    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let noise_key = match &hello {
        ClientHello::Registration { noise_key } | ClientHello::Login { noise_key, .. } => {
            *noise_key
        }
    };
    {
        let mut state = shared.lock();
        state.accepted += 1;
        state.connections.insert(
            id,
            Connection {
                commands: tx.clone(),
                noise_key,
                phone: None,
                qr_refs: Vec::new(),
                passkey: None,
            },
        );
    }
    shared.changed.notify_waiters();

    let result = async {
        match hello {
            ClientHello::Registration { .. } => {
                let issued = issue_qr_refs();
                let refs: Vec<Node> = issued
                    .iter()
                    .map(|r| {
                        NodeBuilder::new("ref")
                            .bytes(r.value.clone().into_bytes())
                            .build()
                    })
                    .collect();
                if let Some(connection) = shared.lock().connections.get_mut(&id) {
                    connection.qr_refs = issued;
                }
                let pair_device = NodeBuilder::new("iq")
                    .attrs([
                        ("from", SERVER_JID.to_string()),
                        ("type", "set".to_string()),
                        ("id", shared.next_stanza_id()),
                        ("xmlns", "md".to_string()),
                    ])
                    .children([NodeBuilder::new("pair-device").children(refs).build()])
                    .build();
                conn.send(&pair_device).await?;
            }
            ClientHello::Login {
                user,
                device,
                noise_key,
            } => {
                let phone = user.to_string();
                let lid = {
                    let state = shared.lock();
                    state.phones.get(&phone).and_then(|p| {
                        (p.devices.get(&device) == Some(&noise_key))
                            .then(|| device_lid(&p.lid_user, device))
                    })
                };
                let Some(lid) = lid.and_then(|l| l.parse::<Jid>().ok()) else {
                    // WhatsApp does not know this device (never linked, or
                    // not with this number or Noise key): 401, then close.
                    conn.send(&NodeBuilder::new("failure").attr("reason", "401").build())
                        .await?;
                    shared.update(&phone, |p| p.record.refused_logins += 1);
                    return Ok(());
                };
                let success = NodeBuilder::new("success")
                    .attr("t", primary::now_secs().to_string())
                    .attr("props", "1")
                    .attr("lid", lid);
                conn.send(&success.build()).await?;
                if let Some(connection) = shared.lock().connections.get_mut(&id) {
                    connection.phone = Some(phone.clone());
                }
                shared.update(&phone, |p| {
                    p.record.logged_in = true;
                    p.record.logins += 1;
                });
            }
        }
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(Command::Send(node)) => conn.send(&node).await?,
                    Some(Command::Close) | None => break,
                },
                node = conn.recv() => {
                    let node = node?;
                    for reply in handle(&shared, id, &node) {
                        match reply {
                            Command::Send(reply) => conn.send(&reply).await?,
                            Command::Close => return Ok(()),
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;

    shared.lock().connections.remove(&id);
    shared.changed.notify_waiters();
    conn.close().await;
    result
}

/// Waits for the companion's answer on `answer`: at most [`STAGE_TIMEOUT`],
/// and no longer than its connection lives (a companion that disconnects
/// will never answer, so the phone hears it at once).
async fn companion_answer<T>(
    answer: oneshot::Receiver<T>,
    connection: &mpsc::UnboundedSender<Command>,
) -> Result<T, LinkAttemptError> {
    tokio::select! {
        // An answer that came in before the close still counts.
        biased;
        waited = tokio::time::timeout(STAGE_TIMEOUT, answer) => match waited {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(LinkAttemptError::CompanionGone),
            Err(_) => Err(LinkAttemptError::CompanionSilent(STAGE_TIMEOUT)),
        },
        () = connection.closed() => Err(LinkAttemptError::CompanionGone),
    }
}

/// Reacts to one node from a client; returns what to send back.
fn handle(shared: &Arc<Shared>, connection: u64, node: &Node) -> Vec<Command> {
    if node.tag != "iq" {
        return Vec::new();
    }
    let id = attr(node, "id").unwrap_or_default();
    match attr(node, "type").as_deref() {
        Some("result") | Some("error") => {
            if let Some(waiter) = shared.lock().pending_iqs.remove(&id) {
                let _ = waiter.send(node.clone());
            }
            Vec::new()
        }
        _ => {
            if attr(node, "xmlns").as_deref() == Some("encrypt") {
                return vec![Command::Send(encrypt(shared, connection, &id, node))];
            }
            if let Some(answer) = passkey::answer_iq(shared, connection, &id, node) {
                return answer;
            }
            if let Some(remove) = node.get_optional_child_by_tag(&["remove-companion-device"]) {
                return vec![Command::Send(remove_device(
                    shared, connection, &id, remove,
                ))];
            }
            let Some(reg) = node.get_optional_child_by_tag(&["link_code_companion_reg"]) else {
                return vec![Command::Send(iq_result(&id, None))];
            };
            match attr(reg, "stage").as_deref() {
                Some("companion_hello") => companion_hello(shared, connection, &id, reg),
                Some("companion_finish") => vec![Command::Send(companion_finish(shared, &id, reg))],
                _ => vec![Command::Send(iq_error(&id, 400, "bad-request", None))],
            }
        }
    }
}

fn companion_hello(shared: &Shared, connection: u64, id: &str, reg: &Node) -> Vec<Command> {
    let jid = attr(reg, "jid").unwrap_or_default();
    let phone = jid.split('@').next().unwrap_or_default().to_owned();
    let wrapped = reg
        .get_optional_child_by_tag(&["link_code_pairing_wrapped_companion_ephemeral_pub"])
        .and_then(content_bytes);
    let Some(wrapped) = wrapped.filter(|w| w.len() == 80) else {
        return vec![Command::Send(iq_error(id, 400, "bad-request", None))];
    };
    let connection_key = shared
        .lock()
        .connections
        .get(&connection)
        .map(|c| c.noise_key);
    let noise_key = reg
        .get_optional_child_by_tag(&["companion_server_auth_key_pub"])
        .and_then(content_bytes)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .filter(|k| Some(*k) == connection_key);
    let nonce = reg.get_optional_child_by_tag(&["link_code_pairing_nonce"]);
    let (Some(noise_key), Some(_)) = (noise_key, nonce) else {
        // Nothing would tie the companion's Noise key to its later login.
        shared.update(&phone, |p| p.record.malformed_hellos += 1);
        return vec![Command::Send(iq_error(id, 400, "bad-request", None))];
    };
    let text_child = |tag: &str| {
        reg.get_optional_child_by_tag(&[tag])
            .and_then(content_bytes)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let platform_id = text_child("companion_platform_id");
    let platform_display = text_child("companion_platform_display");
    let push = attr(reg, "should_show_push_notification").as_deref() == Some("true");

    let fault = {
        let mut state = shared.lock();
        let position = state
            .faults
            .iter()
            .position(|(only, _)| only.as_deref().is_none_or(|p| p == phone));
        position
            .and_then(|i| state.faults.remove(i))
            .map(|(_, f)| f)
    };
    let pairing_ref = random_ref().into_bytes();
    shared.update(&phone, |p| {
        p.record.jid = jid.clone();
        p.record.show_push_notification = push;
        p.record.platform_id = platform_id;
        p.record.platform_display = platform_display;
        p.record.code_requests += 1;
        if fault.is_some() {
            p.record.faults_applied += 1;
        } else {
            p.connection = Some(connection);
            p.pairing = Some(Pairing {
                pairing_ref: pairing_ref.clone(),
                wrapped_companion_ephemeral: wrapped,
                noise_key,
            });
        }
    });
    match fault {
        None => {
            let answered = Command::Send(iq_result(
                id,
                Some(
                    NodeBuilder::new("link_code_companion_reg")
                        .children([NodeBuilder::new("link_code_pairing_ref")
                            .bytes(pairing_ref)
                            .build()])
                        .build(),
                ),
            ));
            // An account with a passkey is asked for it right after.
            std::iter::once(answered)
                .chain(passkey::ask(shared, connection, &phone))
                .collect()
        }
        Some(Fault::RateOverlimit { backoff_secs }) => vec![Command::Send(iq_error(
            id,
            429,
            "rate-overlimit",
            Some(backoff_secs),
        ))],
        Some(Fault::Refuse { code }) => {
            vec![Command::Send(iq_error(id, code, error_text(code), None))]
        }
        Some(Fault::DropConnection) => vec![Command::Close],
        Some(Fault::NeverAnswer) => Vec::new(),
    }
}

/// The companion's stage two: its bundle goes to the phone waiting for it,
/// if it names the pairing the phone is on; otherwise an error IQ.
fn companion_finish(shared: &Shared, id: &str, reg: &Node) -> Node {
    let phone = attr(reg, "jid")
        .and_then(|j| j.split('@').next().map(str::to_owned))
        .unwrap_or_default();
    let child = |tag: &str| {
        reg.get_optional_child_by_tag(&[tag])
            .and_then(content_bytes)
    };
    let bundle = child("link_code_pairing_wrapped_key_bundle");
    let identity = child("companion_identity_public").and_then(|b| <[u8; 32]>::try_from(b).ok());
    let echoed_ref = child("link_code_pairing_ref");
    let waiter = {
        let mut state = shared.lock();
        state.phones.get_mut(&phone).and_then(|p| {
            let current = p.pairing.as_ref().map(|pairing| &pairing.pairing_ref);
            (echoed_ref.is_some() && echoed_ref.as_ref() == current)
                .then(|| p.finish_waiter.take())
                .flatten()
        })
    };
    match (bundle, identity, waiter) {
        (Some(wrapped_bundle), Some(companion_identity), Some(waiter)) => {
            let _ = waiter.send(Finish {
                wrapped_bundle,
                companion_identity,
            });
            iq_result(id, None)
        }
        _ => {
            shared.update(&phone, |p| p.record.refused_finishes += 1);
            iq_error(id, 400, "bad-request", None)
        }
    }
}

/// The phone whose device logged in on `connection`, if one did.
fn logged_in_phone(shared: &Shared, connection: u64) -> Option<String> {
    shared
        .lock()
        .connections
        .get(&connection)
        .and_then(|c| c.phone.clone())
}

/// `encrypt` IQs of a logged-in device: `count` is answered with the
/// pre-keys it uploaded so far; an upload (`set` with a `list` of keys) is
/// counted.
fn encrypt(shared: &Shared, connection: u64, id: &str, node: &Node) -> Node {
    let Some(phone) = logged_in_phone(shared, connection) else {
        return iq_error(id, 401, "not-authorized", None);
    };
    let uploaded = node
        .get_optional_child_by_tag(&["list"])
        .and_then(|list| list.children().map(|keys| keys.len()))
        .unwrap_or(0);
    let mut count = 0;
    shared.update(&phone, |p| {
        p.record.prekeys_uploaded += u32::try_from(uploaded).unwrap_or(u32::MAX);
        count = p.record.prekeys_uploaded;
    });
    if node.get_optional_child_by_tag(&["count"]).is_some() {
        iq_result(
            id,
            Some(
                NodeBuilder::new("count")
                    .attr("value", count.to_string())
                    .build(),
            ),
        )
    } else {
        iq_result(id, None)
    }
}

/// A logged-in device removing itself (`Client::logout`): only its own
/// account's device, and only one that exists; later logins of it get 401.
fn remove_device(shared: &Shared, connection: u64, id: &str, remove: &Node) -> Node {
    let Some(phone) = logged_in_phone(shared, connection) else {
        return iq_error(id, 401, "not-authorized", None);
    };
    let device = attr(remove, "jid").and_then(|jid| {
        let (user, rest) = jid.split_once(':')?;
        let number = rest.split('@').next()?.parse::<u32>().ok()?;
        (user == phone).then_some(number)
    });
    let mut removed = false;
    if let Some(number) = device {
        shared.update(&phone, |p| {
            removed = p.devices.remove(&number).is_some();
            if removed {
                p.record.devices_removed += 1;
            }
        });
    }
    if removed {
        iq_result(id, None)
    } else {
        iq_error(id, 404, "item-not-found", None)
    }
}

fn iq_result(id: &str, child: Option<Node>) -> Node {
    let builder = NodeBuilder::new("iq").attrs([
        ("from", SERVER_JID.to_string()),
        ("type", "result".to_string()),
        ("id", id.to_string()),
    ]);
    match child {
        Some(child) => builder.children([child]).build(),
        None => builder.build(),
    }
}

fn iq_error(id: &str, code: u16, text: &str, backoff_secs: Option<u32>) -> Node {
    let mut error = NodeBuilder::new("error")
        .attr("code", code.to_string())
        .attr("text", text.to_string());
    if let Some(backoff) = backoff_secs {
        error = error.attr("backoff", backoff.to_string());
    }
    NodeBuilder::new("iq")
        .attrs([
            ("from", SERVER_JID.to_string()),
            ("type", "error".to_string()),
            ("id", id.to_string()),
        ])
        .children([error.build()])
        .build()
}

/// The `text` WhatsApp sends with each error `code`.
fn error_text(code: u16) -> &'static str {
    match code {
        400 => "bad-request",
        403 => "forbidden",
        429 => "rate-overlimit",
        452 => "feature-not-available",
        _ => "internal-server-error",
    }
}

fn attr(node: &Node, key: &str) -> Option<String> {
    node.attrs.get(key).map(|v| v.as_str().into_owned())
}

fn content_bytes(node: &Node) -> Option<Vec<u8>> {
    match &node.content {
        Some(NodeContent::Bytes(b)) => Some(b.clone()),
        Some(NodeContent::String(s)) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// A device's LID, `<lid>:<device>@lid`: the one form used in
/// `pair-success` and in `<success>`.
fn device_lid(lid_user: &str, device: u32) -> String {
    format!("{lid_user}:{device}@lid")
}

/// Six fresh refs, each scannable until the end of its turn on screen.
fn issue_qr_refs() -> Vec<IssuedRef> {
    let now = tokio::time::Instant::now();
    let mut until = now;
    (0..QR_REFS)
        .map(|i| {
            until += if i == 0 {
                FIRST_REF_TURN
            } else {
                NEXT_REF_TURN
            };
            IssuedRef {
                value: random_ref(),
                scannable_until: until,
            }
        })
        .collect()
}

fn random_ref() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("2@{body}")
}

#[cfg(test)]
mod tests {
    //! The strictness of the server's answers, one IQ at a time. The whole
    //! flow, with the real client, is tested by the service's integration
    //! tests (`tests/integration/fake_strictness.rs` there).

    use super::*;

    const PHONE: &str = "6281234567890";

    /// A server state with one open connection (id 1) whose Noise key is
    /// `noise_key`.
    fn shared_with_connection(noise_key: [u8; 32]) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            identity: ServerIdentity::generate(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
        });
        let (commands, _) = mpsc::unbounded_channel();
        shared.lock().connections.insert(
            1,
            Connection {
                commands,
                noise_key,
                phone: None,
                qr_refs: Vec::new(),
                passkey: None,
            },
        );
        shared
    }

    fn iq(child: Node) -> Node {
        NodeBuilder::new("iq")
            .attrs([("id", "q1"), ("type", "set"), ("xmlns", "md")])
            .children([child])
            .build()
    }

    fn bytes(tag: &'static str, value: impl Into<Vec<u8>>) -> Node {
        NodeBuilder::new(tag).bytes(value.into()).build()
    }

    fn companion_hello(auth_key: Option<[u8; 32]>, nonce: bool) -> Node {
        let mut children = vec![
            bytes(
                "link_code_pairing_wrapped_companion_ephemeral_pub",
                [1u8; 80],
            ),
            bytes("companion_platform_id", "1"),
            bytes("companion_platform_display", "Chrome (Linux)"),
        ];
        if let Some(key) = auth_key {
            children.push(bytes("companion_server_auth_key_pub", key));
        }
        if nonce {
            children.push(bytes("link_code_pairing_nonce", [0u8]));
        }
        iq(NodeBuilder::new("link_code_companion_reg")
            .attrs([
                ("jid", format!("{PHONE}@s.whatsapp.net")),
                ("stage", "companion_hello".to_owned()),
            ])
            .children(children)
            .build())
    }

    fn is_error(commands: &[Command], code: &str) -> bool {
        matches!(commands, [Command::Send(node)]
            if attr(node, "type").as_deref() == Some("error")
                && node.get_optional_child_by_tag(&["error"]).and_then(|e| attr(e, "code")).as_deref() == Some(code))
    }

    #[test]
    fn a_companion_hello_without_its_noise_key_is_refused() {
        let shared = shared_with_connection([9; 32]);

        let answer = handle(&shared, 1, &companion_hello(None, true));

        assert!(is_error(&answer, "400"));
        let record = shared.lock().phones.get(PHONE).map(|p| p.record.clone());
        assert_eq!(record.map(|r| r.malformed_hellos), Some(1));
    }

    #[test]
    fn a_companion_hello_naming_another_noise_key_than_its_connections_is_refused() {
        let shared = shared_with_connection([9; 32]);

        let answer = handle(&shared, 1, &companion_hello(Some([8; 32]), true));

        assert!(is_error(&answer, "400"));
    }

    #[test]
    fn a_companion_hello_without_the_pairing_nonce_is_refused() {
        let shared = shared_with_connection([9; 32]);

        let answer = handle(&shared, 1, &companion_hello(Some([9; 32]), false));

        assert!(is_error(&answer, "400"));
    }

    #[test]
    fn a_complete_companion_hello_gets_a_pairing_ref_and_registers_its_noise_key() {
        let shared = shared_with_connection([9; 32]);

        let answer = handle(&shared, 1, &companion_hello(Some([9; 32]), true));

        assert!(matches!(&answer[..], [Command::Send(node)]
            if node.get_optional_child_by_tag(&["link_code_companion_reg", "link_code_pairing_ref"]).is_some()));
        let state = shared.lock();
        let pairing = state.phones[PHONE].pairing.as_ref().expect("pairing");
        assert_eq!(pairing.noise_key, [9; 32]);
    }

    /// A phone whose pairing (ref `REF`) waits for the companion's finish.
    fn waiting_for_finish(shared: &Arc<Shared>) -> oneshot::Receiver<Finish> {
        handle(shared, 1, &companion_hello(Some([9; 32]), true));
        let (tx, rx) = oneshot::channel();
        let mut state = shared.lock();
        let phone = state.phones.get_mut(PHONE).unwrap();
        phone.pairing.as_mut().unwrap().pairing_ref = b"REF".to_vec();
        phone.finish_waiter = Some(tx);
        rx
    }

    fn companion_finish_node(pairing_ref: Option<&str>, bundle: bool) -> Node {
        let mut children = vec![bytes("companion_identity_public", [5u8; 32])];
        if bundle {
            children.push(bytes("link_code_pairing_wrapped_key_bundle", [6u8; 40]));
        }
        if let Some(r) = pairing_ref {
            children.push(bytes("link_code_pairing_ref", r));
        }
        iq(NodeBuilder::new("link_code_companion_reg")
            .attrs([
                ("jid", format!("{PHONE}@s.whatsapp.net")),
                ("stage", "companion_finish".to_owned()),
            ])
            .children(children)
            .build())
    }

    #[test]
    fn a_companion_finish_without_the_pairings_ref_gets_an_error_and_reaches_no_phone() {
        let shared = shared_with_connection([9; 32]);
        let mut waiting = waiting_for_finish(&shared);

        let missing = handle(&shared, 1, &companion_finish_node(None, true));
        let other = handle(&shared, 1, &companion_finish_node(Some("OTHER"), true));

        assert!(is_error(&missing, "400"));
        assert!(is_error(&other, "400"));
        assert!(waiting.try_recv().is_err(), "the phone got nothing");
        assert_eq!(shared.lock().phones[PHONE].record.refused_finishes, 2);
    }

    #[test]
    fn a_companion_finish_without_its_bundle_gets_an_error() {
        let shared = shared_with_connection([9; 32]);
        let mut waiting = waiting_for_finish(&shared);

        let answer = handle(&shared, 1, &companion_finish_node(Some("REF"), false));

        assert!(is_error(&answer, "400"));
        assert!(waiting.try_recv().is_err());
    }

    #[test]
    fn a_complete_companion_finish_reaches_the_phone_and_gets_a_result() {
        let shared = shared_with_connection([9; 32]);
        let mut waiting = waiting_for_finish(&shared);

        let answer = handle(&shared, 1, &companion_finish_node(Some("REF"), true));

        assert!(
            matches!(&answer[..], [Command::Send(node)] if attr(node, "type").as_deref() == Some("result"))
        );
        assert_eq!(
            waiting.try_recv().expect("bundle").companion_identity,
            [5; 32]
        );
    }

    /// `encrypt` / `count`: how many pre-keys the server holds.
    fn count_iq() -> Node {
        NodeBuilder::new("iq")
            .attrs([("id", "c1"), ("type", "get"), ("xmlns", "encrypt")])
            .children([NodeBuilder::new("count").build()])
            .build()
    }

    #[test]
    fn encrypt_count_answers_with_the_prekeys_the_device_uploaded() {
        let shared = shared_with_connection([9; 32]);
        shared.lock().connections.get_mut(&1).unwrap().phone = Some(PHONE.to_owned());
        let upload = NodeBuilder::new("iq")
            .attrs([("id", "u1"), ("type", "set"), ("xmlns", "encrypt")])
            .children([NodeBuilder::new("list")
                .children((0..3).map(|i| bytes("key", [i as u8])))
                .build()])
            .build();

        handle(&shared, 1, &upload);
        let answer = handle(&shared, 1, &count_iq());

        assert!(matches!(&answer[..], [Command::Send(node)]
            if node.get_optional_child_by_tag(&["count"]).and_then(|c| attr(c, "value")).as_deref() == Some("3")));
    }

    #[test]
    fn encrypt_before_a_login_is_not_authorized() {
        let shared = shared_with_connection([9; 32]);

        assert!(is_error(&handle(&shared, 1, &count_iq()), "401"));
    }
}

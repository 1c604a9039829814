//! The real [`Linker`]: a `whatsapp-rust` multi-device client per phone.
//!
//! Each phone's [`PhoneClient`] owns one client. Its device keys stay in
//! memory while the device is pending and move to SQLite at
//! `DATA_DIR/<phone>.db` (one device per file) when it links. The client
//! connects, WhatsApp hands it QR refs (reported as QR codes), and
//! [`LinkHandle::request_code`] asks for a phone-number pairing code on that
//! same connection. Once a connection's refs are used up, the next code is
//! asked on a new connection, so a QR is there beside every code.
//!
//! With a [`warm`] pool, the connection (WebSocket, Noise handshake, login
//! as an unregistered device) is made before anyone asks: a new session
//! takes a ready client and only has to ask for the code. A warm client has
//! no files at all until its phone links.
//!
//! Files here: `backend.rs` is the device store (memory, then SQLite);
//! `client.rs` builds, runs and stops one library client and translates
//! its events; `files.rs` deletes and sets aside device files; `warm.rs` is
//! the pool.
//!
//! After the phone links, the library persists the new identity, WhatsApp
//! closes the stream (515) and the client logs in again as the new device.
//! We report `linked` once the identity is flushed to disk; when the session
//! is then shut down, it waits (bounded) for that login so WhatsApp sees the
//! device come online once, and stops the client cleanly: this service links accounts, it does not
//! keep them online. The credentials stay in `DATA_DIR` for whatever runs
//! the account next.
//!
//! Ending a session releases everything its client held: the client runs on
//! its own [`ClientRuntime`], whose [`TaskScope`] ends every library task at
//! shutdown (some would otherwise keep the client alive for minutes), and
//! shutdown returns only once the client is gone and its SQLite files are
//! closed. A device that never linked is of no use to anyone: it never had
//! files, or (a link that failed half-way) they are deleted. A linked
//! device's files stay, closed.
//!
//! The library logs the phone number and the pairing code in clear under the
//! `Client/PairCode` target; `telemetry` filters that target out.

mod backend;
mod client;
mod files;
pub mod warm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use wacore::pair_code::PairCodeUtils;
use whatsapp_rust::Client;
use whatsapp_rust::pair_code::PairCodeOptions;

use self::backend::DeviceBackend;
use self::client::{ClientFactory, Flags, Running, Wiring, await_post_link_login, map_pair_error};
use self::files::keep_earlier_device_aside;
use self::warm::{WarmClient, WarmPool};
use super::http_client::ReqwestHttpClient;
use super::passkey::PasskeyAssertion;
use super::version::{ServiceWorker, SharedVersion, VersionSource};
use super::{IssuedCode, LinkError, LinkHandle, Linker, OpenedLink, PairingCode};
use crate::phone::PhoneNumber;

/// How long to wait for the WebSocket + Noise handshake before a code can be
/// requested. The library gives the transport 20 s on its own.
pub const SOCKET_WAIT: Duration = Duration::from_secs(25);
/// Upper bound on one code request: the library's IQ timeout is 30 s, plus
/// one PBKDF2 (131,072 rounds) before the request leaves.
pub const CODE_REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
/// Upper bound on one step of a passkey link (fetching a ref and sending
/// the assertion; sending the sealed pairing request): two IQs at most,
/// each under the library's own 30 s IQ timeout, plus a margin.
pub const PASSKEY_STEP_TIMEOUT: Duration = Duration::from_secs(65);
/// After the link, how long to wait for the client's post-pairing login
/// before shutting it down anyway. The link is already complete by then, and
/// the login is one reconnect (about a second); the bound stays well inside
/// the shutdown grace so a stop right after a link is not held up.
pub const POST_LINK_LOGIN_WAIT: Duration = Duration::from_secs(5);
/// How long discarding a device waits for WhatsApp to confirm its logout
/// (the library's own IQ timeout is longer): short, since the files of a
/// stranger's device must be gone before a shutdown's grace runs out; they
/// go either way.
pub const LOGOUT_WAIT: Duration = Duration::from_secs(3);
/// Poll interval while waiting for that login; the library offers no event
/// for "logged in but not fully synced".
const LOGIN_POLL: Duration = Duration::from_millis(100);
/// How long a shutdown waits for the client to disconnect and its run loop
/// to finish (it flushes the device store first). Past this the client's
/// tasks are cancelled anyway: a stuck client is stopped, never detached.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// After the client's tasks are cancelled, how long to wait for the last
/// references to the client to go (each task lets go at its next poll, which
/// takes microseconds unless a blocking SQLite call is in flight).
pub const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// Poll interval while waiting for that release.
const RELEASE_POLL: Duration = Duration::from_millis(5);
/// Events are rare (a handful per code); the ordered mailbox only needs to
/// absorb a burst while our handler is busy.
const EVENT_MAILBOX: usize = 64;
/// Device id inside each per-phone SQLite file: one device per file.
const DEVICE_ID: i32 = 1;
/// How long a warm client waits ready before it is replaced. The library
/// gives an unpaired connection six QR refs (60 s + 5 x 20 s) and then
/// disconnects it unless a code is outstanding; replacing it well before
/// that means a session never takes a client about to be dropped.
pub const WARM_CLIENT_MAX_AGE: Duration = Duration::from_secs(120);

/// Where and how link clients connect.
#[derive(Debug, Clone, Default)]
pub struct WhatsAppSettings {
    /// Directory holding one SQLite device store per phone.
    pub data_dir: PathBuf,
    /// WebSocket URL override (`WA_WS_URL`); WhatsApp's own when `None`.
    pub ws_url: Option<String>,
    /// Web client version pin (`WA_VERSION`); fetched from WhatsApp when `None`.
    pub version: Option<(u32, u32, u32)>,
    /// Bound on one code request; [`CODE_REQUEST_TIMEOUT`] when `None`.
    pub code_request_timeout: Option<Duration>,
    /// Connected, unpaired clients kept ready (`PAIR_WARM_CLIENTS`); 0 = none.
    pub warm_clients: usize,
    /// Age at which a ready client is replaced; [`WARM_CLIENT_MAX_AGE`]
    /// when `None`.
    pub warm_max_age: Option<Duration>,
}

/// Opens [`PhoneClient`]s over `whatsapp-rust`, from the warm pool when it
/// has one ready.
#[derive(Debug, Clone)]
pub struct WhatsAppLinker {
    factory: ClientFactory,
    warm: Option<WarmPool>,
}

impl WhatsAppLinker {
    /// A linker with the given settings; without a version pin, WhatsApp
    /// Web's version is fetched once for all its clients.
    pub fn new(settings: WhatsAppSettings) -> Result<Self, LinkError> {
        let http = ReqwestHttpClient::new().map_err(|e| LinkError::Client(e.to_string()))?;
        let source = ServiceWorker(Arc::new(http.clone()));
        Ok(Self::with_version_source(settings, http, source))
    }

    /// A linker whose clients get WhatsApp Web's version from `source`.
    pub fn with_version_source(
        settings: WhatsAppSettings,
        http: ReqwestHttpClient,
        source: impl VersionSource,
    ) -> Self {
        let factory = ClientFactory {
            settings: Arc::new(settings),
            http,
            version: Arc::new(SharedVersion::new(source)),
        };
        let warm = (factory.settings.warm_clients > 0).then(|| WarmPool::new(factory.clone()));
        Self { factory, warm }
    }

    /// The warm pool, when `warm_clients` is above zero.
    pub fn warm_pool(&self) -> Option<&WarmPool> {
        self.warm.as_ref()
    }

    /// Path of `phone`'s device store.
    pub fn store_path(data_dir: &Path, phone: &PhoneNumber) -> PathBuf {
        data_dir.join(format!("{}.db", phone.as_str()))
    }

    /// Where `phone`'s device will be stored once linked: its directory
    /// exists (the file is created at the link, which must not fail for want
    /// of one), and an earlier device stored there is kept aside first,
    /// before the new one can ever land on it.
    async fn claim_home(&self, phone: &PhoneNumber) -> Result<PathBuf, LinkError> {
        let dir = &self.factory.settings.data_dir;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| LinkError::Storage(format!("creating {dir:?}: {e}")))?;
        let home = Self::store_path(dir, phone);
        if tokio::fs::try_exists(&home).await.unwrap_or(false) {
            keep_earlier_device_aside(&home, phone).await?;
        }
        Ok(home)
    }

    /// A new client for `phone`, connecting now.
    async fn open_cold(&self, phone: &PhoneNumber) -> Result<OpenedLink, LinkError> {
        let home = self.claim_home(phone).await?;
        let (wiring, events) = Wiring::new();
        let backend = DeviceBackend::pending();
        backend.set_home(home);
        let client = Arc::new(PhoneClient {
            phone: phone.clone(),
            factory: self.factory.clone(),
            backend,
            wiring,
            running: tokio::sync::Mutex::new(None),
        });
        client.ensure_running().await?;
        Ok(OpenedLink {
            handle: Arc::new(PhoneClientHandle(client)),
            events,
        })
    }

    /// `phone` takes over a warm client: its device is stored at the
    /// phone's place once the phone links.
    async fn open_warm(
        &self,
        phone: &PhoneNumber,
        warm: WarmClient,
    ) -> Result<OpenedLink, LinkError> {
        let (backend, running, wiring, events) = warm.into_parts();
        let home = match self.claim_home(phone).await {
            Ok(home) => home,
            Err(e) => {
                running.stop().await;
                return Err(e);
            }
        };
        backend.set_home(home);
        let client = Arc::new(PhoneClient {
            phone: phone.clone(),
            factory: self.factory.clone(),
            backend,
            wiring,
            running: tokio::sync::Mutex::new(Some(running)),
        });
        Ok(OpenedLink {
            handle: Arc::new(PhoneClientHandle(client)),
            events,
        })
    }
}

#[async_trait]
impl Linker for WhatsAppLinker {
    async fn has_linked_device(&self, phone: &PhoneNumber) -> bool {
        tokio::fs::try_exists(Self::store_path(&self.factory.settings.data_dir, phone))
            .await
            .unwrap_or(false)
    }

    async fn linked_device(&self, phone: &PhoneNumber) -> Result<Option<Vec<u8>>, LinkError> {
        files::snapshot(&Self::store_path(&self.factory.settings.data_dir, phone)).await
    }

    async fn open(&self, phone: &PhoneNumber) -> Result<OpenedLink, LinkError> {
        match self.warm.as_ref().and_then(WarmPool::take) {
            Some(warm) => self.open_warm(phone, warm).await,
            None => self.open_cold(phone).await,
        }
    }

    fn warm_clients(&self) -> usize {
        self.warm.as_ref().map_or(0, WarmPool::ready)
    }

    async fn keep_warm(&self, stop: watch::Receiver<bool>) {
        if let Some(pool) = &self.warm {
            pool.run(stop).await;
        }
    }
}

/// One phone's link client (rebuilt on the same device store when it
/// stops).
struct PhoneClient {
    phone: PhoneNumber,
    factory: ClientFactory,
    /// The device's keys, and where its file goes once linked: every client
    /// this phone gets uses the same ones.
    backend: Arc<DeviceBackend>,
    wiring: Wiring,
    running: tokio::sync::Mutex<Option<Running>>,
}

impl PhoneClient {
    fn flags(&self) -> &Flags {
        &self.wiring.flags
    }

    /// Returns a client whose run loop is alive, building one if needed.
    async fn ensure_running(&self) -> Result<Arc<Client>, LinkError> {
        let mut running = self.running.lock().await;
        if self.flags().closed.load(Ordering::Acquire) {
            return Err(LinkError::Closed);
        }
        // A connection whose QR refs are spent can never show a QR again:
        // a new one brings six more.
        let qr_spent = self.flags().qr_spent.swap(false, Ordering::AcqRel);
        if let Some(current) = running.as_ref()
            && !current.run_loop.is_finished()
            && !qr_spent
        {
            return Ok(Arc::clone(&current.client));
        }
        // A disconnected client can never run again; a new one on the same
        // device store keeps the device keys.
        if let Some(stale) = running.take() {
            stale.stop().await;
        }
        let started = self.factory.start(&self.backend, &self.wiring).await?;
        let client = Arc::clone(&started.client);
        *running = Some(started);
        Ok(client)
    }

    /// A client with its socket up, building one if needed.
    async fn connected(&self) -> Result<Arc<Client>, LinkError> {
        let client = self.ensure_running().await?;
        client
            .wait_for_socket(SOCKET_WAIT)
            .await
            .map_err(|_| LinkError::Timeout("connecting to WhatsApp"))?;
        Ok(client)
    }

    async fn request_code(&self) -> Result<IssuedCode, LinkError> {
        let client = self.connected().await?;
        // The previous code dies here on purpose: a second live code for the
        // same number would make the phone's entry of the older one fail.
        client.cancel_pair_code().await;
        let started = tokio::time::Instant::now();
        self.flags().code_live.store(false, Ordering::Release);
        let result = tokio::time::timeout(
            self.factory
                .settings
                .code_request_timeout
                .unwrap_or(CODE_REQUEST_TIMEOUT),
            client.pair_with_code(PairCodeOptions {
                phone_number: self.phone.as_str().to_owned(),
                show_push_notification: true,
                ..Default::default()
            }),
        )
        .await;
        match result {
            Err(_) => Err(LinkError::Timeout(
                "WhatsApp did not answer the code request",
            )),
            Ok(Err(e)) => Err(map_pair_error(e)),
            Ok(Ok(code)) => Ok(IssuedCode {
                code: PairingCode::new(code),
                valid_for: PairCodeUtils::code_validity().saturating_sub(started.elapsed()),
            }),
        }
    }

    /// The client whose connection carries this session's passkey link:
    /// the one running now. A new connection would not know the exchange.
    async fn passkey_client(&self) -> Result<Arc<Client>, LinkError> {
        let running = self.running.lock().await;
        match running.as_ref() {
            Some(current) if !current.run_loop.is_finished() => Ok(Arc::clone(&current.client)),
            _ => Err(LinkError::Disconnected),
        }
    }

    async fn send_passkey(&self, assertion: PasskeyAssertion) -> Result<(), LinkError> {
        let client = self.passkey_client().await?;
        let assertion_json = whatsapp_rust::passkey::build_webauthn_assertion_json(
            &assertion.credential_id,
            &assertion.client_data_json,
            &assertion.authenticator_data,
            &assertion.signature,
            assertion.user_handle.as_deref(),
        );
        let answer = whatsapp_rust::passkey::Assertion {
            assertion_json,
            credential_id: assertion.credential_id,
        };
        tokio::time::timeout(PASSKEY_STEP_TIMEOUT, client.send_passkey_response(answer))
            .await
            .map_err(|_| LinkError::Timeout("WhatsApp did not answer the passkey"))?
            .map_err(|e| LinkError::Passkey(e.to_string()))
    }

    async fn confirm_passkey(&self) -> Result<(), LinkError> {
        let client = self.passkey_client().await?;
        tokio::time::timeout(PASSKEY_STEP_TIMEOUT, client.send_passkey_confirmation())
            .await
            .map_err(|_| LinkError::Timeout("WhatsApp did not answer the confirmation"))?
            .map_err(|e| LinkError::Passkey(e.to_string()))
    }

    async fn shutdown(&self) {
        let mut running = self.running.lock().await;
        self.flags().closed.store(true, Ordering::Release);
        let linked = self.flags().keep_device();
        if let Some(current) = running.take() {
            if linked {
                // Let WhatsApp see the new device come online once.
                await_post_link_login(&current.client, &self.phone).await;
            }
            current.stop().await;
        }
        self.backend.close(linked).await;
    }

    async fn discard(&self) {
        // Said first: if this is cut short (a shutdown, a dropped task),
        // whoever releases the client still deletes the files.
        self.flags().discard.store(true, Ordering::Release);
        let mut running = self.running.lock().await;
        self.flags().closed.store(true, Ordering::Release);
        if let Some(current) = running.take() {
            // The logout IQ needs the device logged in: the post-link login.
            await_post_link_login(&current.client, &self.phone).await;
            let logged_in = current.client.is_logged_in();
            let confirmed = tokio::time::timeout(LOGOUT_WAIT, current.client.logout())
                .await
                .is_ok();
            if !logged_in || !confirmed {
                // Best effort: the files go anyway; the phone that scanned
                // may still list the device until it is removed there.
                tracing::warn!(
                    phone = %self.phone,
                    logged_in,
                    confirmed,
                    event = "wrong_account_logout_unconfirmed",
                    "could not confirm the logout of another account's device; deleting it here"
                );
            }
            current.stop().await;
        }
        // As never linked: its files are deleted.
        self.backend.close(false).await;
    }
}

impl Drop for PhoneClient {
    fn drop(&mut self) {
        // Dropped without `shutdown` (a caller that gave up half-way through
        // `open`, say): stop the client in the background rather than leave
        // its connection, tasks and files behind. After a `shutdown` there is
        // nothing left to do, and a late delete could hit the files of the
        // number's next session.
        if self.flags().closed.load(Ordering::Acquire) {
            return;
        }
        let running = self.running.get_mut().take();
        let linked = self.flags().keep_device();
        if (running.is_some() || !linked)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let backend = Arc::clone(&self.backend);
            runtime.spawn(async move {
                if let Some(running) = running {
                    running.stop().await;
                }
                backend.close(linked).await;
            });
        }
    }
}

/// The [`LinkHandle`] handed to callers.
struct PhoneClientHandle(Arc<PhoneClient>);

#[async_trait]
impl LinkHandle for PhoneClientHandle {
    async fn request_code(&self) -> Result<IssuedCode, LinkError> {
        self.0.request_code().await
    }

    async fn connect(&self) -> Result<(), LinkError> {
        self.0.connected().await.map(drop)
    }

    async fn shutdown(&self) {
        self.0.shutdown().await
    }

    async fn discard(&self) {
        self.0.discard().await
    }

    async fn send_passkey(&self, assertion: PasskeyAssertion) -> Result<(), LinkError> {
        self.0.send_passkey(assertion).await
    }

    async fn confirm_passkey(&self) -> Result<(), LinkError> {
        self.0.confirm_passkey().await
    }
}

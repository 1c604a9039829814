//! The real [`Linker`]: a `whatsapp-rust` multi-device client per phone.
//!
//! Each session owns one client whose device keys live in SQLite at
//! `DATA_DIR/<phone>.db` (one device per file). The client connects,
//! WhatsApp hands it QR refs, and [`LinkHandle::request_code`] asks for a
//! phone-number pairing code on that same connection.
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
//! closed. A device that never linked is of no use to anyone: its files are
//! deleted. A linked device's files stay, closed.
//!
//! The library logs the phone number and the pairing code in clear under the
//! `Client/PairCode` target; `telemetry` filters that target out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wacore::pair_code::PairCodeUtils;
use wacore::store::DevicePropsOverride;
use wacore::types::events::Event;
use waproto::whatsapp::device_props::PlatformType;
use whatsapp_rust::Client;
use whatsapp_rust::bot::{Bot, EventDelivery};
use whatsapp_rust::pair_code::{PairCodeOptions, PairError};
use whatsapp_rust::request::IqError;
use whatsapp_rust_sqlite_storage::SqliteStore;
use whatsapp_rust_tokio_transport::TokioWebSocketTransportFactory;

use super::http_client::ReqwestHttpClient;
use super::tasks::{ClientRuntime, TaskScope};
use super::version::{ServiceWorker, SharedVersion, VersionSource};
use super::{
    Invalidation, IssuedCode, LinkError, LinkEvent, LinkHandle, LinkSession, LinkedAccount, Linker,
    PairingCode,
};
use crate::phone::PhoneNumber;

/// How long to wait for the WebSocket + Noise handshake before a code can be
/// requested. The library gives the transport 20 s on its own.
pub const SOCKET_WAIT: Duration = Duration::from_secs(25);
/// Upper bound on one code request: the library's IQ timeout is 30 s, plus
/// one PBKDF2 (131,072 rounds) before the request leaves.
pub const CODE_REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
/// After the link, how long to wait for the client's post-pairing login
/// before shutting it down anyway. The link is already complete by then, and
/// the login is one reconnect (about a second); the bound stays well inside
/// the shutdown grace so a stop right after a link is not held up.
pub const POST_LINK_LOGIN_WAIT: Duration = Duration::from_secs(5);
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
}

/// Opens [`WhatsAppSession`]s over `whatsapp-rust`.
#[derive(Debug, Clone)]
pub struct WhatsAppLinker {
    settings: Arc<WhatsAppSettings>,
    http: ReqwestHttpClient,
    /// WhatsApp Web's version for every client, when `WA_VERSION` is unset.
    version: Arc<SharedVersion>,
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
        Self {
            settings: Arc::new(settings),
            http,
            version: Arc::new(SharedVersion::new(source)),
        }
    }

    /// Path of `phone`'s device store.
    pub fn store_path(data_dir: &Path, phone: &PhoneNumber) -> PathBuf {
        data_dir.join(format!("{}.db", phone.as_str()))
    }
}

#[async_trait]
impl Linker for WhatsAppLinker {
    async fn has_linked_device(&self, phone: &PhoneNumber) -> bool {
        tokio::fs::try_exists(Self::store_path(&self.settings.data_dir, phone))
            .await
            .unwrap_or(false)
    }

    async fn open(&self, phone: &PhoneNumber) -> Result<LinkSession, LinkError> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let session = Arc::new(WhatsAppSession {
            phone: phone.clone(),
            settings: Arc::clone(&self.settings),
            http: self.http.clone(),
            version: Arc::clone(&self.version),
            flags: Arc::new(Flags::default()),
            events: events_tx,
            running: tokio::sync::Mutex::new(None),
        });
        session.ensure_running().await?;
        Ok(LinkSession {
            handle: Box::new(SessionHandle(session)),
            events: events_rx,
        })
    }
}

/// State the library's event handler shares with the session.
#[derive(Debug, Default)]
struct Flags {
    /// A code is live as far as the (ordered) event stream has told us:
    /// set by `PairingCode`, cleared by anything that kills the code and
    /// before each new request. The library reports a failed request both
    /// as an `Err` and as a `PairingCodeError` event; only a
    /// `PairingCodeError` while a code is live (its `companion_finish` was
    /// refused) is news.
    code_live: AtomicBool,
    /// The phone linked; later disconnects are the expected 515 dance.
    linked: AtomicBool,
    /// `shutdown` ran; nothing may be started again.
    closed: AtomicBool,
}

/// One phone's link client (rebuilt on the same store when it stops).
struct WhatsAppSession {
    phone: PhoneNumber,
    settings: Arc<WhatsAppSettings>,
    http: ReqwestHttpClient,
    version: Arc<SharedVersion>,
    flags: Arc<Flags>,
    events: mpsc::UnboundedSender<LinkEvent>,
    running: tokio::sync::Mutex<Option<Running>>,
}

struct Running {
    client: Arc<Client>,
    /// Completes when the client's run loop has ended.
    run_loop: JoinHandle<()>,
    /// Owns every task the client spawned.
    tasks: TaskScope,
}

impl Running {
    /// Disconnects the client, ends all its tasks and waits (bounded) until
    /// nothing refers to it any more, so its device store is closed.
    async fn stop(self) {
        let Running {
            client,
            mut run_loop,
            tasks,
        } = self;
        let graceful = tokio::time::timeout(SHUTDOWN_WAIT, async {
            client.disconnect().await;
            let _ = (&mut run_loop).await;
        })
        .await;
        if graceful.is_err() {
            tracing::warn!("link client did not stop within {SHUTDOWN_WAIT:?}; cancelling it");
            run_loop.abort();
            let _ = run_loop.await;
        }
        release(client, tasks).await;
    }
}

/// Ends every task of `tasks`, lets go of `client` and waits (bounded)
/// until no task is left and nothing else holds the client, so its device
/// store is closed.
async fn release(client: Arc<Client>, tasks: TaskScope) {
    tasks.close();
    // Shadowing would keep the `Arc` alive to the end of this function.
    let client = {
        let weak = Arc::downgrade(&client);
        drop(client);
        weak
    };
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    while client.strong_count() > 0 || tasks.live_tasks() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                references = client.strong_count(),
                tasks = tasks.live_tasks(),
                "link client still referenced {RELEASE_WAIT:?} after it was stopped"
            );
            return;
        }
        tokio::time::sleep(RELEASE_POLL).await;
    }
}

impl WhatsAppSession {
    /// Returns a client whose run loop is alive, building one if needed.
    async fn ensure_running(&self) -> Result<Arc<Client>, LinkError> {
        let mut running = self.running.lock().await;
        if self.flags.closed.load(Ordering::Acquire) {
            return Err(LinkError::Closed);
        }
        if let Some(current) = running.as_ref()
            && !current.run_loop.is_finished()
        {
            return Ok(Arc::clone(&current.client));
        }
        // A disconnected client can never run again; a new one on the same
        // store keeps the device keys.
        if let Some(stale) = running.take() {
            stale.stop().await;
        }
        let started = self.start_client().await?;
        let client = Arc::clone(&started.client);
        *running = Some(started);
        Ok(client)
    }

    async fn start_client(&self) -> Result<Running, LinkError> {
        tokio::fs::create_dir_all(&self.settings.data_dir)
            .await
            .map_err(|e| {
                LinkError::Storage(format!("creating {:?}: {e}", self.settings.data_dir))
            })?;
        let path = self.store_path();
        let (mut bot, mut tasks) = self.build_bot(&path).await?;
        if !self.flags.linked.load(Ordering::Acquire)
            && bot
                .client()
                .persistence_manager()
                .get_device_snapshot()
                .is_registered()
        {
            // An earlier link of this number left a registered device here.
            // A new link needs a new device; keep the old credentials aside
            // rather than destroy them.
            let client = bot.client();
            drop(bot);
            release(client, tasks).await;
            let kept = set_aside(&path).await?;
            tracing::warn!(
                phone = %self.phone,
                kept = %kept.display(),
                "phone already had a linked device here; kept it aside and pairing a new one"
            );
            (bot, tasks) = self.build_bot(&path).await?;
        }
        let client = bot.client();
        let run_loop = tokio::spawn(bot.spawn());
        Ok(Running {
            client,
            run_loop,
            tasks,
        })
    }

    fn store_path(&self) -> PathBuf {
        WhatsAppLinker::store_path(&self.settings.data_dir, &self.phone)
    }

    /// A bot on its own [`ClientRuntime`], with the scope that owns its tasks.
    async fn build_bot(&self, path: &Path) -> Result<(Bot, TaskScope), LinkError> {
        let path_str = path
            .to_str()
            .ok_or_else(|| LinkError::Storage(format!("non UTF-8 path {path:?}")))?;
        let backend = SqliteStore::new_for_device(path_str, DEVICE_ID)
            .await
            .map_err(|e| LinkError::Storage(e.to_string()))?;
        let transport = match &self.settings.ws_url {
            Some(url) => TokioWebSocketTransportFactory::new().with_url(url.clone()),
            None => TokioWebSocketTransportFactory::new(),
        };
        let events = self.events.clone();
        let flags = Arc::clone(&self.flags);
        let phone = self.phone.clone();
        let (runtime, tasks) = ClientRuntime::new();
        let mut builder = Bot::builder()
            .with_backend(backend)
            .with_runtime(runtime)
            .with_transport_factory(transport)
            .with_http_client(self.http.clone())
            // WhatsApp rejects a pair-code companion whose display is not an
            // OS name; "Chrome (Linux)" is what WA Web on Linux sends.
            .with_device_props(
                DevicePropsOverride::new()
                    .with_os("Linux")
                    .with_platform_type(PlatformType::CHROME),
            )
            .skip_history_sync()
            // One mailbox, in order: a refresh must not overtake the
            // disconnect that caused it.
            .with_event_delivery(EventDelivery::Ordered {
                capacity: EVENT_MAILBOX,
            })
            .on_event(move |event, client| {
                let events = events.clone();
                let flags = Arc::clone(&flags);
                let phone = phone.clone();
                async move { on_event(&event, client, &events, &flags, &phone).await }
            });
        let version = match self.settings.version {
            Some(pinned) => Some(pinned),
            None => self.version.current().await,
        };
        if let Some(version) = version {
            builder = builder.with_version(version);
        }
        match builder.build().await {
            Ok(bot) => Ok((bot, tasks)),
            Err(e) => {
                tasks.close();
                Err(LinkError::Storage(e.to_string()))
            }
        }
    }

    async fn request_code(&self) -> Result<IssuedCode, LinkError> {
        let client = self.ensure_running().await?;
        client
            .wait_for_socket(SOCKET_WAIT)
            .await
            .map_err(|_| LinkError::Timeout("connecting to WhatsApp"))?;
        // The previous code dies here on purpose: a second live code for the
        // same number would make the phone's entry of the older one fail.
        client.cancel_pair_code().await;
        let started = tokio::time::Instant::now();
        self.flags.code_live.store(false, Ordering::Release);
        let result = tokio::time::timeout(
            self.settings
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

    async fn shutdown(&self) {
        let mut running = self.running.lock().await;
        self.flags.closed.store(true, Ordering::Release);
        let linked = self.flags.linked.load(Ordering::Acquire);
        if let Some(current) = running.take() {
            if linked {
                // Let WhatsApp see the new device come online once.
                await_post_link_login(&current.client, &self.phone).await;
            }
            current.stop().await;
        }
        if !linked {
            remove_device_files(&self.store_path()).await;
        }
    }
}

impl Drop for WhatsAppSession {
    fn drop(&mut self) {
        // Dropped without `shutdown` (a caller that gave up half-way through
        // `open`, say): stop the client in the background rather than leave
        // its connection, tasks and files behind. After a `shutdown` there is
        // nothing left to do, and a late delete could hit the files of the
        // number's next session.
        if self.flags.closed.load(Ordering::Acquire) {
            return;
        }
        let running = self.running.get_mut().take();
        let linked = self.flags.linked.load(Ordering::Acquire);
        if (running.is_some() || !linked)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let path = self.store_path();
            runtime.spawn(async move {
                if let Some(running) = running {
                    running.stop().await;
                }
                if !linked {
                    remove_device_files(&path).await;
                }
            });
        }
    }
}

/// Deletes an unlinked device's store: `path` and SQLite's side files.
async fn remove_device_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        match tokio::fs::remove_file(&file).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The path holds the phone number: name only the kind of file.
            Err(e) => tracing::warn!(
                file = if suffix.is_empty() { "db" } else { suffix },
                error = %e,
                "could not delete an unlinked device's file"
            ),
        }
    }
}

/// Moves `path` (and SQLite's side files) to `path.replaced-<unix time>`.
async fn set_aside(path: &Path) -> Result<PathBuf, LinkError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let target = PathBuf::from(format!("{}.replaced-{stamp}", path.display()));
    tokio::fs::rename(path, &target)
        .await
        .map_err(|e| LinkError::Storage(format!("setting aside {path:?}: {e}")))?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if tokio::fs::try_exists(&side).await.unwrap_or(false) {
            let _ = tokio::fs::rename(&side, format!("{}{suffix}", target.display())).await;
        }
    }
    Ok(target)
}

fn map_pair_error(error: PairError) -> LinkError {
    match error {
        PairError::RequestFailed(IqError::ServerError {
            code,
            text,
            backoff,
            ..
        }) => LinkError::Refused {
            status: code,
            text,
            backoff: backoff.map(|s| Duration::from_secs(u64::from(s))),
        },
        PairError::RequestFailed(IqError::Timeout) => {
            LinkError::Timeout("WhatsApp did not answer the code request")
        }
        PairError::RequestFailed(
            IqError::NotConnected
            | IqError::Disconnected(_)
            | IqError::Socket(_)
            | IqError::EncryptSend(_)
            | IqError::InternalChannelClosed,
        ) => LinkError::Disconnected,
        other => LinkError::Client(other.to_string()),
    }
}

/// Translates the library's events into [`LinkEvent`]s.
async fn on_event(
    event: &Event,
    client: Arc<Client>,
    events: &mpsc::UnboundedSender<LinkEvent>,
    flags: &Flags,
    phone: &PhoneNumber,
) {
    let linked = flags.linked.load(Ordering::Acquire);
    let send = |e: LinkEvent| {
        // The receiver is gone only after shutdown; nothing to tell then.
        let _ = events.send(e);
    };
    let code_died = |why: Invalidation| {
        flags.code_live.store(false, Ordering::Release);
        send(LinkEvent::CodeInvalidated(why));
    };
    match event {
        Event::PairingCode(issued) => {
            flags.code_live.store(true, Ordering::Release);
            send(LinkEvent::CodeIssued(IssuedCode {
                code: PairingCode::new(issued.code.clone()),
                valid_for: issued.timeout,
            }));
        }
        Event::PairingQrCode(_) => send(LinkEvent::QrRotated),
        Event::PairingCodeRefresh(_) if !linked => code_died(Invalidation::RefreshRequested),
        // Claims the live code in the guard: only the first refusal of a
        // live code is news (see `Flags::code_live`).
        Event::PairingCodeError(error)
            if !linked && flags.code_live.swap(false, Ordering::AcqRel) =>
        {
            send(LinkEvent::Refused {
                status: error
                    .rejection
                    .and_then(|r| u16::try_from(r.code()).ok())
                    .unwrap_or(500),
                backoff: error.backoff,
            });
        }
        Event::Disconnected(_) if !linked => code_died(Invalidation::Disconnected),
        Event::PairingQrCodesExhausted(exhausted) if exhausted.disconnected && !linked => {
            code_died(Invalidation::ClientStopped)
        }
        // The library stops its own run loop (no reconnect, no
        // `Disconnected`) after these; the code went with it.
        Event::StreamReplaced(_) | Event::ConnectFailure(_) if !linked => {
            code_died(Invalidation::ClientStopped)
        }
        Event::PairError(_) if !linked => code_died(Invalidation::PairingRejected),
        Event::PairSuccess(success) => {
            flags.linked.store(true, Ordering::Release);
            // The identity must be on disk before anyone is told "linked".
            if let Err(e) = client.persistence_manager().flush().await {
                tracing::error!(phone = %phone, error = %e, "could not flush the linked device");
                send(LinkEvent::LinkedButNotSaved);
                return;
            }
            let non_empty = |s: String| (!s.is_empty()).then_some(s);
            send(LinkEvent::Linked(LinkedAccount {
                jid: success.id.to_string(),
                lid: non_empty(success.lid.user.to_string()).map(|_| success.lid.to_string()),
                platform: non_empty(success.platform.clone()),
            }));
        }
        Event::LoggedOut(logged_out) => send(LinkEvent::Failed {
            reason: format!("WhatsApp logged the device out ({:?})", logged_out.reason),
        }),
        Event::ClientOutdated(_) => send(LinkEvent::Failed {
            reason: "WhatsApp says this client version is outdated; set WA_VERSION".into(),
        }),
        Event::TemporaryBan(ban) => send(LinkEvent::Failed {
            reason: format!(
                "WhatsApp temporarily banned this client for {} s",
                ban.expire.num_seconds()
            ),
        }),
        _ => {}
    }
}

/// Waits (bounded) for a freshly linked client's post-pairing login.
async fn await_post_link_login(client: &Client, phone: &PhoneNumber) {
    let deadline = tokio::time::Instant::now() + POST_LINK_LOGIN_WAIT;
    while !client.is_logged_in() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(LOGIN_POLL).await;
    }
    tracing::info!(
        phone = %phone,
        logged_in = client.is_logged_in(),
        "linked device checked in; closing the link client"
    );
}

/// The [`LinkHandle`] handed to callers.
struct SessionHandle(Arc<WhatsAppSession>);

#[async_trait]
impl LinkHandle for SessionHandle {
    async fn request_code(&self) -> Result<IssuedCode, LinkError> {
        self.0.request_code().await
    }

    async fn shutdown(&self) {
        self.0.shutdown().await
    }
}

//! Building, running and stopping one `whatsapp-rust` client, and turning
//! its events into [`LinkEvent`]s. Shared by the per-phone clients and the
//! warm pool: a client is the same thing before and after a phone claims it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wacore::store::DevicePropsOverride;
use wacore::types::events::Event;
use waproto::whatsapp::device_props::PlatformType;
use whatsapp_rust::Client;
use whatsapp_rust::bot::{Bot, EventDelivery};
use whatsapp_rust::pair_code::PairError;
use whatsapp_rust::request::IqError;
use whatsapp_rust_tokio_transport::TokioWebSocketTransportFactory;

use super::backend::DeviceBackend;
use super::{
    EVENT_MAILBOX, LOGIN_POLL, POST_LINK_LOGIN_WAIT, RELEASE_POLL, RELEASE_WAIT, SHUTDOWN_WAIT,
    WhatsAppSettings,
};
use crate::link::http_client::ReqwestHttpClient;
use crate::link::passkey::{PasskeyOptions, VerificationCode};
use crate::link::tasks::{ClientRuntime, TaskScope};
use crate::link::version::SharedVersion;
use crate::link::{
    Invalidation, IssuedCode, LinkError, LinkEvent, LinkedAccount, PairingCode, QrCode,
};
use crate::phone::PhoneNumber;

/// State the library's event handler shares with the client's owner.
#[derive(Debug, Default)]
pub(super) struct Flags {
    /// A code is live as far as the (ordered) event stream has told us:
    /// set by `PairingCode`, cleared by anything that kills the code and
    /// before each new request. The library reports a failed request both
    /// as an `Err` and as a `PairingCodeError` event; only a
    /// `PairingCodeError` while a code is live (its `companion_finish` was
    /// refused) is news.
    pub code_live: AtomicBool,
    /// The phone linked; later disconnects are the expected 515 dance.
    pub linked: AtomicBool,
    /// `shutdown` ran; nothing may be started again.
    pub closed: AtomicBool,
    /// The running connection's QR refs are used up: the next code is asked
    /// on a new connection, which brings new ones.
    pub qr_spent: AtomicBool,
    /// The linked device is not to be kept (another account's): whoever
    /// releases the client deletes its files, as for a device never linked.
    pub discard: AtomicBool,
}

impl Flags {
    /// Whether the device is linked and to be kept.
    pub fn keep_device(&self) -> bool {
        self.linked.load(Ordering::Acquire) && !self.discard.load(Ordering::Acquire)
    }
}

/// Everything a client needs that does not depend on the phone: shared by
/// the linker, its per-phone clients and the warm pool.
#[derive(Debug, Clone)]
pub(super) struct ClientFactory {
    pub settings: Arc<WhatsAppSettings>,
    pub http: ReqwestHttpClient,
    /// WhatsApp Web's version for every client, when `WA_VERSION` is unset.
    pub version: Arc<SharedVersion>,
}

/// Where a client's events go: its owner's mailbox and flags.
#[derive(Debug, Clone)]
pub(super) struct Wiring {
    pub events: mpsc::UnboundedSender<LinkEvent>,
    pub flags: Arc<Flags>,
}

impl Wiring {
    /// A fresh mailbox and flags, and the receiving end of the mailbox.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<LinkEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                events,
                flags: Arc::new(Flags::default()),
            },
            rx,
        )
    }
}

/// A client whose run loop is going, and the scope owning its tasks.
pub(super) struct Running {
    pub client: Arc<Client>,
    /// Completes when the client's run loop has ended.
    pub run_loop: JoinHandle<()>,
    /// Owns every task the client spawned.
    pub tasks: TaskScope,
}

impl Running {
    /// Starts `bot`'s run loop.
    pub fn spawn(bot: Bot, tasks: TaskScope) -> Self {
        let client = bot.client();
        let run_loop = tokio::spawn(bot.spawn());
        Self {
            client,
            run_loop,
            tasks,
        }
    }

    /// Whether the client still has a live connection to WhatsApp.
    pub fn is_connected(&self) -> bool {
        !self.run_loop.is_finished() && self.client.is_connected()
    }

    /// Disconnects the client, ends all its tasks and waits (bounded) until
    /// nothing refers to it any more, so its device store is closed.
    pub async fn stop(self) {
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
pub(super) async fn release(client: Arc<Client>, tasks: TaskScope) {
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

impl ClientFactory {
    /// A bot on its own [`ClientRuntime`] over `backend`, with the scope
    /// that owns its tasks. Its events go to `wiring`.
    pub async fn build(
        &self,
        backend: &Arc<DeviceBackend>,
        wiring: &Wiring,
    ) -> Result<(Bot, TaskScope), LinkError> {
        let transport = match &self.settings.ws_url {
            Some(url) => TokioWebSocketTransportFactory::new().with_url(url.clone()),
            None => TokioWebSocketTransportFactory::new(),
        };
        let events = wiring.events.clone();
        let flags = Arc::clone(&wiring.flags);
        let store = Arc::clone(backend);
        let (runtime, tasks) = ClientRuntime::new();
        let mut builder = Bot::builder()
            .with_backend_arc(Arc::clone(backend) as _)
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
                let store = Arc::clone(&store);
                async move { on_event(&event, client, &events, &flags, &store).await }
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

    /// Builds a client over `backend` and starts its run loop (it connects
    /// in the background).
    pub async fn start(
        &self,
        backend: &Arc<DeviceBackend>,
        wiring: &Wiring,
    ) -> Result<Running, LinkError> {
        let (bot, tasks) = self.build(backend, wiring).await?;
        Ok(Running::spawn(bot, tasks))
    }
}

pub(super) fn map_pair_error(error: PairError) -> LinkError {
    match error {
        PairError::RequestFailed(IqError::ServerError {
            code,
            text,
            backoff,
            ..
        }) => LinkError::Refused {
            status: code,
            text,
            backoff: backoff.map(|s| std::time::Duration::from_secs(u64::from(s))),
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
    backend: &DeviceBackend,
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
        Event::PairingQrCode(qr) if !linked => send(LinkEvent::QrRotated(QrCode::new(
            qr.code.clone(),
            qr.timeout,
        ))),
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
        Event::PairingQrCodesExhausted(exhausted) if !linked => {
            flags.qr_spent.store(true, Ordering::Release);
            if exhausted.disconnected {
                flags.code_live.store(false, Ordering::Release);
            }
            send(LinkEvent::QrExhausted {
                connection_closed: exhausted.disconnected,
            })
        }
        // The library stops its own run loop (no reconnect, no
        // `Disconnected`) after these; the code went with it.
        Event::StreamReplaced(_) | Event::ConnectFailure(_) if !linked => {
            code_died(Invalidation::ClientStopped)
        }
        Event::PairError(_) if !linked => code_died(Invalidation::PairingRejected),
        Event::PairPasskeyRequest(request) if !linked => {
            send(match PasskeyOptions::parse(&request.request_options_json) {
                Some(options) => LinkEvent::PasskeyRequested(options),
                None => LinkEvent::PasskeyFailed {
                    reason: "WhatsApp's passkey request carries no usable WebAuthn options".into(),
                },
            })
        }
        // `skip_handoff_ux` is only ever set on a re-link of a device that
        // was linked before; every session here starts a fresh device (a
        // forced re-link sets the old one aside), so the code is shown.
        Event::PairPasskeyConfirmation(confirmation) if !linked => send(
            LinkEvent::PasskeyVerification(VerificationCode::new(confirmation.code.clone())),
        ),
        Event::PairPasskeyError(error) if !linked => send(LinkEvent::PasskeyFailed {
            reason: error.error.clone(),
        }),
        Event::PairSuccess(success) => {
            flags.linked.store(true, Ordering::Release);
            // The identity must be on disk before anyone is told "linked":
            // saving the registered device moves the store to its file.
            if let Err(e) = client.persistence_manager().flush().await {
                tracing::error!(error = %e, "could not flush the linked device");
                send(LinkEvent::LinkedButNotSaved);
                return;
            }
            if !backend.is_on_disk().await {
                tracing::error!("the linked device is not on disk after its flush");
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
pub(super) async fn await_post_link_login(client: &Client, phone: &PhoneNumber) {
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

//! The warm pool: link clients connected before anyone asks.
//!
//! A code costs a WebSocket connect, the Noise handshake and a login as an
//! unregistered device before WhatsApp will even take the code request
//! (itself one PBKDF2 and one round trip). None of the first part depends
//! on the phone, so the pool does it ahead: it keeps up to
//! `PAIR_WARM_CLIENTS` connected clients, each with a fresh device in
//! memory (no files). [`Linker::open`](crate::link::Linker::open) takes
//! the freshest; the pool refills in the background.
//!
//! The pool's one task ([`WarmPool::run`], owned by `App::serve`) does all
//! the slow work: connecting, replacing clients before WhatsApp's QR refs
//! run out ([`WARM_CLIENT_MAX_AGE`](super::WARM_CLIENT_MAX_AGE)), stopping
//! the ones `take` found dead, and closing everything at shutdown. `take`
//! itself never waits. [`WarmPool::step`] is one turn of that loop, so
//! tests can drive it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backend::DeviceBackend;
use super::client::{ClientFactory, Running, Wiring};
use super::files::recover_warm_dir;
use super::{SOCKET_WAIT, WARM_CLIENT_MAX_AGE};
use crate::link::{LinkError, LinkEvent, QrCode};

/// Name of the directory inside `DATA_DIR` where earlier builds kept warm
/// clients' device stores; the pool finishes what they left there.
pub const WARM_DIR: &str = ".warm";
/// First wait after a failed connect; doubles up to [`RETRY_MAX`]. WhatsApp
/// unreachable must not turn the pool into a connect loop.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between connect attempts while WhatsApp is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A connected, unpaired client waiting for a phone.
pub(super) struct WarmClient {
    /// Its fresh device, in memory until a phone claims it and links.
    pub backend: Arc<DeviceBackend>,
    pub running: Running,
    pub wiring: Wiring,
    pub events: mpsc::UnboundedReceiver<LinkEvent>,
    connected_at: Instant,
    /// The QR its connection shows now.
    last_qr: Option<QrCode>,
}

impl WarmClient {
    /// Whether a phone can still use it: connected, young enough, and no
    /// event on its mailbox says the connection went (or its QR codes ran
    /// out). Drains the mailbox, keeping the latest QR code.
    fn is_usable(&mut self, now: Instant, max_age: Duration) -> bool {
        let mut lost = false;
        while let Ok(event) = self.events.try_recv() {
            match event {
                LinkEvent::QrRotated(qr) => self.last_qr = Some(qr),
                LinkEvent::CodeInvalidated(_)
                | LinkEvent::Failed { .. }
                | LinkEvent::QrExhausted { .. } => lost = true,
                _ => {}
            }
        }
        !lost && self.running.is_connected() && now.duration_since(self.connected_at) < max_age
    }

    /// Hands the client over: the QR its connection shows now is put back
    /// on the mailbox first (with what is left of its time), so the new
    /// owner shows it at once instead of waiting up to a minute for the
    /// next.
    pub fn into_parts(
        mut self,
    ) -> (
        Arc<DeviceBackend>,
        Running,
        Wiring,
        mpsc::UnboundedReceiver<LinkEvent>,
    ) {
        let mut others = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            match event {
                LinkEvent::QrRotated(qr) => self.last_qr = Some(qr),
                other => others.push(other),
            }
        }
        if let Some(qr) = self.last_qr.take().filter(|qr| !qr.time_left().is_zero()) {
            let _ = self.wiring.events.send(LinkEvent::QrRotated(qr));
        }
        for event in others {
            let _ = self.wiring.events.send(event);
        }
        (self.backend, self.running, self.wiring, self.events)
    }

    /// Closes the client; its device goes with it.
    async fn discard(self) {
        self.running.stop().await;
    }
}

/// What one [`WarmPool::step`] did.
#[derive(Debug)]
pub enum WarmStep {
    /// Connected one more client.
    Added,
    /// Closed this many clients that were too old, dead, or left behind.
    Retired(usize),
    /// As many clients ready as wanted; the oldest expires at `next_expiry`.
    Full {
        /// When the next client is due for replacement.
        next_expiry: Option<Instant>,
    },
    /// A connect failed.
    Failed(LinkError),
    /// The pool is stopped; nothing more to do.
    Stopped,
}

#[derive(Default)]
struct Ready {
    /// Ready clients, oldest first.
    clients: VecDeque<WarmClient>,
    /// Clients `take` found unusable; the pool's task closes them.
    retired: Vec<WarmClient>,
    stopped: bool,
}

struct Shared {
    factory: ClientFactory,
    size: usize,
    max_age: Duration,
    /// Where earlier versions kept warm clients' stores.
    legacy_dir: PathBuf,
    ready: Mutex<Ready>,
    /// Woken by `take`: a client left, or one was found dead.
    wanted: Notify,
    /// Cancelled at shutdown: a connect in flight gives up.
    closing: CancellationToken,
}

/// Up to `PAIR_WARM_CLIENTS` connected, unpaired link clients.
#[derive(Clone)]
pub struct WarmPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool")
            .field("size", &self.shared.size)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl WarmPool {
    pub(super) fn new(factory: ClientFactory) -> Self {
        let settings = &factory.settings;
        let shared = Shared {
            size: settings.warm_clients,
            max_age: settings.warm_max_age.unwrap_or(WARM_CLIENT_MAX_AGE),
            legacy_dir: settings.data_dir.join(WARM_DIR),
            factory,
            ready: Mutex::new(Ready::default()),
            wanted: Notify::new(),
            closing: CancellationToken::new(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ready> {
        // A panic while holding this lock leaves plain data behind; the pool
        // can go on with it.
        self.shared
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many clients are ready now.
    pub fn ready(&self) -> usize {
        self.lock().clients.len()
    }

    /// The freshest usable client, if any; never waits. The pool's task
    /// replaces it (and closes any found dead on the way).
    pub(super) fn take(&self) -> Option<WarmClient> {
        let now = Instant::now();
        let taken = {
            let mut ready = self.lock();
            let mut taken = None;
            while !ready.stopped
                && let Some(mut client) = ready.clients.pop_back()
            {
                if client.is_usable(now, self.shared.max_age) {
                    taken = Some(client);
                    break;
                }
                ready.retired.push(client);
            }
            taken
        };
        self.shared.wanted.notify_one();
        taken
    }

    /// One turn of the pool's work: close what must go, else connect one
    /// client if fewer than wanted are ready, else report when the next
    /// one is due.
    pub async fn step(&self) -> WarmStep {
        let now = Instant::now();
        let (retired, missing, next_expiry) = {
            let mut ready = self.lock();
            if ready.stopped {
                return WarmStep::Stopped;
            }
            let mut retired = std::mem::take(&mut ready.retired);
            let mut kept = VecDeque::with_capacity(ready.clients.len());
            while let Some(mut client) = ready.clients.pop_front() {
                if client.is_usable(now, self.shared.max_age) {
                    kept.push_back(client);
                } else {
                    retired.push(client);
                }
            }
            let next_expiry = kept
                .front()
                .map(|oldest| oldest.connected_at + self.shared.max_age);
            ready.clients = kept;
            let missing = self.shared.size.saturating_sub(ready.clients.len());
            (retired, missing, next_expiry)
        };
        if !retired.is_empty() {
            let count = retired.len();
            futures::future::join_all(retired.into_iter().map(WarmClient::discard)).await;
            return WarmStep::Retired(count);
        }
        if missing == 0 {
            return WarmStep::Full { next_expiry };
        }
        match self.connect_one().await {
            Ok(client) => {
                let refused = {
                    let mut ready = self.lock();
                    if ready.stopped {
                        Some(client)
                    } else {
                        ready.clients.push_back(client);
                        None
                    }
                };
                match refused {
                    Some(client) => {
                        client.discard().await;
                        WarmStep::Stopped
                    }
                    None => WarmStep::Added,
                }
            }
            Err(e) => WarmStep::Failed(e),
        }
    }

    /// Connects one client with a fresh device; closes it again when the
    /// connect fails or the pool closes meanwhile.
    async fn connect_one(&self) -> Result<WarmClient, LinkError> {
        let backend = DeviceBackend::pending();
        let (wiring, events) = Wiring::new();
        let running = self.shared.factory.start(&backend, &wiring).await?;
        let connected = tokio::select! {
            connected = running.client.wait_for_socket(SOCKET_WAIT) => connected
                .map_err(|_| LinkError::Timeout("connecting to WhatsApp")),
            () = self.shared.closing.cancelled() => Err(LinkError::Closed),
        };
        let client = WarmClient {
            backend,
            running,
            wiring,
            events,
            connected_at: Instant::now(),
            last_qr: None,
        };
        match connected {
            Ok(()) => Ok(client),
            Err(e) => {
                client.discard().await;
                Err(e)
            }
        }
    }

    /// Keeps the pool full until `stop` turns true, then closes every
    /// client it holds. First finishes what an earlier version left in
    /// [`WARM_DIR`].
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let data_dir = &self.shared.factory.settings.data_dir;
        match recover_warm_dir(data_dir, &self.shared.legacy_dir).await {
            Ok(recovered) if recovered.moved > 0 => tracing::warn!(
                moved = recovered.moved,
                deleted = recovered.deleted,
                "moved devices linked just before the last stop into place"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not clean up the warm pool's directory"),
        }
        let mut retry = RETRY_FIRST;
        loop {
            let step = self.step();
            tokio::pin!(step);
            let outcome = tokio::select! {
                outcome = &mut step => Some(outcome),
                _ = stop.wait_for(|stop| *stop) => None,
            };
            let Some(outcome) = outcome else {
                // Let the step finish: a connect in flight gives up and
                // cleans up after itself.
                self.shared.closing.cancel();
                let _ = step.await;
                break;
            };
            // After a failure only the backoff (or the stop) ends the wait:
            // a `take` must not turn it into a connect loop.
            let (until, on_demand) = match outcome {
                WarmStep::Added | WarmStep::Retired(_) => {
                    retry = RETRY_FIRST;
                    continue;
                }
                WarmStep::Stopped => break,
                WarmStep::Failed(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry, "warm link client could not connect");
                    let until = Instant::now() + retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    (until, false)
                }
                WarmStep::Full { next_expiry } => (
                    next_expiry.unwrap_or_else(|| Instant::now() + self.shared.max_age),
                    true,
                ),
            };
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                () = self.shared.wanted.notified(), if on_demand => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
        self.close().await;
    }

    /// Closes every client the pool holds; `take` finds nothing from now on.
    async fn close(&self) {
        self.shared.closing.cancel();
        let clients: Vec<WarmClient> = {
            let mut ready = self.lock();
            ready.stopped = true;
            let mut all: Vec<WarmClient> = ready.clients.drain(..).collect();
            all.append(&mut ready.retired);
            all
        };
        futures::future::join_all(clients.into_iter().map(WarmClient::discard)).await;
    }
}

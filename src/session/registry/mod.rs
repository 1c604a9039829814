//! All sessions of the process, one per phone (single-flight): start or
//! join, commands, shutdown.
//!
//! The registry holds running sessions only: a session leaves it when its
//! task ends, and from then on its outcome is read from the store (which
//! keeps it for `PAIR_OUTCOME_TTL_SECS`), so memory follows the open
//! sessions, not the traffic of the last day.

mod commands;
mod relay;
mod resume;

pub use relay::{RELAY_REPLY_MARGIN, RELAY_RESUBSCRIBE};
pub use resume::{RESUME_LOOK_EVERY, RESUME_LOOKS_FOR, Resumed};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use self::resume::Adoption;
use super::SessionError;
use super::access::{Actor, Owner};
use super::schedule::SessionSettings;
use super::state::{PairState, ReadState, Reason, Status};
use super::task::{Command, LEASE_TTL, Session};
use crate::devices::DeviceVault;
use crate::link::Linker;
use crate::metrics::Metrics;
use crate::phone::PhoneNumber;
use crate::store::LeaseStep;
use crate::store::{Metered, PairingStore};
use crate::webhook::Webhooks;

/// How long a command waits for the session to answer. A refresh or a
/// passkey step still in progress then answers with the current state
/// (`starting`; for a passkey step, the stage it has not left yet).
pub const COMMAND_REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Most sessions open at once. Each holds a WhatsApp connection (about
/// 0.7 MiB, see the pairing benchmark); the cap keeps a flood of numbers
/// from exhausting memory or getting the server's address throttled by
/// WhatsApp.
pub const MAX_OPEN_SESSIONS: usize = 1000;

/// Whether a caller started a session or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// A new session was started.
    Created,
    /// An existing session (pending, starting or linked) was joined.
    Existing,
}

/// How long a new session for a phone waits for the previous session of the
/// same phone to let go of its device store (its link client shuts down in
/// well under a second unless WhatsApp is slow to say goodbye). Past this the
/// caller gets `busy` with a `Retry-After`.
pub const PREVIOUS_SESSION_WAIT: Duration = Duration::from_secs(8);

/// How long a look-up waits for the store when this process has no running
/// session for the phone: an answer must not hang on a slow store.
pub const STORE_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Below this many slots the table of running sessions is never shrunk:
/// shrinking small tables would only make the next burst reallocate them.
const LIVE_SHRINK_FLOOR: usize = 64;

/// Where [`Sessions::watch`] finds a phone's states.
#[derive(Debug)]
pub enum StateFeed {
    /// The session runs in this process: every state it commits, the
    /// current one first.
    Live(watch::Receiver<PairState>),
    /// Not running here: its last stored state (an outcome, or a session
    /// whose process is gone, as [`PairState::orphaned`] tells it).
    Stored(Box<PairState>),
}

/// A session whose task is running (it may have ended and still be
/// releasing its link client).
struct Live {
    /// Tells this session apart from a later one for the same phone.
    id: u64,
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<PairState>,
    /// Taken by [`Sessions::shutdown`] to wait for the task.
    task: Option<JoinHandle<()>>,
    /// Closed when the task has ended and released everything it held.
    released: watch::Receiver<()>,
    /// Who started it.
    owner: Owner,
}

/// What the registry knows: the running sessions.
#[derive(Default)]
struct Registry {
    live: HashMap<PhoneNumber, Live>,
    /// How many running sessions each owner has (owners with none are not
    /// listed), so a per-caller cap is checked without a scan.
    open_by_owner: HashMap<Owner, usize>,
    next_id: u64,
}

impl Registry {
    /// Counts a session `owner` just started.
    fn opened_by(&mut self, owner: &Owner) {
        *self.open_by_owner.entry(owner.clone()).or_default() += 1;
    }

    /// Uncounts a session of `owner` that is no longer running.
    fn closed_by(&mut self, owner: &Owner) {
        if let Some(open) = self.open_by_owner.get_mut(owner) {
            *open -= 1;
            if *open == 0 {
                self.open_by_owner.remove(owner);
            }
        }
    }
}

/// Owned by a session's task; when the task ends (or unwinds), removes the
/// session from the running ones (its outcome is in the store) and wakes
/// whoever waits for its device store.
struct Departure {
    registry: Arc<std::sync::Mutex<Registry>>,
    phone: PhoneNumber,
    id: u64,
    owner: Owner,
    /// Set once the session's run returned (ended, handed over or taken
    /// over); still unset when the task unwound.
    finished: bool,
    /// Dropped last: closes every [`Live::released`].
    _released: watch::Sender<()>,
}

impl Departure {
    /// The session's run returned: its task did not unwind.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Departure {
    fn drop(&mut self) {
        let mut registry = lock(&self.registry);
        if registry
            .live
            .get(&self.phone)
            .is_some_and(|live| live.id == self.id)
        {
            registry.live.remove(&self.phone);
        }
        registry.closed_by(&self.owner);
        // A burst of sessions must not leave its table behind once over.
        if registry.live.capacity() > LIVE_SHRINK_FLOOR
            && registry.live.len() * 4 < registry.live.capacity()
        {
            registry.live.shrink_to_fit();
        }
        if !self.finished {
            // The task unwound (a bug): forget it so the next request
            // resumes it from the store rather than serve its frozen state.
            tracing::error!(phone = %self.phone, "session task died; the next request resumes it");
        }
    }
}

/// How often saving a linked device in the database is tried before it is
/// left on disk only (logged).
const DEVICE_SAVE_ATTEMPTS: u32 = 3;
/// Backoff between those attempts.
const DEVICE_SAVE_BACKOFF: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(4));

/// The store of the device `linked` names, as the linker kept it.
async fn read_linked_device(linker: &dyn Linker, linked: &PairState) -> Option<Vec<u8>> {
    let phone = &linked.phone;
    match linker.linked_device(phone).await {
        Ok(Some(device)) => Some(device),
        Ok(None) => {
            tracing::error!(phone = %phone, "linked device has no store to save");
            None
        }
        Err(e) => {
            tracing::error!(phone = %phone, error = %e, "linked device's store not read; not saved");
            None
        }
    }
}

/// Saves `device`, the store of the device `linked` names, in `devices`.
async fn keep_linked_device(devices: &DeviceVault, linked: &PairState, device: &[u8]) {
    let phone = &linked.phone;
    let Some(jid) = linked.jid.as_deref() else {
        return;
    };
    for attempt in 0..DEVICE_SAVE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(DEVICE_SAVE_BACKOFF.ceiling(attempt - 1)).await;
        }
        match devices.save(phone, jid, device, linked.updated_at).await {
            Ok(()) => {
                tracing::info!(phone = %phone, event = "device_saved", "linked device saved in PostgreSQL");
                return;
            }
            Err(e) => {
                tracing::warn!(phone = %phone, error = %e, attempt, "linked device not saved yet");
            }
        }
    }
    tracing::error!(
        phone = %phone,
        event = "device_not_saved",
        "linked device not saved in PostgreSQL; it stays in DATA_DIR only"
    );
}

/// Gives up lease `key` that `holder` took at `epoch` (bounded, best
/// effort: a lease not given up expires after its TTL).
async fn give_lease_up(store: &dyn PairingStore, key: &str, holder: &str, epoch: u64) {
    let step = LeaseStep::Release { holder, epoch };
    let _ = tokio::time::timeout(STORE_READ_TIMEOUT, store.lease(key, step, LEASE_TTL)).await;
}

fn lock(registry: &std::sync::Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    // The registry stays consistent even if a holder panicked: every
    // mutation is a single insert or remove.
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one look at the registry found for a phone.
enum Look {
    /// No running session: look at the store.
    NotRunning,
    /// A session to answer from: joined, or just started.
    Session(Joined, watch::Receiver<PairState>),
    /// An ended session still holding the phone's device store: wait for
    /// this to close, then look again.
    WaitFor(watch::Receiver<()>),
}

/// All sessions of the process, one per phone (single-flight).
pub struct Sessions {
    settings: Arc<SessionSettings>,
    linker: Arc<dyn Linker>,
    store: Arc<dyn PairingStore>,
    registry: Arc<std::sync::Mutex<Registry>>,
    stopping: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    /// Where outcomes are announced, when `WEBHOOK_URL` is set.
    webhooks: Option<Webhooks>,
    /// This process, as the holder of phones' leases: random, so two
    /// processes (or two runs of one) never share it.
    holder: String,
    /// On shutdown, open sessions are handed over to the next process
    /// (stored as `starting`/`handed_over`) instead of ending
    /// `failed`/`interrupted`: set when the store outlives the process.
    hands_over: bool,
    /// Commands relayed to other processes, awaiting their answers.
    relay: relay::Relay,
    /// Where linked devices are saved beside `DATA_DIR` (`DATABASE_URL`).
    devices: Option<Arc<DeviceVault>>,
}

/// Who has a phone's lease, as a start finds it.
enum Leased {
    /// This process: the epoch it holds.
    Here(u64),
    /// Another process runs the phone's session.
    Elsewhere,
    /// The store did not say; a start goes ahead (a store outage must not
    /// stop pairing), without a lease.
    Unknown,
}

/// What a stored session not final reads as when this process can neither
/// find it running elsewhere nor resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unresumed {
    /// Its process's end (`failed`/`interrupted`): a single read.
    AsEnded,
    /// As stored: a follower that will look again.
    AsStored,
}

/// What a start does, after a look at the store.
enum Before {
    /// Answer with this stored outcome.
    Answer(PairState),
    /// A session not final is stored: resume it, or join it where another
    /// process runs it.
    Resume(ReadState),
    /// Start a session.
    Start,
}

/// How many entries the registry holds, for soak tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryCounts {
    /// Sessions whose task is running (ending ones included).
    pub live: usize,
    /// Owners with at least one running session.
    pub owners: usize,
}

impl Sessions {
    /// An empty registry over `store`, which it times and counts in its
    /// [`Metrics`] (see [`Sessions::metrics`]).
    pub fn new(
        settings: SessionSettings,
        linker: Arc<dyn Linker>,
        store: Arc<dyn PairingStore>,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        Self {
            settings: Arc::new(settings),
            linker,
            store: Arc::new(Metered::new(store, Arc::clone(&metrics))),
            registry: Arc::default(),
            stopping: watch::Sender::new(false),
            metrics,
            webhooks: None,
            holder: uuid::Uuid::new_v4().simple().to_string(),
            hands_over: false,
            relay: relay::Relay::default(),
            devices: None,
        }
    }

    /// The same registry, saving every linked device in `devices` right
    /// after its link, and counting a device saved there as linked.
    #[must_use]
    pub fn keeping_devices_in(mut self, devices: Arc<DeviceVault>) -> Self {
        self.devices = Some(devices);
        self
    }

    /// Whether `phone` has a linked device: on this process's disk, or
    /// saved in the device database (bounded; a database that does not
    /// answer does not stop a start).
    async fn has_linked_device(&self, phone: &PhoneNumber) -> bool {
        if self.linker.has_linked_device(phone).await {
            return true;
        }
        let Some(devices) = &self.devices else {
            return false;
        };
        match tokio::time::timeout(STORE_READ_TIMEOUT, devices.has(phone)).await {
            Ok(Ok(saved)) => saved,
            Ok(Err(e)) => {
                tracing::warn!(phone = %phone, error = %e, "device database not asked; starting");
                false
            }
            Err(_) => {
                tracing::warn!(phone = %phone, "device database did not answer in time; starting");
                false
            }
        }
    }

    /// The same registry, handing its open sessions over to the next
    /// process when it stops (for a store other processes share or the
    /// next run reads).
    #[must_use]
    pub fn handing_over_on_stop(mut self) -> Self {
        self.hands_over = true;
        self
    }

    /// The same registry, announcing every session's outcome to `webhooks`.
    #[must_use]
    pub fn announcing_to(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// What the sessions and their store counted.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Connected link clients ready for new sessions.
    pub fn warm_clients(&self) -> usize {
        self.linker.warm_clients()
    }

    /// The store sessions write to (timed and counted).
    pub fn store(&self) -> &Arc<dyn PairingStore> {
        &self.store
    }

    /// How many sessions and outcomes are held right now.
    pub fn counts(&self) -> RegistryCounts {
        let registry = lock(&self.registry);
        RegistryCounts {
            live: registry.live.len(),
            owners: registry.open_by_owner.len(),
        }
    }

    /// `phone`'s state in the store, with its owner tag: `Ok(None)` when
    /// there is none (or it does not parse, which is logged).
    async fn stored(&self, phone: &PhoneNumber) -> Result<Option<ReadState>, SessionError> {
        let key = self.settings.key(phone);
        let read = tokio::time::timeout(STORE_READ_TIMEOUT, self.store.get(&key)).await;
        match read {
            Ok(Ok(Some(json))) => match serde_json::from_str::<ReadState>(&json) {
                Ok(read) => Ok(Some(read)),
                Err(e) => {
                    tracing::error!(phone = %phone, error = %e, "stored state does not parse");
                    Ok(None)
                }
            },
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => {
                tracing::warn!(phone = %phone, error = %e, "store read failed");
                Err(SessionError::StoreUnavailable)
            }
            Err(_) => {
                tracing::warn!(phone = %phone, "store read timed out");
                Err(SessionError::StoreUnavailable)
            }
        }
    }

    /// `phone`'s session as the store has it, if `actor` may see it: an
    /// outcome; a session another process runs, as it stored it; a session
    /// handed over (or left by a process that is gone) resumed here, live;
    /// and one that cannot be resumed as its process's end.
    async fn stored_feed(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<Option<StateFeed>, SessionError> {
        self.stored_view(phone, actor, Unresumed::AsEnded).await
    }

    /// [`stored_feed`](Self::stored_feed), with `unresumed` saying what a
    /// session that runs nowhere and could not be resumed here reads as.
    async fn stored_view(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        unresumed: Unresumed,
    ) -> Result<Option<StateFeed>, SessionError> {
        let Some(read) = self.stored(phone).await? else {
            return Ok(None);
        };
        if !actor.may_touch_tagged(read.owner.as_deref()) {
            // Untagged states predate owners: a user learns nothing of them.
            return match read.owner {
                Some(_) => Err(SessionError::Forbidden),
                None => Ok(None),
            };
        }
        // The registry was looked at first; a session that started since
        // has its own, newer state.
        if let Some(live) = lock(&self.registry).live.get(phone) {
            return Ok(Some(StateFeed::Live(live.state.clone())));
        }
        if !read.state.status.is_terminal() {
            match self.adopt(phone, &read).await {
                Adoption::Here => {
                    if let Some(states) = self.live_states(phone, actor)? {
                        return Ok(Some(StateFeed::Live(states)));
                    }
                }
                // Running in another process: as that process stored it.
                Adoption::Elsewhere => return Ok(Some(StateFeed::Stored(Box::new(read.state)))),
                Adoption::Not if unresumed == Unresumed::AsStored => {
                    return Ok(Some(StateFeed::Stored(Box::new(read.state))));
                }
                Adoption::Not => {}
            }
        }
        Ok(Some(StateFeed::Stored(Box::new(read.state.orphaned()))))
    }

    /// `phone`'s state for an event stream that follows a session another
    /// process runs: as [`get`](Self::get), except that a session this
    /// process could not resume just now (it is stopping or full, the store
    /// was slow) reads as stored, not as ended: the stream looks again.
    pub async fn follow(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<Option<PairState>, SessionError> {
        self.current(phone, actor, Unresumed::AsStored).await
    }

    /// The running session's state, else the stored one as
    /// [`stored_view`](Self::stored_view) reads it.
    async fn current(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        unresumed: Unresumed,
    ) -> Result<Option<PairState>, SessionError> {
        if let Some(running) = self.running(phone, actor)? {
            return Ok(Some(running));
        }
        Ok(self
            .stored_view(phone, actor, unresumed)
            .await?
            .map(|feed| match feed {
                StateFeed::Live(states) => states.borrow().clone(),
                StateFeed::Stored(state) => *state,
            }))
    }

    /// Turns `true` when the service starts stopping.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Joins `phone`'s live (or linked) session, or starts a new one.
    /// Concurrent callers for one phone get one session. A session that has
    /// just ended still holds the phone's device store for a moment; the
    /// new one waits for it (at most [`PREVIOUS_SESSION_WAIT`]).
    ///
    /// A restricted `actor` may only join its own sessions, and start one
    /// only while it has fewer than its limit open.
    ///
    /// A phone whose device is linked is not paired again unless `relink`:
    /// a linked session this process knows is joined, and a device kept
    /// from before (a restart) answers `AlreadyLinked`. With `relink`, a new
    /// session starts and the linked device is set aside.
    pub async fn start_or_join(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        relink: bool,
    ) -> Result<(Joined, watch::Receiver<PairState>), SessionError> {
        let deadline = tokio::time::Instant::now() + PREVIOUS_SESSION_WAIT;
        let mut looked_at_store = false;
        let mut lease = None;
        loop {
            let look = match self.try_start_or_join(phone, actor, relink, looked_at_store, lease) {
                Ok(look) => look,
                Err(error) => {
                    // Not while a session of this process runs the phone:
                    // the lease (this process's) is that session's.
                    let running_here = lock(&self.registry).live.contains_key(phone);
                    if let Some(epoch) = lease.filter(|_| !running_here) {
                        self.release_lease(phone, epoch).await;
                    }
                    return Err(error);
                }
            };
            let mut released = match look {
                Look::Session(joined, state) => return Ok((joined, state)),
                Look::NotRunning => {
                    match self.before_start(phone, actor, relink).await? {
                        Before::Answer(state) => {
                            let (_, state) = watch::channel(state);
                            return Ok((Joined::Existing, state));
                        }
                        Before::Resume(read) => match self.adopt(phone, &read).await {
                            // Runs here now: join it, with the caller's rights.
                            Adoption::Here => continue,
                            Adoption::Elsewhere => {
                                if !actor.may_touch_tagged(read.owner.as_deref()) {
                                    return Err(SessionError::Forbidden);
                                }
                                let (_, state) = watch::channel(read.state);
                                return Ok((Joined::Existing, state));
                            }
                            Adoption::Not => {
                                if !relink && self.has_linked_device(phone).await {
                                    return Err(SessionError::AlreadyLinked);
                                }
                            }
                        },
                        Before::Start => {}
                    }
                    match self.take_lease(phone).await {
                        Leased::Here(epoch) => lease = Some(epoch),
                        Leased::Unknown => lease = None,
                        Leased::Elsewhere => {
                            let state = self.running_elsewhere(phone, actor).await?;
                            let (_, state) = watch::channel(state);
                            return Ok((Joined::Existing, state));
                        }
                    }
                    looked_at_store = true;
                    continue;
                }
                Look::WaitFor(released) => released,
            };
            // The session waited for gives the lease up as it ends: look
            // at the store and take the lease again.
            lease = None;
            looked_at_store = false;
            // `Err` means the sender is gone: released, look again.
            let wait = tokio::time::timeout_at(deadline, released.changed()).await;
            if wait.is_err() {
                tracing::warn!(phone = %phone, "previous session still releasing its link client");
                return Err(SessionError::Busy);
            }
        }
    }

    /// Takes `phone`'s lease for a session about to start here.
    async fn take_lease(&self, phone: &PhoneNumber) -> Leased {
        let step = LeaseStep::Take {
            holder: &self.holder,
        };
        let key = self.settings.lease_key(phone);
        match tokio::time::timeout(STORE_READ_TIMEOUT, self.store.lease(&key, step, LEASE_TTL))
            .await
        {
            Ok(Ok(Some(epoch))) => Leased::Here(epoch),
            Ok(Ok(None)) => Leased::Elsewhere,
            Ok(Err(e)) => {
                tracing::warn!(phone = %phone, error = %e, "lease not taken; starting without one");
                Leased::Unknown
            }
            Err(_) => {
                tracing::warn!(phone = %phone, "lease not taken in time; starting without one");
                Leased::Unknown
            }
        }
    }

    /// Gives up a lease taken for a session that did not start.
    async fn release_lease(&self, phone: &PhoneNumber, epoch: u64) {
        let key = self.settings.lease_key(phone);
        give_lease_up(self.store.as_ref(), &key, &self.holder, epoch).await;
    }

    /// Whether another process holds `phone`'s lease (so its stored state
    /// is that process's running session, not one left behind).
    async fn leased_elsewhere(&self, phone: &PhoneNumber) -> bool {
        let key = self.settings.lease_key(phone);
        matches!(
            tokio::time::timeout(STORE_READ_TIMEOUT, self.store.get(&key)).await,
            Ok(Ok(Some(_)))
        )
    }

    /// The state of `phone`'s session that another process runs: as stored
    /// (`starting` until its first write lands: a final state in the store
    /// is an earlier session's), if `actor` may see it.
    async fn running_elsewhere(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<PairState, SessionError> {
        match self.stored(phone).await? {
            Some(read) if !read.state.status.is_terminal() => {
                if !actor.may_touch_tagged(read.owner.as_deref()) {
                    return Err(SessionError::Forbidden);
                }
                Ok(read.state)
            }
            _ => Ok(PairState::starting(phone.clone())),
        }
    }

    /// With no running session for `phone`: what the store says to do. The
    /// stored outcome to answer with instead of starting (a link, or a
    /// refusal retrying cannot fix), or `AlreadyLinked` for a device kept
    /// from before; a session another process runs, handed over or left
    /// behind, to resume or join; else start one. A store that does not
    /// answer does not stop a start.
    async fn before_start(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        relink: bool,
    ) -> Result<Before, SessionError> {
        if let Ok(Some(read)) = self.stored(phone).await {
            let ended = read.state.status.is_terminal();
            if !ended {
                // Whose it is is checked once it is known where it runs.
                return Ok(Before::Resume(read));
            }
            if (read.state.status == Status::Linked && !relink) || self.holds_failure(&read.state) {
                if !actor.may_touch_tagged(read.owner.as_deref()) {
                    return Err(SessionError::Forbidden);
                }
                return Ok(Before::Answer(read.state));
            }
        }
        if !relink && self.has_linked_device(phone).await {
            return Err(SessionError::AlreadyLinked);
        }
        Ok(Before::Start)
    }

    /// One look under the lock. `looked_at_store`: the store was consulted
    /// since the last look, so a session may start if none runs.
    fn try_start_or_join(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
        relink: bool,
        looked_at_store: bool,
        lease: Option<u64>,
    ) -> Result<Look, SessionError> {
        let mut registry = lock(&self.registry);
        if let Some(live) = registry.live.get(phone) {
            if !actor.may_touch(&live.owner) {
                return Err(SessionError::Forbidden);
            }
            let state = live.state.borrow().clone();
            if !state.status.is_terminal()
                || (state.status == Status::Linked && !relink)
                || self.holds_failure(&state)
            {
                return Ok(Look::Session(Joined::Existing, live.state.clone()));
            }
            return Ok(Look::WaitFor(live.released.clone()));
        }
        if !looked_at_store {
            return Ok(Look::NotRunning);
        }
        if *self.stopping.borrow() {
            return Err(SessionError::ShuttingDown);
        }
        let open = registry.live.len();
        if open >= MAX_OPEN_SESSIONS {
            tracing::warn!(open, "session limit reached; refusing a new session");
            return Err(SessionError::AtCapacity);
        }
        if let Some(limit) = actor.open_limit {
            let mut mine = registry
                .open_by_owner
                .get(&actor.owner)
                .copied()
                .unwrap_or(0);
            if !actor.sees_all {
                // A signed-in user's sessions resumed from another process
                // are counted under their tag.
                let resumed = Owner::tagged(&actor.owner.tag());
                mine += registry.open_by_owner.get(&resumed).copied().unwrap_or(0);
            }
            if mine >= limit {
                tracing::warn!(
                    limit,
                    "caller's session limit reached; refusing a new session"
                );
                return Err(SessionError::TooManySessions { limit });
            }
        }
        let state = self.spawn(&mut registry, phone, actor.owner.clone(), lease, None);
        Ok(Look::Session(Joined::Created, state))
    }

    /// Starts `phone`'s session task for `owner`, holding the lease taken
    /// at `lease`; `resume`: the stored state of a session another process
    /// handed over (or left), which this one goes on with.
    fn spawn(
        &self,
        registry: &mut Registry,
        phone: &PhoneNumber,
        owner: Owner,
        lease: Option<u64>,
        resume: Option<&PairState>,
    ) -> watch::Receiver<PairState> {
        registry.next_id += 1;
        let id = registry.next_id;
        let (session, commands, state) = Session::new(
            phone.clone(),
            Arc::clone(&self.settings),
            Arc::clone(&self.linker),
            Arc::clone(&self.store),
            self.stopping.subscribe(),
        );
        let mut session = session
            .owned_by(owner.tag())
            .metered(Arc::clone(&self.metrics));
        session = match lease {
            Some(epoch) => {
                session.leased(self.settings.lease_key(phone), self.holder.clone(), epoch)
            }
            None => session.leasing_later(self.settings.lease_key(phone), self.holder.clone()),
        };
        if let Some(webhooks) = &self.webhooks {
            session = session.announcing_to(webhooks.clone());
        }
        if self.hands_over {
            session = session.handing_over();
        }
        if let Some(stored) = resume {
            session = session.resuming(stored);
        }
        let (released_tx, released) = watch::channel(());
        let mut departure = Departure {
            registry: Arc::clone(&self.registry),
            phone: phone.clone(),
            id,
            owner: owner.clone(),
            finished: false,
            _released: released_tx,
        };
        self.metrics.session_started();
        let event = if resume.is_some() {
            "session_resumed"
        } else {
            "session_started"
        };
        tracing::info!(phone = %phone, event, "pairing session started");
        let devices = self
            .devices
            .clone()
            .map(|devices| (devices, Arc::clone(&self.linker)));
        let last = state.clone();
        let task = tokio::spawn(async move {
            session.run().await;
            // The link client has closed: its store is complete on disk. It
            // is read before the phone is let go (a relink may replace it
            // after), and saved after (a relink need not wait for that).
            let linked = last.borrow().clone();
            let to_save = match devices {
                Some((devices, linker)) if linked.status == Status::Linked => {
                    read_linked_device(linker.as_ref(), &linked)
                        .await
                        .map(|device| (devices, device))
                }
                _ => None,
            };
            departure.finish();
            drop(departure);
            if let Some((devices, device)) = to_save {
                keep_linked_device(&devices, &linked, &device).await;
            }
        });
        registry.live.insert(
            phone.clone(),
            Live {
                id,
                commands,
                state: state.clone(),
                task: Some(task),
                released,
                owner: owner.clone(),
            },
        );
        registry.opened_by(&owner);
        state
    }

    /// Whether a failed session's outcome should be served again instead of
    /// asking WhatsApp once more: a refusal retrying cannot fix (403, 452)
    /// for as long as the outcome is kept, and giving up for one backoff cap.
    fn holds_failure(&self, state: &PairState) -> bool {
        if state.status != Status::Failed {
            return false;
        }
        let age = OffsetDateTime::now_utc() - state.updated_at;
        match state.reason {
            Some(Reason::WhatsappRefused) => true,
            Some(Reason::GaveUp) => age < self.settings.backoff.cap,
            _ => false,
        }
    }

    /// The current state of `phone`'s session: the running one, else its
    /// outcome from the store. `Forbidden` if `actor` may not see it.
    pub async fn get(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<Option<PairState>, SessionError> {
        self.current(phone, actor, Unresumed::AsEnded).await
    }

    /// `phone`'s state as it changes: the running session's states, or
    /// (no session runs here) the last state stored, which will not change
    /// here.
    pub async fn watch(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<StateFeed, SessionError> {
        {
            let registry = lock(&self.registry);
            if let Some(live) = registry.live.get(phone) {
                if !actor.may_touch(&live.owner) {
                    return Err(SessionError::Forbidden);
                }
                return Ok(StateFeed::Live(live.state.clone()));
            }
        }
        self.stored_feed(phone, actor)
            .await?
            .ok_or(SessionError::NotFound)
    }

    /// The state of `phone`'s running session, if any.
    fn running(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<Option<PairState>, SessionError> {
        let registry = lock(&self.registry);
        let Some(live) = registry.live.get(phone) else {
            return Ok(None);
        };
        if !actor.may_touch(&live.owner) {
            return Err(SessionError::Forbidden);
        }
        Ok(Some(live.state.borrow().clone()))
    }

    /// The states of `phone`'s session running here, if any, and if
    /// `actor` may see it.
    fn live_states(
        &self,
        phone: &PhoneNumber,
        actor: &Actor,
    ) -> Result<Option<watch::Receiver<PairState>>, SessionError> {
        let registry = lock(&self.registry);
        let Some(live) = registry.live.get(phone) else {
            return Ok(None);
        };
        if !actor.may_touch(&live.owner) {
            return Err(SessionError::Forbidden);
        }
        Ok(Some(live.state.clone()))
    }

    /// Stops every session: open ones end as `failed`/`interrupted`. Waits
    /// at most `grace` for them to write their final state and close.
    pub async fn shutdown(&self, grace: Duration) {
        // Under the lock, so no session can start after the flag is seen.
        let tasks: Vec<JoinHandle<()>> = {
            let mut registry = lock(&self.registry);
            self.stopping.send_replace(true);
            registry
                .live
                .values_mut()
                .filter_map(|live| live.task.take())
                .collect()
        };
        let count = tasks.len();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                sessions = count,
                "sessions did not all stop within {grace:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::link::{LinkError, LinkEvent, LinkedAccount};
    use crate::session::testing::{Script, ScriptedLinker, settings};
    use crate::store::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn registry_runs_one_session_per_phone_however_many_join() {
        let script = Arc::new(Script::default());
        let sessions = scripted(Arc::clone(&script));
        let phone = PhoneNumber::parse("628123456789").unwrap();

        let mut joins: Vec<Joined> = Vec::new();
        for _ in 0..50 {
            joins.push(
                sessions
                    .start_or_join(&phone, &anyone(), false)
                    .await
                    .unwrap()
                    .0,
            );
        }
        until_pending(&sessions, &phone).await;

        assert_eq!(joins.iter().filter(|j| **j == Joined::Created).count(), 1);
        assert_eq!(script.opens.load(Ordering::SeqCst), 1);
        assert_eq!(script.requests.load(Ordering::SeqCst), 1);
        sessions.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            sessions
                .get(&phone, &anyone())
                .await
                .unwrap()
                .unwrap()
                .reason,
            Some(Reason::Interrupted)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn registry_refuses_new_phones_beyond_the_cap_but_still_joins_open_ones() {
        let sessions = scripted(Arc::default());
        let phones: Vec<PhoneNumber> = (0..=MAX_OPEN_SESSIONS)
            .map(|n| PhoneNumber::parse(&format!("62812{n:08}")).unwrap())
            .collect();

        for phone in &phones[..MAX_OPEN_SESSIONS] {
            sessions
                .start_or_join(phone, &anyone(), false)
                .await
                .unwrap();
        }
        let refused = sessions
            .start_or_join(&phones[MAX_OPEN_SESSIONS], &anyone(), false)
            .await;
        let joined = sessions.start_or_join(&phones[0], &anyone(), false).await;

        assert_eq!(refused.err(), Some(SessionError::AtCapacity));
        assert_eq!(joined.unwrap().0, Joined::Existing);
        sessions.shutdown(Duration::from_secs(5)).await;
    }

    fn registry(script: &Arc<Script>) -> (Sessions, PhoneNumber) {
        let sessions = scripted(Arc::clone(script));
        (sessions, PhoneNumber::parse("628123456789").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_task_died_is_replaced_not_served_forever() {
        let script = Arc::new(Script::default());
        script.panic_on_open.store(true, Ordering::SeqCst);
        let (sessions, phone) = registry(&script);
        let (_, states) = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .unwrap();
        while states.has_changed().is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        script.panic_on_open.store(false, Ordering::SeqCst);

        let (joined, mut states) = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .unwrap();

        // The dead task's stored `starting` is resumed by a new task.
        assert_eq!(joined, Joined::Existing);
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        sessions.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_session_waits_until_the_cancelled_one_has_let_go_of_the_device() {
        // Arrange
        let script = Arc::new(Script::default());
        *script.slow_shutdown.lock().unwrap() = Duration::from_secs(3);
        let (sessions, phone) = registry(&script);
        until_pending(&sessions, &phone).await;
        sessions.cancel(&phone, &anyone()).await.unwrap();
        let started = tokio::time::Instant::now();

        // Act
        let joined = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .map(|(j, _)| j);

        // Assert
        assert_eq!(joined, Ok(Joined::Created));
        assert!(started.elapsed() >= Duration::from_secs(3), "it waited");
        assert_eq!(
            script.shutdowns.load(Ordering::SeqCst),
            1,
            "the old one let go first"
        );
        sessions.shutdown(Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_session_says_busy_when_the_previous_one_cannot_let_go_in_time() {
        // Arrange
        let script = Arc::new(Script::default());
        *script.slow_shutdown.lock().unwrap() = PREVIOUS_SESSION_WAIT * 2;
        let (sessions, phone) = registry(&script);
        until_pending(&sessions, &phone).await;
        sessions.cancel(&phone, &anyone()).await.unwrap();

        // Act
        let while_closing = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .map(|(j, _)| j);
        tokio::time::sleep(PREVIOUS_SESSION_WAIT * 2).await;
        let after = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .map(|(j, _)| j);

        // Assert
        assert_eq!(while_closing, Err(SessionError::Busy));
        assert_eq!(after, Ok(Joined::Created));
        sessions.shutdown(Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_to_a_session_that_just_ended_gets_its_outcome_not_shutting_down() {
        // Arrange: the cancel's store write is slow, so a refresh queues
        // behind it and is still waiting when the session ends.
        let script = Arc::new(Script::default());
        *script.slow_shutdown.lock().unwrap() = Duration::from_secs(2);
        let sessions = Arc::new(registry(&script).0);
        let phone = PhoneNumber::parse("628123456789").unwrap();
        until_pending(&sessions, &phone).await;

        // Act
        let server = anyone();
        let (cancelled, refreshed, cancelled_again) = tokio::join!(
            sessions.cancel(&phone, &server),
            sessions.refresh(&phone, &server),
            sessions.cancel(&phone, &server)
        );
        let later = sessions.refresh(&phone, &anyone()).await;

        // Assert
        assert_eq!(cancelled.unwrap().status, Status::Cancelled);
        assert_eq!(refreshed, Err(SessionError::Ended("cancelled")));
        assert_eq!(cancelled_again, Err(SessionError::Ended("cancelled")));
        assert_eq!(later, Err(SessionError::Ended("cancelled")));
        sessions.shutdown(Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_session_leaves_the_registry_and_its_outcome_is_read_from_the_store() {
        // Arrange
        let script = Arc::new(Script::default());
        let store = Arc::new(MemoryStore::new());
        let sessions = Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(Arc::clone(&script))),
            Arc::clone(&store) as Arc<dyn PairingStore>,
        );
        let phones: Vec<PhoneNumber> = (0..100)
            .map(|n| PhoneNumber::parse(&format!("62812{n:08}")).unwrap())
            .collect();

        // Act
        for phone in &phones {
            until_pending(&sessions, phone).await;
            sessions.cancel(phone, &anyone()).await.unwrap();
        }
        until_released(&sessions).await;
        let after_cancels = sessions.counts();
        let outcome = sessions.get(&phones[0], &anyone()).await;
        let refresh = sessions.refresh(&phones[0], &anyone()).await;

        // Assert
        assert_eq!(after_cancels.live, 0, "no task, channel or client is left");
        assert_eq!(after_cancels.owners, 0, "no owner count is left");
        assert_eq!(
            outcome.unwrap().map(|state| state.status),
            Some(Status::Cancelled),
            "the outcome comes from the store"
        );
        assert_eq!(refresh, Err(SessionError::Ended("cancelled")));
        assert_eq!(
            store.stored_entries(),
            phones.len() * 3,
            "state, budget and the lease's epoch counter (the lease itself is given up)"
        );
        assert_eq!(
            script.opens.load(Ordering::SeqCst),
            script.shutdowns.load(Ordering::SeqCst),
            "every link client opened was shut down"
        );
    }

    /// Starts (or joins) `phone`'s session and waits for its first code.
    async fn until_pending(sessions: &Sessions, phone: &PhoneNumber) -> watch::Receiver<PairState> {
        let (_, mut states) = sessions
            .start_or_join(phone, &anyone(), false)
            .await
            .unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();
        states
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_linked_device_is_not_paired_again_unless_relinked() {
        let script = Arc::new(Script::default());
        script.linked_device.store(true, Ordering::SeqCst);
        let sessions = scripted(Arc::clone(&script));
        let phone = PhoneNumber::parse("628123456789").unwrap();

        let refused = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .map(|(j, _)| j);
        let forced = sessions
            .start_or_join(&phone, &anyone(), true)
            .await
            .map(|(j, _)| j);

        assert_eq!(refused, Err(SessionError::AlreadyLinked));
        assert_eq!(forced, Ok(Joined::Created));
        assert_eq!(
            script.opens.load(Ordering::SeqCst),
            0,
            "nothing opened when refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_linked_outcome_is_joined_but_a_relink_starts_a_new_session() {
        let script = Arc::new(Script::default());
        let sessions = scripted(Arc::clone(&script));
        let phone = PhoneNumber::parse("628123456789").unwrap();
        until_pending(&sessions, &phone).await;
        script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628123456789:1@s.whatsapp.net".into(),
            lid: None,
            platform: None,
        }));
        until_released(&sessions).await;
        script.linked_device.store(true, Ordering::SeqCst);

        let joined = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .map(|(j, _)| j);
        let relinked = sessions
            .start_or_join(&phone, &anyone(), true)
            .await
            .map(|(j, _)| j);

        assert_eq!(joined, Ok(Joined::Existing));
        assert_eq!(relinked, Ok(Joined::Created));
    }

    /// Sessions over `script`'s linker, default settings, a memory store.
    fn scripted(script: Arc<Script>) -> Sessions {
        Sessions::new(
            settings(),
            Arc::new(ScriptedLinker(script)),
            Arc::new(MemoryStore::new()),
        )
    }

    /// An actor that may do anything (a server caller).
    fn anyone() -> Actor {
        Actor::trusted(Owner::server("key-1"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_can_neither_see_nor_join_nor_command_another_users_session() {
        let sessions = scripted(Arc::default());
        let phone = PhoneNumber::parse("628123456789").unwrap();
        let alice = Actor::restricted(Owner::user("alice"), 5);
        let bob = Actor::restricted(Owner::user("bob"), 5);
        let (_, mut states) = sessions.start_or_join(&phone, &alice, false).await.unwrap();
        states
            .wait_for(|s| s.status == Status::Pending)
            .await
            .unwrap();

        let joined = sessions
            .start_or_join(&phone, &bob, false)
            .await
            .map(|(j, _)| j);
        let read = sessions.get(&phone, &bob).await;
        let refreshed = sessions.refresh(&phone, &bob).await;
        let cancelled = sessions.cancel(&phone, &bob).await;

        assert_eq!(joined, Err(SessionError::Forbidden));
        assert_eq!(read, Err(SessionError::Forbidden));
        assert_eq!(refreshed, Err(SessionError::Forbidden));
        assert_eq!(cancelled, Err(SessionError::Forbidden));
        assert!(matches!(sessions.get(&phone, &alice).await, Ok(Some(_))));
        assert!(matches!(sessions.get(&phone, &anyone()).await, Ok(Some(_))));
        let ended = sessions.cancel(&phone, &alice).await.unwrap();
        assert_eq!(ended.status, Status::Cancelled);
        until_released(&sessions).await;
        assert_eq!(
            sessions.get(&phone, &bob).await,
            Err(SessionError::Forbidden),
            "the outcome keeps its owner too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restricted_caller_opens_at_most_its_limit_and_others_are_not_held_back() {
        let sessions = scripted(Arc::default());
        let phones: Vec<PhoneNumber> = (0..4)
            .map(|n| PhoneNumber::parse(&format!("62812{n:08}")).unwrap())
            .collect();
        let greedy = Actor::restricted(Owner::user("greedy"), 2);
        let other = Actor::restricted(Owner::user("other"), 2);

        sessions
            .start_or_join(&phones[0], &greedy, false)
            .await
            .unwrap();
        sessions
            .start_or_join(&phones[1], &greedy, false)
            .await
            .unwrap();
        let third = sessions
            .start_or_join(&phones[2], &greedy, false)
            .await
            .map(|(j, _)| j);
        let others = sessions
            .start_or_join(&phones[3], &other, false)
            .await
            .map(|(j, _)| j);
        sessions.cancel(&phones[0], &greedy).await.unwrap();
        until_live(&sessions, 2).await;
        let after_one_ended = sessions
            .start_or_join(&phones[2], &greedy, false)
            .await
            .map(|(j, _)| j);

        assert_eq!(third, Err(SessionError::TooManySessions { limit: 2 }));
        assert_eq!(others, Ok(Joined::Created));
        assert_eq!(after_one_ended, Ok(Joined::Created));
    }

    /// Waits until exactly `n` session tasks are left.
    async fn until_live(sessions: &Sessions, n: usize) {
        while sessions.counts().live != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no session task is left.
    async fn until_released(sessions: &Sessions) {
        while sessions.counts().live > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_retrying_cannot_fix_is_served_again_without_asking_whatsapp() {
        let script = Arc::new(Script::default());
        script.push(Err(LinkError::Refused {
            status: 403,
            text: "forbidden".into(),
            backoff: None,
        }));
        let (sessions, phone) = registry(&script);
        let (_, mut states) = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .unwrap();
        states
            .wait_for(|s| s.status == Status::Failed)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;

        let (joined, states) = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .unwrap();

        assert_eq!(joined, Joined::Existing);
        assert_eq!(states.borrow().whatsapp_status, Some(403));
        assert_eq!(script.requests.load(Ordering::SeqCst), 1);
    }

    async fn linked_registry(outcome_ttl: Duration) -> (Sessions, PhoneNumber) {
        let script = Arc::new(Script::default());
        let sessions = Sessions::new(
            SessionSettings {
                outcome_ttl,
                ..settings()
            },
            Arc::new(ScriptedLinker(Arc::clone(&script))),
            Arc::new(MemoryStore::new()),
        );
        let phone = PhoneNumber::parse("628123456789").unwrap();
        let mut states = until_pending(&sessions, &phone).await;
        script.emit(LinkEvent::Linked(LinkedAccount {
            jid: "628123456789:1@s.whatsapp.net".into(),
            lid: None,
            platform: None,
        }));
        states
            .wait_for(|s| s.status == Status::Linked)
            .await
            .unwrap();
        (sessions, phone)
    }

    #[tokio::test]
    async fn a_linked_phone_is_joined_not_relinked_while_its_outcome_is_fresh() {
        let (sessions, phone) = linked_registry(Duration::from_secs(86_400)).await;

        let (joined, states) = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .unwrap();

        assert_eq!(joined, Joined::Existing);
        assert_eq!(states.borrow().status, Status::Linked);
    }

    #[tokio::test]
    async fn an_aged_out_outcome_is_forgotten_and_the_phone_can_link_again() {
        let (sessions, phone) = linked_registry(Duration::ZERO).await;
        until_released(&sessions).await;
        // The store keeps an outcome at least a second.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let (joined, _) = sessions
            .start_or_join(&phone, &anyone(), false)
            .await
            .unwrap();

        assert_eq!(joined, Joined::Created);
        sessions.shutdown(Duration::from_secs(5)).await;
    }
}

//! Key-value storage with TTL for pending pairings.
//!
//! Keys look like `wa:pair:628123456789`; values are JSON text that the
//! caller serializes. Three backends implement [`PairingStore`], each in its
//! own file: [`MemoryStore`] (`memory`: in-process, for development and
//! tests), [`UpstashStore`] (`upstash`: Upstash Redis over its REST API) and
//! [`RedisStore`] (`native_redis`: any Redis server, natively).
//! [`Metered`] (`metered`) wraps either for the metrics.

mod memory;
mod metered;
mod native_redis;
mod upstash;

pub use memory::{MEMORY_PRUNE_MIN_ENTRIES, MemoryStore};
pub use metered::Metered;
pub use native_redis::{REDIS_COMMAND_TIMEOUT, REDIS_CONNECT_TIMEOUT, RedisStore};
pub use upstash::{
    DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_MAX_RETRIES, DEFAULT_REQUEST_TIMEOUT,
    MAX_CONNECT_TIMEOUT, MAX_RETRY_AFTER_WAIT, UpstashSettings, UpstashStore,
};

use std::time::Duration;

/// What a failed store operation went wrong with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store refused the credentials (HTTP 401 or 403).
    #[error("store refused the credentials (HTTP 401/403); check the configured token")]
    Unauthorized,
    /// The store is throttling us (HTTP 429 or an exhausted request quota).
    #[error(
        "store rate limit reached{}",
        .retry_after.map(|wait| format!(" (retry after {wait:?})")).unwrap_or_default()
    )]
    RateLimited {
        /// How long the store asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The store failed internally (HTTP 5xx).
    #[error("store server error (HTTP {status}): {message}")]
    Server {
        /// HTTP status code.
        status: u16,
        /// Error text from the store, shortened.
        message: String,
    },
    /// The store refused the command (other 4xx, or a 2xx carrying `{"error":..}`).
    #[error("store rejected the command (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status code.
        status: u16,
        /// Error text from the store, shortened.
        message: String,
    },
    /// The store did not answer within the request timeout.
    #[error("store request timed out")]
    Timeout,
    /// The store could not be reached (DNS, connect, TLS, broken connection).
    #[error("could not reach the store: {0}")]
    Transport(String),
    /// The store answered with something that is not a valid reply.
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
    /// The store settings are unusable (bad URL, empty token, zero timeout).
    #[error("invalid store settings: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether trying the same operation again later may succeed.
    ///
    /// `RateLimited`, `Server`, `Timeout` and `Transport` are transient;
    /// `Unauthorized`, `Rejected`, `Protocol` and `Config` will fail the same
    /// way every time.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Timeout | Self::Transport(_)
        )
    }

    /// The wait the store asked for, if this is a rate limit that said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// A key-value store with per-key expiry that holds pairing records.
#[async_trait::async_trait]
pub trait PairingStore: Send + Sync + 'static {
    /// Writes `value` under `key`, expiring after `ttl` (whole seconds, at least 1).
    ///
    /// A sub-second remainder rounds up, so an entry never expires earlier
    /// than asked; a zero `ttl` becomes one second. Overwriting a key resets
    /// its expiry.
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Writes the pairing state `value`, numbered `seq` (its `"seq"` field),
    /// under `key` with expiry `ttl`, unless the state stored there has a
    /// higher `"seq"`: a write that arrived late never replaces a newer
    /// state. With `lease`, only while the writer still holds that lease,
    /// which the write renews: a process that lost a phone to another
    /// writes nothing more for it. One store command (a script where the
    /// store is Redis). A state with the same number is written again (a
    /// retry of the same write).
    async fn set_state(
        &self,
        key: &str,
        value: &str,
        seq: u64,
        ttl: Duration,
        lease: Option<HeldLease<'_>>,
    ) -> Result<Written, StoreError>;

    /// Reads the value under `key`; `None` when it is missing or expired.
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Cheap reachability check for readiness probes.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Counts one more event under `key`, in a window of `window` that opens
    /// with its first event (a fixed window: later events do not extend it).
    /// Returns the count, this event included, and the time the window has
    /// left. One store command.
    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError>;

    /// One step of the lease `key` (who runs a phone's session when
    /// several processes share the store): see [`LeaseStep`]. `Some(epoch)`
    /// when the step succeeded, `None` when another holder has the lease
    /// (take) or it is no longer `holder`'s with that epoch (renew,
    /// release). One store command (a script where the store is Redis).
    async fn lease(
        &self,
        key: &str,
        step: LeaseStep<'_>,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError>;

    /// Writes the state of a session this process hands over as it stops,
    /// lists the phone in the index of handed-over sessions and gives the
    /// writer's lease up: all or nothing, in one store command (a script
    /// where the store is Redis). The same rules as
    /// [`set_state`](Self::set_state): a newer state is not replaced, and a
    /// lost lease writes nothing.
    async fn hand_over(&self, handover: HandOver<'_>) -> Result<Written, StoreError>;

    /// The phones listed in the index `index` (handed over, not resumed
    /// yet), the soonest deadline first, at most [`HANDED_OVER_LISTED`].
    /// Entries whose deadline passed a day ago are dropped on the way. One
    /// store command.
    async fn handed_over(&self, index: &str) -> Result<Vec<String>, StoreError>;

    /// Takes `phone` off the index `index` (resumed, or nothing left to
    /// resume). One store command.
    async fn unlist(&self, index: &str, phone: &str) -> Result<(), StoreError>;

    /// Publishes `message` on `channel` (pub/sub between the processes
    /// sharing the store); returns how many subscribers received it. One
    /// store command.
    async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError>;

    /// Subscribes to `channel`: its messages arrive on the receiver until
    /// the subscription breaks or is renewed (the receiver then ends:
    /// subscribe again) or the receiver is dropped (the subscription ends).
    async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError>;

    /// Short name for logs and /readyz ("memory", "upstash").
    fn kind(&self) -> &'static str;
}

/// The messages of one subscription, in order.
pub type Subscription = tokio::sync::mpsc::Receiver<String>;

/// How long one subscription is kept before the store ends it (its reader
/// subscribes again): a connection that died without a word would
/// otherwise leave a process deaf for good. On Upstash each renewal is one
/// command.
pub const SUBSCRIPTION_RENEW_EVERY: Duration = Duration::from_secs(600);

/// Messages a subscription holds that its reader has not taken yet: a
/// reader that falls this far behind loses the subscription (and
/// subscribes again) rather than letting it grow.
pub const SUBSCRIPTION_BUFFER: usize = 256;

/// A session's last state in a process that stops, for
/// [`PairingStore::hand_over`].
#[derive(Debug, Clone, Copy)]
pub struct HandOver<'a> {
    /// The state's key.
    pub key: &'a str,
    /// The state (JSON).
    pub value: &'a str,
    /// Its `seq`.
    pub seq: u64,
    /// How long it is kept.
    pub ttl: Duration,
    /// The writer's lease, given up by the write; `None` for a session that
    /// started without one.
    pub lease: Option<HeldLease<'a>>,
    /// The index of handed-over sessions.
    pub index: &'a str,
    /// The phone, as listed in the index.
    pub phone: &'a str,
    /// The session's deadline (milliseconds since 1970): the index's order.
    pub deadline_ms: u64,
}

/// Most phones one look at the index of handed-over sessions returns: a
/// process resumes at most its session cap anyway, and the next look finds
/// the rest.
pub const HANDED_OVER_LISTED: usize = 1000;

/// How long the index of handed-over sessions outlives its last entry, and
/// how long past its deadline an entry nobody resumed is kept: a day.
pub(crate) const HANDED_OVER_INDEX_TTL_MS: u64 = 86_400_000;

/// Hands a session over in one step: `KEYS[1]` the state, `KEYS[2]` the
/// index of handed-over sessions, `KEYS[3]` (optional) the writer's lease;
/// `ARGV[1]` the JSON, `ARGV[2]` its `seq`, `ARGV[3]` its TTL in seconds,
/// `ARGV[4]` the phone, `ARGV[5]` its deadline in milliseconds (the score),
/// `ARGV[6]` the index's TTL in milliseconds, `ARGV[7]` the lease's value
/// while the writer holds it. Returns what [`SET_STATE_SCRIPT`] returns;
/// only a written state is listed and its lease deleted.
pub(crate) const HAND_OVER_SCRIPT: &str = "if KEYS[3] then \
if redis.call('GET', KEYS[3]) ~= ARGV[7] then return -2 end end \
local current = redis.call('GET', KEYS[1]) \
if current then \
local stored = tonumber(string.match(current, '\"seq\":(%d+)')) \
if stored and stored > tonumber(ARGV[2]) then return stored end end \
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3]) \
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4]) \
redis.call('PEXPIRE', KEYS[2], ARGV[6]) \
if KEYS[3] then redis.call('DEL', KEYS[3]) end \
return -1";

/// Lists the index of handed-over sessions: `KEYS[1]` the index; `ARGV[1]`
/// the score below which entries are dropped, `ARGV[2]` the last rank
/// returned.
pub(crate) const HANDED_OVER_SCRIPT: &str = "\
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1]) \
return redis.call('ZRANGE', KEYS[1], 0, ARGV[2])";

/// The score below which [`HANDED_OVER_SCRIPT`] drops an entry: a day ago.
pub(crate) fn handed_over_floor_ms() -> u64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    u64::try_from(now)
        .unwrap_or(0)
        .saturating_sub(HANDED_OVER_INDEX_TTL_MS)
}

/// A lease a writer holds, checked and renewed by its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease<'a> {
    /// The lease's key.
    pub key: &'a str,
    /// Who holds it.
    pub holder: &'a str,
    /// The epoch it was taken at.
    pub epoch: u64,
    /// How long it lasts from this write.
    pub ttl: Duration,
}

impl HeldLease<'_> {
    /// The lease's value while this writer holds it.
    fn value(&self) -> String {
        lease_value(self.holder, self.epoch)
    }
}

/// A lease's stored value while `holder` has it at `epoch`: `holder|epoch`
/// (what [`LEASE_SCRIPT`] writes and compares).
fn lease_value(holder: &str, epoch: u64) -> String {
    format!("{holder}|{epoch}")
}

/// A step of a lease, held by one process (`holder`, unique per process)
/// and numbered by an epoch that grows with every new holder, so a holder
/// can tell whether it still has the lease it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep<'a> {
    /// Take the lease for `ttl` if nobody has it (a new epoch), or extend
    /// it if `holder` has it already (the same epoch).
    Take {
        /// Who takes it.
        holder: &'a str,
    },
    /// Extend the lease for `ttl`, if `holder` still has it at `epoch`.
    Renew {
        /// Who holds it.
        holder: &'a str,
        /// The epoch it was taken at.
        epoch: u64,
    },
    /// Give the lease up, if `holder` still has it at `epoch`.
    Release {
        /// Who holds it.
        holder: &'a str,
        /// The epoch it was taken at.
        epoch: u64,
    },
}

impl LeaseStep<'_> {
    /// The script's arguments after the keys: step, holder, epoch.
    fn script_args(self) -> [String; 3] {
        match self {
            Self::Take { holder } => ["take".into(), holder.into(), "0".into()],
            Self::Renew { holder, epoch } => ["renew".into(), holder.into(), epoch.to_string()],
            Self::Release { holder, epoch } => ["release".into(), holder.into(), epoch.to_string()],
        }
    }
}

/// The key that numbers the epochs of lease `key`.
pub(crate) fn lease_epoch_key(key: &str) -> String {
    format!("{key}:epoch")
}

/// How long a lease's epoch counter outlives its last take: a day, so an
/// idle phone leaves nothing behind, and epochs grow while leases of a
/// phone come and go.
const LEASE_EPOCH_TTL_MS: u64 = 86_400_000;

/// One step of a lease: `KEYS[1]` the lease (`holder|epoch`), `KEYS[2]` its
/// epoch counter; `ARGV[1]` `take`, `renew` or `release`, `ARGV[2]` the
/// holder, `ARGV[3]` the epoch (renew, release), `ARGV[4]` the TTL in
/// milliseconds, `ARGV[5]` the counter's. Returns the epoch, or 0 when the
/// lease is another's. Plain string functions only (see
/// [`SET_STATE_SCRIPT`]).
pub(crate) const LEASE_SCRIPT: &str = "local current = redis.call('GET', KEYS[1]) local mine = ARGV[2] .. '|' if ARGV[1] == 'take' then if current then if string.sub(current, 1, #mine) == mine then redis.call('PEXPIRE', KEYS[1], ARGV[4]) return tonumber(string.sub(current, #mine + 1)) end return 0 end local epoch = redis.call('INCR', KEYS[2]) redis.call('PEXPIRE', KEYS[2], ARGV[5]) redis.call('SET', KEYS[1], mine .. epoch, 'PX', ARGV[4]) return epoch end if current ~= mine .. ARGV[3] then return 0 end if ARGV[1] == 'renew' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) else redis.call('DEL', KEYS[1]) end return tonumber(ARGV[3])";

/// The TTL in whole milliseconds, at least 1.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What [`PairingStore::set_state`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The state is stored.
    Stored,
    /// A newer state is stored (numbered `current`); this one was not.
    Stale {
        /// The `seq` of the state the store holds.
        current: u64,
    },
    /// The writer's lease is another's now: nothing was written.
    LeaseLost,
}

impl Written {
    /// `Written` from a set-state script's reply: -1 for stored, -2 for a
    /// lost lease, else the newer `seq` it found.
    fn from_script(reply: i64) -> Self {
        match u64::try_from(reply) {
            Ok(current) => Self::Stale { current },
            Err(_) if reply == -2 => Self::LeaseLost,
            Err(_) => Self::Stored,
        }
    }
}

/// What [`PairingStore::count`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Events in the window, the one just counted included.
    pub count: u64,
    /// Until the window closes and the count starts again from zero.
    pub window_left: Duration,
}

/// Counts and opens the window in one step, so two replicas counting at once
/// cannot both see a fresh key, and a key never lives on without expiry.
/// A key left without a TTL (written by hand) gets one.
pub(crate) const COUNT_SCRIPT: &str = "local n = redis.call('INCR', KEYS[1]) \
local ttl = redis.call('TTL', KEYS[1]) \
if ttl < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) ttl = tonumber(ARGV[1]) end \
return {n, ttl}";

/// Writes a state unless a newer one is stored: `KEYS[1]` the key,
/// `ARGV[1]` the JSON, `ARGV[2]` its `seq`, `ARGV[3]` the TTL in seconds;
/// with a lease, `KEYS[2]` the lease, `ARGV[4]` its value while the writer
/// holds it and `ARGV[5]` its TTL in milliseconds (renewed by the write).
/// Returns -1 when written, -2 when the lease is another's (nothing
/// written), else the stored (newer) `seq`. A stored value without a `seq`
/// (written by an older build, or by hand) is replaced.
///
/// The stored number is found with a string pattern, not `cjson`: plain
/// Lua string functions run on every Redis and on Upstash's engine, whose
/// Lua libraries are not Redis's. Our JSON is compact and writes `seq`
/// before any free text (`message`), so the first `"seq":<digits>` is the
/// state's own. Numbers stay exact in Lua's doubles up to 2^53
/// (microseconds: the year 2255).
pub(crate) const SET_STATE_SCRIPT: &str = "if KEYS[2] then \
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return -2 end \
redis.call('PEXPIRE', KEYS[2], ARGV[5]) end \
local current = redis.call('GET', KEYS[1]) \
if current then \
local stored = tonumber(string.match(current, '\"seq\":(%d+)')) \
if stored and stored > tonumber(ARGV[2]) then return stored end end \
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3]) \
return -1";

/// The `seq` of a stored state, if it has one.
fn stored_seq(value: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Numbered {
        seq: Option<u64>,
    }
    serde_json::from_str::<Numbered>(value).ok()?.seq
}

/// The TTL in whole seconds as sent to the store: rounded up, at least 1.
fn ttl_seconds(ttl: Duration) -> u64 {
    let whole = ttl.as_secs();
    let rounded = if ttl.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    };
    rounded.max(1)
}

/// Asks `store` whether it answers within `timeout`, logging why not.
/// Shared by the startup check and `/readyz`, so both say the same thing
/// (in particular the clear line for a rejected token).
pub async fn probe(store: &dyn PairingStore, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, store.ping()).await {
        Ok(Ok(())) => true,
        Ok(Err(StoreError::Unauthorized)) => {
            tracing::error!(
                store = store.kind(),
                "the store rejected our credentials: check UPSTASH_REDIS_REST_TOKEN, or the password in REDIS_URL"
            );
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(store = store.kind(), error = %e, "store not reachable");
            false
        }
        Err(_) => {
            tracing::warn!(
                store = store.kind(),
                "store did not answer within {timeout:?}"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn both_stores_can_be_shared_as_trait_objects() {
        // Arrange
        let upstash = UpstashStore::new(UpstashSettings::new("http://127.0.0.1:9", "t0ken"))
            .expect("valid settings");

        // Act
        let stores: Vec<Arc<dyn PairingStore>> =
            vec![Arc::new(MemoryStore::new()), Arc::new(upstash)];

        // Assert
        let kinds: Vec<&str> = stores.iter().map(|store| store.kind()).collect();
        assert_eq!(kinds, ["memory", "upstash"]);
    }

    // StoreError

    #[test]
    fn only_transient_errors_are_retryable() {
        // Arrange
        let transient = [
            StoreError::RateLimited { retry_after: None },
            StoreError::Server {
                status: 503,
                message: String::new(),
            },
            StoreError::Timeout,
            StoreError::Transport(String::new()),
        ];
        let permanent = [
            StoreError::Unauthorized,
            StoreError::Rejected {
                status: 400,
                message: String::new(),
            },
            StoreError::Protocol(String::new()),
            StoreError::Config(String::new()),
        ];

        // Act
        let transient_flags: Vec<bool> = transient.iter().map(StoreError::is_retryable).collect();
        let permanent_flags: Vec<bool> = permanent.iter().map(StoreError::is_retryable).collect();

        // Assert
        assert!(transient_flags.iter().all(|retryable| *retryable));
        assert!(permanent_flags.iter().all(|retryable| !retryable));
    }

    #[test]
    fn a_rate_limit_error_mentions_the_requested_wait() {
        // Arrange
        let error = StoreError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        };

        // Act
        let shown = error.to_string();

        // Assert
        assert!(shown.contains("retry after 7s"), "{shown}");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn ttl_seconds_rounds_up_and_is_at_least_one() {
        // Arrange
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_secs(600), 600),
            (Duration::from_millis(600_001), 601),
            (Duration::MAX, u64::MAX),
        ];

        for (ttl, expected) in cases {
            // Act
            let seconds = ttl_seconds(ttl);

            // Assert
            assert_eq!(seconds, expected, "{ttl:?}");
        }
    }
}

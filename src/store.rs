//! Key-value storage with TTL for pending pairings.
//!
//! Keys look like `wa:pair:628123456789`; values are JSON text that the
//! caller serializes. Two backends implement [`PairingStore`]:
//! [`MemoryStore`] (in-process, for development and tests) and
//! [`UpstashStore`] (Upstash Redis over its REST API).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::retry::Backoff;

/// Default per-request timeout for Upstash calls.
///
/// Readiness probes and `POST /pair` must not hang on a slow Upstash; a
/// healthy Upstash answers in tens of milliseconds, so 5 s only cuts off
/// requests that are already broken.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Default number of retries after the first attempt of an Upstash command.
///
/// Bounded so that a transient blip is absorbed but a real outage surfaces
/// quickly; every retry also spends the free plan's daily request budget.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Default upper bound of the delay before the first retry.
///
/// Short enough that a single lost packet costs the user little, long
/// enough that an overloaded server gets a moment to recover.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Default upper bound of any single retry delay.
///
/// With the default base and retries the jittered sleeps add up to at most
/// 1.4 s (0.2 + 0.4 + 0.8), keeping the retry overhead of a request small.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Upper bound of the TCP/TLS connect phase (never more than the request timeout).
///
/// A handshake to Upstash's edge normally takes well under a second; giving
/// up on a dead endpoint early leaves time in the request budget to retry.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest server-requested wait (`Retry-After`) that a retry will sleep through.
///
/// A longer requested wait is handed back to the caller as
/// [`StoreError::RateLimited`] with the hint, instead of parking an HTTP
/// handler for that long; the caller can pass the hint on to its own client.
pub const MAX_RETRY_AFTER_WAIT: Duration = Duration::from_secs(3);

/// Number of stored entries below which [`MemoryStore`] never prunes.
///
/// Pruning scans the whole map, so it only runs when the map has doubled
/// since the last prune (or reached this floor); that keeps writes amortised
/// O(1) while bounding memory to about twice the live entries.
pub const MEMORY_PRUNE_MIN_ENTRIES: usize = 1024;

/// Largest Upstash reply body that is read into memory.
///
/// Pairing records are a few hundred bytes; anything near this size is a
/// misbehaving server or proxy, not a pairing record.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Longest server error message kept in a [`StoreError`].
///
/// Error text ends up in logs; an HTML error page from a proxy would
/// otherwise flood them.
const MAX_ERROR_MESSAGE_CHARS: usize = 256;

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

    /// Short name for logs and /readyz ("memory", "upstash").
    fn kind(&self) -> &'static str;
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
const COUNT_SCRIPT: &str = "local n = redis.call('INCR', KEYS[1]) \
local ttl = redis.call('TTL', KEYS[1]) \
if ttl < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) ttl = tonumber(ARGV[1]) end \
return {n, ttl}";

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

/// In-process [`PairingStore`] for development, tests and single-instance runs.
///
/// Expiry uses [`tokio::time::Instant`], so tests running with paused time
/// can move past a TTL with `tokio::time::advance` (tokio `test-util`).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    entries: HashMap<String, MemoryEntry>,
    /// Entry count at which the next write prunes expired entries.
    prune_at: usize,
}

#[derive(Debug)]
struct MemoryEntry {
    value: String,
    /// `None` when `now + ttl` is beyond what an `Instant` can represent.
    expires_at: Option<Instant>,
}

impl MemoryEntry {
    fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

impl MemoryInner {
    fn prune_if_due(&mut self, now: Instant) {
        if self.entries.len() < self.prune_at {
            return;
        }
        self.entries.retain(|_, entry| !entry.is_expired(now));
        self.prune_at = self
            .entries
            .len()
            .saturating_mul(2)
            .max(MEMORY_PRUNE_MIN_ENTRIES);
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remaining time to live of `key`; `None` when it is missing or expired.
    ///
    /// For tests and debugging. An entry whose expiry lies beyond what the
    /// clock can represent reports `Duration::MAX`.
    pub fn ttl_of(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let inner = self.lock();
        let entry = inner.entries.get(key)?;
        if entry.is_expired(now) {
            return None;
        }
        Some(
            entry
                .expires_at
                .map_or(Duration::MAX, |at| at.saturating_duration_since(now)),
        )
    }

    /// Number of entries held in memory, including expired ones not yet pruned.
    ///
    /// For tests and metrics: shows that pruning keeps memory bounded.
    pub fn stored_entries(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        // No critical section can panic half-way, so a poisoned map is still
        // consistent; recovering avoids turning one panic into many.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl PairingStore for MemoryStore {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let expires_at = now.checked_add(Duration::from_secs(ttl_seconds(ttl)));
        let mut inner = self.lock();
        inner.prune_if_due(now);
        inner.entries.insert(
            key.to_owned(),
            MemoryEntry {
                value: value.to_owned(),
                expires_at,
            },
        );
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let expired = match inner.entries.get(key) {
            None => return Ok(None),
            Some(entry) if !entry.is_expired(now) => return Ok(Some(entry.value.clone())),
            Some(_) => true,
        };
        if expired {
            inner.entries.remove(key);
        }
        Ok(None)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.lock().entries.remove(key);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune_if_due(now);
        let live = inner
            .entries
            .get(key)
            .filter(|entry| !entry.is_expired(now))
            .map(|entry| (entry.value.parse::<u64>().unwrap_or(0), entry.expires_at));
        let (count, expires_at) = match live {
            Some((count, expires_at)) => (count.saturating_add(1), expires_at),
            None => (1, now.checked_add(Duration::from_secs(ttl_seconds(window)))),
        };
        inner.entries.insert(
            key.to_owned(),
            MemoryEntry {
                value: count.to_string(),
                expires_at,
            },
        );
        Ok(Counted {
            count,
            window_left: expires_at.map_or(Duration::MAX, |at| at.saturating_duration_since(now)),
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// Connection settings for [`UpstashStore`].
#[derive(Clone)]
pub struct UpstashSettings {
    /// REST endpoint, e.g. `https://eu1-example-12345.upstash.io`.
    pub base_url: String,
    /// REST token, sent as `Authorization: Bearer <token>`; never logged.
    pub token: String,
    /// Limit for one HTTP request, connect to last byte.
    pub request_timeout: Duration,
    /// Retries after the first attempt for transient failures (not for `ping`).
    pub max_retries: u32,
    /// Delay policy between retries.
    pub backoff: Backoff,
}

impl UpstashSettings {
    /// Settings for `base_url` and `token` with the default timeout, retries and backoff.
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            token: token.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            backoff: Backoff::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP),
        }
    }

    /// Longest a retried operation can take before it returns, every attempt
    /// timing out and every retry waiting its longest.
    ///
    /// Useful for sizing an outer handler timeout. With the defaults this is
    /// 4 × 5 s of requests plus 3 × 3 s of waits = 29 s; failures that come
    /// back fast (5xx, refused connections) cost at most the 1.4 s of backoff.
    pub fn worst_case_latency(&self) -> Duration {
        let attempts = self.max_retries.saturating_add(1);
        let requests = self.request_timeout.saturating_mul(attempts);
        (0..self.max_retries)
            .map(|attempt| self.backoff.ceiling(attempt).max(MAX_RETRY_AFTER_WAIT))
            .fold(requests, Duration::saturating_add)
    }
}

impl std::fmt::Debug for UpstashSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstashSettings")
            .field("base_url", &self.base_url)
            .field("token", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// [`PairingStore`] backed by Upstash Redis over its REST API.
///
/// Each operation is exactly one `POST` of the command as a JSON array when
/// it succeeds first time, because the free plan has a daily request budget.
/// Transient failures of `set`, `get` and `delete` are retried (all three
/// are idempotent); `ping` never is, so readiness probes stay fast.
#[derive(Clone)]
pub struct UpstashStore {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    /// Kept only to scrub it from error text that the server might echo.
    token: String,
    request_timeout: Duration,
    max_retries: u32,
    backoff: Backoff,
}

impl std::fmt::Debug for UpstashStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstashStore")
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// A failed attempt and whether the retry loop may try again.
struct Failure {
    error: StoreError,
    retry: bool,
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        let retry = error.is_retryable();
        Self { error, retry }
    }
}

impl UpstashStore {
    /// Validates `settings` and builds the HTTP client (once; it is reused).
    ///
    /// Fails with [`StoreError::Config`] for a malformed or non-HTTP(S)
    /// `base_url`, an empty token, a token that cannot go in an HTTP header,
    /// or a zero `request_timeout`. The error text never contains the token.
    pub fn new(settings: UpstashSettings) -> Result<Self, StoreError> {
        let UpstashSettings {
            base_url,
            token,
            request_timeout,
            max_retries,
            backoff,
        } = settings;

        let endpoint = reqwest::Url::parse(base_url.trim_end_matches('/')).map_err(|err| {
            StoreError::Config(format!("base_url {base_url:?} is invalid: {err}"))
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(StoreError::Config(format!(
                "base_url {base_url:?} must use http or https"
            )));
        }
        if token.trim().is_empty() {
            return Err(StoreError::Config("token is empty".to_owned()));
        }
        if request_timeout.is_zero() {
            return Err(StoreError::Config(
                "request_timeout must be positive".to_owned(),
            ));
        }

        let mut authorization = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| {
                StoreError::Config("token contains characters not allowed in a header".to_owned())
            })?;
        authorization.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, authorization);

        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(MAX_CONNECT_TIMEOUT))
            // A redirect would cost another request from the daily budget and
            // could carry the bearer token elsewhere; Upstash never sends one.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| StoreError::Config(format!("cannot build HTTP client: {err}")))?;

        Ok(Self {
            client,
            endpoint,
            token,
            request_timeout,
            max_retries,
            backoff,
        })
    }

    /// Runs `command`, retrying transient failures up to `max_retries` times.
    async fn run(
        &self,
        op: &'static str,
        key: Option<&str>,
        command: &[&str],
        max_retries: u32,
    ) -> Result<Value, StoreError> {
        let mut attempt: u32 = 0;
        loop {
            let failure = match self.send_once(command).await {
                Ok(result) => return Ok(result),
                Err(failure) => failure,
            };
            let hint = failure.error.retry_after();
            let hint_too_long = hint.is_some_and(|wait| wait > MAX_RETRY_AFTER_WAIT);
            if !failure.retry || attempt >= max_retries || hint_too_long {
                return Err(failure.error);
            }
            let delay = self.next_delay(attempt, hint);
            attempt = attempt.saturating_add(1);
            tracing::warn!(
                op,
                attempt,
                max_retries,
                key = %key.map(mask_key).unwrap_or_default(),
                error = %failure.error,
                ?delay,
                "retrying Upstash command after a transient failure"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Kept out of `run` so the thread-local RNG is never held across an await.
    fn next_delay(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        self.backoff
            .delay_honouring(attempt, hint, &mut rand::rng())
    }

    /// One HTTP round trip; returns the reply's `result`.
    async fn send_once(&self, command: &[&str]) -> Result<Value, Failure> {
        let response = self
            .client
            .post(self.endpoint.clone())
            .json(command)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers());
        let body = read_body(response).await?;
        classify(status, retry_after, &body).map_err(|mut failure| {
            scrub_token(&mut failure.error, &self.token);
            failure
        })
    }
}

#[async_trait::async_trait]
impl PairingStore for UpstashStore {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let seconds = ttl_seconds(ttl).to_string();
        let command = ["SET", key, value, "EX", seconds.as_str()];
        match self
            .run("SET", Some(key), &command, self.max_retries)
            .await?
        {
            Value::String(reply) if reply == "OK" => Ok(()),
            other => Err(unexpected("SET", "\"OK\"", &other)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self
            .run("GET", Some(key), &["GET", key], self.max_retries)
            .await?
        {
            Value::String(value) => Ok(Some(value)),
            Value::Null => Ok(None),
            other => Err(unexpected("GET", "a string or null", &other)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self
            .run("DEL", Some(key), &["DEL", key], self.max_retries)
            .await?
        {
            Value::Number(_) => Ok(()),
            other => Err(unexpected("DEL", "a count", &other)),
        }
    }

    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError> {
        let seconds = ttl_seconds(window).to_string();
        let command = ["EVAL", COUNT_SCRIPT, "1", key, seconds.as_str()];
        // Not retried: a retry after a lost answer would count twice.
        let reply = self.run("EVAL", Some(key), &command, 0).await?;
        let numbers = match &reply {
            Value::Array(items) if items.len() == 2 => items
                .iter()
                .map(Value::as_u64)
                .collect::<Option<Vec<u64>>>(),
            _ => None,
        };
        match numbers.as_deref() {
            Some(&[count, ttl]) => Ok(Counted {
                count,
                window_left: Duration::from_secs(ttl),
            }),
            _ => Err(unexpected("EVAL", "[count, ttl]", &reply)),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self.run("PING", None, &["PING"], 0).await? {
            Value::String(reply) if reply == "PONG" => Ok(()),
            other => Err(unexpected("PING", "\"PONG\"", &other)),
        }
    }

    fn kind(&self) -> &'static str {
        "upstash"
    }
}

/// Maps a reqwest failure; the URL is dropped in case it embeds credentials.
fn transport_error(err: reqwest::Error) -> Failure {
    if err.is_timeout() {
        return StoreError::Timeout.into();
    }
    let err = err.without_url();
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    StoreError::Transport(message).into()
}

/// Reads the reply body, refusing bodies over [`MAX_RESPONSE_BYTES`].
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
            return Err(StoreError::Protocol(format!(
                "reply is larger than {MAX_RESPONSE_BYTES} bytes"
            ))
            .into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` in delta-seconds form; the HTTP-date form is ignored.
fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let raw = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    raw.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Turns an HTTP status and body into the reply's `result` or a failure.
fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Result<Value, Failure> {
    if matches!(status, 401 | 403) {
        return Err(StoreError::Unauthorized.into());
    }
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let error_text = parsed
        .as_ref()
        .ok()
        .and_then(|reply| reply.get("error"))
        .map(|error| match error {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        });

    if let Some(text) = &error_text
        && is_quota_exhausted(text)
    {
        // Retrying a spent daily budget within seconds cannot succeed.
        return Err(Failure {
            error: StoreError::RateLimited { retry_after },
            retry: false,
        });
    }
    if status == 429 {
        return Err(StoreError::RateLimited { retry_after }.into());
    }
    if !(200..=299).contains(&status) {
        let message =
            shorten(&error_text.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()));
        let error = if (500..=599).contains(&status) {
            StoreError::Server { status, message }
        } else {
            StoreError::Rejected { status, message }
        };
        return Err(error.into());
    }

    // The body of a 2xx may hold a stored value, so it never goes into the error.
    let mut reply = match parsed {
        Ok(Value::Object(reply)) => reply,
        Ok(other) => {
            return Err(StoreError::Protocol(format!(
                "reply is {} instead of a JSON object",
                json_kind(&other)
            ))
            .into());
        }
        Err(err) => {
            return Err(StoreError::Protocol(format!(
                "reply of {} bytes is not JSON ({err})",
                body.len()
            ))
            .into());
        }
    };
    if let Some(text) = error_text {
        return Err(StoreError::Rejected {
            status,
            message: shorten(&text),
        }
        .into());
    }
    reply.remove("result").ok_or_else(|| {
        StoreError::Protocol("reply has neither \"result\" nor \"error\"".to_owned()).into()
    })
}

/// Whether `message` is Upstash saying the plan's request quota is spent.
fn is_quota_exhausted(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("request limit exceeded") || message.contains("requests limit exceeded")
}

fn unexpected(op: &str, wanted: &str, got: &Value) -> StoreError {
    StoreError::Protocol(format!(
        "{op} replied with {} instead of {wanted}",
        json_kind(got)
    ))
}

/// The JSON type of `value`, for error text that must not show the value.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "another string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn shorten(text: &str) -> String {
    let mut short: String = text.trim().chars().take(MAX_ERROR_MESSAGE_CHARS).collect();
    if text.trim().chars().count() > MAX_ERROR_MESSAGE_CHARS {
        short.push('…');
    }
    short
}

/// Removes the token from error text, in case a server or proxy echoes it.
fn scrub_token(error: &mut StoreError, token: &str) {
    if token.is_empty() {
        return;
    }
    if let StoreError::Server { message, .. }
    | StoreError::Rejected { message, .. }
    | StoreError::Transport(message)
    | StoreError::Protocol(message) = error
        && message.contains(token)
    {
        *message = message.replace(token, "<redacted>");
    }
}

/// Masks the phone number at the end of a key for logging.
///
/// Keeps the first and last four of the trailing digits
/// (`wa:pair:628123456789` → `wa:pair:6281****6789`); eight or fewer
/// trailing digits are masked entirely, and a key without trailing digits
/// holds no phone number and is returned unchanged.
fn mask_key(key: &str) -> String {
    /// Digits kept visible at each end of a long enough phone number.
    const VISIBLE: usize = 4;

    let split = key.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let Some((prefix, digits)) = key.split_at_checked(split) else {
        return "****".to_owned();
    };
    if digits.is_empty() {
        return key.to_owned();
    }
    let head = digits.get(..VISIBLE);
    let tail = digits.get(digits.len().saturating_sub(VISIBLE)..);
    match (head, tail) {
        (Some(head), Some(tail)) if digits.len() > 2 * VISIBLE => {
            format!("{prefix}{head}****{tail}")
        }
        _ => format!("{prefix}****"),
    }
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
                "the store rejected our credentials: check UPSTASH_REDIS_REST_TOKEN"
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

    const KEY: &str = "wa:pair:628123456789";
    const VALUE: &str = r#"{"status":"pending"}"#;
    const TEN_MINUTES: Duration = Duration::from_secs(600);

    // MemoryStore

    #[tokio::test]
    async fn a_stored_value_can_be_read_back() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");
        let read = store.get(KEY).await.expect("get");

        // Assert
        assert_eq!(read.as_deref(), Some(VALUE));
    }

    #[tokio::test]
    async fn a_missing_key_reads_as_none() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        let read = store.get(KEY).await.expect("get");

        // Assert
        assert_eq!(read, None);
    }

    #[tokio::test]
    async fn a_deleted_key_reads_as_none() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");

        // Act
        store.delete(KEY).await.expect("delete");

        // Assert
        assert_eq!(store.get(KEY).await.expect("get"), None);
        assert_eq!(store.ttl_of(KEY), None);
    }

    #[tokio::test]
    async fn deleting_a_missing_key_is_not_an_error() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        let outcome = store.delete(KEY).await;

        // Assert
        assert!(outcome.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_is_readable_until_its_ttl_has_passed_and_gone_after() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");

        // Act
        tokio::time::advance(Duration::from_secs(599)).await;
        let just_before = store.get(KEY).await.expect("get");
        tokio::time::advance(Duration::from_secs(1)).await;
        let at_expiry = store.get(KEY).await.expect("get");

        // Assert
        assert_eq!(just_before.as_deref(), Some(VALUE));
        assert_eq!(at_expiry, None);
        assert_eq!(store.ttl_of(KEY), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_of_reports_the_remaining_time_to_live() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, VALUE, TEN_MINUTES).await.expect("set");

        // Act
        tokio::time::advance(Duration::from_secs(100)).await;
        let remaining = store.ttl_of(KEY);

        // Assert
        assert_eq!(remaining, Some(Duration::from_secs(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn overwriting_a_key_replaces_the_value_and_resets_the_ttl() {
        // Arrange
        let store = MemoryStore::new();
        store.set(KEY, "first", TEN_MINUTES).await.expect("set");
        tokio::time::advance(Duration::from_secs(500)).await;

        // Act
        store.set(KEY, "second", TEN_MINUTES).await.expect("set");
        tokio::time::advance(Duration::from_secs(500)).await;

        // Assert
        assert_eq!(
            store.get(KEY).await.expect("get").as_deref(),
            Some("second")
        );
        assert_eq!(store.ttl_of(KEY), Some(Duration::from_secs(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_or_fractional_ttl_rounds_up_to_whole_seconds() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        store.set("zero", VALUE, Duration::ZERO).await.expect("set");
        store
            .set("fraction", VALUE, Duration::from_millis(1_500))
            .await
            .expect("set");

        // Assert
        assert_eq!(store.ttl_of("zero"), Some(Duration::from_secs(1)));
        assert_eq!(store.ttl_of("fraction"), Some(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurdly_long_ttl_never_expires_instead_of_overflowing() {
        // Arrange
        let store = MemoryStore::new();

        // Act
        store.set(KEY, VALUE, Duration::MAX).await.expect("set");
        tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;

        // Assert
        assert_eq!(store.get(KEY).await.expect("get").as_deref(), Some(VALUE));
        assert_eq!(store.ttl_of(KEY), Some(Duration::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_pruned_so_memory_stays_bounded() {
        // Arrange
        let store = MemoryStore::new();
        let rounds = 20;
        let per_round = MEMORY_PRUNE_MIN_ENTRIES;
        let mut peak = 0;

        // Act
        for round in 0..rounds {
            for n in 0..per_round {
                let key = format!("wa:pair:{round}:{n}");
                store
                    .set(&key, VALUE, Duration::from_secs(1))
                    .await
                    .expect("set");
                peak = peak.max(store.stored_entries());
            }
            tokio::time::advance(Duration::from_secs(2)).await;
        }

        // Assert
        assert!(
            peak <= 2 * MEMORY_PRUNE_MIN_ENTRIES + 1,
            "peak of {peak} entries after {} writes",
            rounds * per_round
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_never_drops_live_entries() {
        // Arrange
        let store = MemoryStore::new();
        let live = MEMORY_PRUNE_MIN_ENTRIES * 3;
        for n in 0..live {
            store
                .set(&format!("live:{n}"), VALUE, TEN_MINUTES)
                .await
                .expect("set");
        }

        // Act
        for n in 0..MEMORY_PRUNE_MIN_ENTRIES * 4 {
            store
                .set(&format!("short:{n}"), VALUE, Duration::from_secs(1))
                .await
                .expect("set");
            tokio::time::advance(Duration::from_millis(10)).await;
        }

        // Assert
        for n in 0..live {
            let read = store.get(&format!("live:{n}")).await.expect("get");
            assert_eq!(read.as_deref(), Some(VALUE), "live:{n} was dropped");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_grow_within_a_fixed_window_and_start_over_after_it() {
        // Arrange
        let store = MemoryStore::new();
        let window = Duration::from_secs(3600);

        // Act
        let first = store.count("budget", window).await.unwrap();
        tokio::time::advance(Duration::from_secs(600)).await;
        let second = store.count("budget", window).await.unwrap();
        tokio::time::advance(Duration::from_secs(3000)).await;
        let after = store.count("budget", window).await.unwrap();

        // Assert
        assert_eq!(first.count, 1);
        assert_eq!(first.window_left, window);
        assert_eq!(second.count, 2);
        assert_eq!(
            second.window_left,
            Duration::from_secs(3000),
            "not extended"
        );
        assert_eq!(after.count, 1, "a new window");
    }

    #[tokio::test]
    async fn memory_store_pings_and_names_itself() {
        // Arrange
        let store = MemoryStore::default();

        // Act
        let pinged = store.ping().await;

        // Assert
        assert!(pinged.is_ok());
        assert_eq!(store.kind(), "memory");
    }

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

    // UpstashSettings / UpstashStore construction

    #[test]
    fn default_settings_come_from_the_named_constants() {
        // Arrange / Act
        let settings = UpstashSettings::new("https://example.upstash.io", "secret");

        // Assert
        assert_eq!(settings.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(settings.max_retries, DEFAULT_MAX_RETRIES);
        assert_eq!(settings.backoff.base, DEFAULT_BACKOFF_BASE);
        assert_eq!(settings.backoff.cap, DEFAULT_BACKOFF_CAP);
    }

    #[test]
    fn worst_case_latency_of_the_defaults_is_twenty_nine_seconds() {
        // Arrange
        let settings = UpstashSettings::new("https://example.upstash.io", "secret");

        // Act
        let worst = settings.worst_case_latency();

        // Assert
        assert_eq!(worst, Duration::from_secs(29));
    }

    #[test]
    fn debug_output_of_settings_and_store_never_shows_the_token() {
        // Arrange
        let token = "AXsecretTOKENvalue123";
        let settings = UpstashSettings::new("https://example.upstash.io/", token);

        // Act
        let settings_debug = format!("{settings:?}");
        let store_debug = format!("{:?}", UpstashStore::new(settings).expect("valid"));

        // Assert
        assert!(!settings_debug.contains(token), "{settings_debug}");
        assert!(!store_debug.contains(token), "{store_debug}");
        assert!(store_debug.contains("<redacted>"));
    }

    #[test]
    fn unusable_settings_are_refused_without_echoing_the_token() {
        // Arrange
        let cases = [
            UpstashSettings::new("not a url", "secret-token"),
            UpstashSettings::new("ftp://example.upstash.io", "secret-token"),
            UpstashSettings::new("https://example.upstash.io", "  "),
            UpstashSettings::new("https://example.upstash.io", "secret-token\n"),
            UpstashSettings {
                request_timeout: Duration::ZERO,
                ..UpstashSettings::new("https://example.upstash.io", "secret-token")
            },
        ];

        for settings in cases {
            // Act
            let outcome = UpstashStore::new(settings.clone());

            // Assert
            match outcome {
                Err(StoreError::Config(message)) => {
                    assert!(!message.contains("secret-token"), "{message}");
                }
                other => panic!("{settings:?} gave {other:?}"),
            }
        }
    }

    // Reply classification

    fn classified(status: u16, body: &str) -> Result<Value, StoreError> {
        classify(status, None, body.as_bytes()).map_err(|failure| failure.error)
    }

    #[test]
    fn a_result_reply_yields_its_result() {
        // Arrange / Act
        let outcome = classified(200, r#"{"result":"OK"}"#);

        // Assert
        assert_eq!(outcome.ok(), Some(Value::String("OK".to_owned())));
    }

    #[test]
    fn statuses_map_to_their_error_variants() {
        // Arrange
        let wrongpass = r#"{"error":"WRONGPASS invalid or missing auth token"}"#;

        // Act
        let unauthorized = classified(401, wrongpass);
        let forbidden = classified(403, wrongpass);
        let limited = classified(429, "{}");
        let server = classified(502, "<html>bad gateway</html>");
        let rejected = classified(400, r#"{"error":"ERR unknown command"}"#);
        let error_in_ok = classified(200, r#"{"error":"ERR syntax"}"#);

        // Assert
        assert!(matches!(unauthorized, Err(StoreError::Unauthorized)));
        assert!(matches!(forbidden, Err(StoreError::Unauthorized)));
        assert!(matches!(
            limited,
            Err(StoreError::RateLimited { retry_after: None })
        ));
        assert!(
            matches!(server, Err(StoreError::Server { status: 502, ref message }) if message.contains("bad gateway"))
        );
        assert!(
            matches!(rejected, Err(StoreError::Rejected { status: 400, ref message }) if message == "ERR unknown command")
        );
        assert!(
            matches!(error_in_ok, Err(StoreError::Rejected { status: 200, ref message }) if message == "ERR syntax")
        );
    }

    #[test]
    fn an_exhausted_daily_quota_is_a_rate_limit_that_is_not_retried() {
        // Arrange
        let body = br#"{"error":"ERR max daily request limit exceeded"}"#;

        // Act
        let outcome = classify(400, None, body);

        // Assert
        match outcome {
            Err(failure) => {
                assert!(matches!(failure.error, StoreError::RateLimited { .. }));
                assert!(!failure.retry);
            }
            Ok(result) => panic!("expected a failure, got {result}"),
        }
    }

    #[test]
    fn a_successful_reply_that_is_not_a_result_object_is_a_protocol_error_without_the_body() {
        // Arrange
        let secret_value = "pairing-code-ABCD1234";

        // Act
        let garbage = classified(200, secret_value);
        let array = classified(200, r#"["x"]"#);
        let empty_object = classified(200, "{}");

        // Assert
        for outcome in [garbage, array, empty_object] {
            match outcome {
                Err(StoreError::Protocol(message)) => {
                    assert!(!message.contains(secret_value), "{message}");
                }
                other => panic!("expected a protocol error, got {other:?}"),
            }
        }
    }

    #[test]
    fn long_error_messages_are_shortened() {
        // Arrange
        let body = "x".repeat(10 * MAX_ERROR_MESSAGE_CHARS);

        // Act
        let outcome = classified(500, &body);

        // Assert
        match outcome {
            Err(StoreError::Server { message, .. }) => {
                assert_eq!(message.chars().count(), MAX_ERROR_MESSAGE_CHARS + 1);
            }
            other => panic!("expected a server error, got {other:?}"),
        }
    }

    #[test]
    fn a_token_echoed_by_the_server_is_scrubbed_from_the_error() {
        // Arrange
        let mut error = StoreError::Rejected {
            status: 400,
            message: "bad header Bearer s3cret-token".to_owned(),
        };

        // Act
        scrub_token(&mut error, "s3cret-token");

        // Assert
        assert!(!error.to_string().contains("s3cret-token"), "{error}");
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_other_forms_are_ignored() {
        // Arrange
        let with = |raw: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            if let Ok(value) = reqwest::header::HeaderValue::from_str(raw) {
                headers.insert(reqwest::header::RETRY_AFTER, value);
            }
            headers
        };

        // Act
        let seconds = parse_retry_after(&with(" 3 "));
        let date = parse_retry_after(&with("Wed, 21 Oct 2015 07:28:00 GMT"));
        let missing = parse_retry_after(&reqwest::header::HeaderMap::new());

        // Assert
        assert_eq!(seconds, Some(Duration::from_secs(3)));
        assert_eq!(date, None);
        assert_eq!(missing, None);
    }

    // Key masking

    #[test]
    fn a_phone_key_keeps_only_the_first_and_last_four_digits() {
        // Arrange / Act
        let masked = mask_key(KEY);

        // Assert
        assert_eq!(masked, "wa:pair:6281****6789");
    }

    #[test]
    fn a_short_trailing_number_is_masked_entirely() {
        // Arrange / Act
        let masked = mask_key("wa:pair:12345678");

        // Assert
        assert_eq!(masked, "wa:pair:****");
    }

    #[test]
    fn a_key_without_trailing_digits_is_left_as_is() {
        // Arrange / Act
        let masked = mask_key("wa:pair:é-config");

        // Assert
        assert_eq!(masked, "wa:pair:é-config");
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

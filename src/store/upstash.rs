//! [`UpstashStore`]: Upstash Redis over its REST API, one `POST` of the
//! command as a JSON array per operation.

use std::time::Duration;

use serde_json::Value;

use super::{
    COUNT_SCRIPT, Counted, HAND_OVER_SCRIPT, HANDED_OVER_INDEX_TTL_MS, HANDED_OVER_LISTED,
    HANDED_OVER_SCRIPT, HandOver, HeldLease, LEASE_EPOCH_TTL_MS, LEASE_SCRIPT, LeaseStep,
    PairingStore, SET_STATE_SCRIPT, SUBSCRIPTION_BUFFER, SUBSCRIPTION_RENEW_EVERY, StoreError,
    Subscription, Written, handed_over_floor_ms, lease_epoch_key, ttl_millis, ttl_seconds,
};
use crate::phone::mask_phone;
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
    /// Runs a state-writing script (`command`, about `key`), retried, and
    /// reads its answer as [`Written`].
    async fn eval_written(&self, key: &str, command: &[&str]) -> Result<Written, StoreError> {
        match self
            .run("EVAL", Some(key), command, self.max_retries)
            .await?
        {
            Value::Number(n) => n
                .as_i64()
                .map(Written::from_script)
                .ok_or_else(|| unexpected("EVAL", "a number", &Value::Number(n))),
            other => Err(unexpected("EVAL", "a number", &other)),
        }
    }

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

    async fn set_state(
        &self,
        key: &str,
        value: &str,
        seq: u64,
        ttl: Duration,
        lease: Option<HeldLease<'_>>,
    ) -> Result<Written, StoreError> {
        let seq = seq.to_string();
        let seconds = ttl_seconds(ttl).to_string();
        let held = lease.map(|lease| (lease.value(), ttl_millis(lease.ttl).to_string()));
        let mut command = vec!["EVAL", SET_STATE_SCRIPT];
        match (&lease, &held) {
            (Some(lease), Some((value_held, millis))) => command.extend([
                "2",
                key,
                lease.key,
                value,
                seq.as_str(),
                seconds.as_str(),
                value_held.as_str(),
                millis.as_str(),
            ]),
            _ => command.extend(["1", key, value, seq.as_str(), seconds.as_str()]),
        }
        // Retried like SET: the same state written twice is one state.
        self.eval_written(key, &command).await
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

    async fn lease(
        &self,
        key: &str,
        step: LeaseStep<'_>,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let [name, holder, epoch] = step.script_args();
        let counter = lease_epoch_key(key);
        let millis = ttl_millis(ttl).to_string();
        let counter_millis = LEASE_EPOCH_TTL_MS.to_string();
        let command = [
            "EVAL",
            LEASE_SCRIPT,
            "2",
            key,
            counter.as_str(),
            name.as_str(),
            holder.as_str(),
            epoch.as_str(),
            millis.as_str(),
            counter_millis.as_str(),
        ];
        // Retried: taking a lease one holds already, renewing it or
        // releasing it twice gives the same answer.
        match self
            .run("EVAL", Some(key), &command, self.max_retries)
            .await?
        {
            Value::Number(n) => n
                .as_u64()
                .map(|epoch| (epoch > 0).then_some(epoch))
                .ok_or_else(|| unexpected("EVAL", "an epoch", &Value::Number(n))),
            other => Err(unexpected("EVAL", "an epoch", &other)),
        }
    }

    async fn hand_over(&self, handover: HandOver<'_>) -> Result<Written, StoreError> {
        let seq = handover.seq.to_string();
        let seconds = ttl_seconds(handover.ttl).to_string();
        let deadline = handover.deadline_ms.to_string();
        let index_millis = HANDED_OVER_INDEX_TTL_MS.to_string();
        let held = handover.lease.map(|lease| lease.value());
        let mut command = vec!["EVAL", HAND_OVER_SCRIPT];
        command.push(if held.is_some() { "3" } else { "2" });
        command.extend([handover.key, handover.index]);
        if let Some(lease) = &handover.lease {
            command.push(lease.key);
        }
        command.extend([
            handover.value,
            seq.as_str(),
            seconds.as_str(),
            handover.phone,
            deadline.as_str(),
            index_millis.as_str(),
        ]);
        if let Some(held) = &held {
            command.push(held.as_str());
        }
        // Retried like a state write. A retry after the first went through
        // finds the lease gone and answers `LeaseLost`; the session then
        // checks whether its state is the one stored.
        self.eval_written(handover.key, &command).await
    }

    async fn handed_over(&self, index: &str) -> Result<Vec<String>, StoreError> {
        let floor = handed_over_floor_ms().to_string();
        let last = (HANDED_OVER_LISTED - 1).to_string();
        let command = [
            "EVAL",
            HANDED_OVER_SCRIPT,
            "1",
            index,
            floor.as_str(),
            last.as_str(),
        ];
        let reply = self
            .run("EVAL", Some(index), &command, self.max_retries)
            .await?;
        let phones = match &reply {
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<String>>>(),
            _ => None,
        };
        phones.ok_or_else(|| unexpected("EVAL", "a list of phones", &reply))
    }

    async fn unlist(&self, index: &str, phone: &str) -> Result<(), StoreError> {
        match self
            .run(
                "ZREM",
                Some(index),
                &["ZREM", index, phone],
                self.max_retries,
            )
            .await?
        {
            Value::Number(_) => Ok(()),
            other => Err(unexpected("ZREM", "a count", &other)),
        }
    }

    async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        // Not retried: a retry after a lost answer would deliver twice.
        match self
            .run("PUBLISH", None, &["PUBLISH", channel, message], 0)
            .await?
        {
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| unexpected("PUBLISH", "a count", &Value::Number(n))),
            other => Err(unexpected("PUBLISH", "a count", &other)),
        }
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError> {
        // Upstash's REST subscription: an event stream whose events are
        // `data: subscribe,<channel>,<count>` once, then
        // `data: message,<channel>,<message>` for each message.
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| StoreError::Config("the Upstash URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(["subscribe", channel]);
        let request = self
            .client
            .post(url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(SUBSCRIPTION_RENEW_EVERY)
            .send();
        let mut response = tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| StoreError::Timeout)?
            .map_err(|e| transport_error(e).error)?;
        let status = response.status().as_u16();
        if status != 200 {
            let retry_after = parse_retry_after(response.headers());
            let body = read_body(response).await.map_err(|f| f.error)?;
            let mut failure = match classify(status, retry_after, &body) {
                Err(failure) => failure,
                Ok(_) => return Err(StoreError::Protocol(format!("subscribe answered {status}"))),
            };
            scrub_token(&mut failure.error, &self.token);
            return Err(failure.error);
        }
        let event_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !event_stream {
            return Err(StoreError::Protocol(
                "subscribe did not answer with an event stream".into(),
            ));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(SUBSCRIPTION_BUFFER);
        let prefix = format!("message,{channel},");
        // Owns the stream: ends (closing it) when the receiver is dropped,
        // the stream breaks or is renewed, or the reader falls behind.
        tokio::spawn(async move {
            let mut pending = Vec::new();
            loop {
                let chunk = tokio::select! {
                    () = sender.closed() => return,
                    chunk = response.chunk() => chunk,
                };
                let Ok(Some(chunk)) = chunk else { return };
                pending.extend_from_slice(&chunk);
                if pending.len() > MAX_RESPONSE_BYTES {
                    // No line of ours is this long: not our stream.
                    return;
                }
                for message in messages_in(&mut pending, &prefix) {
                    if sender.try_send(message).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(receiver)
    }

    fn kind(&self) -> &'static str {
        "upstash"
    }
}

/// The messages in the complete lines of an event stream's `pending`
/// bytes (`data: <prefix><message>`; `prefix` is `message,<channel>,`),
/// leaving what follows the last line end for the next chunk. Other lines
/// (the subscription's confirmation, comments, blank lines) are skipped.
fn messages_in(pending: &mut Vec<u8>, prefix: &str) -> Vec<String> {
    let mut messages = Vec::new();
    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = pending.drain(..=end).collect();
        let Ok(line) = std::str::from_utf8(&line) else {
            continue;
        };
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(message) = line
            .strip_prefix("data:")
            .map(str::trim_start)
            .and_then(|data| data.strip_prefix(prefix))
        {
            messages.push(message.to_owned());
        }
    }
    messages
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

/// Masks the phone number at the end of a key for logging, the way every
/// phone is masked ([`mask_phone`]: `wa:pair:628123456789` →
/// `wa:pair:6281****6789`); a key without trailing digits holds no phone
/// number and is returned unchanged.
fn mask_key(key: &str) -> String {
    let split = key.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    match key.split_at_checked(split) {
        Some((_, "")) => key.to_owned(),
        Some((prefix, digits)) => format!("{prefix}{}", mask_phone(digits)),
        None => "****".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "wa:pair:628123456789";

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
    fn a_short_trailing_number_is_masked_like_any_phone() {
        // Arrange / Act
        let masked = mask_key("wa:pair:12345678");

        // Assert
        assert_eq!(masked, format!("wa:pair:{}", mask_phone("12345678")));
        assert!(!masked.contains("345"), "{masked}");
    }

    #[test]
    fn a_key_without_trailing_digits_is_left_as_is() {
        // Arrange / Act
        let masked = mask_key("wa:pair:é-config");

        // Assert
        assert_eq!(masked, "wa:pair:é-config");
    }

    #[test]
    fn event_stream_lines_split_across_chunks_or_ending_in_crlf_give_whole_messages() {
        let prefix = "message,wa:pair:process:a,";
        let mut pending =
            b"data: subscribe,wa:pair:process:a,1\r\n\r\ndata: message,wa:pair:process:a,{\"a\":"
                .to_vec();

        let first = messages_in(&mut pending, prefix);
        pending.extend_from_slice(b"\"x, y\"}\r\n\ndata:message,wa:pair:process:b,no\n");
        let second = messages_in(&mut pending, prefix);
        pending.extend_from_slice(b"data: message,wa:pair:process:a,");
        let unfinished = messages_in(&mut pending, prefix);

        assert!(first.is_empty(), "{first:?}");
        assert_eq!(second, vec![r#"{"a":"x, y"}"#.to_owned()]);
        assert!(unfinished.is_empty());
        assert_eq!(pending, b"data: message,wa:pair:process:a,");
    }
}

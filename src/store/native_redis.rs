//! [`RedisStore`]: a Redis server spoken to natively (`REDIS_URL`,
//! `redis://` or `rediss://`): Railway's Redis, a self-hosted one, or
//! Upstash's TLS endpoint. The same commands as the Upstash REST store
//! (`SET … EX`, `GET`, `DEL`, `PING`, the counting script), over one
//! multiplexed connection that reconnects by itself.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{ErrorKind, RedisError};

use super::{
    COUNT_SCRIPT, Counted, HAND_OVER_SCRIPT, HANDED_OVER_INDEX_TTL_MS, HANDED_OVER_LISTED,
    HANDED_OVER_SCRIPT, HandOver, HeldLease, LEASE_EPOCH_TTL_MS, LEASE_SCRIPT, LeaseStep,
    PairingStore, SET_STATE_SCRIPT, SUBSCRIPTION_BUFFER, SUBSCRIPTION_RENEW_EVERY, StoreError,
    Subscription, Written, handed_over_floor_ms, lease_epoch_key, ttl_millis, ttl_seconds,
};

/// Bound on one command (connect included): a store that does not answer
/// in two seconds is as good as down for a request waiting on it.
pub const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on making the connection.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts after a failed connect before a command gives up on it.
pub const REDIS_CONNECT_RETRIES: usize = 1;
/// Longest wait between reconnect attempts, in milliseconds (the
/// connection manager's unit): a lost connection is back within a second
/// of the server.
pub const REDIS_RECONNECT_MAX_DELAY_MS: u64 = 1_000;

/// Pairing state in a Redis server.
pub struct RedisStore {
    client: redis::Client,
    /// Made at the first command, not at startup: a store outage must not
    /// keep the service (and the codes it can still hand out) down.
    connection: tokio::sync::OnceCell<ConnectionManager>,
    count: redis::Script,
    set_state: redis::Script,
    lease: redis::Script,
    hand_over: redis::Script,
    handed_over: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL can carry a password: never printed.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS). Connects at the first command, then keeps one
    /// multiplexed connection that reconnects by itself.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Config(format!("REDIS_URL is not a Redis URL ({:?})", e.kind()))
        })?;
        Ok(Self {
            client,
            connection: tokio::sync::OnceCell::new(),
            count: redis::Script::new(COUNT_SCRIPT),
            set_state: redis::Script::new(SET_STATE_SCRIPT),
            lease: redis::Script::new(LEASE_SCRIPT),
            hand_over: redis::Script::new(HAND_OVER_SCRIPT),
            handed_over: redis::Script::new(HANDED_OVER_SCRIPT),
        })
    }

    /// The connection, made now if it was not yet.
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
                    .set_response_timeout(REDIS_COMMAND_TIMEOUT)
                    // A refused connection is reported at once (the next
                    // command tries again), not retried for seconds.
                    .set_number_of_retries(REDIS_CONNECT_RETRIES)
                    .set_max_delay(REDIS_RECONNECT_MAX_DELAY_MS);
                tokio::time::timeout(
                    REDIS_CONNECT_TIMEOUT,
                    ConnectionManager::new_with_config(self.client.clone(), config),
                )
                .await
                .map_err(|_| StoreError::Timeout)?
                .map_err(store_error)
            })
            .await?;
        Ok(connection.clone())
    }

    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection().await?;
        bounded(command.query_async(&mut connection)).await
    }

    /// Runs a script: `EVALSHA`, falling back to `EVAL` once when the
    /// server does not have it cached yet.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection().await?;
        bounded(script.invoke_async(&mut connection)).await
    }
}

/// `reply`, within [`REDIS_COMMAND_TIMEOUT`], as our result.
async fn bounded<T>(reply: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
    tokio::time::timeout(REDIS_COMMAND_TIMEOUT, reply)
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(store_error)
}

#[async_trait::async_trait]
impl PairingStore for RedisStore {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.run::<()>(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl_seconds(ttl)),
        )
        .await
    }

    async fn set_state(
        &self,
        key: &str,
        value: &str,
        seq: u64,
        ttl: Duration,
        lease: Option<HeldLease<'_>>,
    ) -> Result<Written, StoreError> {
        let mut invocation = self.set_state.key(key);
        invocation.arg(value).arg(seq).arg(ttl_seconds(ttl));
        if let Some(lease) = lease {
            invocation
                .key(lease.key)
                .arg(lease.value())
                .arg(ttl_millis(lease.ttl));
        }
        let reply: i64 = self.invoke(&invocation).await?;
        Ok(Written::from_script(reply))
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.run(redis::cmd("GET").arg(key)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run::<u64>(redis::cmd("DEL").arg(key)).await.map(drop)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reply: String = self.run(&redis::cmd("PING")).await?;
        match reply.as_str() {
            "PONG" => Ok(()),
            other => Err(StoreError::Protocol(format!("PING answered {other:.32}"))),
        }
    }

    async fn count(&self, key: &str, window: Duration) -> Result<Counted, StoreError> {
        // Never retried (it would count twice).
        let (count, ttl): (u64, u64) = self
            .invoke(self.count.key(key).arg(ttl_seconds(window)))
            .await?;
        Ok(Counted {
            count,
            window_left: Duration::from_secs(ttl),
        })
    }

    async fn lease(
        &self,
        key: &str,
        step: LeaseStep<'_>,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let [name, holder, epoch] = step.script_args();
        let reply: u64 = self
            .invoke(
                self.lease
                    .key(key)
                    .key(lease_epoch_key(key))
                    .arg(name)
                    .arg(holder)
                    .arg(epoch)
                    .arg(ttl_millis(ttl))
                    .arg(LEASE_EPOCH_TTL_MS),
            )
            .await?;
        Ok((reply > 0).then_some(reply))
    }

    async fn hand_over(&self, handover: HandOver<'_>) -> Result<Written, StoreError> {
        let mut invocation = self.hand_over.key(handover.key);
        invocation.key(handover.index);
        if let Some(lease) = &handover.lease {
            invocation.key(lease.key);
        }
        invocation
            .arg(handover.value)
            .arg(handover.seq)
            .arg(ttl_seconds(handover.ttl))
            .arg(handover.phone)
            .arg(handover.deadline_ms)
            .arg(HANDED_OVER_INDEX_TTL_MS);
        if let Some(lease) = &handover.lease {
            invocation.arg(lease.value());
        }
        let reply: i64 = self.invoke(&invocation).await?;
        Ok(Written::from_script(reply))
    }

    async fn handed_over(&self, index: &str) -> Result<Vec<String>, StoreError> {
        self.invoke(
            self.handed_over
                .key(index)
                .arg(handed_over_floor_ms())
                .arg(HANDED_OVER_LISTED - 1),
        )
        .await
    }

    async fn unlist(&self, index: &str, phone: &str) -> Result<(), StoreError> {
        self.run::<u64>(redis::cmd("ZREM").arg(index).arg(phone))
            .await
            .map(drop)
    }

    async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        self.run(redis::cmd("PUBLISH").arg(channel).arg(message))
            .await
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StoreError> {
        // A connection of its own: a subscribed connection takes no other
        // commands.
        let mut pubsub =
            tokio::time::timeout(REDIS_CONNECT_TIMEOUT, self.client.get_async_pubsub())
                .await
                .map_err(|_| StoreError::Timeout)?
                .map_err(store_error)?;
        bounded(pubsub.subscribe(channel)).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(SUBSCRIPTION_BUFFER);
        // Owns the connection: ends (closing it) when the receiver is
        // dropped, the connection breaks, the reader falls behind, or it is
        // due for renewal.
        tokio::spawn(async move {
            use futures::StreamExt as _;
            let mut messages = pubsub.into_on_message();
            let renew = tokio::time::sleep(SUBSCRIPTION_RENEW_EVERY);
            tokio::pin!(renew);
            loop {
                tokio::select! {
                    () = sender.closed() => return,
                    () = &mut renew => return,
                    message = messages.next() => {
                        let Some(message) = message else { return };
                        let Ok(payload) = message.get_payload::<String>() else { continue };
                        if sender.try_send(payload).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(receiver)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// Our error for a Redis one; its text (which can name the server's
/// address, never the password) goes to the log through `StoreError`.
fn store_error(error: RedisError) -> StoreError {
    match error.kind() {
        ErrorKind::AuthenticationFailed => StoreError::Unauthorized,
        ErrorKind::IoError => StoreError::Transport(error.to_string()),
        ErrorKind::TypeError => StoreError::Protocol(error.to_string()),
        _ if error.is_timeout() => StoreError::Timeout,
        _ if error.is_connection_dropped() || error.is_connection_refusal() => {
            StoreError::Transport(error.to_string())
        }
        _ => StoreError::Rejected {
            status: 0,
            message: error.to_string(),
        },
    }
}

//! The webhook: every session outcome (`linked`, `failed`, `expired`,
//! `cancelled`) is POSTed to `WEBHOOK_URL`, signed the way the Standard
//! Webhooks spec says, so a receiver (a Supabase edge function, say) can
//! update its own records without polling.
//!
//! - **Signed.** `webhook-id` (one per outcome, the same on every retry),
//!   `webhook-timestamp` (Unix seconds of the attempt) and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
//! - **At least once.** A delivery that does not get a 2xx is retried with
//!   exponential backoff and jitter until [`GIVE_UP_AFTER`] has passed since
//!   the outcome; receivers deduplicate on `webhook-id`.
//! - **Never in the way.** [`Webhooks::notify`] only queues: a session ends
//!   at once whatever the receiver does. [`Webhooks::run`] owns every
//!   delivery; when the service stops it gives the attempts in flight a
//!   moment and logs what it could not deliver (deliveries live in memory).
//!
//! [`Delivery::attempt`] is one try, returning an [`AttemptOutcome`], so the
//! schedule is tested step by step.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::retry::Backoff;
use crate::session::PairState;

/// How long an outcome is retried before it is given up (the spec's
/// receivers expect retries for hours; an hour covers a receiver's deploy
/// or outage without holding outcomes past their usefulness).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);
/// Backoff between attempts: 5 s, 10 s, 20 s … at most 10 minutes, jittered.
pub const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(600));
/// Bound on one attempt (connect, send, answer).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Outcomes waiting for the deliverer; beyond this an outcome is dropped
/// (and logged): something is badly wrong if a thousand sessions ended
/// while none could be handed over.
pub const QUEUE: usize = 1024;
/// Attempts allowed to finish when the service stops: what is left of the
/// default 10 s grace after the sessions' 7 s, with room to exit.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Where and how outcomes are sent.
#[derive(Clone)]
pub struct WebhookSettings {
    /// `WEBHOOK_URL`.
    pub url: String,
    /// The HMAC key (`WEBHOOK_SECRET`, decoded).
    pub key: Vec<u8>,
    /// Backoff between attempts ([`RETRY_BACKOFF`]).
    pub backoff: Backoff,
    /// Retry until this long after the outcome ([`GIVE_UP_AFTER`]).
    pub give_up_after: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// The sending side: sessions hand their outcomes here.
#[derive(Debug, Clone)]
pub struct Webhooks {
    queue: mpsc::Sender<Delivery>,
}

/// The delivering side, run by [`Webhooks::run`].
#[derive(Debug)]
pub struct Deliverer {
    settings: WebhookSettings,
    http: reqwest::Client,
    queue: mpsc::Receiver<Delivery>,
}

impl Webhooks {
    /// A webhook sender and the deliverer that must be run for it.
    pub fn new(settings: WebhookSettings) -> Result<(Self, Deliverer), reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let (queue, rx) = mpsc::channel(QUEUE);
        Ok((
            Self { queue },
            Deliverer {
                settings,
                http,
                queue: rx,
            },
        ))
    }

    /// Queues `state` for delivery if it is an outcome; never waits.
    pub fn notify(&self, state: &PairState) {
        if !state.status.is_terminal() {
            return;
        }
        let body = match serde_json::to_vec(state) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "could not serialize an outcome for the webhook");
                return;
            }
        };
        let delivery = Delivery {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            body,
            since: Instant::now(),
            attempts: 0,
        };
        if self.queue.try_send(delivery).is_err() {
            tracing::error!(
                phone = %state.phone,
                event = "webhook_dropped",
                "webhook queue full or closed; this outcome is not delivered"
            );
        }
    }

    /// Delivers queued outcomes until `stop` turns true: each in its own
    /// task, owned here, retried on its schedule.
    pub async fn run(deliverer: Deliverer, mut stop: watch::Receiver<bool>) {
        let Deliverer {
            settings,
            http,
            mut queue,
        } = deliverer;
        let mut deliveries = JoinSet::new();
        let start = |deliveries: &mut JoinSet<()>, delivery: Delivery| {
            let settings = settings.clone();
            let http = http.clone();
            deliveries.spawn(async move { delivery.deliver(&settings, &http).await });
        };
        loop {
            tokio::select! {
                delivery = queue.recv() => match delivery {
                    Some(delivery) => start(&mut deliveries, delivery),
                    None => break,
                },
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        // Outcomes queued up to the stop are still tried.
        while let Ok(delivery) = queue.try_recv() {
            start(&mut deliveries, delivery);
        }
        let waiting = tokio::time::timeout(SHUTDOWN_WAIT, async {
            while deliveries.join_next().await.is_some() {}
        })
        .await;
        if waiting.is_err() {
            tracing::warn!(
                undelivered = deliveries.len(),
                event = "webhook_dropped",
                "stopping with webhooks not yet delivered; they are lost"
            );
            deliveries.shutdown().await;
        }
    }
}

/// One outcome on its way.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `webhook-id`: the same on every attempt.
    pub id: String,
    /// The state JSON, exactly as signed.
    pub body: Vec<u8>,
    /// When the outcome was queued: the give-up clock starts here.
    pub since: Instant,
    /// Attempts made so far.
    pub attempts: u32,
}

/// What one [`Delivery::attempt`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Not delivered; try again after this long.
    RetryAfter(Duration),
    /// Not delivered, and the next try would be past the give-up time.
    GaveUp,
}

impl Delivery {
    /// Tries until delivered or given up.
    pub async fn deliver(mut self, settings: &WebhookSettings, http: &reqwest::Client) {
        // `ThreadRng` is not `Send`; a seeded `StdRng` is, for the jitter.
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
        loop {
            match self.attempt(settings, http, &mut rng).await {
                AttemptOutcome::Delivered => return,
                AttemptOutcome::RetryAfter(wait) => tokio::time::sleep(wait).await,
                AttemptOutcome::GaveUp => return,
            }
        }
    }

    /// One signed POST, and what to do next.
    pub async fn attempt(
        &mut self,
        settings: &WebhookSettings,
        http: &reqwest::Client,
        rng: &mut impl rand::Rng,
    ) -> AttemptOutcome {
        self.attempts += 1;
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = sign(&settings.key, &self.id, timestamp, &self.body);
        let sent = http
            .post(&settings.url)
            .header("content-type", "application/json")
            .header("webhook-id", &self.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(self.body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(answer) if answer.status().is_success() => {
                tracing::info!(
                    webhook_id = %self.id,
                    attempts = self.attempts,
                    event = "webhook_delivered",
                    "webhook delivered"
                );
                return AttemptOutcome::Delivered;
            }
            Ok(answer) => format!("answered {}", answer.status().as_u16()),
            Err(e) if e.is_timeout() => "timed out".to_owned(),
            Err(_) => "unreachable".to_owned(),
        };
        let wait = settings.backoff.delay(self.attempts - 1, rng);
        if self.since.elapsed() + wait > settings.give_up_after {
            tracing::error!(
                webhook_id = %self.id,
                attempts = self.attempts,
                failure,
                event = "webhook_gave_up",
                "webhook not delivered; giving up"
            );
            return AttemptOutcome::GaveUp;
        }
        tracing::warn!(
            webhook_id = %self.id,
            attempts = self.attempts,
            failure,
            retry_in_ms = wait.as_millis() as u64,
            event = "webhook_failed",
            "webhook not delivered; retrying"
        );
        AttemptOutcome::RetryAfter(wait)
    }
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks spec (and of its reference
        // libraries' tests).
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();

        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );

        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}

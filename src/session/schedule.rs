//! When a session does what: the code schedule and the store TTLs, as
//! pure functions of the settings and durations (no clock, no tokio), so
//! they are tested on their own. The session task asks them and keeps the
//! time.

use std::time::Duration;

use super::state::Status;
use crate::config::Config;
use crate::phone::PhoneNumber;
use crate::retry::Backoff;

/// Replace a code this long before WhatsApp stops accepting it: a refresh
/// costs one PBKDF2 and a round trip, and the store must never show a dead
/// code.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(15);
/// Never schedule refreshes closer than this, whatever WhatsApp says about
/// validity, so a misbehaving peer cannot make us hammer it.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// A code WhatsApp invalidated is replaced at once, but never sooner than
/// this after the previous one was issued: a peer that keeps invalidating
/// codes must not get a request storm back.
pub const MIN_EVENT_REFRESH_GAP: Duration = Duration::from_secs(5);
/// "Refresh Kode" pressed again within this long of a new code returns that
/// code instead of asking WhatsApp for yet another (double clicks, retries).
pub const MANUAL_REFRESH_DEBOUNCE: Duration = Duration::from_secs(2);
/// A state stored while its session waits (a backoff, the code budget)
/// lives at least this long past the end of the wait, so a reader of the
/// store never finds the key gone while the session is still there.
pub const WAIT_TTL_MARGIN: Duration = Duration::from_secs(60);
/// The window of the per-phone code budget (`PAIR_CODES_PER_HOUR`): it opens
/// with the first code and does not slide.
pub const CODE_BUDGET_WINDOW: Duration = Duration::from_secs(3600);

/// Tunables of every session, from [`Config`].
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Store TTL while starting or pending.
    pub code_ttl: Duration,
    /// A new code at least this often.
    pub refresh_every: Duration,
    /// End unlinked sessions after this long.
    pub session_max: Duration,
    /// Store TTL of a final state.
    pub outcome_ttl: Duration,
    /// Retry backoff for failed code requests.
    pub backoff: Backoff,
    /// Consecutive failures before the session fails.
    pub max_attempts: u32,
    /// Prefix of store keys.
    pub key_prefix: String,
    /// Codes per phone and [`CODE_BUDGET_WINDOW`], counted in the store.
    pub codes_per_hour: u32,
}

impl SessionSettings {
    /// Takes the session tunables from the service configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            code_ttl: config.code_ttl,
            refresh_every: config.refresh_every,
            session_max: config.session_max,
            outcome_ttl: config.outcome_ttl,
            backoff: Backoff::new(config.backoff_base, config.backoff_cap),
            max_attempts: config.max_attempts.max(1),
            key_prefix: config.key_prefix.clone(),
            codes_per_hour: config.codes_per_hour,
        }
    }

    /// The store key of `phone`.
    pub fn key(&self, phone: &PhoneNumber) -> String {
        format!("{}{}", self.key_prefix, phone.as_str())
    }

    /// The store key of `phone`'s lease: which process runs its session.
    pub fn lease_key(&self, phone: &PhoneNumber) -> String {
        format!("{}lease:{}", self.key_prefix, phone.as_str())
    }

    /// The store key of the index of sessions handed over by a process that
    /// stopped, for the next process to resume (a sorted set by deadline).
    pub fn handed_over_key(&self) -> String {
        format!("{}handed_over", self.key_prefix)
    }

    /// The store key counting `phone`'s codes.
    pub fn budget_key(&self, phone: &PhoneNumber) -> String {
        format!("{}budget:{}", self.key_prefix, phone.as_str())
    }

    /// How long after it was issued a code valid for `valid_for` is
    /// replaced: every `refresh_every`, and [`REFRESH_MARGIN`] before
    /// WhatsApp stops accepting it, but never more often than
    /// [`MIN_REFRESH_INTERVAL`].
    pub fn refresh_in(&self, valid_for: Duration) -> Duration {
        self.refresh_every
            .min(valid_for.saturating_sub(REFRESH_MARGIN))
            .max(MIN_REFRESH_INTERVAL)
    }

    /// The store TTL of a state with `status`, when the session's next
    /// request is `wait` away (if it is waiting for one): a waiting
    /// session's key outlives the wait by [`WAIT_TTL_MARGIN`], since
    /// WhatsApp's backoff or the code budget can outlast the code TTL.
    pub fn store_ttl(&self, status: Status, wait: Option<Duration>) -> Duration {
        if status.is_terminal() {
            return self.outcome_ttl;
        }
        match wait {
            Some(wait) => self.code_ttl.max(wait + WAIT_TTL_MARGIN),
            None => self.code_ttl,
        }
    }
}

/// How long to wait before replacing a code WhatsApp invalidated, when the
/// last code was issued `since_issued` ago (`None`: no code yet): at once,
/// but not sooner than [`MIN_EVENT_REFRESH_GAP`] after the last one.
pub fn replacement_wait(since_issued: Option<Duration>) -> Duration {
    since_issued.map_or(Duration::ZERO, |since| {
        MIN_EVENT_REFRESH_GAP.saturating_sub(since)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SessionSettings {
        SessionSettings::from_config(&Config::default())
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_code_is_replaced_at_the_refresh_interval_when_whatsapp_allows_longer() {
        let settings = SessionSettings {
            refresh_every: 8 * MIN,
            ..settings()
        };
        assert_eq!(settings.refresh_in(20 * MIN), 8 * MIN);
    }

    #[test]
    fn a_code_is_replaced_its_margin_before_whatsapp_stops_accepting_it() {
        let settings = SessionSettings {
            refresh_every: 8 * MIN,
            ..settings()
        };
        assert_eq!(
            settings.refresh_in(Duration::from_secs(180)),
            Duration::from_secs(180) - REFRESH_MARGIN
        );
    }

    #[test]
    fn a_short_lived_code_is_still_not_replaced_more_often_than_the_minimum() {
        assert_eq!(
            settings().refresh_in(Duration::from_secs(10)),
            MIN_REFRESH_INTERVAL
        );
    }

    #[test]
    fn a_waiting_sessions_key_outlives_its_wait() {
        let settings = SessionSettings {
            code_ttl: 10 * MIN,
            ..settings()
        };
        assert_eq!(settings.store_ttl(Status::Starting, None), 10 * MIN);
        assert_eq!(
            settings.store_ttl(Status::Starting, Some(30 * MIN)),
            30 * MIN + WAIT_TTL_MARGIN
        );
        assert_eq!(
            settings.store_ttl(Status::Pending, Some(MIN)),
            10 * MIN,
            "a short wait keeps the code TTL"
        );
    }

    #[test]
    fn an_ended_sessions_state_keeps_the_outcome_ttl_whatever_it_waited_for() {
        let settings = SessionSettings {
            outcome_ttl: 5 * MIN,
            ..settings()
        };
        assert_eq!(settings.store_ttl(Status::Linked, Some(60 * MIN)), 5 * MIN);
    }

    #[test]
    fn an_invalidated_code_is_replaced_at_once_unless_the_last_one_is_too_recent() {
        assert_eq!(replacement_wait(None), Duration::ZERO);
        assert_eq!(replacement_wait(Some(MIN)), Duration::ZERO);
        assert_eq!(
            replacement_wait(Some(Duration::from_secs(2))),
            MIN_EVENT_REFRESH_GAP - Duration::from_secs(2)
        );
    }
}

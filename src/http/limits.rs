//! Rate limits per caller: token buckets (GCRA, from `governor`) keyed by
//! who is calling, one budget for requests that can make WhatsApp notify a
//! phone (`POST /pair`, `POST /pair/{phone}/refresh`) and a larger one for
//! reads and cancels.
//!
//! A signed-in user is one caller whatever address they come from; a server
//! key is one caller with a budget [`SERVER_BUDGET_FACTOR`] times larger,
//! since an edge function calls on behalf of many users; with no callers
//! configured, each client IP is one caller. The client IP is the socket's
//! peer, or with `TRUST_PROXY=true` the last address in `X-Forwarded-For`
//! (the one the proxy in front of us appended; earlier ones are whatever the
//! client claimed).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ApiError;
use super::auth::Caller;
use super::server::peer_of;

/// How many times more a server caller may do than a user or an IP: an edge
/// function speaks for every user of the frontend.
pub const SERVER_BUDGET_FACTOR: u32 = 20;
/// Forgotten buckets (callers quiet long enough to be full again) are
/// dropped every this many checks, so the key maps stay as large as the set
/// of recently active callers.
pub const PRUNE_EVERY: u64 = 1024;

/// Requests per minute for each kind of caller and request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Requests that can issue a code, per user or IP and minute.
    pub starts_per_minute: u32,
    /// Other requests, per user or IP and minute.
    pub reads_per_minute: u32,
}

/// A token bucket per caller.
type Buckets = DefaultKeyedRateLimiter<String>;

/// The buckets of every caller.
pub struct CallerLimits {
    starts: Buckets,
    reads: Buckets,
    server_starts: Buckets,
    server_reads: Buckets,
    trust_proxy: bool,
    checks: AtomicU64,
}

impl std::fmt::Debug for CallerLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerLimits")
            .field("callers", &self.tracked())
            .field("trust_proxy", &self.trust_proxy)
            .finish_non_exhaustive()
    }
}

fn buckets(per_minute: u32) -> Buckets {
    let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    // A full minute's budget may be spent at once (a page that starts two
    // numbers and polls both), then it refills steadily.
    RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(per_minute))
}

impl CallerLimits {
    /// Buckets sized by `budgets`; `trust_proxy` says whether
    /// `X-Forwarded-For` names the client.
    pub fn new(budgets: Budgets, trust_proxy: bool) -> Self {
        let server = |n: u32| n.saturating_mul(SERVER_BUDGET_FACTOR);
        Self {
            starts: buckets(budgets.starts_per_minute),
            reads: buckets(budgets.reads_per_minute),
            server_starts: buckets(server(budgets.starts_per_minute)),
            server_reads: buckets(server(budgets.reads_per_minute)),
            trust_proxy,
            checks: AtomicU64::new(0),
        }
    }

    /// How many callers have a bucket right now.
    pub fn tracked(&self) -> usize {
        self.starts.len() + self.reads.len() + self.server_starts.len() + self.server_reads.len()
    }

    /// Takes one token from the bucket of `caller` for a request that
    /// `starts` a code (or not); `Err` says how long until one is there.
    pub fn check(
        &self,
        caller: &Caller,
        client: Option<IpAddr>,
        starts: bool,
    ) -> Result<(), Duration> {
        let key = match caller {
            Caller::Server { key_id } => format!("key:{key_id}"),
            Caller::User { id } => format!("user:{id}"),
            Caller::Anonymous => match client {
                Some(ip) => format!("ip:{ip}"),
                None => "ip:unknown".to_owned(),
            },
        };
        let buckets = match (matches!(caller, Caller::Server { .. }), starts) {
            (true, true) => &self.server_starts,
            (true, false) => &self.server_reads,
            (false, true) => &self.starts,
            (false, false) => &self.reads,
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        buckets
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Drops the buckets of callers that have been quiet long enough to be
    /// full again: they would behave exactly like a fresh bucket.
    pub fn prune(&self) {
        for buckets in [
            &self.starts,
            &self.reads,
            &self.server_starts,
            &self.server_reads,
        ] {
            buckets.retain_recent();
            buckets.shrink_to_fit();
        }
    }

    /// The client's address: the peer, or behind a trusted proxy the last
    /// `X-Forwarded-For` entry.
    pub fn client_ip(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
        if !self.trust_proxy {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
            .next_back();
        forwarded.or(peer)
    }
}

/// Charges `caller`'s budget for `request`: the second step of admitting a
/// request to the API routes (see `http::admit`), once the caller is known.
/// Answers 429 `rate_limited` with `Retry-After` when the caller's bucket is
/// empty; otherwise the client address it charged, if it knows one.
pub fn charge(
    limits: &CallerLimits,
    caller: &Caller,
    request: &Parts,
) -> Result<Option<ClientIp>, ApiError> {
    let client = limits.client_ip(
        &request.headers,
        peer_of(&request.extensions).map(|peer| peer.ip()),
    );
    let starts = request.method == Method::POST;
    if let Err(wait) = limits.check(caller, client, starts) {
        tracing::warn!(
            request_id = crate::http::request_id(&request.headers),
            event = "rate_limited",
            starts,
            retry_after_ms = wait.as_millis() as u64,
            "caller over its request budget"
        );
        return Err(ApiError::RateLimited {
            retry_after: wait.max(Duration::from_secs(1)),
            message: "too many requests from this caller; slow down and retry after the time \
                      in Retry-After"
                .to_owned(),
        });
    }
    Ok(client.map(ClientIp))
}

/// The client address [`charge`] charged, for handlers that count
/// anonymous callers apart.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGETS: Budgets = Budgets {
        starts_per_minute: 3,
        reads_per_minute: 6,
    };

    fn user(id: &str) -> Caller {
        Caller::User { id: id.into() }
    }

    #[test]
    fn a_user_spends_its_own_budget_and_others_keep_theirs() {
        let limits = CallerLimits::new(BUDGETS, false);

        let spent: Vec<bool> = (0..4)
            .map(|_| limits.check(&user("a"), None, true).is_ok())
            .collect();
        let other = limits.check(&user("b"), None, true);
        let reads = limits.check(&user("a"), None, false);

        assert_eq!(spent, [true, true, true, false]);
        assert!(other.is_ok());
        assert!(reads.is_ok(), "reads have a budget of their own");
    }

    #[test]
    fn an_empty_bucket_says_how_long_until_the_next_token() {
        let limits = CallerLimits::new(BUDGETS, false);
        for _ in 0..3 {
            limits.check(&user("a"), None, true).unwrap();
        }

        let wait = limits.check(&user("a"), None, true).unwrap_err();

        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
    }

    #[test]
    fn a_server_key_gets_a_larger_budget() {
        let limits = CallerLimits::new(BUDGETS, false);
        let server = Caller::Server {
            key_id: "key-1".into(),
        };

        let allowed = (0..100)
            .filter(|_| limits.check(&server, None, true).is_ok())
            .count();

        assert_eq!(allowed, 3 * SERVER_BUDGET_FACTOR as usize);
    }

    #[test]
    fn anonymous_callers_are_told_apart_by_address() {
        let limits = CallerLimits::new(BUDGETS, false);
        let one: IpAddr = "203.0.113.1".parse().unwrap();
        let two: IpAddr = "203.0.113.2".parse().unwrap();
        for _ in 0..3 {
            limits.check(&Caller::Anonymous, Some(one), true).unwrap();
        }

        assert!(limits.check(&Caller::Anonymous, Some(one), true).is_err());
        assert!(limits.check(&Caller::Anonymous, Some(two), true).is_ok());
    }

    #[test]
    fn forwarded_for_is_read_only_behind_a_trusted_proxy_and_its_last_entry_counts() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.1.1.1, 198.51.100.7".parse().unwrap());
        let peer: IpAddr = "10.0.0.2".parse().unwrap();

        let direct = CallerLimits::new(BUDGETS, false).client_ip(&headers, Some(peer));
        let proxied = CallerLimits::new(BUDGETS, true).client_ip(&headers, Some(peer));
        let garbage = CallerLimits::new(BUDGETS, true).client_ip(
            &HeaderMap::from_iter([(
                "x-forwarded-for".parse().unwrap(),
                "nonsense".parse().unwrap(),
            )]),
            Some(peer),
        );

        assert_eq!(direct, Some(peer), "a client cannot pick its own bucket");
        assert_eq!(proxied, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(garbage, Some(peer));
    }

    #[test]
    fn pruning_drops_callers_whose_buckets_are_full_again_and_keeps_the_others() {
        // 6000 a minute: one token comes back in 10 ms.
        let limits = CallerLimits::new(
            Budgets {
                starts_per_minute: 3,
                reads_per_minute: 6000,
            },
            false,
        );
        limits.check(&user("quiet"), None, false).unwrap();
        limits.check(&user("busy"), None, true).unwrap();
        assert_eq!(limits.tracked(), 2);
        std::thread::sleep(Duration::from_millis(50));

        limits.prune();

        assert_eq!(
            limits.tracked(),
            1,
            "only the caller still owed a token is kept"
        );
        assert!(limits.check(&user("busy"), None, true).is_ok());
    }
}

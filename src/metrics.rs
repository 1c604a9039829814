//! Prometheus metrics, served at `GET /metrics`: what ops graph and alert
//! on (codes, links, failures by reason, WhatsApp refusals by status, store
//! latency and errors, open sessions, warm clients).
//!
//! One [`Metrics`] per service instance, owned by the app and shared by
//! `Arc`: no process-wide recorder, so each test (and each instance in a
//! test process) counts on its own. Labels never carry a phone number or a
//! caller: only small, fixed sets of values.

use std::fmt;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::session::{Reason, Status};

/// Prefix of every metric name.
pub const PREFIX: &str = "wa_pair";

/// Buckets of POST → code latency, in seconds: 5 ms (a warm client on
/// loopback) doubling to about 41 s (past the longest code wait).
fn code_wait_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 14)
}

/// Buckets of store command latency, in seconds: 0.5 ms (the memory store)
/// doubling to about 4 s (past an Upstash request timeout).
fn store_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// How a store command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The store answered.
    Ok,
    /// The store answered with an error (or could not be reached).
    Failed,
    /// Dropped before the store answered: a caller's timeout (a store that
    /// does not answer in time), a cancelled request, a shutdown.
    Abandoned,
}

/// What made a session ask WhatsApp for a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeTrigger {
    /// The session's first code (`POST /pair`).
    First,
    /// A scheduled refresh, or the replacement of an invalidated code.
    Auto,
    /// `POST /pair/{phone}/refresh`.
    Manual,
}

impl CodeTrigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Auto => "auto",
            Self::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TriggerLabel {
    trigger: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndLabels {
    status: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// Every metric of the service, registered in one registry.
pub struct Metrics {
    registry: Registry,
    sessions_started: Counter,
    codes_issued: Family<TriggerLabel, Counter>,
    links: Counter,
    sessions_ended: Family<EndLabels, Counter>,
    whatsapp_refusals: Family<StatusLabel, Counter>,
    store_errors: Family<OpLabel, Counter>,
    store_abandoned: Family<OpLabel, Counter>,
    code_wait: Histogram,
    store_latency: Family<OpLabel, Histogram, fn() -> Histogram>,
    open_sessions: Gauge,
    warm_clients: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let sessions_started = Counter::default();
        registry.register(
            "sessions_started",
            "Pairing sessions started",
            sessions_started.clone(),
        );
        let codes_issued = Family::<TriggerLabel, Counter>::default();
        registry.register(
            "codes_issued",
            "Pairing codes WhatsApp issued, by what asked for them (first, auto, manual)",
            codes_issued.clone(),
        );
        let links = Counter::default();
        registry.register("links", "Phones linked", links.clone());
        let sessions_ended = Family::<EndLabels, Counter>::default();
        registry.register(
            "sessions_ended",
            "Pairing sessions ended, by final status and reason",
            sessions_ended.clone(),
        );
        let whatsapp_refusals = Family::<StatusLabel, Counter>::default();
        registry.register(
            "whatsapp_refusals",
            "Code requests WhatsApp refused, by its status code",
            whatsapp_refusals.clone(),
        );
        let store_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            "store_errors",
            "State store commands the store answered with an error (or could not be reached for), by command",
            store_errors.clone(),
        );
        let store_abandoned = Family::<OpLabel, Counter>::default();
        registry.register(
            "store_abandoned",
            "State store commands dropped before the store answered (a caller's timeout, a cancelled request, shutdown), by command",
            store_abandoned.clone(),
        );
        let code_wait = Histogram::new(code_wait_buckets());
        registry.register(
            "code_wait_seconds",
            "Time from POST /pair to the first code, for sessions that got one while the request waited",
            code_wait.clone(),
        );
        let store_latency: Family<OpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(store_buckets);
        registry.register(
            "store_seconds",
            "State store command latency, by command",
            store_latency.clone(),
        );
        let open_sessions = Gauge::default();
        registry.register(
            "open_sessions",
            "Pairing sessions running in this process",
            open_sessions.clone(),
        );
        let warm_clients = Gauge::default();
        registry.register(
            "warm_clients",
            "Connected, unpaired link clients ready in the warm pool",
            warm_clients.clone(),
        );
        Self {
            registry,
            sessions_started,
            codes_issued,
            links,
            sessions_ended,
            whatsapp_refusals,
            store_errors,
            store_abandoned,
            code_wait,
            store_latency,
            open_sessions,
            warm_clients,
        }
    }

    /// A session started.
    pub fn session_started(&self) {
        self.sessions_started.inc();
    }

    /// WhatsApp issued a code.
    pub fn code_issued(&self, trigger: CodeTrigger) {
        self.codes_issued
            .get_or_create(&TriggerLabel {
                trigger: trigger.as_str(),
            })
            .inc();
    }

    /// A session ended with `status` (and `reason`, unless it linked).
    pub fn session_ended(&self, status: Status, reason: Option<Reason>) {
        if status == Status::Linked {
            self.links.inc();
        }
        self.sessions_ended
            .get_or_create(&EndLabels {
                status: status.as_str(),
                reason: reason.map_or("none", Reason::as_str),
            })
            .inc();
    }

    /// WhatsApp refused a code request with `status`.
    pub fn whatsapp_refused(&self, status: u16) {
        self.whatsapp_refusals
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    /// A POST waited `elapsed` for its session's first code.
    pub fn code_waited(&self, elapsed: Duration) {
        self.code_wait.observe(elapsed.as_secs_f64());
    }

    /// A store command `op` took `elapsed` and ended with `outcome`.
    pub fn store_command(&self, op: &'static str, elapsed: Duration, outcome: StoreOutcome) {
        let label = OpLabel { op };
        self.store_latency
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        match outcome {
            StoreOutcome::Ok => {}
            StoreOutcome::Failed => {
                self.store_errors.get_or_create(&label).inc();
            }
            StoreOutcome::Abandoned => {
                self.store_abandoned.get_or_create(&label).inc();
            }
        }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus reads),
    /// with the gauges set to `open_sessions` and `warm_clients` first.
    pub fn render(&self, open_sessions: usize, warm_clients: usize) -> String {
        self.open_sessions
            .set(i64::try_from(open_sessions).unwrap_or(i64::MAX));
        self.warm_clients
            .set(i64::try_from(warm_clients).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_registry_renders_every_metric_with_its_prefix() {
        let metrics = Metrics::new();

        let text = metrics.render(3, 2);

        for name in [
            "wa_pair_sessions_started_total",
            "wa_pair_links_total",
            "wa_pair_open_sessions 3",
            "wa_pair_warm_clients 2",
            "wa_pair_code_wait_seconds_count 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn endings_are_counted_by_status_and_reason_and_links_apart() {
        let metrics = Metrics::new();

        metrics.session_ended(Status::Linked, None);
        metrics.session_ended(Status::Failed, Some(Reason::GaveUp));
        metrics.session_ended(Status::Failed, Some(Reason::GaveUp));
        let text = metrics.render(0, 0);

        assert!(text.contains("wa_pair_links_total 1"), "{text}");
        assert!(
            text.contains(r#"wa_pair_sessions_ended_total{status="failed",reason="gave_up"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wa_pair_sessions_ended_total{status="linked",reason="none"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn store_errors_count_only_failed_commands_and_latency_counts_all() {
        let metrics = Metrics::new();

        metrics.store_command("set", Duration::from_millis(2), StoreOutcome::Ok);
        metrics.store_command("set", Duration::from_millis(3), StoreOutcome::Failed);
        let text = metrics.render(0, 0);

        assert!(
            text.contains(r#"wa_pair_store_errors_total{op="set"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wa_pair_store_seconds_count{op="set"} 2"#),
            "{text}"
        );
    }
}

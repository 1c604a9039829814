//! Tracing setup that keeps pairing codes and phone numbers out of the logs.
//!
//! The WhatsApp library logs the phone number and the pairing code in clear
//! at INFO under the `log` target `Client/PairCode`. Three independent
//! guards keep those lines out, so no single mistake re-enables them:
//!
//! 1. the `log` → `tracing` bridge ignores [`SECRET_TARGETS`];
//! 2. [`build_filter`] appends `{target}=off` directives after the user's
//!    own, replacing any user directive for the same target;
//! 3. [`SecretTargetFilter`], a layer in front of every output, drops any
//!    event or span under [`SECRET_TARGETS`] whatever its level, which also
//!    covers span-scoped user directives such as `[pairing]=trace` that an
//!    `EnvFilter` would otherwise let through.

mod batched_stdout;
mod flat_json;

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::level_filters::LevelFilter;
use tracing::{Event, Metadata, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::config::LogFormat;

pub use self::batched_stdout::{Batched, BatchedStdout, Flusher};
pub use self::flat_json::{FlatJson, FlatJsonFields};
pub use crate::phone::mask_phone;

/// Log targets whose events are never written, at any level.
///
/// `Client/PairCode` is where the WhatsApp library logs the phone number
/// and the pairing code in clear text. Matching is by prefix, so
/// sub-targets such as `Client/PairCode/retry` are dropped too.
pub const SECRET_TARGETS: &[&str] = &["Client/PairCode", "Bot/PairCode"];

/// Filter used by [`capture_subscriber`]: the most verbose one, so tests
/// prove that secrets are dropped by the redaction itself, not by a level.
const CAPTURE_FILTER: &str = "trace";

/// Whether `target` is, or is under, one of the [`SECRET_TARGETS`].
#[must_use]
pub fn is_secret_target(target: &str) -> bool {
    SECRET_TARGETS
        .iter()
        .any(|secret| target.starts_with(secret))
}

/// Builds the `EnvFilter` for the user's directives (usually `RUST_LOG`)
/// with `{target}=off` appended for every [`SECRET_TARGETS`] entry.
///
/// An empty string means `info`. Invalid directives are skipped (and named
/// on stderr by `tracing-subscriber`) rather than failing: `Config` already
/// rejects an invalid `RUST_LOG` at startup. The secret directives come last
/// so they replace a user directive for the same target and outrank a bare
/// level such as `trace`, which is less specific than any target.
#[must_use]
pub fn build_filter(user: &str) -> EnvFilter {
    let mut filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse_lossy(user);
    for target in SECRET_TARGETS {
        // The directive grammar allows `/` after the first character, so
        // `Client/PairCode=off` parses; the fallback never triggers, but a
        // panic here would take the whole service down over a log setting.
        if let Ok(directive) = format!("{target}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Installs the global subscriber: `filter` (usually `RUST_LOG`, see
/// [`build_filter`]) plus [`SecretTargetFilter`], writing to stdout as JSON
/// lines ([`FlatJson`]: Railway's shape) or in the pretty format, in
/// batches ([`BatchedStdout`]). Also bridges the `log` crate into `tracing`.
///
/// Hold the returned [`Flusher`] until nothing is left to log: dropping it
/// writes what is waiting, and lines logged after that are written as they
/// come.
///
/// Safe to call more than once: later calls leave the first subscriber and
/// bridge in place and do nothing.
pub fn init(format: LogFormat, filter: &str) -> Flusher {
    install_log_bridge();
    let (stdout, flusher) = BatchedStdout::start();
    let base = Registry::default()
        .with(SecretTargetFilter)
        .with(build_filter(filter));
    let installed = match format {
        LogFormat::Json => tracing::subscriber::set_global_default(base.with(json_layer(stdout))),
        LogFormat::Pretty => tracing::subscriber::set_global_default(
            base.with(fmt::layer().pretty().with_writer(Redacting(stdout))),
        ),
    };
    if installed.is_err() {
        tracing::debug!("telemetry already initialised; keeping the existing subscriber");
    }
    flusher
}

/// A subscriber with the production filtering and redaction that writes JSON
/// lines into memory, and the handle to read them.
///
/// Uses the most verbose filter (`trace`), so anything a flow logs is
/// captured unless redaction drops it. Run the code under test with
/// `tracing::subscriber::with_default` (or `set_default`) and assert on
/// [`CapturedLogs::contents`]. Also installs the `log` bridge, so `log`
/// records from libraries reach the scoped subscriber.
#[must_use]
pub fn capture_subscriber() -> (impl Subscriber + Send + Sync, CapturedLogs) {
    capture_subscriber_with_filter(CAPTURE_FILTER)
}

/// Like [`capture_subscriber`], but with `filter` as the user's directives,
/// to check how a particular `RUST_LOG` behaves.
#[must_use]
pub fn capture_subscriber_with_filter(
    filter: &str,
) -> (impl Subscriber + Send + Sync, CapturedLogs) {
    install_log_bridge();
    let logs = CapturedLogs::default();
    let subscriber = Registry::default()
        .with(SecretTargetFilter)
        .with(build_filter(filter))
        .with(json_layer(logs.clone()));
    (subscriber, logs)
}

/// In-memory log output shared between a capturing subscriber and a test.
/// Clones share the same buffer.
#[derive(Clone, Debug, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything written so far, as text (invalid UTF-8 is replaced).
    #[must_use]
    pub fn contents(&self) -> String {
        let buffer = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

impl<'a> MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A test that panicked while logging must not hide the logs from
        // the next assertion, so a poisoned buffer is still used.
        let mut buffer = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        buffer.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A layer that disables every span and event whose target is under
/// [`SECRET_TARGETS`], at any level and regardless of other filters.
///
/// Placed as a plain (global) layer, it filters for every layer of the
/// subscriber, including outputs added later. Events bridged from the `log`
/// crate carry the generic target `log` in their static metadata, so the
/// event check also looks at the original `log` target.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecretTargetFilter;

impl<S> Layer<S> for SecretTargetFilter
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        !is_secret_target(metadata.target())
    }

    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let target = event.normalized_metadata().map_or_else(
            || event.metadata().target().to_owned(),
            |m| m.target().to_owned(),
        );
        !is_secret_target(&target)
    }
}

fn json_layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer()
        .event_format(FlatJson)
        .fmt_fields(FlatJsonFields)
        .with_writer(Redacting(writer))
}

/// Shortest and longest digit runs treated as a phone number (E.164 allows
/// up to 15 digits; the shortest numbers we accept have 8).
const PHONE_RUN: std::ops::RangeInclusive<usize> = 8..=15;

/// Masks every standalone run of 8 to 15 digits in `line`, the way
/// [`mask_phone`] masks a phone.
///
/// Our own code only ever logs masked phones, but the WhatsApp library
/// logs JIDs and LID mappings in clear at INFO (`628…@s.whatsapp.net`), so
/// the last line of defence sits where log lines are written. Runs touching
/// a letter or a `-` are left alone: they are parts of hex ids, UUIDs and
/// dates, not phone numbers.
#[must_use]
pub fn redact_phone_like(line: &str) -> std::borrow::Cow<'_, str> {
    let bytes = line.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let touches = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphabetic() || *b == b'-');
        let standalone =
            !touches(start.checked_sub(1).and_then(|p| bytes.get(p))) && !touches(bytes.get(i));
        if standalone && PHONE_RUN.contains(&(i - start)) {
            let buffer = out.get_or_insert_with(|| String::with_capacity(line.len()));
            buffer.push_str(&line[copied..start]);
            buffer.push_str(&mask_phone(&line[start..i]));
            copied = i;
        }
    }
    match out {
        Some(mut buffer) => {
            buffer.push_str(&line[copied..]);
            std::borrow::Cow::Owned(buffer)
        }
        None => std::borrow::Cow::Borrowed(line),
    }
}

/// A [`MakeWriter`] whose writers pass each formatted event through
/// [`redact_phone_like`]. The fmt layer writes one whole event per call.
struct Redacting<M>(M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

struct RedactingWriter<W>(W);

impl<W: io::Write> io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(redact_phone_like(text).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Routes `log` records into `tracing`, once per process.
///
/// The bridge forwards each record to the thread's current subscriber, so
/// scoped test subscribers receive `log` records too. If another logger
/// was installed first, that one stays and this does nothing.
fn install_log_bridge() {
    let result = tracing_log::LogTracer::builder()
        .ignore_all(SECRET_TARGETS.iter().copied())
        .with_max_level(log::LevelFilter::Trace)
        .init();
    // An error only means a logger is already installed, which is the
    // idempotent case this function exists for.
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIRING_CODE: &str = "ABCD1234";
    const PHONE: &str = "628123456789";

    fn captured_with(filter: &str, emit: impl FnOnce()) -> String {
        let (subscriber, logs) = capture_subscriber_with_filter(filter);
        tracing::subscriber::with_default(subscriber, emit);
        logs.contents()
    }

    fn log_secret_line_through_the_log_crate() {
        log::info!(target: "Client/PairCode", "pairing secret for {PHONE}: {PAIRING_CODE}");
    }

    #[test]
    fn log_crate_pair_code_line_is_dropped_while_tracing_info_is_kept() {
        // Arrange
        let (subscriber, logs) = capture_subscriber();

        // Act
        tracing::subscriber::with_default(subscriber, || {
            log_secret_line_through_the_log_crate();
            tracing::info!(phone = %mask_phone(PHONE), "pairing started");
            log::info!(target: "wa_pair::store", "bridged ordinary line");
        });
        let output = logs.contents();

        // Assert
        assert!(!output.contains(PAIRING_CODE), "{output}");
        assert!(!output.contains(PHONE), "{output}");
        assert!(output.contains("pairing started"), "{output}");
        assert!(output.contains("6281****6789"), "{output}");
        assert!(
            output.contains("bridged ordinary line"),
            "log bridge not working: {output}"
        );
    }

    #[test]
    fn log_records_that_bypass_the_bridge_ignore_list_are_still_dropped() {
        // Arrange
        let (subscriber, logs) = capture_subscriber();

        // Act
        tracing::subscriber::with_default(subscriber, || {
            dispatch_log_record_directly("Client/PairCode", PAIRING_CODE);
            dispatch_log_record_directly("Client/Socket", "socket connected");
        });
        let output = logs.contents();

        // Assert
        assert!(!output.contains(PAIRING_CODE), "{output}");
        assert!(output.contains("socket connected"), "{output}");
        assert!(output.contains("\"target\":\"Client/Socket\""), "{output}");
    }

    /// What a `LogTracer` installed without our ignore list would do, so the
    /// subscriber's own redaction is exercised rather than the bridge's.
    fn dispatch_log_record_directly(target: &str, message: &str) {
        let _ = tracing_log::format_trace(
            &log::Record::builder()
                .target(target)
                .level(log::Level::Info)
                .args(format_args!("{message}"))
                .build(),
        );
    }

    #[test]
    fn log_bridge_ignores_secret_targets_before_any_filter_runs() {
        // Arrange
        install_log_bridge();
        let logs = CapturedLogs::default();
        let unfiltered = Registry::default().with(json_layer(logs.clone()));

        // Act
        tracing::subscriber::with_default(unfiltered, || {
            log_secret_line_through_the_log_crate();
            log::error!(target: "Client/Socket", "marker");
        });
        let output = logs.contents();

        // Assert
        assert!(!output.contains(PAIRING_CODE), "{output}");
        assert!(output.contains("marker"), "{output}");
    }

    #[test]
    fn tracing_events_under_secret_targets_are_dropped_at_every_level() {
        // Arrange
        let (subscriber, logs) = capture_subscriber();

        // Act
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "Client/PairCode", code = PAIRING_CODE, "error");
            tracing::warn!(target: "Client/PairCode", "warn {PAIRING_CODE}");
            tracing::info!(target: "Client/PairCode/retry", "info {PAIRING_CODE}");
            tracing::trace!(target: "Client/PairCode", "trace {PAIRING_CODE}");
            tracing::info!(target: "Client/Other", "kept");
        });
        let output = logs.contents();

        // Assert
        assert!(!output.contains(PAIRING_CODE), "{output}");
        assert!(output.contains("kept"), "{output}");
    }

    #[test]
    fn user_directives_cannot_re_enable_secret_targets() {
        // Arrange
        let filters = [
            "trace",
            "Client/PairCode=trace,error",
            "Client/PairCode=trace,trace",
            "Client=trace",
            "[pairing]=trace",
            "[pairing]=trace,Client/PairCode=trace",
            "Client/PairCode[pairing]=trace,error",
        ];

        for filter in filters {
            // Act
            let output = captured_with(filter, || {
                let span = tracing::info_span!("pairing");
                let _entered = span.enter();
                log_secret_line_through_the_log_crate();
                tracing::info!(target: "Client/PairCode", "tracing {PAIRING_CODE}");
                tracing::error!(target: "Client/Other", "marker");
            });

            // Assert
            assert!(
                !output.contains(PAIRING_CODE),
                "{filter:?} leaked: {output}"
            );
            assert!(
                output.contains("marker"),
                "{filter:?} captured nothing: {output}"
            );
        }
    }

    #[test]
    fn build_filter_alone_outranks_user_directives_for_the_secret_target() {
        // Arrange
        let filters = [
            "trace",
            "Client/PairCode=trace,error",
            "Client/PairCode=trace,trace",
        ];

        for filter in filters {
            // Act
            let logs = CapturedLogs::default();
            let subscriber = Registry::default()
                .with(build_filter(filter))
                .with(json_layer(logs.clone()));
            tracing::subscriber::with_default(subscriber, || {
                tracing::error!(target: "Client/PairCode", "tracing {PAIRING_CODE}");
                tracing::error!(target: "Client/Other", "marker");
            });
            let output = logs.contents();

            // Assert
            assert!(
                !output.contains(PAIRING_CODE),
                "{filter:?} leaked: {output}"
            );
            assert!(
                output.contains("marker"),
                "{filter:?} captured nothing: {output}"
            );
        }
    }

    #[test]
    fn build_filter_keeps_the_users_levels_for_other_targets() {
        // Arrange
        let filter = "warn";

        // Act
        let output = captured_with(filter, || {
            tracing::info!("quiet info");
            tracing::warn!("loud warning");
        });

        // Assert
        assert!(!output.contains("quiet info"), "{output}");
        assert!(output.contains("loud warning"), "{output}");
    }

    #[test]
    fn build_filter_defaults_to_info_when_empty() {
        // Arrange
        let filter = "";

        // Act
        let output = captured_with(filter, || {
            tracing::debug!("hidden debug");
            tracing::info!("shown info");
        });

        // Assert
        assert!(!output.contains("hidden debug"), "{output}");
        assert!(output.contains("shown info"), "{output}");
    }

    #[test]
    fn captured_output_is_flat_json_with_the_span_fields() {
        // Arrange
        let (subscriber, logs) = capture_subscriber();

        // Act
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("pair_session", phone = %mask_phone(PHONE));
            let _entered = span.enter();
            tracing::info!(attempt = 1, "requesting pairing");
        });
        let output = logs.contents();

        // Assert
        let line = output.lines().next().expect("one line");
        let json: serde_json::Value = serde_json::from_str(line).expect("json line");
        assert_eq!(json["message"], "requesting pairing");
        assert_eq!(json["level"], "info");
        assert_eq!(json["attempt"], 1);
        assert_eq!(json["phone"], "6281****6789");
    }

    #[test]
    fn is_secret_target_matches_by_prefix_only() {
        // Arrange
        let targets = [
            ("Client/PairCode", true),
            ("Client/PairCode/retry", true),
            ("Client", false),
            ("wa_pair::Client/PairCode", false),
        ];

        for (target, expected) in targets {
            // Act
            let secret = is_secret_target(target);

            // Assert
            assert_eq!(secret, expected, "{target:?}");
        }
    }

    #[test]
    fn init_can_be_called_twice_without_panicking() {
        // Arrange
        let filter = "info";

        // Act
        drop(init(LogFormat::Json, filter));
        drop(init(LogFormat::Pretty, filter));

        // Assert
        assert!(tracing::dispatcher::has_been_set());
    }

    #[test]
    fn phone_like_digit_runs_are_masked_but_ids_and_dates_are_not() {
        let line = r#"{"timestamp":"2026-11-25T21:46:03.287159Z","message":"Added own LID-PN mapping: 957982417606510 <-> 628123456789 jid 628123456789:1@s.whatsapp.net id 550e8400-e29b-41d4-a716-446655440000 msg 3EB0123456789ABC","latency_ms":12}"#;

        let redacted = redact_phone_like(line);

        assert!(!redacted.contains("628123456789"), "{redacted}");
        assert!(!redacted.contains("957982417606510"), "{redacted}");
        assert!(redacted.contains("6281****6789"), "{redacted}");
        assert!(
            redacted.contains("2026-11-25T21:46:03.287159Z"),
            "{redacted}"
        );
        assert!(redacted.contains("446655440000"), "uuid intact: {redacted}");
        assert!(
            redacted.contains("3EB0123456789ABC"),
            "hex id intact: {redacted}"
        );
        assert!(redacted.contains(r#""latency_ms":12"#), "{redacted}");
    }

    #[test]
    fn a_line_without_phone_like_runs_is_not_copied() {
        assert!(matches!(
            redact_phone_like("nothing 1234567 here"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}

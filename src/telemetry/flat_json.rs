//! One JSON object per log line, flat, in the shape Railway's log explorer
//! reads: `timestamp`, `level` (lower case), `message` and `target` at the
//! top, then the fields of every span the event is in (outermost first),
//! then the event's own fields, all at the top level too. Railway shows
//! `message` as the line and turns every other top-level key into an
//! attribute people filter on (`@level:error`, `@event:linked`).
//!
//! ```json
//! {"timestamp":"2026-11-26T12:00:00.123456Z","level":"info","message":"request completed","target":"wa_pair::http","request_id":"…","method":"GET","route":"/pair/{phone}","status":404,"latency_ms":0}
//! ```
//!
//! A key that appears twice (a span field and an event field of the same
//! name) is written twice; JSON readers, Railway's included, keep the last,
//! which is the event's own. Written by hand rather than through `serde`'s
//! maps: one request line is on the hot path of every request.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format: see the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlatJson;

/// How span fields are kept between their creation and an event: as the
/// body of a JSON object (`"k":v,"k2":v2`), ready to be spliced in.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlatJsonFields;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records bridged from the `log` crate carry their real target and
        // level in `log.*` fields; `normalized_metadata` puts them back.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":\"");
        push_timestamp(&mut line);
        line.push_str("\",\"level\":\"");
        line.push_str(level_name(meta.level()));
        line.push('"');
        // The message first, so it stays at the top whatever else follows.
        let mut message = MessageOnly(&mut line);
        event.record(&mut message);
        line.push_str(",\"target\":");
        push_json_str(&mut line, meta.target());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    line.push(',');
                    line.push_str(fields.as_str());
                }
            }
        }
        let mut rest = Fields {
            out: &mut line,
            first: false,
            skip_message: true,
        };
        event.record(&mut rest);
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

impl<'writer> FormatFields<'writer> for FlatJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut body = String::new();
        fields.record(&mut Fields {
            out: &mut body,
            first: true,
            skip_message: false,
        });
        writer.write_str(&body)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut body = String::new();
        fields.record(&mut Fields {
            out: &mut body,
            first: current.is_empty(),
            skip_message: false,
        });
        current.fields.push_str(&body);
        Ok(())
    }
}

fn level_name(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// Writes `value` as a JSON string, quotes included.
fn push_json_str(out: &mut String, value: &str) {
    out.reserve(value.len() + 2);
    out.push('"');
    push_json_escaped(out, value);
    out.push('"');
}

/// Writes `value`'s `Debug` text as a JSON string, quotes included,
/// escaping it as it is formatted rather than formatting it into a
/// `String` first (an allocation per field: a request line's `message` and
/// `method` are such fields).
fn push_json_debug(out: &mut String, value: &dyn fmt::Debug) {
    struct Escaping<'a>(&'a mut String);

    impl fmt::Write for Escaping<'_> {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            push_json_escaped(self.0, text);
            Ok(())
        }
    }

    out.push('"');
    let _ = write!(Escaping(out), "{value:?}");
    out.push('"');
}

/// Writes `value` as the inside of a JSON string.
///
/// Copies the runs between characters that need escaping in one
/// `push_str` each: every request's log line goes through here, and pushed
/// a character at a time it was 6% of the instructions of a `GET
/// /pair/{phone}` (callgrind; 3.9% this way). Only ASCII bytes are ever
/// escaped, and an ASCII byte is never inside a multi-byte character, so
/// every slice below starts and ends on a character boundary.
fn push_json_escaped(out: &mut String, value: &str) {
    let mut copied = 0;
    for (i, byte) in value.bytes().enumerate() {
        let short = match byte {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&value[copied..i]);
        match short {
            Some(escape) => out.push_str(escape),
            None => {
                let _ = write!(out, "\\u{byte:04x}");
            }
        }
        copied = i + 1;
    }
    out.push_str(&value[copied..]);
}

/// Writes the current UTC time as `2026-11-26T12:00:00.123456Z`, the form
/// `tracing-subscriber`'s `SystemTime` writes. The part up to the seconds is
/// kept per thread and formatted again only when the second changes:
/// formatting the whole date on every line was 4% of the instructions of a
/// `GET /pair/{phone}` (callgrind).
fn push_timestamp(out: &mut String) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        /// The last second formatted, and its text up to the seconds.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    // A clock before 1970 is written as 1970: a log line is no place to fail.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let cached = SECOND.try_with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != now.as_secs() {
            second.0 = now.as_secs();
            second.1 = format_second(now.as_secs());
        }
        out.push_str(&second.1);
    });
    // A line logged while the thread's locals are being destroyed.
    if cached.is_err() {
        out.push_str(&format_second(now.as_secs()));
    }
    let mut micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.push('.');
    out.extend(digits.iter().map(|&d| char::from(d)));
    out.push('Z');
}

/// `secs` after 1970 in UTC, as `2026-11-26T12:00:00`. A time `time`
/// cannot represent (past the year 9999) is written as 1970.
fn format_second(secs: u64) -> String {
    let at = i64::try_from(secs)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Writes the `message` field, and nothing else, as `,"message":"…"`.
struct MessageOnly<'a>(&'a mut String);

impl Visit for MessageOnly<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(",\"message\":");
            push_json_str(self.0, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(",\"message\":");
            push_json_debug(self.0, value);
        }
    }
}

/// Writes fields as `"name":value` pairs separated by commas; numbers and
/// booleans as JSON numbers and booleans, everything else as strings.
struct Fields<'a> {
    out: &'a mut String,
    /// Whether nothing was written yet (no leading comma then).
    first: bool,
    /// The event's message has its own place; spans have none.
    skip_message: bool,
}

impl Fields<'_> {
    /// Starts a pair: the separator and the key. `None` when skipped.
    fn key(&mut self, field: &Field) -> Option<()> {
        // `log` records bridged into tracing carry their metadata as
        // `log.*` fields; the target is already at the top.
        if (self.skip_message && field.name() == "message") || field.name().starts_with("log.") {
            return None;
        }
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_json_str(self.out, field.name());
        self.out.push(':');
        Some(())
    }
}

impl Visit for Fields<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field).is_some() {
            let _ = write!(self.out, "{value}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field).is_some() {
            let _ = write!(self.out, "{value}");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field).is_some() {
            self.out.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field).is_some() {
            if value.is_finite() {
                let _ = write!(self.out, "{value}");
            } else {
                push_json_str(self.out, &value.to_string());
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field).is_some() {
            push_json_str(self.out, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field).is_some() {
            push_json_debug(self.out, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::telemetry::CapturedLogs;

    fn one_line(emit: impl FnOnce()) -> serde_json::Value {
        let logs = CapturedLogs::default();
        let subscriber = tracing_subscriber::Registry::default().with(
            tracing_subscriber::fmt::layer()
                .event_format(FlatJson)
                .fmt_fields(FlatJsonFields)
                .with_writer(logs.clone()),
        );
        tracing::subscriber::with_default(subscriber, emit);
        let output = logs.contents();
        let line = output.lines().next().expect("one line");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    proptest::proptest! {
        #[test]
        fn any_string_written_as_json_reads_back_unchanged(value in ".*") {
            // Act
            let mut out = String::new();
            push_json_str(&mut out, &value);

            // Assert
            let read: String = serde_json::from_str(&out).expect("valid JSON");
            proptest::prop_assert_eq!(read, value);
        }

        #[test]
        fn any_debug_text_written_as_json_reads_back_unchanged(value in ".*") {
            // Act
            let mut out = String::new();
            push_json_debug(&mut out, &value);

            // Assert
            let read: String = serde_json::from_str(&out).expect("valid JSON");
            proptest::prop_assert_eq!(read, format!("{value:?}"));
        }
    }

    #[test]
    fn seconds_are_formatted_across_day_month_and_year_boundaries() {
        // 2024-12-31T23:59:59Z, one second later, and a leap day.
        let cases = [
            (1_735_689_599, "2024-12-31T23:59:59"),
            (1_735_689_600, "2025-01-01T00:00:00"),
            (1_709_164_800, "2024-02-29T00:00:00"),
            (0, "1970-01-01T00:00:00"),
        ];

        for (secs, text) in cases {
            assert_eq!(format_second(secs), text);
        }
    }

    #[test]
    fn timestamps_have_the_form_and_time_tracing_subscriber_writes() {
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        let format = time::format_description::well_known::Rfc3339;

        // Act: twice, so the second comes from the thread's cached second.
        let mut ours = [String::new(), String::new()];
        let mut theirs = String::new();
        push_timestamp(&mut ours[0]);
        SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .expect("formatted");
        push_timestamp(&mut ours[1]);

        // Assert
        let theirs_at = time::OffsetDateTime::parse(&theirs, &format).expect(&theirs);
        for ours in ours {
            assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[10] == b'T', "{ours}");
            let ours_at = time::OffsetDateTime::parse(&ours, &format).expect(&ours);
            assert!(
                (ours_at - theirs_at).abs() < time::Duration::seconds(1),
                "{ours} vs {theirs}"
            );
        }
    }

    #[test]
    fn control_characters_quotes_and_backslashes_are_escaped() {
        // Act
        let mut out = String::new();
        push_json_str(&mut out, "a\"b\\c\nd\u{1}é");

        // Assert
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
    }

    #[test]
    fn an_event_is_one_flat_object_with_lower_case_level_and_message_on_top() {
        // Act
        let json = one_line(|| {
            tracing::warn!(
                event = "linked",
                attempt = 2_u64,
                ok = true,
                "phone \"linked\"\n"
            );
        });

        // Assert
        assert_eq!(json["level"], "warn");
        assert_eq!(json["message"], "phone \"linked\"\n");
        assert_eq!(json["event"], "linked");
        assert_eq!(json["attempt"], 2);
        assert_eq!(json["ok"], true);
        assert!(json["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(json.get("fields").is_none());
    }

    #[test]
    fn span_fields_are_flattened_into_the_line_and_later_records_too() {
        // Act
        let json = one_line(|| {
            let outer = tracing::info_span!(
                "request",
                request_id = "r-1",
                status = tracing::field::Empty
            );
            let _outer = outer.enter();
            outer.record("status", 404_u64);
            let inner = tracing::info_span!("session", phone = "6281****6789");
            let _inner = inner.enter();
            tracing::info!(latency_ms = 3_u64, "done");
        });

        // Assert
        assert_eq!(json["request_id"], "r-1");
        assert_eq!(json["status"], 404);
        assert_eq!(json["phone"], "6281****6789");
        assert_eq!(json["latency_ms"], 3);
        assert_eq!(json["message"], "done");
    }

    #[test]
    fn the_events_own_field_wins_over_a_spans_of_the_same_name() {
        // Act
        let json = one_line(|| {
            let span = tracing::info_span!("request", status = 200_u64);
            let _entered = span.enter();
            tracing::info!(status = 500_u64, "answered");
        });

        // Assert
        assert_eq!(json["status"], 500);
    }
}

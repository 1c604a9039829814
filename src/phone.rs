//! Phone numbers as WhatsApp wants them: E.164 digits without the `+`.
//!
//! [`PhoneNumber::parse`] is the only way to obtain a [`PhoneNumber`], so any
//! value of that type is known to be canonical. Rejected input yields a
//! [`PhoneError`] that says what is wrong, shows the expected format and, when
//! it can be derived safely, suggests the digits the caller probably meant.
//!
//! Phone numbers are personal data: [`PhoneNumber`]'s `Display` and `Debug`
//! print the masked form, and only [`PhoneNumber::as_str`] and serde
//! serialization expose the full digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Fewest digits accepted, country code included.
///
/// Nearly every numbering plan gives mobile numbers at least 8 digits with
/// the country code; the few exceptions are tiny plans with 4-digit local
/// numbers (such as Niue or Tokelau). Shorter input is far more likely a
/// truncated number than a real account, so it is rejected.
pub const MIN_DIGITS: usize = 8;

/// Most digits accepted, country code included: the E.164 maximum.
pub const MAX_DIGITS: usize = 15;

/// Longest country calling code, in digits (E.164 codes are 1 to 3 digits).
const MAX_COUNTRY_CODE_DIGITS: usize = 3;

/// How many digits [`mask_phone`] shows at each end of a long number.
///
/// Four at each end is enough for an operator to tell two numbers apart in
/// logs without the log holding the number itself.
const MASK_VISIBLE_PER_SIDE: usize = 4;

/// How many digits [`mask_phone`] always hides, whatever the length.
///
/// Without a floor, "keep four at each end" would reveal an 8-digit number
/// in full; hiding at least four keeps even the shortest number unusable.
const MASK_MIN_HIDDEN: usize = 4;

/// What every masked number shows in place of its hidden digits.
///
/// A fixed width hides how many digits were left out.
const MASK_FILLER: &str = "****";

/// The format every error message repeats, so a caller always learns what to send.
const FORMAT_HINT: &str = "phone must be digits only with the country code and no \"+\", spaces or dashes, e.g. 628123456789";

/// A phone number in canonical form: E.164 digits without the `+`
/// (for example `628123456789`).
///
/// Built only by [`PhoneNumber::parse`] (or [`FromStr`] / deserialization,
/// which call it). `Display` and `Debug` print the masked form so that a
/// stray `{}` in a log line cannot leak the number; use
/// [`PhoneNumber::as_str`] where the real digits are needed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parses strict canonical input: ASCII digits only, country calling code
    /// first, no `+`, no separators or surrounding whitespace, no leading `0`,
    /// [`MIN_DIGITS`] to [`MAX_DIGITS`] digits, and a country calling code
    /// that exists in the libphonenumber metadata.
    ///
    /// # Errors
    ///
    /// Returns a [`PhoneError`] whose [`kind`](PhoneError::kind) names the
    /// first problem found and whose [`suggestion`](PhoneError::suggestion)
    /// holds the canonical digits when they can be derived from the input.
    pub fn parse(input: &str) -> Result<Self, PhoneError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::new(PhoneErrorKind::Empty, "phone is empty"));
        }

        let mut has_plus = false;
        let mut has_inner_separator = false;
        for c in trimmed.chars() {
            if c.is_ascii_digit() {
                continue;
            }
            if c == '+' {
                has_plus = true;
            } else if is_separator(c) {
                has_inner_separator = true;
            } else {
                return Err(PhoneError::new(
                    PhoneErrorKind::NonDigit,
                    format!("phone contains {c:?}, which is not a digit"),
                ));
            }
        }

        let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();

        // A leading 0 means a national (trunk) or international (00) prefix,
        // which is a different mistake from formatting, so it is reported
        // first even when separators are present too.
        if digits.starts_with('0') {
            return Err(leading_zero_error(&digits));
        }
        if has_plus {
            let problem = if has_inner_separator {
                "phone must not contain \"+\" or separators such as spaces, dashes, dots or brackets"
            } else {
                "phone must not contain \"+\""
            };
            let suggestion = if plus_only_leads(trimmed) {
                suggest_from(trimmed)
            } else {
                None
            };
            return Err(
                PhoneError::new(PhoneErrorKind::PlusSign, problem).with_suggestion(suggestion)
            );
        }
        if has_inner_separator {
            return Err(PhoneError::new(
                PhoneErrorKind::Separators,
                "phone must not contain separators such as spaces, dashes, dots or brackets",
            )
            .with_suggestion(suggest_from(trimmed)));
        }
        if trimmed.len() != input.len() {
            return Err(PhoneError::new(
                PhoneErrorKind::Whitespace,
                "phone must not have leading or trailing whitespace",
            )
            .with_suggestion(suggest_from(trimmed)));
        }

        check_digits(&digits)?;
        Ok(Self(digits))
    }

    /// The canonical digits (for example `628123456789`).
    ///
    /// This is the real number: keep it out of logs, use
    /// [`masked`](Self::masked) or `Display` there.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number with its middle digits replaced by `****`, safe for logs
    /// (for example `6281****6789`). See [`mask_phone`] for the exact rule.
    #[must_use]
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }

    /// Whether the device `jid` (`628123456789:3@s.whatsapp.net`) belongs
    /// to this number's account. Where WhatsApp spells the account number
    /// otherwise than it is dialled, both are compared in WhatsApp's
    /// spelling, so a right link is never taken for a stranger's.
    #[must_use]
    pub fn owns_device(&self, jid: &str) -> bool {
        let user = jid.split([':', '@']).next().unwrap_or_default();
        account_spelling(user) == account_spelling(&self.0)
    }
}

/// A number as WhatsApp names the account: Brazil's mobile ninth digit
/// (`55 AA 9XXXX-XXXX`) is left out of older accounts' JIDs, and Mexico's
/// `521` and Argentina's `549` mobile prefixes are `52` and `54` there.
fn account_spelling(digits: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    if let Some(rest) = digits.strip_prefix("521").filter(|r| r.len() == 10) {
        return Cow::Owned(format!("52{rest}"));
    }
    if let Some(rest) = digits.strip_prefix("549").filter(|r| r.len() == 10) {
        return Cow::Owned(format!("54{rest}"));
    }
    if digits.len() == 13 && digits.starts_with("55") && digits.as_bytes()[4] == b'9' {
        return Cow::Owned(format!("{}{}", &digits[..4], &digits[5..]));
    }
    Cow::Borrowed(digits)
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PhoneNumber").field(&self.masked()).finish()
    }
}

impl FromStr for PhoneNumber {
    type Err = PhoneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for PhoneNumber {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Serialize for PhoneNumber {
    // Storage needs the real digits, unlike Display which is for humans and logs.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PhoneNumber {
    // Going through `parse` means corrupt or legacy stored values are
    // rejected at the boundary instead of flowing on as "valid" numbers.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Masks a phone number for logs: keeps at most the first and last four
/// characters and replaces the middle by exactly `****`.
///
/// At least four characters are always hidden, so shorter input shows fewer
/// at each end (`62812345` becomes `62****45`) and input of four characters
/// or fewer becomes just `****`. Works on any string without panicking, so
/// it can be applied to unvalidated input too.
#[must_use]
pub fn mask_phone(digits: &str) -> String {
    let chars: Vec<char> = digits.chars().collect();
    let visible = chars.len().saturating_sub(MASK_MIN_HIDDEN) / 2;
    let visible = visible.min(MASK_VISIBLE_PER_SIDE);
    let head = chars.iter().take(visible);
    let tail = chars.iter().skip(chars.len() - visible);
    let mut masked = String::with_capacity(2 * visible + MASK_FILLER.len());
    masked.extend(head);
    masked.push_str(MASK_FILLER);
    masked.extend(tail);
    masked
}

/// The kind of problem a [`PhoneError`] reports, for programmatic handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhoneErrorKind {
    /// The input is empty or only whitespace.
    Empty,
    /// The input contains a `+` (often together with separators).
    PlusSign,
    /// The input contains spaces, dashes, dots, brackets or slashes between digits.
    Separators,
    /// The input is otherwise fine but has leading or trailing whitespace.
    Whitespace,
    /// The input contains a character that is not an ASCII digit, `+` or separator.
    NonDigit,
    /// The digits start with `0`: a national trunk prefix or a `00` international prefix.
    LeadingZero,
    /// Fewer than [`MIN_DIGITS`] digits.
    TooShort,
    /// More than [`MAX_DIGITS`] digits.
    TooLong,
    /// No country calling code matches the first one to three digits.
    UnknownCountryCode,
}

impl PhoneErrorKind {
    /// A stable `snake_case` code for API responses (for example `plus_sign`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::PlusSign => "plus_sign",
            Self::Separators => "separators",
            Self::Whitespace => "whitespace",
            Self::NonDigit => "non_digit",
            Self::LeadingZero => "leading_zero",
            Self::TooShort => "too_short",
            Self::TooLong => "too_long",
            Self::UnknownCountryCode => "unknown_country_code",
        }
    }
}

/// Why an input was not accepted as a [`PhoneNumber`].
///
/// `Display` (and [`message`](Self::message)) says what is wrong and repeats
/// the expected format; it never contains the input's digits. The derived
/// `Debug` shows the suggestion only in masked form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; {FORMAT_HINT}")]
pub struct PhoneError {
    kind: PhoneErrorKind,
    problem: String,
    suggestion: Option<PhoneNumber>,
}

impl PhoneError {
    fn new(kind: PhoneErrorKind, problem: impl Into<String>) -> Self {
        Self {
            kind,
            problem: problem.into(),
            suggestion: None,
        }
    }

    fn with_suggestion(mut self, suggestion: Option<PhoneNumber>) -> Self {
        self.suggestion = suggestion;
        self
    }

    /// What kind of problem this is.
    #[must_use]
    pub fn kind(&self) -> PhoneErrorKind {
        self.kind
    }

    /// A human-readable explanation, including the expected format.
    #[must_use]
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The canonical digits the caller probably meant, when they can be
    /// derived from the input; always a value that [`PhoneNumber::parse`]
    /// accepts.
    #[must_use]
    pub fn suggestion(&self) -> Option<&str> {
        self.suggestion.as_ref().map(PhoneNumber::as_str)
    }
}

/// Characters people put between digits when writing a number for humans.
fn is_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '-' | '.' | '(' | ')' | '/')
}

/// True when the only `+` is the first character, as in `+62 812...`;
/// a `+` elsewhere makes the intended number a guess.
fn plus_only_leads(trimmed: &str) -> bool {
    trimmed.starts_with('+') && trimmed.matches('+').count() == 1
}

/// The digits of a formatted number, offered only if they parse.
fn suggest_from(trimmed: &str) -> Option<PhoneNumber> {
    // "+44 (0)20 ..." writes the trunk 0 in brackets for domestic callers;
    // it is not part of the international number.
    let without_trunk = trimmed.replace("(0)", "");
    let digits: String = without_trunk.chars().filter(char::is_ascii_digit).collect();
    PhoneNumber::parse(&digits).ok()
}

fn leading_zero_error(digits: &str) -> PhoneError {
    if let Some(international) = digits.strip_prefix("00") {
        // "00" is the international dialling prefix, so the country code
        // follows it and the intended number is known.
        return PhoneError::new(
            PhoneErrorKind::LeadingZero,
            "phone must not start with the international prefix 00: drop it and start with the country code",
        )
        .with_suggestion(PhoneNumber::parse(international).ok());
    }
    // A single leading 0 is a national trunk prefix; the country is unknown,
    // so no suggestion is possible.
    PhoneError::new(
        PhoneErrorKind::LeadingZero,
        "phone must not start with 0: replace the leading 0 with the country code, e.g. 62 for Indonesia",
    )
}

/// Checks a string known to be ASCII digits only and without a leading 0.
fn check_digits(digits: &str) -> Result<(), PhoneError> {
    let count = digits.len();
    if count < MIN_DIGITS {
        return Err(PhoneError::new(
            PhoneErrorKind::TooShort,
            format!(
                "phone is too short: it has {count} digits but needs at least {MIN_DIGITS} including the country code"
            ),
        ));
    }
    if count > MAX_DIGITS {
        return Err(PhoneError::new(
            PhoneErrorKind::TooLong,
            format!(
                "phone is too long: it has {count} digits but at most {MAX_DIGITS} are allowed"
            ),
        ));
    }
    if !has_known_country_code(digits) {
        return Err(PhoneError::new(
            PhoneErrorKind::UnknownCountryCode,
            "phone does not start with a known country calling code",
        ));
    }
    Ok(())
}

/// Every country calling code in libphonenumber's metadata (9.0.33; the
/// non-geographic ones such as 800 and 882 included), sorted. It is the only
/// part of that metadata the service uses, so it is compiled in rather than
/// the whole database loaded at startup (about 90 ms and 5 MiB). The test
/// `country_codes_are_exactly_libphonenumbers` checks it against the crate,
/// so a metadata update that adds or drops a code fails the tests.
const COUNTRY_CODES: [u16; 215] = [
    1, 7, 20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53, 54,
    55, 56, 57, 58, 60, 61, 62, 63, 64, 65, 66, 81, 82, 84, 86, 90, 91, 92, 93, 94, 95, 98, 211,
    212, 213, 216, 218, 220, 221, 222, 223, 224, 225, 226, 227, 228, 229, 230, 231, 232, 233, 234,
    235, 236, 237, 238, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250, 251, 252, 253,
    254, 255, 256, 257, 258, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 290, 291, 297, 298,
    299, 350, 351, 352, 353, 354, 355, 356, 357, 358, 359, 370, 371, 372, 373, 374, 375, 376, 377,
    378, 380, 381, 382, 383, 385, 386, 387, 389, 420, 421, 423, 500, 501, 502, 503, 504, 505, 506,
    507, 508, 509, 590, 591, 592, 593, 594, 595, 596, 597, 598, 599, 670, 672, 673, 674, 675, 676,
    677, 678, 679, 680, 681, 682, 683, 685, 686, 687, 688, 689, 690, 691, 692, 800, 808, 850, 852,
    853, 855, 856, 870, 878, 880, 881, 882, 883, 886, 888, 960, 961, 962, 963, 964, 965, 966, 967,
    968, 970, 971, 972, 973, 974, 975, 976, 977, 979, 992, 993, 994, 995, 996, 998,
];

/// E.164 country codes are prefix-free, so at most one of the 1-, 2- and
/// 3-digit prefixes can be a code; any match means the code exists.
fn has_known_country_code(digits: &str) -> bool {
    (1..=MAX_COUNTRY_CODE_DIGITS)
        .filter_map(|len| digits.get(..len))
        .filter_map(|prefix| prefix.parse::<u16>().ok())
        .any(|code| COUNTRY_CODES.binary_search(&code).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn country_codes_are_exactly_libphonenumbers() {
        // Arrange
        let database = &*phonenumber::metadata::DATABASE;

        // Act
        let known: Vec<u16> = (1..=999)
            .filter(|code| {
                database
                    .by_code(code)
                    .is_some_and(|regions| !regions.is_empty())
            })
            .collect();

        // Assert
        assert_eq!(known, COUNTRY_CODES.to_vec());
    }

    fn parse_err(input: &str) -> PhoneError {
        match PhoneNumber::parse(input) {
            Ok(number) => panic!("expected {input:?} to be rejected, got {}", number.as_str()),
            Err(error) => error,
        }
    }

    #[test]
    fn parse_accepts_canonical_numbers_from_many_countries() {
        // Arrange
        let valid = [
            ("Indonesia", "628123456789"),
            ("United States", "14155552671"),
            ("United Kingdom", "447911123456"),
            ("India", "919876543210"),
            ("Germany", "4915112345678"),
            ("Brazil", "5511987654321"),
            ("8-digit minimum", "62812345"),
            ("15-digit maximum", "628123456789012"),
            ("3-digit country code", "971501234567"),
        ];

        for (label, input) in valid {
            // Act
            let parsed = PhoneNumber::parse(input);

            // Assert
            let number = parsed.unwrap_or_else(|e| panic!("{label} {input:?} rejected: {e}"));
            assert_eq!(number.as_str(), input, "{label}");
        }
    }

    #[test]
    fn parse_rejects_each_kind_with_a_format_hint_and_the_right_suggestion() {
        // Arrange
        let cases: [(&str, PhoneErrorKind, Option<&str>); 20] = [
            ("", PhoneErrorKind::Empty, None),
            ("   ", PhoneErrorKind::Empty, None),
            (
                "+62 812-345-6789",
                PhoneErrorKind::PlusSign,
                Some("628123456789"),
            ),
            (
                "+628123456789",
                PhoneErrorKind::PlusSign,
                Some("628123456789"),
            ),
            ("62+8123456789", PhoneErrorKind::PlusSign, None),
            ("+62 123", PhoneErrorKind::PlusSign, None),
            (
                "+44 (0)7911 123456",
                PhoneErrorKind::PlusSign,
                Some("447911123456"),
            ),
            (
                "(62) 812.345.6789",
                PhoneErrorKind::Separators,
                Some("628123456789"),
            ),
            (
                "62 812 3456 789",
                PhoneErrorKind::Separators,
                Some("628123456789"),
            ),
            (
                " 628123456789 ",
                PhoneErrorKind::Whitespace,
                Some("628123456789"),
            ),
            ("62abc", PhoneErrorKind::NonDigit, None),
            ("６２８１２３４５６７８９", PhoneErrorKind::NonDigit, None),
            ("0812 3456 789", PhoneErrorKind::LeadingZero, None),
            ("08123456789", PhoneErrorKind::LeadingZero, None),
            (
                "00628123456789",
                PhoneErrorKind::LeadingZero,
                Some("628123456789"),
            ),
            ("6281234", PhoneErrorKind::TooShort, None),
            ("6281234567890123", PhoneErrorKind::TooLong, None),
            ("999123456789", PhoneErrorKind::UnknownCountryCode, None),
            ("2101234567", PhoneErrorKind::UnknownCountryCode, None),
            ("+", PhoneErrorKind::PlusSign, None),
        ];

        for (input, kind, suggestion) in cases {
            // Act
            let error = parse_err(input);

            // Assert
            assert_eq!(error.kind(), kind, "kind for {input:?}");
            assert_eq!(error.suggestion(), suggestion, "suggestion for {input:?}");
            assert!(
                error.message().ends_with(FORMAT_HINT),
                "hint for {input:?}: {error}"
            );
        }
    }

    #[test]
    fn parse_rejects_plus_sign_with_separators_naming_both() {
        // Arrange
        let input = "+62 812-345-6789";

        // Act
        let error = parse_err(input);

        // Assert
        assert_eq!(error.kind(), PhoneErrorKind::PlusSign);
        assert!(error.message().contains("\"+\""));
        assert!(error.message().contains("spaces, dashes"));
        assert_eq!(
            error.message(),
            "phone must not contain \"+\" or separators such as spaces, dashes, dots or brackets; \
             phone must be digits only with the country code and no \"+\", spaces or dashes, e.g. 628123456789"
        );
    }

    #[test]
    fn parse_rejects_trunk_zero_telling_to_use_the_country_code() {
        // Arrange
        let input = "0812 3456 789";

        // Act
        let error = parse_err(input);

        // Assert
        assert_eq!(error.kind(), PhoneErrorKind::LeadingZero);
        assert!(
            error
                .message()
                .contains("replace the leading 0 with the country code")
        );
        assert!(error.message().contains("62 for Indonesia"));
        assert_eq!(error.suggestion(), None);
    }

    #[test]
    fn parse_rejects_non_digit_naming_the_character() {
        // Arrange
        let input = "62abc";

        // Act
        let error = parse_err(input);

        // Assert
        assert!(
            error
                .message()
                .starts_with("phone contains 'a', which is not a digit")
        );
    }

    #[test]
    fn parse_rejects_lengths_stating_the_digit_count() {
        // Arrange
        let short = "6281234";
        let long = "6281234567890123";

        // Act
        let short_error = parse_err(short);
        let long_error = parse_err(long);

        // Assert
        assert!(
            short_error
                .message()
                .contains("has 7 digits but needs at least 8")
        );
        assert!(
            long_error
                .message()
                .contains("has 16 digits but at most 15")
        );
    }

    #[test]
    fn error_messages_never_contain_the_input_digits() {
        // Arrange
        // Not the 628123456789 of the format hint, which every message shows.
        let inputs = [
            "+1 415-555-2671",
            " 14155552671 ",
            "0014155552671",
            "999155552671",
        ];

        for input in inputs {
            // Act
            let error = parse_err(input);
            let rendered = format!("{error} {error:?}");

            // Assert
            assert!(
                !rendered.contains("5552671"),
                "{input:?} leaked in {rendered}"
            );
        }
    }

    #[test]
    fn error_kind_codes_are_snake_case() {
        // Arrange
        let kind = PhoneErrorKind::UnknownCountryCode;

        // Act
        let code = kind.as_str();

        // Assert
        assert_eq!(code, "unknown_country_code");
    }

    #[test]
    fn masked_keeps_first_four_and_last_four_digits() {
        // Arrange
        let number = PhoneNumber::parse("628123456789").expect("valid");

        // Act
        let masked = number.masked();

        // Assert
        assert_eq!(masked, "6281****6789");
    }

    #[test]
    fn mask_phone_always_hides_at_least_four_characters() {
        // Arrange
        let cases = [
            ("", "****"),
            ("1234", "****"),
            ("12345", "****"),
            ("123456", "1****6"),
            ("62812345", "62****45"),
            ("6281234567", "628****567"),
            ("14155552671", "141****671"),
            ("628123456789012", "6281****9012"),
            ("ünïcödé-text", "ünïc****text"),
        ];

        for (input, expected) in cases {
            // Act
            let masked = mask_phone(input);

            // Assert
            assert_eq!(masked, expected, "mask of {input:?}");
        }
    }

    #[test]
    fn display_and_debug_never_show_the_full_digits() {
        // Arrange
        let number = PhoneNumber::parse("628123456789").expect("valid");

        // Act
        let displayed = format!("{number}");
        let debugged = format!("{number:?}");

        // Assert
        assert_eq!(displayed, "6281****6789");
        assert_eq!(debugged, "PhoneNumber(\"6281****6789\")");
        assert!(!debugged.contains("628123456789"));
    }

    #[test]
    fn serde_round_trips_the_full_digits() {
        // Arrange
        let number = PhoneNumber::parse("14155552671").expect("valid");

        // Act
        let json = serde_json::to_string(&number).expect("serialize");
        let back: PhoneNumber = serde_json::from_str(&json).expect("deserialize");

        // Assert
        assert_eq!(json, "\"14155552671\"");
        assert_eq!(back, number);
    }

    #[test]
    fn deserialize_rejects_stored_values_that_do_not_parse() {
        // Arrange
        let stored = "\"+14155552671\"";

        // Act
        let result = serde_json::from_str::<PhoneNumber>(stored);

        // Assert
        let error = result.expect_err("must reject");
        assert!(error.to_string().contains("must not contain \"+\""));
    }

    #[test]
    fn from_str_and_as_ref_agree_with_parse_and_as_str() {
        // Arrange
        let input = "447911123456";

        // Act
        let number: PhoneNumber = input.parse().expect("valid");

        // Assert
        assert_eq!(AsRef::<str>::as_ref(&number), number.as_str());
        assert_eq!(number, PhoneNumber::parse(input).expect("valid"));
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_strings(input in any::<String>()) {
            let _ = PhoneNumber::parse(&input);
        }

        #[test]
        fn parse_never_panics_on_phone_like_strings(input in "[0-9+ ().\\-/a٣\u{00a0}]{0,24}") {
            let _ = PhoneNumber::parse(&input);
        }

        #[test]
        fn accepted_numbers_are_canonical_and_reparse_to_themselves(
            input in prop_oneof![any::<String>(), "[1-9][0-9]{6,16}", "[ +0-9-]{0,18}"]
        ) {
            if let Ok(number) = PhoneNumber::parse(&input) {
                let digits = number.as_str();
                prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
                prop_assert!((MIN_DIGITS..=MAX_DIGITS).contains(&digits.len()));
                prop_assert_eq!(PhoneNumber::parse(digits), Ok(number.clone()));
            }
        }

        #[test]
        fn suggestions_always_parse(input in "[ +0-9().-]{0,20}") {
            if let Err(error) = PhoneNumber::parse(&input)
                && let Some(suggestion) = error.suggestion()
            {
                prop_assert!(PhoneNumber::parse(suggestion).is_ok());
            }
        }

        #[test]
        fn mask_phone_never_shows_more_than_eight_characters(input in any::<String>()) {
            let masked = mask_phone(&input);
            prop_assert!(masked.chars().count() <= 8 + MASK_FILLER.len());
            prop_assert!(masked.contains(MASK_FILLER));
        }
    }

    fn owns(jid: &str, phone: &str) -> bool {
        PhoneNumber::parse(phone).unwrap().owns_device(jid)
    }

    #[test]
    fn a_device_of_the_dialled_number_is_its_account() {
        assert!(owns("628123456789:3@s.whatsapp.net", "628123456789"));
        assert!(!owns("628111111111:3@s.whatsapp.net", "628123456789"));
    }

    #[test]
    fn numbers_whatsapp_spells_otherwise_are_still_their_own_account() {
        // Brazil: an older account's JID lacks the mobile ninth digit.
        assert!(owns("551187654321:1@s.whatsapp.net", "5511987654321"));
        // Mexico and Argentina: the mobile 1 and 9 are not in the JID.
        assert!(owns("525512345678:1@s.whatsapp.net", "5215512345678"));
        assert!(owns("541112345678:1@s.whatsapp.net", "5491112345678"));
        // Another Brazilian subscriber is still another account.
        assert!(!owns("551187654322:1@s.whatsapp.net", "5511987654321"));
    }
}

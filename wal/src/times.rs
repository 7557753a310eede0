//! Recovery target times as people paste them: RFC 3339 with any offset
//! (`2026-12-03T11:22:02Z`, `2026-12-03T16:52:02+05:30`) and PostgreSQL's own
//! `timestamptz` text (`2026-12-03 11:22:02.144437+00`, what `SELECT now()`
//! prints). A time without an offset is refused: which zone it meant is a guess.

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("target time `{0}` is not a time with an offset: use RFC 3339 (2026-12-03T11:22:02Z, 2026-12-03T16:52:02+05:30) or what PostgreSQL's `SELECT now()` prints (2026-12-03 11:22:02.144437+00)")]
pub struct BadTime(pub String);

/// A parsed recovery target, kept to the microsecond (PostgreSQL's precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetTime(DateTime<Utc>);

impl TargetTime {
    pub fn parse(text: &str) -> Result<Self, BadTime> {
        let normalized = normalize_offset(text.trim());
        DateTime::<FixedOffset>::parse_from_rfc3339(&normalized)
            .map(|t| TargetTime(t.with_timezone(&Utc)))
            .map_err(|_| BadTime(text.to_string()))
    }

    /// Seconds since the epoch, with the fraction.
    /// Microseconds since the epoch, exactly (the precision PostgreSQL keeps).
    pub fn unix_micros(&self) -> i64 {
        self.0.timestamp_micros()
    }

    pub fn unix_seconds(&self) -> f64 {
        self.0.timestamp_micros() as f64 / 1e6
    }

    /// The form `recovery_target_time` is written in: UTC, microseconds,
    /// PostgreSQL's own `+00` offset (it takes no `T` or `Z` either).
    pub fn to_postgres(&self) -> String {
        self.0.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
    }

    pub fn to_rfc3339(&self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

/// PostgreSQL prints whole-hour offsets as `+00`/`-05` and some people write
/// `+0530`; RFC 3339 wants `+HH:MM`.
fn normalize_offset(text: &str) -> String {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    let sign_at = |i: usize| matches!(bytes[i], b'+' | b'-');
    let n = bytes.len();
    // Only after the time of day (`...:SS[.ffffff]`), so a date's own `-` is never taken.
    if n > 11 && sign_at(n - 3) && digits(n - 2..n) && bytes[n - 4].is_ascii_digit() {
        return format!("{text}:00");
    }
    if n > 13 && sign_at(n - 5) && digits(n - 4..n) && bytes[n - 6].is_ascii_digit() {
        return format!("{}:{}", &text[..n - 2], &text[n - 2..]);
    }
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(text: &str) -> String {
        TargetTime::parse(text)
            .unwrap_or_else(|e| panic!("{e}"))
            .to_postgres()
    }

    #[test]
    fn what_select_now_prints_is_accepted_to_the_microsecond() {
        assert_eq!(
            pg("2026-12-03 11:22:02.144437+00"),
            "2026-12-03 11:22:02.144437+00"
        );
        assert_eq!(
            pg("2026-12-03 11:22:02+00"),
            "2026-12-03 11:22:02.000000+00"
        );
        assert_eq!(
            pg("2026-12-03 16:52:02.5+05:30"),
            "2026-12-03 11:22:02.500000+00"
        );
        assert_eq!(
            pg("2026-12-03 06:22:02-05"),
            "2026-12-03 11:22:02.000000+00"
        );
        assert_eq!(
            pg(" 2026-12-03 16:52:02+0530 "),
            "2026-12-03 11:22:02.000000+00"
        );
    }

    #[test]
    fn rfc3339_with_any_offset_is_accepted() {
        assert_eq!(pg("2026-12-03T11:22:02Z"), "2026-12-03 11:22:02.000000+00");
        assert_eq!(
            pg("2026-12-03t11:22:02.123z"),
            "2026-12-03 11:22:02.123000+00"
        );
        assert_eq!(
            pg("2026-12-04T01:22:02.000001+14:00"),
            "2026-12-03 11:22:02.000001+00"
        );
        assert_eq!(
            pg("2026-12-03T11:22:02-00:30"),
            "2026-12-03 11:52:02.000000+00"
        );
    }

    #[test]
    fn a_time_without_an_offset_or_garbage_is_refused_with_the_forms_named() {
        for text in [
            "2026-12-03 11:22:02",
            "2026-12-03T11:22:02",
            "2026-12-03",
            "yesterday",
            "2026-13-03 11:22:02+00",
            "",
        ] {
            let err = TargetTime::parse(text).expect_err(text);
            assert!(err.to_string().contains("SELECT now()"), "{err}");
        }
    }

    #[test]
    fn unix_seconds_keep_the_fraction() {
        let t = TargetTime::parse("1970-01-01 00:00:01.25+00").unwrap();
        assert_eq!(t.unix_seconds(), 1.25);
        assert_eq!(t.to_rfc3339(), "1970-01-01T00:00:01.250000Z");
    }
}

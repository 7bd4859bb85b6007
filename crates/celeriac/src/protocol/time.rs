//! Timestamps as Celery writes them: Python's `datetime.isoformat()` with a UTC offset.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Timelike, Utc};

/// Formats like Python's `isoformat()`: microseconds only when non-zero, `+00:00` offset.
pub fn to_iso(t: &DateTime<Utc>) -> String {
    let format = if t.nanosecond() / 1000 == 0 { SecondsFormat::Secs } else { SecondsFormat::Micros };
    t.to_rfc3339_opts(format, false)
}

/// Parses an ISO-8601 timestamp; a naive one is taken as UTC (as Celery does).
pub fn parse_iso(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isoformat_matches_python() {
        let t = parse_iso("2026-11-22T12:34:30.478038+00:00").unwrap();
        assert_eq!(to_iso(&t), "2026-11-22T12:34:30.478038+00:00");
        let whole = parse_iso("2026-11-22T12:34:30+00:00").unwrap();
        assert_eq!(to_iso(&whole), "2026-11-22T12:34:30+00:00");
        let naive = parse_iso("2026-11-22T12:34:30.5").unwrap();
        assert_eq!(to_iso(&naive), "2026-11-22T12:34:30.500000+00:00");
        let shifted = parse_iso("2026-11-22T14:34:30+02:00").unwrap();
        assert_eq!(to_iso(&shifted), "2026-11-22T12:34:30+00:00");
        assert!(parse_iso("yesterday").is_none());
    }
}

//! Operational records a broker keeps beside its queues, shared by every worker and CLI that
//! uses it: the persisted revoked set, the shared rate-limit buckets' arithmetic, and what a
//! dead letter records about its failure (with the filters `celeriac dlq` applies).
//!
//! Not here: where each transport stores them (`memory.rs`, `sqlite.rs`, `redis/`), and how the
//! worker applies them (`worker/revoke.rs`, `worker/shared_limit.rs`).

use super::DeadLetter;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// A revoked task id persisted in the broker, in force until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The task id.
    pub id: String,
    /// Whether a worker running it should stop it (`revoke --terminate`).
    pub terminate: bool,
    /// When the entry is pruned.
    pub expires_at: DateTime<Utc>,
}

/// What a dead letter records about why it is there (beside the original bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// Why, in a sentence (`failed after 2 retries: KeyError: 'x'`).
    pub reason: String,
    /// The exception type (`KeyError`, `Reject`, `NotRegistered`, `DecodeError`, ...).
    pub error_type: Option<String>,
    /// The traceback text, when the task produced one.
    pub traceback: Option<String>,
    /// How many times the task had been retried.
    pub retries: Option<u32>,
}

impl DeadLetterInfo {
    /// A record with `reason` and `error_type`.
    pub fn new(reason: impl Into<String>, error_type: impl Into<String>) -> Self {
        DeadLetterInfo { reason: reason.into(), error_type: Some(error_type.into()), ..Default::default() }
    }

    /// With the traceback text.
    pub fn traceback(mut self, traceback: Option<String>) -> Self {
        self.traceback = traceback;
        self
    }

    /// With the retry count.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }
}

/// Which dead letters `celeriac dlq list|replay|purge` acts on. Every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Task name, exactly.
    pub task: Option<String>,
    /// Error type, exactly (records from before error types were kept: the reason mentions it).
    pub error: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
}

impl DeadLetterFilter {
    /// Whether `d` passes.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let task = self.task.as_ref().is_none_or(|t| d.task_name.as_ref() == Some(t));
        let error = self.error.as_ref().is_none_or(|e| match &d.error_type {
            Some(have) => have == e,
            None => d.reason.contains(e.as_str()),
        });
        let since = self.since.is_none_or(|t| d.created_at >= t);
        let until = self.until.is_none_or(|t| d.created_at < t);
        task && error && since && until
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == DeadLetterFilter::default()
    }
}

/// A point in time as the CLI takes it: RFC 3339 (`2026-12-01T10:00:00Z`) or an age before
/// `now` (`90s`, `15m`, `1h`, `2d`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad =
        || format!("{text:?} is neither an RFC 3339 time (2026-12-01T10:00:00Z) nor an age such as 90s, 15m, 1h, 2d");
    let n: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(bad()),
    };
    let age =
        chrono::Duration::from_std(Duration::try_from_secs_f64(seconds).map_err(|_| bad())?).map_err(|_| bad())?;
    Ok(now - age)
}

/// The generic cell rate algorithm on one bucket, for transports that keep the bucket's
/// "theoretical arrival time" (`tat`, milliseconds) themselves (memory, SQL; Redis runs the
/// same arithmetic in Lua). Returns the new `tat` when a start is allowed now, or the wait
/// until one is.
///
/// With `burst` = 1 starts are spaced by `interval`; a larger burst lets `burst` starts
/// through at once after an idle spell, never more than `burst - 1 + window / interval` in any
/// window.
pub fn gcra(tat: Option<f64>, now: f64, interval: f64, burst: u32) -> Result<f64, Duration> {
    let tat = tat.unwrap_or(now).max(now);
    let allow_at = tat - f64::from(burst.max(1) - 1) * interval;
    if allow_at > now {
        return Err(Duration::from_secs_f64((allow_at - now) / 1000.0));
    }
    Ok(tat + interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_ages() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_time("1h", now).unwrap(), now - chrono::Duration::hours(1));
        assert_eq!(parse_time("90s", now).unwrap(), now - chrono::Duration::seconds(90));
        assert_eq!(parse_time("2d", now).unwrap(), now - chrono::Duration::days(2));
        assert_eq!(
            parse_time("2026-12-01T11:00:00+01:00", now).unwrap(),
            now - chrono::Duration::hours(2),
            "offsets are honoured"
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("5w", now).is_err());
    }

    #[test]
    fn gcra_spaces_starts_and_allows_the_burst() {
        // 5/s, no burst: one start, then the next 200 ms later.
        let tat = gcra(None, 1000.0, 200.0, 1).unwrap();
        assert_eq!(tat, 1200.0);
        assert_eq!(gcra(Some(tat), 1100.0, 200.0, 1), Err(Duration::from_millis(100)));
        assert_eq!(gcra(Some(tat), 1200.0, 200.0, 1), Ok(1400.0));
        // Burst 3: three at once, the fourth waits one interval.
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(gcra(tat, 0.0, 200.0, 3).unwrap());
        }
        assert_eq!(gcra(tat, 0.0, 200.0, 3), Err(Duration::from_millis(200)));
    }

    #[test]
    fn filters_match_every_set_field() {
        let at = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z").unwrap().with_timezone(&Utc);
        let d = DeadLetter {
            id: "1".into(),
            queue: "celery".into(),
            task_id: Some("t".into()),
            task_name: Some("billing.charge".into()),
            reason: "failed after 0 retries: KeyError: 'x'".into(),
            error_type: Some("KeyError".into()),
            traceback: None,
            retries: Some(0),
            replayed_as: None,
            payload: Vec::new(),
            created_at: at,
        };
        assert!(DeadLetterFilter::default().matches(&d));
        let f = |task: Option<&str>, error: Option<&str>| DeadLetterFilter {
            task: task.map(str::to_owned),
            error: error.map(str::to_owned),
            ..Default::default()
        };
        assert!(f(Some("billing.charge"), Some("KeyError")).matches(&d));
        assert!(!f(Some("billing"), None).matches(&d));
        assert!(!f(None, Some("ValueError")).matches(&d));
        let window = |since: i64, until: i64| DeadLetterFilter {
            since: Some(at + chrono::Duration::seconds(since)),
            until: Some(at + chrono::Duration::seconds(until)),
            ..Default::default()
        };
        assert!(window(0, 1).matches(&d));
        assert!(!window(1, 2).matches(&d));
        assert!(!window(-2, 0).matches(&d), "until is exclusive");
    }
}

//! Operational records a broker keeps beside its queues, shared by every worker and CLI that
//! uses it: the persisted revoked set, the shared rate-limit buckets' arithmetic (memory and
//! SQLite run [`attempt`]; Redis the same steps in Lua), and what a
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

/// One shared rate bucket as the transports keep it (times in milliseconds on one clock).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bucket {
    /// GCRA's theoretical arrival time: a start is allowed once `tat - (burst - 1) × interval`
    /// is reached.
    pub tat: f64,
    /// The end of the line: the turn the next waiter to join is given.
    pub ticket: f64,
}

/// What one attempt on a bucket came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attempt {
    /// A start was taken: run now (and leave the line, if in it).
    Granted,
    /// Not now: come back after the wait. `joined`: the waiter was put in line with this
    /// turn (it was not in line before).
    Wait {
        /// How long until the waiter's turn.
        wait: Duration,
        /// The turn given to a waiter that joined the line now.
        joined: Option<f64>,
    },
}

/// One attempt by `waiter` on a bucket: the generic cell rate algorithm with a line of
/// waiters, so that many messages that found no room do not all come back at once (and all but
/// one find no room again). `holder_turn`: the waiter's turn if it is in line; `others_due`:
/// whether another waiter's turn has come (a newcomer then queues behind it).
///
/// With `burst` = 1 starts are at least `interval` apart; a larger burst lets `burst` starts
/// through at once after an idle spell, never more than `burst - 1 + window / interval` in
/// any window.
pub fn attempt(
    bucket: &mut Bucket,
    now: f64,
    interval: f64,
    burst: u32,
    holder_turn: Option<f64>,
    others_due: bool,
) -> Attempt {
    let tat = bucket.tat.max(now);
    let allow_at = tat - f64::from(burst.max(1) - 1) * interval;
    let ms = |t: f64| Duration::from_secs_f64((t / 1000.0).max(0.001));
    if allow_at <= now && (holder_turn.is_some() || !others_due) {
        bucket.tat = tat + interval;
        return Attempt::Granted;
    }
    if holder_turn.is_some() {
        // In line and its turn has come, but the token is not free yet: keep the place.
        return Attempt::Wait { wait: ms(allow_at - now), joined: None };
    }
    let turn = bucket.ticket.max(allow_at).max(now);
    bucket.ticket = turn + interval;
    Attempt::Wait { wait: ms(turn - now), joined: Some(turn) }
}

/// Waiters whose turn passed this long ago (in intervals) are taken out of line: their message
/// was revoked, lost or served elsewhere.
pub const STALE_TURNS: f64 = 10.0;

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
    fn starts_are_spaced_and_waiters_queue_up() {
        let wait = |ms: f64, joined: Option<f64>| Attempt::Wait { wait: Duration::from_secs_f64(ms / 1000.0), joined };
        let mut b = Bucket::default();
        // 5/s, burst 1: one start, then a line, one turn per 200 ms.
        assert_eq!(attempt(&mut b, 1000.0, 200.0, 1, None, false), Attempt::Granted);
        assert_eq!(attempt(&mut b, 1000.0, 200.0, 1, None, false), wait(200.0, Some(1200.0)));
        assert_eq!(attempt(&mut b, 1010.0, 200.0, 1, None, false), wait(390.0, Some(1400.0)));
        // The first in line comes back a little early: it keeps its place.
        assert_eq!(attempt(&mut b, 1190.0, 200.0, 1, Some(1200.0), false), wait(10.0, None));
        // A newcomer does not take the token while a waiter's turn has come.
        assert_eq!(attempt(&mut b, 1200.0, 200.0, 1, None, true), wait(400.0, Some(1600.0)));
        assert_eq!(attempt(&mut b, 1200.0, 200.0, 1, Some(1200.0), true), Attempt::Granted);
        assert_eq!(b.tat, 1400.0);
        // Burst 3: three at once after an idle spell, the fourth waits one interval.
        let mut b = Bucket::default();
        for _ in 0..3 {
            assert_eq!(attempt(&mut b, 0.0, 200.0, 3, None, false), Attempt::Granted);
        }
        assert_eq!(attempt(&mut b, 0.0, 200.0, 3, None, false), wait(200.0, Some(200.0)));
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

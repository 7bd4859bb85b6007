//! When an entry is due: Celery's `crontab` (five fields, Celery's syntax), a fixed interval,
//! or one time. Only the arithmetic lives here (next tick after an instant, the ticks missed in
//! a window); who sends them and when is `leader.rs`.
//!
//! Crontab patterns are evaluated by `croner` in the entry's time zone, so daylight saving
//! time follows the Open Cron Pattern Specification: a fixed-time job (`30 2 * * *`) whose time
//! falls in a spring-forward gap runs once, at the first real instant after the gap; one whose
//! time occurs twice on a fall-back night runs once, at the first occurrence. Jobs with a
//! wildcard or stepped hour run on real elapsed time (an hourly job runs in both repeated hours).

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::fmt;
use std::time::Duration;

/// A schedule that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// A crontab field is not Celery's syntax or is out of range.
    #[error(
        "bad crontab {field} {value:?}: {problem} (Celery's syntax: `*`, `5`, `1-5`, `*/15`, `0-30/10`, lists `1,15`, names `mon-fri`, `jan`)"
    )]
    Field {
        /// `minute`, `hour`, `day_of_week`, `day_of_month`, `month_of_year` or `cron`.
        field: &'static str,
        /// The text given.
        value: String,
        /// What the cron parser said.
        problem: String,
    },
    /// An interval of zero or one a `Duration` cannot hold.
    #[error("bad interval {0:?}: expected a number of seconds above 0 (`every = 30`)")]
    Interval(String),
    /// A time zone name that is not in the IANA database.
    #[error("unknown time zone {0:?}: expected an IANA name such as \"Europe/Berlin\" or \"UTC\"")]
    TimeZone(String),
}

/// Celery's `crontab(minute, hour, day_of_week, day_of_month, month_of_year)`.
///
/// Day of week 0 (or `sun`) is Sunday, as in Celery. Unlike Vixie cron, a restricted day of
/// month *and* day of week must both match (Celery's rule).
#[derive(Clone)]
pub struct Crontab {
    fields: [String; 5],
    /// Boxed: croner's parsed pattern is a few hundred bytes.
    cron: std::sync::Arc<croner::Cron>,
}

impl fmt::Debug for Crontab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Crontab({self})")
    }
}

impl PartialEq for Crontab {
    fn eq(&self, other: &Self) -> bool {
        self.fields == other.fields
    }
}

impl fmt::Display for Crontab {
    /// Celery's repr order: `<crontab: minute hour day_of_week day_of_month month_of_year>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [m, h, dow, dom, moy] = &self.fields;
        write!(f, "crontab({m} {h} {dow} {dom} {moy})")
    }
}

/// `crontab(minute, hour, day_of_week, day_of_month, month_of_year)`: Celery's argument order.
pub fn crontab(
    minute: &str,
    hour: &str,
    day_of_week: &str,
    day_of_month: &str,
    month_of_year: &str,
) -> Result<Crontab, ScheduleError> {
    Crontab::new(minute, hour, day_of_week, day_of_month, month_of_year)
}

impl Crontab {
    /// See [`crontab`].
    pub fn new(
        minute: &str,
        hour: &str,
        day_of_week: &str,
        day_of_month: &str,
        month_of_year: &str,
    ) -> Result<Crontab, ScheduleError> {
        let named = [
            ("minute", minute, 0, 59),
            ("hour", hour, 0, 23),
            ("day_of_week", day_of_week, 0, 7),
            ("day_of_month", day_of_month, 1, 31),
            ("month_of_year", month_of_year, 1, 12),
        ];
        let mut fields: [String; 5] = Default::default();
        for (slot, (field, value, low, high)) in fields.iter_mut().zip(named) {
            *slot = check_field(field, value, low, high)?;
        }
        let [m, h, dow, dom, moy] = &fields;
        // croner's order is Unix cron's: minute hour day-of-month month day-of-week.
        let pattern = format!("{m} {h} {dom} {moy} {dow}");
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .dom_and_dow(true)
            .build()
            .parse(&pattern)
            .map_err(|e| ScheduleError::Field { field: "crontab", value: pattern.clone(), problem: e.to_string() })?;
        Ok(Crontab { fields, cron: std::sync::Arc::new(cron) })
    }

    /// A five-field Unix cron line, `minute hour day_of_month month day_of_week`
    /// (`"30 2 * * mon-fri"`).
    pub fn parse_unix(line: &str) -> Result<Crontab, ScheduleError> {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [m, h, dom, moy, dow] = parts.as_slice() else {
            return Err(ScheduleError::Field {
                field: "cron",
                value: line.to_owned(),
                problem: format!("expected 5 fields (minute hour day_of_month month day_of_week), got {}", parts.len()),
            });
        };
        Crontab::new(m, h, dow, dom, moy)
    }

    /// The fields as given, in Celery's order (minute, hour, day_of_week, day_of_month,
    /// month_of_year).
    pub fn fields(&self) -> &[String; 5] {
        &self.fields
    }

    fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&tz);
        self.cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The newest `max` ticks in `(after, until]` by walking forward only (croner's backward
    /// search can repeat an instant inside a fall-back overlap). The walk starts an hour before
    /// `until` and reaches back four times further each round until it has `max` ticks or
    /// reaches `after`, so a long outage costs a few rounds, not a walk over every tick.
    fn ticks_between(&self, after: DateTime<Utc>, until: DateTime<Utc>, tz: Tz, max: usize) -> Vec<DateTime<Utc>> {
        let mut span = chrono::Duration::hours(1);
        loop {
            let from = until.checked_sub_signed(span).map_or(after, |f| f.max(after));
            let mut ticks = std::collections::VecDeque::with_capacity(max + 1);
            let mut cursor = from;
            while let Some(next) = self.next_after(cursor, tz).filter(|n| *n <= until) {
                ticks.push_back(next);
                if ticks.len() > max {
                    ticks.pop_front();
                }
                cursor = next;
            }
            if ticks.len() >= max || from == after {
                return ticks.into();
            }
            span = span * 4;
        }
    }
}

/// Lower-cases, trims and checks one field: Celery's characters only (no Quartz `L`, `W`, `#`,
/// `?`), numbers in range.
fn check_field(field: &'static str, value: &str, low: u32, high: u32) -> Result<String, ScheduleError> {
    let text = value.trim().to_ascii_lowercase();
    let bad = |problem: String| ScheduleError::Field { field, value: value.to_owned(), problem };
    if text.is_empty() {
        return Err(bad("empty".to_owned()));
    }
    if let Some(c) = text.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '*' | ',' | '-' | '/'))) {
        return Err(bad(format!("unexpected character {c:?}")));
    }
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        if let Some(step) = step {
            match step.parse::<u32>() {
                Ok(n) if n >= 1 => {}
                _ => return Err(bad(format!("step {step:?} is not a whole number of 1 or more"))),
            }
        }
        if range == "*" {
            continue;
        }
        for end in range.split('-') {
            if end.is_empty() {
                return Err(bad(format!("incomplete range {range:?}")));
            }
            match end.parse::<u32>() {
                Ok(n) if n < low || n > high => return Err(bad(format!("{n} is outside {low}-{high}"))),
                Ok(_) => {}
                Err(_) if name_value(field, end).is_some() => {}
                Err(_) => return Err(bad(format!("{end:?} is not a number or a name"))),
            }
        }
    }
    Ok(text)
}

/// Day and month names Celery accepts.
fn name_value(field: &str, name: &str) -> Option<u32> {
    const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let list: &[&str] = match field {
        "day_of_week" => &DAYS,
        "month_of_year" => &MONTHS,
        _ => return None,
    };
    let offset = u32::from(field == "month_of_year");
    list.iter().position(|n| *n == name).map(|i| i as u32 + offset)
}

/// When an entry is due.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Schedule {
    /// Celery's `crontab`, evaluated in the entry's time zone.
    Crontab(Crontab),
    /// Every `every`, on multiples of it counted from the Unix epoch (so every beat instance
    /// computes the same ticks: `every = 60` fires on whole minutes).
    Every(Duration),
    /// Once, at this instant.
    At(DateTime<Utc>),
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Crontab(c) => c.fmt(f),
            Schedule::Every(d) => write!(f, "every {}s", d.as_secs_f64()),
            Schedule::At(t) => write!(f, "once at {}", t.to_rfc3339()),
        }
    }
}

impl From<Crontab> for Schedule {
    fn from(c: Crontab) -> Self {
        Schedule::Crontab(c)
    }
}

impl Schedule {
    /// Every `seconds` (fractions allowed, down to a millisecond).
    pub fn every_secs(seconds: f64) -> Result<Schedule, ScheduleError> {
        match Duration::try_from_secs_f64(seconds) {
            Ok(d) if d.as_millis() >= 1 => Ok(Schedule::Every(d)),
            _ => Err(ScheduleError::Interval(seconds.to_string())),
        }
    }

    /// The first tick strictly after `after`, `None` when there is none (a one-off in the past).
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Crontab(c) => c.next_after(after, tz),
            Schedule::Every(every) => {
                let step = every.as_millis().max(1) as i64;
                let ms = after.timestamp_millis();
                Utc.timestamp_millis_opt((ms.div_euclid(step) + 1) * step).single()
            }
            Schedule::At(at) => (*at > after).then_some(*at),
        }
    }

    /// The latest tick at or before `at` (a crontab looks back at most five years).
    pub fn latest_at_or_before(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let back = at.checked_sub_signed(chrono::Duration::days(5 * 366)).unwrap_or(DateTime::<Utc>::MIN_UTC);
        self.ticks_between(back, at, tz, 1).0.pop()
    }

    /// The ticks in `(after, until]`, oldest first, at most the `max` newest of them, and
    /// whether older ones were left out.
    pub fn ticks_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        tz: Tz,
        max: usize,
    ) -> (Vec<DateTime<Utc>>, bool) {
        if max == 0 || until <= after {
            return (Vec::new(), false);
        }
        let ticks = match self {
            Schedule::Crontab(c) => c.ticks_between(after, until, tz, max),
            Schedule::Every(every) => {
                let step = every.as_millis().max(1) as i64;
                let first = after.timestamp_millis().div_euclid(step) + 1;
                let last = until.timestamp_millis().div_euclid(step);
                let from = first.max(last.saturating_sub(max as i64 - 1));
                (from..=last).filter_map(|k| Utc.timestamp_millis_opt(k * step).single()).collect()
            }
            Schedule::At(t) => (*t > after && *t <= until).then_some(*t).into_iter().collect(),
        };
        let dropped = match (ticks.first(), self.next_after(after, tz)) {
            (Some(oldest), Some(first)) => first < *oldest,
            _ => false,
        };
        (ticks, dropped)
    }
}

/// Parses an IANA time zone name (`"Europe/Berlin"`, `"UTC"`).
pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    name.trim().parse::<Tz>().map_err(|_| ScheduleError::TimeZone(name.to_owned()))
}

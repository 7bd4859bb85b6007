//! A beat entry: which task to send, on what schedule, with which arguments and options, and
//! what to do with ticks missed while no beat ran. Built in code ([`Entry::new`]) or read from
//! the `[beat_schedule.<name>]` tables of the TOML config ([`entries_from_config`]).

use super::schedule::{Crontab, Schedule, ScheduleError, parse_tz};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The most ticks "run all" sends for one entry in one catch-up, unless told otherwise.
pub const DEFAULT_RUN_ALL_MAX: usize = 100;

/// What the leader does with ticks that passed while no leader was sending (downtime, a
/// takeover): the ticks in `(last sent, now]` other than one that is due right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Missed {
    /// Drop them; only a tick that is at most the beat's grace (5 s by default) late is sent.
    Skip,
    /// Send the latest of them once (Celery's behaviour after downtime). The default.
    #[default]
    RunOnce,
    /// Send each of them, oldest first, at most `max` (the newest `max`; older ones dropped).
    RunAll {
        /// Bound on how many one catch-up sends.
        max: usize,
    },
}

impl Missed {
    /// `skip`, `once` (or `run_once`), `all` (or `run_all`, bounded by `max`).
    pub fn parse(text: &str, max: Option<usize>) -> Option<Missed> {
        match text.trim().to_ascii_lowercase().replace(['-', ' '], "_").as_str() {
            "skip" => Some(Missed::Skip),
            "once" | "run_once" => Some(Missed::RunOnce),
            "all" | "run_all" => Some(Missed::RunAll { max: max.unwrap_or(DEFAULT_RUN_ALL_MAX).max(1) }),
            _ => None,
        }
    }
}

impl std::fmt::Display for Missed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missed::Skip => f.write_str("skip"),
            Missed::RunOnce => f.write_str("once"),
            Missed::RunAll { max } => write!(f, "all (max {max})"),
        }
    }
}

/// One scheduled task.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Unique name; the last sent tick is stored under it.
    pub name: String,
    /// Task name to send (need not be registered in this process).
    pub task: String,
    /// When.
    pub schedule: Schedule,
    /// Time zone for a crontab; `None` uses the app's `timezone` setting (UTC if unset).
    pub timezone: Option<Tz>,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Queue (default: routed as any `send_task`).
    pub queue: Option<String>,
    /// Other `apply_async` options by Celery's names (`priority`, `expires`, `headers`, ...).
    pub options: Map<String, Value>,
    /// A disabled entry is listed but never sent.
    pub enabled: bool,
    /// Missed-tick policy.
    pub missed: Missed,
}

impl Entry {
    /// An enabled entry with no arguments and the default missed-tick policy.
    pub fn new(name: impl Into<String>, task: impl Into<String>, schedule: impl Into<Schedule>) -> Entry {
        Entry {
            name: name.into(),
            task: task.into(),
            schedule: schedule.into(),
            timezone: None,
            args: Vec::new(),
            kwargs: Map::new(),
            queue: None,
            options: Map::new(),
            enabled: true,
            missed: Missed::default(),
        }
    }

    /// Positional arguments.
    pub fn args(mut self, args: Vec<Value>) -> Self {
        self.args = args;
        self
    }

    /// Keyword arguments.
    pub fn kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Queue to send to.
    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = Some(queue.to_owned());
        self
    }

    /// Any `apply_async` option (`priority`, `expires`, ...).
    pub fn option(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.options.insert(name.to_owned(), value.into());
        self
    }

    /// The time zone its crontab is evaluated in.
    pub fn timezone(mut self, tz: Tz) -> Self {
        self.timezone = Some(tz);
        self
    }

    /// Enables or disables it.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Missed-tick policy.
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// The zone in force: its own, else `default`.
    pub fn zone(&self, default: Tz) -> Tz {
        self.timezone.unwrap_or(default)
    }

    /// The next tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>, default_tz: Tz) -> Option<DateTime<Utc>> {
        self.schedule.next_after(after, self.zone(default_tz))
    }
}

/// A `[beat_schedule.<name>]` table that does not describe an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("beat_schedule.{entry}: {problem}")]
pub struct EntryError {
    /// The entry's name.
    pub entry: String,
    /// What is wrong and what would work.
    pub problem: String,
}

const KEYS: &[&str] = &[
    "args",
    "at",
    "cron",
    "day_of_month",
    "day_of_week",
    "enabled",
    "every",
    "hour",
    "kwargs",
    "minute",
    "missed",
    "missed_max",
    "month_of_year",
    "options",
    "queue",
    "task",
    "timezone",
];

/// Reads the entries of the `beat_schedule` setting (name → table), sorted by name.
///
/// ```toml
/// [beat_schedule.nightly-report]
/// task = "reports.nightly"
/// cron = "30 2 * * *"            # or minute/hour/day_of_week/day_of_month/month_of_year
/// timezone = "Europe/Berlin"
/// kwargs = { full = true }
/// queue = "reports"
/// missed = "once"                # skip | once | all (with missed_max, default 100)
///
/// [beat_schedule.heartbeat]
/// task = "ops.heartbeat"
/// every = 30                     # seconds
/// options = { priority = 9, expires = 25 }
/// ```
pub fn entries_from_config(table: &BTreeMap<String, toml::Value>) -> Result<Vec<Entry>, EntryError> {
    table.iter().map(|(name, value)| entry_from_toml(name, value)).collect()
}

fn entry_from_toml(name: &str, value: &toml::Value) -> Result<Entry, EntryError> {
    let bad = |problem: String| EntryError { entry: name.to_owned(), problem };
    let table = value.as_table().ok_or_else(|| bad(format!("got {value}, expected a table with task = \"...\"")))?;
    if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        let hint = crate::config::closest(key, KEYS.iter().copied())
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        return Err(bad(format!("unknown key `{key}`{hint}")));
    }
    let text = |key: &str| -> Result<Option<String>, EntryError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(toml::Value::Integer(i)) if key != "task" && key != "queue" => Ok(Some(i.to_string())),
            Some(v) => Err(bad(format!("{key}: got {v}, expected text"))),
        }
    };
    let task = text("task")?.ok_or_else(|| bad("missing `task` (the task name to send)".to_owned()))?;
    let cron_fields = ["minute", "hour", "day_of_week", "day_of_month", "month_of_year"];
    let has_fields = cron_fields.iter().any(|k| table.contains_key(*k));
    let kinds = [table.contains_key("cron") || has_fields, table.contains_key("every"), table.contains_key("at")];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(bad(
            "give exactly one schedule: cron = \"m h dom mon dow\" (or minute/hour/... fields), every = <seconds>, or at = <time>"
                .to_owned(),
        ));
    }
    let sched = |e: ScheduleError| bad(e.to_string());
    let schedule = if let Some(line) = text("cron")? {
        if has_fields {
            return Err(bad("give either `cron` or the minute/hour/... fields, not both".to_owned()));
        }
        Schedule::Crontab(Crontab::parse_unix(&line).map_err(sched)?)
    } else if has_fields {
        let mut f = Vec::new();
        for key in cron_fields {
            f.push(text(key)?.unwrap_or_else(|| "*".to_owned()));
        }
        Schedule::Crontab(Crontab::new(&f[0], &f[1], &f[2], &f[3], &f[4]).map_err(sched)?)
    } else if let Some(every) = table.get("every") {
        let secs = match every {
            toml::Value::Integer(i) => *i as f64,
            toml::Value::Float(x) => *x,
            toml::Value::String(text) => parse_every(text).ok_or_else(|| {
                bad(format!("every: got {text:?}, expected seconds or a duration such as \"30s\", \"5m\", \"1h\""))
            })?,
            v => return Err(bad(format!("every: got {v}, expected a number of seconds"))),
        };
        Schedule::every_secs(secs).map_err(sched)?
    } else {
        let at = match table.get("at") {
            Some(toml::Value::Datetime(d)) => d.to_string(),
            Some(toml::Value::String(s)) => s.clone(),
            v => return Err(bad(format!("at: got {v:?}, expected a time such as 2026-12-24T18:00:00Z"))),
        };
        let t = DateTime::parse_from_rfc3339(&at)
            .map_err(|e| bad(format!("at: {at:?} is not an RFC 3339 time with an offset ({e})")))?;
        Schedule::At(t.with_timezone(&Utc))
    };
    let mut entry = Entry::new(name, task, schedule);
    if let Some(tz) = text("timezone")? {
        entry.timezone = Some(parse_tz(&tz).map_err(sched)?);
    }
    let json = |key: &str| -> Result<Option<Value>, EntryError> {
        table
            .get(key)
            .map(|v| serde_json::to_value(v).map_err(|e| bad(format!("{key}: cannot be JSON ({e})"))))
            .transpose()
    };
    match json("args")? {
        Some(Value::Array(a)) => entry.args = a,
        Some(v) => return Err(bad(format!("args: got {v}, expected a list"))),
        None => {}
    }
    match json("kwargs")? {
        Some(Value::Object(m)) => entry.kwargs = m,
        Some(v) => return Err(bad(format!("kwargs: got {v}, expected a table"))),
        None => {}
    }
    match json("options")? {
        Some(Value::Object(m)) => entry.options = m,
        Some(v) => return Err(bad(format!("options: got {v}, expected a table"))),
        None => {}
    }
    entry.queue = text("queue")?;
    match table.get("enabled") {
        None => {}
        Some(toml::Value::Boolean(b)) => entry.enabled = *b,
        Some(v) => return Err(bad(format!("enabled: got {v}, expected true or false"))),
    }
    let max = match table.get("missed_max") {
        None => None,
        Some(toml::Value::Integer(n)) if *n >= 1 => Some(*n as usize),
        Some(v) => return Err(bad(format!("missed_max: got {v}, expected a whole number of 1 or more"))),
    };
    if let Some(policy) = text("missed")? {
        entry.missed = Missed::parse(&policy, max)
            .ok_or_else(|| bad(format!("missed: got {policy:?}, expected \"skip\", \"once\" or \"all\"")))?;
    }
    Ok(entry)
}

/// `"30s"`, `"30 s"`, `"5m"`, `"1.5h"`, `"2d"` or a bare number of seconds.
fn parse_every(text: &str) -> Option<f64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        _ => return None,
    };
    Some(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> BTreeMap<String, toml::Value> {
        let t: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        t.into_iter().collect()
    }

    #[test]
    fn reads_every_kind_of_entry() {
        let entries = entries_from_config(&table(
            r#"
            [heartbeat]
            task = "ops.heartbeat"
            every = 1.5
            options = { priority = 9 }
            missed = "all"
            missed_max = 7

            [report]
            task = "reports.nightly"
            cron = "30 2 * * mon-fri"
            timezone = "Europe/Berlin"
            args = [1, "x"]
            kwargs = { full = true }
            queue = "reports"
            enabled = false

            [slow]
            task = "s"
            every = "5m"

            [quarter]
            task = "q"
            minute = "*/15"
            day_of_month = "1"

            [once]
            task = "o"
            at = 2026-12-24T18:00:00Z
            missed = "skip"
            "#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n}"));
        let hb = by("heartbeat");
        assert_eq!(hb.schedule, Schedule::Every(std::time::Duration::from_millis(1500)));
        assert_eq!(hb.missed, Missed::RunAll { max: 7 });
        assert_eq!(hb.options.get("priority"), Some(&Value::from(9)));
        assert_eq!(by("slow").schedule, Schedule::Every(std::time::Duration::from_secs(300)));
        let r = by("report");
        assert_eq!(r.schedule, Schedule::Crontab(Crontab::new("30", "2", "mon-fri", "*", "*").unwrap()));
        assert_eq!(r.timezone, Some(chrono_tz::Europe::Berlin));
        assert_eq!(r.args, vec![Value::from(1), Value::from("x")]);
        assert_eq!(r.kwargs.get("full"), Some(&Value::Bool(true)));
        assert_eq!((r.queue.as_deref(), r.enabled, r.missed), (Some("reports"), false, Missed::RunOnce));
        assert_eq!(by("quarter").schedule, Schedule::Crontab(Crontab::new("*/15", "*", "*", "1", "*").unwrap()));
        let at = DateTime::parse_from_rfc3339("2026-12-24T18:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!((by("once").schedule.clone(), by("once").missed), (Schedule::At(at), Missed::Skip));
    }

    #[test]
    fn bad_entries_say_what_would_work() {
        let cases = [
            ("[a]\nevery = 3", "missing `task`"),
            ("[a]\ntask = \"t\"", "exactly one schedule"),
            ("[a]\ntask = \"t\"\nevery = 3\ncron = \"* * * * *\"", "exactly one schedule"),
            ("[a]\ntask = \"t\"\ncron = \"* * *\"", "expected 5 fields"),
            ("[a]\ntask = \"t\"\nminute = \"61\"", "61 is outside 0-59"),
            ("[a]\ntask = \"t\"\nday_of_week = \"funday\"", "not a number or a name"),
            ("[a]\ntask = \"t\"\nevery = 0", "bad interval"),
            ("[a]\ntask = \"t\"\nevery = \"5 fortnights\"", "such as \"30s\""),
            ("[a]\ntask = \"t\"\nevery = 3\ntimezone = \"Mars/Olympus\"", "unknown time zone"),
            ("[a]\ntask = \"t\"\nevery = 3\nmissed = \"twice\"", "expected \"skip\", \"once\" or \"all\""),
            ("[a]\ntask = \"t\"\nevery = 3\nqueu = \"x\"", "did you mean `queue`?"),
        ];
        for (text, needle) in cases {
            let err = entries_from_config(&table(text)).expect_err(text).to_string();
            assert!(err.starts_with("beat_schedule.a: ") && err.contains(needle), "{text}: {err}");
        }
    }
}
